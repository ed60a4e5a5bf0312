"""Which libsodium seals transport data (fzpoll/wireguard/sodium.py): known answers, the choice,
the fall-back from a library that miscomputes, and round trips through each library at hand."""

from __future__ import annotations

import dataclasses
import logging
import pytest
from nacl._sodium import lib

from fzpoll.wireguard import sodium
from fzpoll.wireguard.sodium import BUNDLED, PYNACL, SYSTEM, Backend, agrees, choose, pick
from helpers import TUN_A, TUN_B, Pair, ip4, ip6

SYSTEM_LIB = choose(SYSTEM)
# every distinct library this process can use: PyNaCl's, and the shared one if it is another
BACKENDS = [PYNACL] + ([SYSTEM_LIB] if SYSTEM_LIB.via == "dlopen" else [])
IDS = [f"{b.kind}-via-{b.via}" for b in BACKENDS]


def test_sodium_init_ran_on_pynacl_library() -> None:
    """Without it libsodium runs its portable code (2x slower per packet): 1 = already done."""
    assert lib.sodium_init() == 1


@pytest.mark.parametrize("backend", BACKENDS, ids=IDS)
def test_each_library_gives_the_known_answers(backend: Backend) -> None:
    assert agrees(backend, PYNACL)
    assert agrees(PYNACL, backend)


def test_a_shared_libsodium_is_found_where_the_machine_has_one() -> None:
    """Debian's libsodium23 comes with python3-nacl (tools/install-deps.sh): ``system`` is the
    shared library, loaded by us or already linked by PyNaCl's module."""
    assert SYSTEM_LIB.kind == SYSTEM and SYSTEM_LIB.library in sodium.SYSTEM_SONAMES
    assert SYSTEM_LIB.version.count(".") == 2  # sodium_version_string(), e.g. 1.0.18
    linked = sodium._already_loaded() is not None and SYSTEM_LIB.via == "pynacl"
    assert SYSTEM_LIB.via == "dlopen" or linked


def test_auto_and_bundled_are_pynacl_module() -> None:
    """PyNaCl's module: API mode costs less per call than dlopen's ABI mode, and runs the same
    vectorised code once initialised (the module docstring has the figures)."""
    for preference in (None, "auto", BUNDLED):
        backend = choose(preference)
        assert backend.via == "pynacl" and backend.seal is PYNACL.seal


def test_an_unknown_choice_is_auto_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fzpoll.wireguard.sodium"):
        assert choose("fastest") is choose("auto")
    assert "unknown choice" in caplog.text


def _corrupt(backend: Backend, *, seal: bool = False, forged_ok: bool = False) -> Backend:
    """``backend`` with a bit flipped in what it seals, or opening anything (a forged tag too)."""
    real_seal, real_open = backend.seal, backend.open

    def bad_seal(c, *args):
        rc = real_seal(c, *args)
        c[0] ^= 1
        return rc

    def lax_open(*args):
        real_open(*args)
        return 0

    return dataclasses.replace(backend, kind=SYSTEM, via="dlopen",
                               seal=bad_seal if seal else real_seal, open=lax_open if forged_ok else real_open)


@pytest.mark.parametrize("broken", ["seal", "forged_ok"])
def test_a_library_failing_the_known_answers_is_not_used(broken: str, caplog: pytest.LogCaptureFixture) -> None:
    candidate = _corrupt(SYSTEM_LIB, **{broken: True})
    assert not agrees(candidate, PYNACL)
    with caplog.at_level(logging.WARNING, logger="fzpoll.wireguard.sodium"):
        assert pick(SYSTEM, PYNACL, candidate, False) is PYNACL
    assert "fails the AEAD known answers" in caplog.text
    assert pick(SYSTEM, PYNACL, SYSTEM_LIB, False) is SYSTEM_LIB or SYSTEM_LIB.via == "pynacl"


def test_a_library_that_raises_fails_the_known_answers() -> None:
    def raises(*args):
        raise TypeError("wrong signature")

    assert not agrees(dataclasses.replace(SYSTEM_LIB, seal=raises), PYNACL)


def test_system_without_a_shared_library_falls_back_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fzpoll.wireguard.sodium"):
        assert pick(SYSTEM, PYNACL, None, False) is PYNACL
    assert "no shared libsodium" in caplog.text
    assert pick("auto", PYNACL, None, False) is PYNACL


def test_pynacl_linked_to_the_shared_library_is_called_through_its_module() -> None:
    shared = dataclasses.replace(PYNACL, kind=SYSTEM, via="dlopen", library="libsodium.so.23", version="1.0.18")
    for preference in ("auto", BUNDLED, SYSTEM):
        chosen = pick(preference, PYNACL, shared, True)
        assert (chosen.kind, chosen.via, chosen.library) == (SYSTEM, "pynacl", "libsodium.so.23")
        assert chosen.seal is PYNACL.seal


@pytest.mark.parametrize("a", BACKENDS, ids=IDS)
@pytest.mark.parametrize("b", BACKENDS, ids=IDS)
def test_transport_round_trips_through_each_library(a: Backend, b: Backend) -> None:
    pair = Pair(aead_a=a, aead_b=b)
    assert pair.a.aead is a and pair.b.aead is b
    packets = [ip4(TUN_A, TUN_B, bytes(range(256)) * n) for n in (0, 1, 5)] + [ip6("fd00::1", "fd00::2", b"x" * 1373)]
    for p in packets:
        assert pair.a.send(p, pair.now) is None
        pair.deliver()
    assert pair.tun(pair.b) == packets
    back = ip4(TUN_B, TUN_A, b"y" * 1399)
    assert pair.b.send(back, pair.now) is None
    pair.deliver()
    assert pair.tun(pair.a) == [back]
    assert not pair.a.drops and not pair.b.drops
