import base64
import io
import json
import logging
import re

import pytest

from fzpoll import jsonlog
from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
SECRET = PrivateKey(bytes(range(1, 33)))


@pytest.fixture
def out():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    jsonlog.setup_logging("info", stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # one object per line, like jq


def test_basic_line(out):
    logging.getLogger("fzpoll.test").info("hello %s", "world")
    [rec] = lines(out)
    assert rec["message"] == "hello world"
    assert rec["severity"] == "info"
    assert rec["logger"] == "fzpoll.test"
    assert TIME.fullmatch(rec["time"])


def test_severities_and_level(out):
    log = logging.getLogger("x")
    log.debug("hidden")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert [r["severity"] for r in lines(out)] == ["warning", "error", "critical"]


def test_fields_extra_and_log_event(out):
    log = logging.getLogger("x")
    log.info("peer up", extra={"fields": {"peer": "AOD66E7i", "port": 51820, "ok": True}})
    jsonlog.log_event(log, "warning", "dropped 100%", reason="bad_mac1", count=3, message="clash")
    first, second = lines(out)
    assert first["peer"] == "AOD66E7i" and first["port"] == 51820 and first["ok"] is True
    assert second["message"] == "dropped 100%"  # no %-formatting of the message
    assert second["severity"] == "warning"
    assert second["reason"] == "bad_mac1" and second["count"] == 3
    assert second["message_"] == "clash"  # reserved names are not overwritten


def test_non_serializable_values_are_strings(out):
    class Thing:
        def __str__(self):
            return "thing!"

    jsonlog.log_event(logging.getLogger("x"), "info", "m", obj=Thing(), nan=float("nan"), seq=(1, {2}))
    [rec] = lines(out)
    assert rec["obj"] == "thing!"
    assert rec["nan"] == "nan"
    assert rec["seq"] == [1, [2]]


def test_exception_becomes_error_field(out):
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("x").exception("failed")
    text = out.getvalue()
    assert text.count("\n") == 1
    [rec] = lines(out)
    assert rec["error"] == {"type": "ValueError", "message": "boom\nsecond line"}
    assert "traceback" not in rec


def test_traceback_at_debug():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        jsonlog.setup_logging("DEBUG", stream)
        jsonlog.setup_logging("debug", stream)  # idempotent: one handler, not two
        try:
            1 / 0
        except ZeroDivisionError as exc:
            jsonlog.log_event(logging.getLogger("x"), "debug", "oops", exc_info=exc)
        [rec] = lines(stream)
        assert rec["error"]["type"] == "ZeroDivisionError"
        assert "Traceback" in rec["traceback"]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_bad_level():
    with pytest.raises(LocalError):
        jsonlog.setup_logging("loud", io.StringIO())
    with pytest.raises(LocalError):
        jsonlog.log_event(logging.getLogger("x"), "loud", "m")


def test_key_objects_are_redacted(out):
    psk = PresharedKey(bytes(range(100, 132)))
    pub = SECRET.public_key
    log = logging.getLogger("x")
    jsonlog.log_event(log, "info", "keys", key=SECRET, psk=psk, pub=pub, nested={"k": [SECRET]})
    [rec] = lines(out)
    assert rec["key"] == "<PrivateKey (hidden)>"
    assert rec["psk"] == "<PresharedKey (hidden)>"
    assert rec["pub"] == repr(pub)
    assert rec["nested"] == {"k": ["<PrivateKey (hidden)>"]}


def test_any_key_shaped_text_never_appears(out):
    b64, hexa = SECRET.base64(), SECRET.hex()
    log = logging.getLogger("x")
    log.info("leak %s and %s", b64, hexa.upper())
    log.info("unpadded " + b64.rstrip("="), extra={"fields": {"v": f"pk={hexa}", b64: 1}})
    jsonlog.log_event(log, "info", "bytes", raw=SECRET.raw, nested=[{"x": b64}], text=str(SECRET.raw))
    try:
        raise RuntimeError(f"bad key {b64}")
    except RuntimeError:
        log.exception(f"exc {hexa}")
    urlsafe = base64.urlsafe_b64encode(SECRET.raw).decode()
    log.info(f"Endpoint = {urlsafe}:51820")  # pasted into the wrong field, URL-safe form
    text = out.getvalue()
    for form in (b64, b64.rstrip("="), hexa, hexa.upper(), urlsafe, urlsafe.rstrip("="), repr(SECRET.raw)[2:-1]):
        assert form not in text
    assert text.count("<redacted>") >= 9
    assert len(lines(out)) == 5


def test_public_keys_are_masked_too_and_logged_short(out):
    other = PublicKey(bytes(range(50, 82)))
    logging.getLogger("x").info("peer %s %r", other.base64(), other)
    [rec] = lines(out)
    assert rec["message"] == f"peer <redacted> <PublicKey {other.short()}>"


def test_redaction_cost_does_not_grow_with_the_number_of_keys(out):
    """No registry: the formatter holds no per-key state at all (10,000 keys logged)."""
    log = logging.getLogger("x")
    for i in range(1, 10_001):
        log.info("k %s", PrivateKey(i.to_bytes(32, "big")).base64())
    assert "<redacted>" in out.getvalue() and "=" not in "".join(r["message"] for r in lines(out))
    assert not any(isinstance(v, (set, dict)) and len(v) >= 10_000 for v in vars(jsonlog).values())


def test_zero_key_is_not_masked(out):
    logging.getLogger("x").info("psk " + "0" * 64)
    assert lines(out)[0]["message"] == "psk " + "0" * 64

def test_pyroute2_loggers_stay_at_warning_even_at_debug(monkeypatch) -> None:
    from fzpoll.cli import _setup_logging

    class Args:
        log_level = "debug"

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        monkeypatch.delenv("FZPOLL_PYROUTE2_DEBUG", raising=False)
        _setup_logging(Args())
        assert logging.getLogger("pyroute2.netlink").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("fzpoll.daemon").getEffectiveLevel() == logging.DEBUG
        monkeypatch.setenv("FZPOLL_PYROUTE2_DEBUG", "1")
        _setup_logging(Args())
        assert logging.getLogger("pyroute2.netlink").getEffectiveLevel() == logging.DEBUG
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("pyroute2").setLevel(logging.NOTSET)
