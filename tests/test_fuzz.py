"""Property-based fuzzing of everything that parses remote or local input.

- The engine fed arbitrary datagrams: structure-aware (a valid header and a random body for each
  message type, MAC1 recomputed so the message reaches the expensive checks, receiver indices that
  are live in the engine) and mutations of valid messages the engine has already processed. Every
  one must be dropped with a reason, counted once, and change no state; a sequence of them must
  leave the tunnel working.
- The UAPI: :class:`UapiConnection` fed arbitrary byte streams cut at arbitrary points (framing,
  chunking invariance, no internal error), :func:`handle_set` fed lines from the real vocabulary
  (never raises, only the documented errnos, ``get`` output round-trips through ``set``).
- The config parser: arbitrary and structure-aware text; a config that parses must apply through
  the UAPI without error, and errors never echo a key.
- The DNS stub (if ``fzpoll/dns.py`` has a ``StubResolver``): arbitrary queries and upstream
  answers; every query has exactly one outcome and every answer is well-formed.

Bounded for CI (small ``max_examples``, no deadline). Inputs that once found a problem are kept as
explicit ``@example`` cases.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import re
from ipaddress import ip_address

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from dnslib import QTYPE, DNSHeader, DNSQuestion, DNSRecord

from helpers import ADDR_A, ADDR_B, TUN_A, TUN_B, FakeHost, Pair, ip4
from fzpoll.config import ConfigError, parse_config
from fzpoll.dns.stub import Resource, StubResolver
from fzpoll.ippacket import build_udp, checksum_ok, parse_udp
from fzpoll.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEEPALIVE_SIZE,
    RESPONSE_SIZE,
)
from fzpoll.wireguard.crypto import mac
from fzpoll.wireguard.engine import Engine
from fzpoll.wireguard.keys import PrivateKey
from fzpoll.uapi.protocol import UapiConnection, handle_get, handle_set

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)
FEW = settings(FUZZ, max_examples=120)


# =============================================================================================
# The engine


class Fixture:
    """An established pair in which B has also processed a response (its own handshake) and a
    cookie reply (A under load), and has one initiation of its own in flight. ``seen`` holds
    every datagram B processed: replays of them, mutated or not, must all be dropped."""

    def __init__(self, seed: int = 1) -> None:
        p = self.p = Pair(seed)
        p.handshake()  # A initiates; B responds; A's first packet confirms B's keypair
        p.deliver()
        p.clock.now += 1.0
        p.peer_a.last_sent_handshake_at = float("-inf")
        p.b.initiate_handshake(p.peer_a, p.now)  # B initiates: B sees a response
        p.deliver()
        p.clock.now += 1.0
        p.a.assume_under_load(1e18)  # A answers B's next initiation with a cookie reply
        p.peer_a.last_sent_handshake_at = float("-inf")
        p.b.initiate_handshake(p.peer_a, p.now)
        p.deliver()
        p.a.assume_under_load(float("-inf"))
        assert p.peer_a.handshake_index is not None  # still in flight: a live handshake index
        self.seen = [data for direction, data in p.wire if direction == "a->b"]
        kinds = sorted({d[0] for d in self.seen})
        assert kinds == [1, 2, 3, 4], kinds
        self.mac1_key = p.peer_a.cookies.mac1_key  # what MAC1 to B is keyed with
        p.out(p.b).clear()
        p.tun(p.b).clear()
        self.drops_at_start = sum(p.b.drops.values())  # the set-up's own (the cookie reply's MAC2)

    def live_indices(self) -> dict[str, int]:
        peer = self.p.peer_a
        out = {"handshake": peer.handshake_index}
        for name in ("previous", "current", "next"):
            kp = getattr(peer, name)
            if kp is not None:
                out[name] = kp.local_index
        return out


def snapshot(engine: Engine):
    """Every piece of engine state a datagram could wrongly change (cf. tests/test_drops.py)."""
    peers = []
    for peer in engine.peers.values():
        kps = tuple(
            (kp.local_index, kp.remote_index, kp.send_counter, kp.replay.newest, tuple(kp.replay.blocks))
            if kp else None
            for kp in (peer.previous, peer.current, peer.next)
        )
        peers.append((
            peer.endpoint, kps, peer.last_timestamp, peer.last_initiation_at, peer.handshake_state,
            peer.handshake_index, peer.handshake_ephemeral, peer.rx_bytes, peer.tx_bytes,
            tuple(peer.staged), peer.retransmit_at, peer.keepalive_at, peer.new_handshake_at,
            peer.zero_keys_at, peer.persistent_at, peer.last_handshake_wall,
        ))
    # Then what the engine handed out since the last snapshot: after a drop, nothing.
    return (sorted(engine.live_indices()), peers), (engine.packets_for_tun(), engine.take_events())


_TYPES = {1: INITIATION_SIZE, 2: RESPONSE_SIZE, 3: COOKIE_REPLY_SIZE}
_INDEX_AT = {2: 8, 3: 4, 4: 4}  # where each type carries the receiver index


@st.composite
def structured_datagrams(draw):
    """A header of a real type and a random body: (kind, body, index choice, fix MAC1)."""
    kind = draw(st.sampled_from([1, 2, 3, 4]))
    if kind == 4:
        size = draw(st.one_of(st.integers(KEEPALIVE_SIZE, 200), st.integers(4, KEEPALIVE_SIZE - 1)))
    else:
        size = _TYPES[kind] + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
    body = draw(st.binary(min_size=size - 4, max_size=size - 4))
    index = draw(st.sampled_from(["random", "handshake", "current", "previous", "next"]))
    return kind, body, index, draw(st.booleans())


def build_structured(fx: Fixture, kind: int, body: bytes, index: str, fix_mac1: bool) -> bytes:
    data = bytearray(bytes([kind, 0, 0, 0]) + body)
    live = fx.live_indices().get(index)
    at = _INDEX_AT.get(kind)
    if live is not None and at is not None and len(data) >= at + 4:
        data[at:at + 4] = live.to_bytes(4, "little")
    if fix_mac1 and kind in (1, 2) and len(data) == _TYPES[kind]:
        n = len(data)
        data[n - 32:n - 16] = mac(fx.mac1_key, bytes(data[:n - 32]))
    return bytes(data)


@st.composite
def mutations(draw):
    """(which seen datagram, byte flips, truncation, appended bytes)."""
    which = draw(st.integers(0, 10_000))
    flips = draw(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
    cut = draw(st.one_of(st.none(), st.integers(0, 10_000)))
    extra = draw(st.binary(max_size=8))
    return which, flips, cut, extra


def build_mutated(fx: Fixture, which: int, flips, cut, extra) -> tuple[bytes, bytes]:
    original = fx.seen[which % len(fx.seen)]
    data = bytearray(original)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if cut is not None:
        del data[cut % (len(data) + 1):]
    data += extra
    return original, bytes(data)


def assert_dropped_cleanly(fx: Fixture, data: bytes, original: bytes | None = None,
                           under_load: bool = False) -> None:
    b = fx.p.b
    before, _ = snapshot(b)
    drops_before = sum(b.drops.values())
    reason = b.receive(data, ADDR_A, fx.p.now)
    if reason is None:
        # The only authentic datagram a mutation can make: a cookie reply re-addressed to another
        # live index of the same peer (the cookie is bound to the peer, not the index; as
        # wireguard-go). Nothing else may be accepted.
        assert original is not None and data[0] == 3 and len(data) == COOKIE_REPLY_SIZE
        assert data[1:4] == b"\0\0\0" and data[8:] == original[8:]
        assert sum(b.drops.values()) == drops_before
    else:
        assert sum(b.drops.values()) == drops_before + 1, "a drop not counted exactly once"
        assert b.drops[reason] >= 1
    assert snapshot(b) == (before, ([], [])), f"state changed by a dropped datagram ({reason})"
    if under_load and reason == "bad_mac2":
        (reply,) = fx.p.out(b)  # the cookie reply, and nothing else
        assert reply[0][0] == 3 and len(reply[0]) == COOKIE_REPLY_SIZE and reply[1] == ADDR_A
        fx.p.out(b).clear()
    assert fx.p.out(b) == []


@FUZZ
@given(structured_datagrams(), st.booleans())
@example((1, bytes(144), "random", True), False)  # zero (low-order) ephemeral, valid MAC1
@example((1, bytes(144), "random", True), True)  # the same under load: a cookie reply only
@example((2, bytes(88), "handshake", True), False)  # response to our live handshake, zero key
@example((3, bytes(60), "handshake", False), False)  # cookie reply to our live handshake
@example((4, bytes(28), "current", False), False)  # keepalive-sized, live index, bad tag
@example((4, b"\xff" * 12 + bytes(16), "current", False), False)  # counter beyond REJECT_AFTER
def test_structured_datagrams_are_dropped_counted_and_change_nothing(msg, under_load):
    fx = Fixture()
    if under_load:
        fx.p.b.assume_under_load(1e18)
    assert_dropped_cleanly(fx, build_structured(fx, *msg), under_load=under_load)


@FUZZ
@given(mutations())
@example((0, [(132, 1)], None, b""))  # the seen initiation with another MAC2: still a replay
@example((0, [], None, b""))  # the seen initiation as is: replayed
@example((1, [(8, 1)], None, b""))  # a seen transport packet with another counter
@example((0, [(0, 3)], None, b""))  # initiation retyped as a response (wrong length)
def test_mutated_valid_datagrams_are_dropped(mutation):
    fx = Fixture()
    original, data = build_mutated(fx, *mutation)
    if original[0] == 3:
        assume(data != original)  # a replayed cookie reply is accepted again (as wireguard-go)
    assert_dropped_cleanly(fx, data, original)


@FEW
@given(st.lists(
    st.one_of(
        structured_datagrams().map(lambda m: ("s", m)),
        mutations().map(lambda m: ("m", m)),
        st.binary(max_size=160).map(lambda b: ("r", b)),
    ),
    min_size=1, max_size=40,
))
def test_a_stream_of_bad_datagrams_leaves_the_tunnel_working(stream):
    fx = Fixture()
    p = fx.p
    before, _ = snapshot(p.b)
    fed = accepted = 0
    for tag, item in stream:
        if tag == "s":
            data = build_structured(fx, *item)
        elif tag == "m":
            original, data = build_mutated(fx, *item)
            if data == original and original[0] == 3:
                continue  # a replayed cookie reply is accepted again (as wireguard-go)
        else:
            data = item
        fed += 1
        accepted += p.b.receive(data, ADDR_A, p.now) is None
        # Under load (many MAC1-valid messages) B answers with cookie replies only.
        assert all(d[0] == 3 and len(d) == COOKIE_REPLY_SIZE for d, *_ in p.out(p.b))
        p.out(p.b).clear()
    assert snapshot(p.b) == (before, ([], []))
    assert sum(p.b.drops.values()) - fx.drops_at_start + accepted == fed  # every drop counted once
    # And the session still carries data both ways.
    p.a.send(ip4(TUN_A, TUN_B, b"after the storm"), p.now)
    for data, *_ in p.out(p.a):
        p.b.receive(data, ADDR_A, p.now)
    p.out(p.a).clear()
    assert p.tun(p.b) and p.tun(p.b)[-1].endswith(b"after the storm")
    p.b.send(ip4(TUN_B, TUN_A, b"and back"), p.now)
    assert len(p.out(p.b)) == 1
    assert p.a.receive(p.out(p.b)[0][0], ADDR_B, p.now) is None


# =============================================================================================
# The UAPI


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def internal_errors():
    """ERROR records of fzpoll's loggers while the block runs: the UAPI answers an internal
    exception with EIO and logs it, so "never raises" alone would hide a bug."""
    handler = _Collect()
    logger = logging.getLogger("fzpoll")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def fuzz_host(seed: int = 7) -> FakeHost:
    """A UapiHost without sockets where port 1 is taken."""
    return FakeHost(seed, wall=1_700_000_000.0, busy={1})

    @staticmethod
    def zone_exists(name: str) -> bool:
        return True  # every IPv6 endpoint zone names an interface of this imaginary host


_KEYS = [PrivateKey.generate(random.Random(i).randbytes) for i in range(3)]
_HEX = [k.hex() for k in _KEYS] + [k.public_key.hex() for k in _KEYS] + ["0" * 64, "AB" * 32]
_NUMBERS = ["0", "1", "25", "51820", "65535", "65536", "4294967295", "4294967296", "007", "-1",
            "+1", " 1", "1 ", "", "99999999999999999999999"]
_ENDPOINTS = ["192.0.2.1:51820", "[2001:db8::1]:51820", "[fe80::1%eth0]:1", "[::ffff:192.0.2.1]:7",
              "192.0.2.1", "2001:db8::1:51820", "[192.0.2.1]:1", "host.example:1", "1.2.3.4:65536",
              "01.2.3.4:1", "[::1]:0", ":1", "[]:1"]
_PREFIXES = ["10.0.0.0/8", "10.1.2.3/8", "0.0.0.0/0", "::/0", "fd00::1/128", "192.0.2.1/32",
             "192.0.2.1/33", "::ffff:1.2.3.4/128", "fe80::1%eth0/64", "10.0.0.1", "10.0.0.0/-1",
             "10.0.0.0/+8", "10.0.0.0/08", "1.2.3.4/ 8", "::/129"]
_VALUES = {
    "private_key": _HEX, "public_key": _HEX, "preshared_key": _HEX, "listen_port": _NUMBERS,
    "fwmark": _NUMBERS, "persistent_keepalive_interval": _NUMBERS, "endpoint": _ENDPOINTS,
    "allowed_ip": _PREFIXES, "replace_peers": ["true", "false"], "replace_allowed_ips": ["true", "1"],
    "update_only": ["true"], "remove": ["true", "false"], "protocol_version": ["1", "2", "0"],
}


@st.composite
def set_lines(draw):
    """A line of a set body: mostly real keys with plausible (good and bad) values."""
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.text(st.characters(min_codepoint=1, max_codepoint=0x7F, blacklist_characters="\n"),
                            max_size=30))
    key = draw(st.sampled_from(sorted(_VALUES) + ["public_key"] * 3 + ["allowed_ip"] * 2))
    if choice == 1:
        value = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
    else:
        value = draw(st.sampled_from(_VALUES[key]))
    return f"{key}={value}"


_ANSWER = re.compile(rb"(?:(?:[a-z_]+=[^\n]*\n)*errno=(?:0|-[1-9][0-9]*)\n\n)*")
_SETTABLE = ("private_key", "listen_port", "fwmark", "public_key", "preshared_key", "endpoint",
             "persistent_keepalive_interval", "allowed_ip")
_VOLATILE = ("tx_bytes", "rx_bytes", "last_handshake_time_sec", "last_handshake_time_nsec")


def _stable(get_answer: str) -> list[str]:
    return [line for line in get_answer.splitlines() if line.partition("=")[0] not in _VOLATILE]


@FUZZ
@given(st.lists(set_lines(), max_size=30))
@example(["private_key=" + _KEYS[0].hex(), "public_key=" + _KEYS[0].public_key.hex(),
          "allowed_ip=10.0.0.0/8"])  # a peer with our own key: ignored
@example(["public_key=" + _KEYS[1].public_key.hex(), "endpoint=[fe80::1%eth0]:1",
          "persistent_keepalive_interval=25", "private_key=" + _KEYS[0].hex()])
@example(["public_key=" + _KEYS[1].public_key.hex(), "allowed_ip=10.0.0.0/8",
          "public_key=" + _KEYS[2].public_key.hex(), "allowed_ip=10.0.0.0/8"])  # moves to peer 2
def test_handle_set_never_raises_and_get_round_trips(lines):
    host = fuzz_host()
    with internal_errors() as errors:
        code = handle_set(host, lines, 0.0)
    assert code in (0, errno.EINVAL, errno.EPROTO, errno.EADDRINUSE)
    assert not errors
    answer = handle_get(host)
    assert _ANSWER.fullmatch(answer.encode())
    # What get shows, set again on a fresh host, gives the same configuration.
    again = [line for line in answer.splitlines() if line.partition("=")[0] in _SETTABLE]
    fresh = fuzz_host(seed=8)
    assert handle_set(fresh, again, 0.0) == 0, again
    assert _stable(handle_get(fresh)) == _stable(answer)


@st.composite
def uapi_streams(draw):
    """Bytes a client might send: requests built from the vocabulary, junk, or both."""
    parts = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 5))
        if kind == 0:
            parts.append(b"get=1\n\n")
        elif kind in (1, 2):
            body = "\n".join(draw(st.lists(set_lines(), max_size=8)))
            parts.append(b"set=1\n" + body.encode() + (b"\n\n" if kind == 1 else b"\n"))
        elif kind == 3:
            parts.append(draw(st.binary(max_size=64)))
        elif kind == 4:
            parts.append(draw(st.sampled_from([b"get=1\nx", b"\r\n", b"set=1\r\n\r\n", b"get=2\n\n",
                                               b"get=fzpoll\n\n", b"\n", b"set=1\n" + b"a" * 5000])))
        else:
            parts.append(b"set=1\npublic_key=" + _HEX[3].encode() + b"\nendpoint=192.0.2.1:1\n\n")
    return b"".join(parts)


def _drive(stream: bytes, cuts: list[int]) -> tuple[bytes, str, bool]:
    """Feed ``stream`` cut at ``cuts``, then EOF, as UapiServer does; (answers, get, closed)."""
    host = fuzz_host()
    conn = UapiConnection(host, output_budget=512)  # small: exercises the pending path too
    out = bytearray()
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]
    for chunk in chunks + [b""]:
        out += conn.receive_data(chunk, 0.0)
        while conn.has_pending:
            out += conn.process(0.0)
        if conn.closing:
            break
    return bytes(out), handle_get(host), conn.closing


@FUZZ
@given(uapi_streams(), st.lists(st.integers(0, 10_000), max_size=6))
@example(b"get=1\n\n" * 200, [3, 70])  # pipelined gets beyond the output budget
@example(b"set=1\nprivate_key=" + _HEX[0].encode() + b"\n", [10])  # EOF inside a set: applied
@example(b"get=1\r\n\r\n", [])
def test_uapi_connection_frames_any_stream_the_same_however_it_is_cut(stream, cuts):
    with internal_errors() as errors:
        whole = _drive(stream, [])
        pieces = _drive(stream, cuts)
    assert not errors, "internal error in uapi"
    assert _ANSWER.fullmatch(whole[0]), whole[0][-200:]
    assert pieces == whole  # same answers, same resulting configuration, same close


@FEW
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=5))
def test_uapi_connection_survives_arbitrary_bytes(stream, cuts):
    with internal_errors() as errors:
        out, _, _ = _drive(stream, cuts)
    assert _ANSWER.fullmatch(out)
    assert not errors


# =============================================================================================
# The config parser

_SECRETS_B64 = [k.base64() for k in _KEYS]
_CONFIG_VALUES = {
    "PrivateKey": _SECRETS_B64 + [_KEYS[0].hex(), _SECRETS_B64[0][:-2], "x"],
    "PresharedKey": _SECRETS_B64[1:] + [_SECRETS_B64[2] + "A"],
    "PublicKey": [k.public_key.base64() for k in _KEYS] + ["AAAA"],
    "ListenPort": _NUMBERS,
    "FwMark": _NUMBERS + ["0x10", "off", "0x", "0x1_0", "0xffffffff", "0x100000000"],
    "MTU": ["1420", "575", "576", "65535", "65536", "1e3"],
    "Address": ["100.64.0.1/32", "fd00::1", "10.0.0.1/24, 10.0.0.2", "10.0.0.1/33", ","],
    "DNS": ["100.100.111.1", "corp.example", "1.1.1.1, example.com", "-bad-", "::1"],
    "Endpoint": _ENDPOINTS + ["vpn.example.com:51820", "[fe80::1%eth0]:51820", "a..b:1"],
    "AllowedIPs": _PREFIXES + ["0.0.0.0/0, ::/0", ""],
    "PersistentKeepalive": _NUMBERS + ["off"],
    "Name": ["*.example.com", "?.example.com", "app.example.com", "*.", "bad name"],
    "Peer": [k.public_key.base64() for k in _KEYS],
    "PostUp": ["iptables -A x"],
}
_SECTION_KEYS = {
    "Interface": ["PrivateKey", "ListenPort", "FwMark", "MTU", "Address", "DNS", "PostUp"],
    "Peer": ["PublicKey", "PresharedKey", "Endpoint", "AllowedIPs", "PersistentKeepalive"],
    "Resource": ["Name", "Peer", "Address"],
}


@st.composite
def config_texts(draw):
    lines = []
    sections = draw(st.lists(st.sampled_from(["Interface", "Peer", "Peer", "Resource"]),
                             min_size=1, max_size=5))
    if draw(st.booleans()):
        sections = ["Interface"] + [s for s in sections if s != "Interface"]
    for section in sections:
        lines.append(draw(st.sampled_from([f"[{section}]", f"[ {section.lower()} ]", f"[{section}"])))
        keys = _SECTION_KEYS[section]
        for key in draw(st.lists(st.sampled_from(keys), max_size=7)):
            value = draw(st.sampled_from(_CONFIG_VALUES.get(key, _CONFIG_VALUES["Address"])))
            sep = draw(st.sampled_from([" = ", "=", " =", "\t=\t"]))
            lines.append(f"{key}{sep}{value}" + draw(st.sampled_from(["", "  # comment", "\r"])))
        if draw(st.integers(0, 6)) == 0:
            lines.append(draw(st.text(max_size=30).filter(lambda t: "\n" not in t)))
    return "\n".join(lines) + "\n"


def _check_config(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.conf")
    except ConfigError as exc:
        message = str(exc)
        for secret in _SECRETS_B64 + [k.hex() for k in _KEYS]:
            for i in range(0, len(secret) - 16 + 1, 8):
                assert secret[i:i + 16] not in message, f"a private key leaked into {message!r}"
        return
    # A config the parser accepts must apply through the UAPI exactly as the daemon does it, on a
    # host where every port is free: a busy port is the host's failure, not the parser's.
    body = config.to_uapi_set().split("\n")
    assert body[0] == "set=1"
    host = FakeHost(wall=1_700_000_000.0)  # no port busy
    host.zone_exists = lambda name: True  # type: ignore[attr-defined]  # every zone is an interface here
    assert handle_set(host, body[1:], 0.0) == 0, body
    engine = host.engine
    assert engine.private_key == config.interface.private_key
    own = config.interface.private_key.public_key
    assert {p.public_key for p in config.peers if p.public_key != own} == \
        {p.public_key for p in engine.peers.values()}


@FUZZ
@given(config_texts())
@example("[Interface]\nPrivateKey = " + _SECRETS_B64[0] + "\n[Peer]\nPublicKey = "
         + _KEYS[1].public_key.base64() + "\nAllowedIPs = fe80::1%eth0/64\n")
@example("[Interface]\nPrivateKey = " + _SECRETS_B64[0] + "\n[Peer]\nPublicKey = "
         + _KEYS[1].public_key.base64() + "\nEndpoint = [fe80::1%eth0]:51820\n")
@example("[Interface]\n" + _SECRETS_B64[0] + "\n")  # a pasted key without "Key ="
@example("[Interface]\nPrivateKey = " + _SECRETS_B64[0] + "x\n")
@example("[Interface]\nPrivateKey = " + _SECRETS_B64[0] + "\nListenPort = 1\n")  # hypothesis 6.67 found it
def test_config_parser_structured(text):
    _check_config(text)


@FEW
@given(st.text(max_size=200))
@example("[Interface]\nPrivateKey\n")
@example("[\x00]\n")
def test_config_parser_arbitrary_text(text):
    _check_config(text)


# =============================================================================================
# The DNS stub

CLIENT = {4: ip_address("100.64.0.2"), 6: ip_address("fd00:2021:1111::2")}
UPSTREAMS = [("192.0.2.53", 53), ("2001:db8::53", 53)]
RESOURCES = [Resource("*.example.com", "p1"), Resource("app.corp.test", "p2"),
             Resource("?.one.test", "p3")]


def _stub():
    return StubResolver(list(UPSTREAMS), list(RESOURCES), rng=random.Random(3))


_NAMES = ["example.com", "a.b.example.com", "app.corp.test", "x.one.test", "y.x.one.test",
          "use-application-dns.net", "other.org", "1.0.96.100.in-addr.arpa", "", "a" * 63 + ".com"]


@st.composite
def dns_payloads(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=80))
    header = DNSHeader(id=draw(st.integers(0, 0xFFFF)), qr=draw(st.sampled_from([0, 0, 0, 1])),
                       opcode=draw(st.sampled_from([0, 0, 0, 1, 2, 5])), rd=1)
    questions = [
        DNSQuestion(draw(st.sampled_from(_NAMES)),
                    draw(st.sampled_from([QTYPE.A, QTYPE.AAAA, QTYPE.PTR, QTYPE.TXT, 65, 255, 0])),
                    draw(st.sampled_from([1, 1, 1, 3, 255, 254])))
        for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2])))
    ]
    data = DNSRecord(header, questions=questions).pack()
    if kind == 3:  # mutated
        buf = bytearray(data)
        for pos, xor in draw(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 255)), max_size=3)):
            buf[pos % len(buf)] ^= xor
        data = bytes(buf[: draw(st.integers(0, len(buf)))]) if draw(st.booleans()) else bytes(buf)
    return data


def _query_packet(stub, payload: bytes, version: int, port: int) -> bytes:
    sentinel = next(s for s in stub.sentinels if s.version == version)
    return build_udp(CLIENT[version], sentinel, port, 53, payload)


def _outcomes(stub) -> int:
    return len(stub.to_tun) + len(stub.udp_queries) + len(stub.tcp_queries) + sum(stub.drops.values())


def _check_replies(stub, version: int, port: int) -> None:
    for packet in stub.to_tun:
        assert checksum_ok(packet)
        udp = parse_udp(packet)
        assert udp is not None and udp.src_port == 53 and udp.dst_port == port
        assert udp.dst == CLIENT[version] and udp.src in stub.sentinels
        DNSRecord.parse(udp.payload)  # well-formed


@FUZZ
@given(dns_payloads(), st.sampled_from([4, 6]), st.integers(1, 0xFFFF))
@example(b"", 4, 1)
@example(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", 4, 5353)  # pointer loop
def test_dns_queries_have_exactly_one_outcome(payload, version, port):
    stub = _stub()
    assert stub.handle_packet(_query_packet(stub, payload, version, port), 0.0) is True
    assert _outcomes(stub) == 1, (stub.to_tun, stub.udp_queries, stub.drops)
    _check_replies(stub, version, port)


@FUZZ
@given(dns_payloads(), st.booleans(), st.booleans(), st.sampled_from([4, 6]))
@example(b"", False, True, 4)
def test_dns_upstream_answers_never_raise(answer, keep_id, right_source, version):
    stub = _stub()
    query = DNSRecord.question("www.other.org").pack()
    stub.handle_packet(_query_packet(stub, query, version, 4000), 0.0)
    (sent,) = stub.udp_queries
    stub.udp_queries.clear()
    if keep_id and len(answer) >= 2:
        answer = sent.data[:2] + answer[2:]
    source = sent.server if right_source else ("203.0.113.9", 53)
    before = _outcomes(stub) + sum(stub.stats.values())
    stub.handle_upstream_reply(answer, 1.0, source=source)
    assert _outcomes(stub) + sum(stub.stats.values()) > before  # every answer is accounted for
    if not stub.is_pending(sent.query_id):
        assert len(stub.to_tun) == 1 or stub.tcp_queries
    _check_replies(stub, version, 4000)
    stub.handle_timer(100.0)  # and the timer copes with whatever state is left
    assert stub.in_flight == 0
