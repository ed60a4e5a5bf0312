"""PreUp/PostUp/PreDown/PostDown hooks as wg-quick runs them: %i, order, bash, failures."""

from __future__ import annotations

import pytest

from fzpoll.up.hooks import HookError, run_hooks


def test_hooks_run_in_order_through_the_shell_with_the_interface_name(tmp_path):
    out = tmp_path / "out"
    run_hooks("PostUp", [f"echo one %i >> {out}", f"for x in a b; do echo $x-%i; done >> {out}"], "wg7")
    assert out.read_text() == "one wg7\na-wg7\nb-wg7\n"


def test_first_failure_stops_with_its_code_and_message(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HookError) as info:
        run_hooks("PreUp", [f"echo ran > {out}", "echo 'no route to %i' >&2; exit 9", f"rm {out}"], "wg7")
    assert info.value.code == 9 and info.value.phase == "PreUp"
    assert str(info.value) == "PreUp hook failed with exit code 9: echo 'no route to wg7' >&2; exit 9: no route to wg7"
    assert out.read_text() == "ran\n"  # the third never ran


def test_errexit_and_pipefail_as_wg_quick(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HookError) as info:
        run_hooks("PostDown", [f"false | cat; echo after > {out}"], "wg7")
    assert info.value.code == 1 and not out.exists()
    with pytest.raises(HookError):
        run_hooks("PostDown", [f"false; echo after > {out}"], "wg7")
    assert not out.exists()


def test_a_hook_killed_by_a_signal():
    with pytest.raises(HookError) as info:
        run_hooks("PostUp", ["kill -TERM $$"], "wg7")
    assert info.value.code == 128 + 15


def test_a_key_in_a_hook_is_masked_in_the_log(caplog):
    """A hook may carry a key (``wg set %i private-key <(echo KEY)``): anything key-shaped is
    masked in the log line that names the hook."""
    import base64
    import logging

    from fzpoll.jsonlog import JsonFormatter

    raw = bytes(range(100, 132))
    key = base64.b64encode(raw).decode()
    with caplog.at_level(logging.INFO, logger="fzpoll.up.hooks"):
        run_hooks("PostUp", [f"true {key}"], "wg7")
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert lines and all(key not in line for line in lines), lines
