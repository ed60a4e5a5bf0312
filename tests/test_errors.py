"""The error model: a closed set of drop reasons in four kinds, and one cheap aggregate per pass."""

from __future__ import annotations

from fzpoll.errors import DropKind, DropReason, TunnelError


def test_every_reason_has_the_kind_of_the_path_that_drops_it() -> None:
    assert {r.kind for r in DropReason} == set(DropKind)
    assert DropReason.BAD_TAG.kind is DropKind.INBOUND and DropReason.NO_PRIVATE_KEY.kind is DropKind.INBOUND
    assert DropReason.NO_ROUTE.kind is DropKind.OUTBOUND and DropReason.HANDSHAKE_GAVE_UP.kind is DropKind.OUTBOUND
    assert DropReason.BUFFER_FULL.kind is DropKind.IO and DropReason.WRITE_FAILED.kind is DropKind.IO
    assert DropReason.DNS_MALFORMED.kind is DropKind.DNS and DropReason.DNS_UNENCODABLE_REPLY.kind is DropKind.DNS
    assert all(r.value.startswith("dns_") == (r.kind is DropKind.DNS) for r in DropReason)


def test_a_clean_pass_has_no_error() -> None:
    assert TunnelError.from_batch({}, []) is None


def test_the_aggregate_counts_drops_without_an_object_per_drop() -> None:
    failure = ValueError("a bug on one packet")
    error = TunnelError.from_batch({DropReason.BAD_TAG: 100_000, DropReason.REPLAYED: 2}, [failure])
    assert error is not None
    assert error.exceptions == [failure]  # only the unexpected failures are objects
    assert error.counts() == {"bad_tag": 100_000, "replayed": 2, "ValueError": 1}
    assert error.total == 100_003 and str(error) == "100003 packet(s) failed in one pass"
