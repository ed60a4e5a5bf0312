"""A kernel prefilter for the UDP sockets: classic BPF that passes only what can be WireGuard.

Pure: this module builds the program (a list of ``(code, jt, jf, k)`` instructions, the layout of
``struct sock_filter``) and packs it; :mod:`fzpoll.io.sockfilter` attaches it to sockets.

Why: under a flood of junk every datagram that reaches Python costs ~3 us (recvfrom, the engine's
first-byte check, the drop count); a datagram the kernel rejects costs Python nothing, so one core
keeps its time for the tunnel. The kernel runs a socket filter in ``udp_queue_rcv_one_skb`` before
the datagram is queued, with offset 0 at the UDP header (the filter may not trim below it), so the
WireGuard message starts at offset 8 and ``len`` counts the 8-byte UDP header too. A rejected
datagram is counted in the socket's ``sk_drops`` (``SO_MEMINFO``, /proc/net/udp "drops") and in
the namespace's ``Udp: InErrors``, but not in ``RcvbufErrors``.

What passes (whitepaper section 5.4): the first byte is a message type 1-4 followed by three zero
bytes (the 32-bit big-endian word at offset 8 is ``type << 24``), and the length fits the type:
initiation 148, response 92, cookie reply 64, transport >= 32 with the payload after the 16-byte
header a multiple of 16 - or at least 32 + 68 bytes long, because padding is capped at the
sender's MTU (any value >= 68): with the default MTU 1420 a full-size transport datagram is 1452
bytes, and (1452 - 16) % 16 == 12.

UDP GRO: on a socket with ``UDP_GRO`` the kernel does not split a coalesced run (a GSO send from a
peer on this host, or a NIC/veth that aggregates) before the filter: the filter sees the run once,
with its total length and the first datagram's header. A run is equal-sized datagrams plus at most
one shorter last one, and fzpoll's own GSO sender (like GRO on a NIC) may close a run of transport
datagrams with a handshake message to the same address. A transport-led run is either all
multiples of 16 or over 100 bytes, so it passes; the ``gro`` program also passes a handshake-led
run: at least its first message plus a 32-byte one (any length: the last may be an MTU-capped
transport datagram).
Rejecting those would drop a whole run of good traffic.

Counter floors (against replays, see :class:`fzpoll.io.sockfilter.ReplayGuard`): a transport
datagram to an index with a floor passes only if its 64-bit little-endian counter (message bytes
8-15) is at least the floor. cBPF loads are big-endian, so the low 32 bits are assembled from
single bytes; a counter whose high 32 bits are not zero always passes (Python decides). On a GRO
socket the filter sees the first datagram's counter, the lowest of a run from the peer.
"""

from __future__ import annotations

import struct
from typing import Iterable, NamedTuple

from fzpoll.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEEPALIVE_SIZE,
    MESSAGE_HANDSHAKE_COOKIE,
    MESSAGE_HANDSHAKE_INITIATION,
    MESSAGE_HANDSHAKE_RESPONSE,
    MESSAGE_TRANSPORT_DATA,
    PADDING_MULTIPLE,
    RESPONSE_SIZE,
)

# linux/filter.h, linux/bpf_common.h: instruction classes, sizes, modes, operations, sources
BPF_LD, BPF_LDX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
BPF_ST = 0x02
BPF_W, BPF_B = 0x00, 0x10
BPF_IMM, BPF_ABS, BPF_MEM, BPF_LEN = 0x00, 0x20, 0x60, 0x80
BPF_SUB, BPF_OR, BPF_AND, BPF_LSH = 0x10, 0x40, 0x50, 0x60
BPF_JEQ, BPF_JGT, BPF_JGE = 0x10, 0x20, 0x30
BPF_K, BPF_X = 0x00, 0x08
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MAXINSNS = 4096
SKF_AD_OFF, SKF_AD_RANDOM = -0x1000, 56  # ancillary loads live at negative offsets
MAX_FILTER_INDICES = 200  # compared one after the other: bounds the filter's cost per datagram
COUNTER_SCRATCH = 0  # M[0]: the counter's low 32 bits (all ones if its high 32 bits are not 0)
MAX_COUNTER_FLOOR = 0xFFFFFFFF  # a floor the low word alone can express

UDP_HEADER = 8  # the filter's offset 0 is the UDP header
# Padding stops at the sender's MTU (whitepaper 5.4.6; wireguard-go and the kernel: padded size =
# min(MTU, next multiple of 16)), and a packet at or above the MTU is not padded: a transport
# datagram of 32 + MTU bytes or more may have any length. The peer's MTU is unknown; Linux allows
# no interface MTU below IPv4's minimum.
IPV4_MIN_MTU = 68
ACCEPT = 0xFFFFFFFF  # keep the whole datagram (the return value is how many bytes to keep)
REJECT = 0

SIZE_BY_TYPE = {MESSAGE_HANDSHAKE_INITIATION: INITIATION_SIZE, MESSAGE_HANDSHAKE_RESPONSE: RESPONSE_SIZE,
                MESSAGE_HANDSHAKE_COOKIE: COOKIE_REPLY_SIZE}


class Insn(NamedTuple):
    """One ``struct sock_filter``; jump targets are labels until :func:`assemble` resolves them."""

    code: int
    jt: int | str = 0
    jf: int | str = 0
    k: int = 0


class Label(NamedTuple):
    name: str


# the few instructions the WireGuard program needs
def ld_len() -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_LEN)


def ld_word(offset: int) -> Insn:
    return Insn(BPF_LD | BPF_W | BPF_ABS, k=offset)


def ld_byte(offset: int) -> Insn:
    return Insn(BPF_LD | BPF_B | BPF_ABS, k=offset)


def ld_imm(k: int) -> Insn:
    return Insn(BPF_LD | BPF_IMM, k=k)


def ld_mem(slot: int) -> Insn:
    return Insn(BPF_LD | BPF_MEM, k=slot)


def st(slot: int) -> Insn:
    return Insn(BPF_ST, k=slot)


def alu(op: int, k: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_K, k=k)


def alu_x(op: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_X)


def ld_random() -> Insn:
    """A = a random u32 (the kernel's SKF_AD_RANDOM ancillary load)."""
    return Insn(BPF_LD | BPF_W | BPF_ABS, k=SKF_AD_OFF + SKF_AD_RANDOM)


def tax() -> Insn:
    return Insn(BPF_MISC | BPF_TAX)


def txa() -> Insn:
    return Insn(BPF_MISC | BPF_TXA)


def jump(op: int, k: int, jt: int | str, jf: int | str) -> Insn:
    return Insn(BPF_JMP | op | BPF_K, jt, jf, k)


def ret(k: int) -> Insn:
    return Insn(BPF_RET | BPF_K, k=k)


def assemble(items: list[Insn | Label]) -> list[tuple[int, int, int, int]]:
    """Resolve label jumps (forward only, at most 255 instructions: cBPF's 8-bit offsets)."""
    where: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, Label):
            where[item.name] = len(insns)
        else:
            insns.append(item)
    out = []
    for pc, insn in enumerate(insns):
        targets = []
        for target in (insn.jt, insn.jf):
            if isinstance(target, str):
                target = where[target] - pc - 1
            if not 0 <= target <= 255:
                raise ValueError(f"jump out of range at {pc}: {insn}")
            targets.append(target)
        out.append((insn.code, targets[0], targets[1], insn.k & 0xFFFFFFFF))
    if not 0 < len(out) <= BPF_MAXINSNS:
        raise ValueError("program size")
    return out


def _header_word(kind: int) -> int:
    return kind << 24  # type byte, then three zero bytes, loaded big-endian


def _handshake(kind: int, size: int, gro: bool, keep: int | None) -> list[Insn | Label]:
    """A = payload length: exactly ``size``; with GRO also a run (>= size + a 32-byte message).
    With ``keep``, only a random ``keep`` in 65536 pass (shedding in the kernel, under load)."""
    items: list[Insn | Label] = [Label(f"type{kind}")]
    if keep is not None:
        items += [ld_random(), alu(BPF_AND, 0xFFFF), jump(BPF_JGE, keep, "reject", 0)]
    items += [txa(), jump(BPF_JEQ, size, "accept", "reject" if not gro else 0)]
    if gro:
        items.append(jump(BPF_JGE, size + KEEPALIVE_SIZE, "accept", "reject"))
    return items


def _transport(indices: list[int] | None, floors: dict[int, int]) -> list[Insn | Label]:
    """A = payload length: >= 32, and 0 modulo 16 unless it is long enough to be capped by the
    sender's MTU (a GRO run is either long enough or all 0 modulo 16). With ``indices``, the
    receiver index (u32 little-endian after the type) must also be one of them, and its counter
    at least its floor in ``floors`` (if any). Placed last, with its own returns: no jump in it
    reaches far, however many indices there are."""
    ok = "accept4" if indices is None else "index"
    items: list[Insn | Label] = [
        Label(f"type{MESSAGE_TRANSPORT_DATA}"), txa(), jump(BPF_JGE, KEEPALIVE_SIZE, 0, "reject4"),
        jump(BPF_JGE, KEEPALIVE_SIZE + IPV4_MIN_MTU, ok, 0),
        alu(BPF_AND, PADDING_MULTIPLE - 1), jump(BPF_JEQ, 0, ok, "reject4"),
        Label("reject4"), ret(REJECT),
    ]
    if indices is None:
        return [*items, Label("accept4"), ret(ACCEPT)]
    items.append(Label("index"))
    if floors:
        items += _load_counter()
    items.append(ld_word(UDP_HEADER + 4))
    for index in indices:
        items += _index_check(index, floors.get(index, 0))
    return [*items, ret(REJECT)]


def _load_counter() -> list[Insn | Label]:
    """M[COUNTER_SCRATCH] = the counter's low 32 bits (message bytes 8-11, little-endian), or all
    ones if its high 32 bits (bytes 12-15) are not zero: such a counter passes every floor."""
    low = UDP_HEADER + 8
    items: list[Insn | Label] = [ld_imm(MAX_COUNTER_FLOOR), st(COUNTER_SCRATCH),
                                 ld_word(low + 4), jump(BPF_JEQ, 0, 0, "counter")]
    items += [ld_byte(low + 3), alu(BPF_LSH, 24), tax()]
    for byte in (2, 1):
        items += [ld_byte(low + byte), alu(BPF_LSH, 8 * byte), alu_x(BPF_OR), tax()]
    items += [ld_byte(low), alu_x(BPF_OR), st(COUNTER_SCRATCH), Label("counter")]
    return items


def _index_check(index: int, floor: int) -> list[Insn]:
    """A = the receiver index word: accept if it is ``index`` (and the counter >= ``floor``),
    else fall through to the next check. Self-contained (its own returns)."""
    word = int.from_bytes(index.to_bytes(4, "little"), "big")
    if floor <= 0:
        return [jump(BPF_JEQ, word, 0, 1), ret(ACCEPT)]
    return [jump(BPF_JEQ, word, 0, 4), ld_mem(COUNTER_SCRATCH),
            jump(BPF_JGE, min(floor, MAX_COUNTER_FLOOR), 0, 1), ret(ACCEPT), ret(REJECT)]


def wireguard_filter(gro: bool = False, *, initiation_keep: int | None = None,
                     receiver_indices: Iterable[int] | None = None,
                     counter_floors: dict[int, int] | None = None) -> list[tuple[int, int, int, int]]:
    """The prefilter program; ``gro`` for a socket with UDP_GRO on (see the module docstring).

    ``initiation_keep``: pass only that many initiations in 65536, at random (under load).
    ``receiver_indices``: pass only transport datagrams addressed to one of these (at most
    MAX_FILTER_INDICES; None: any index). ``counter_floors``: for some of them, the lowest
    counter that passes (only with ``receiver_indices``; a floor <= 0 checks nothing).
    """
    indices = None if receiver_indices is None else sorted(receiver_indices)
    if indices is not None and len(indices) > MAX_FILTER_INDICES:
        raise ValueError("too many receiver indices for the filter")
    floors = {i: f for i, f in (counter_floors or {}).items() if f > 0}
    if floors and (indices is None or not floors.keys() <= set(indices)):
        raise ValueError("a counter floor for an index the filter does not check")
    kinds = [MESSAGE_TRANSPORT_DATA, *SIZE_BY_TYPE]  # transport first: the common case
    items: list[Insn | Label] = [
        ld_len(), jump(BPF_JGE, UDP_HEADER + 4, 0, "reject"),
        alu(BPF_SUB, UDP_HEADER), tax(),  # X = payload length
        ld_word(UDP_HEADER),
    ]
    items += [jump(BPF_JEQ, _header_word(kind), f"type{kind}", 0) for kind in kinds]
    items.append(ret(REJECT))
    for kind, size in SIZE_BY_TYPE.items():
        items += _handshake(kind, size, gro, initiation_keep if kind == MESSAGE_HANDSHAKE_INITIATION else None)
    items += [Label("accept"), ret(ACCEPT), Label("reject"), ret(REJECT)]
    items += _transport(indices, floors)
    return assemble(items)


def pack(program: list[tuple[int, int, int, int]]) -> bytes:
    """The program as an array of ``struct sock_filter`` (u16 code, u8 jt, u8 jf, u32 k)."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)
