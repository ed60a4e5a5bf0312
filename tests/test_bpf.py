"""The kernel prefilter: its program (run by a pure interpreter of the instructions it uses) passes
exactly the datagrams that can be WireGuard messages, and the real kernel agrees on loopback,
including a GSO run that reaches a GRO socket in one piece."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from fzpoll.io import bpf, sockfilter
from fzpoll.io.bpf import BPF_ALU, BPF_JMP, BPF_LD, BPF_MISC, BPF_RET, UDP_HEADER

MAX_LEN = 1500


def run(program: list[tuple[int, int, int, int]], packet: bytes, rand: int = 0) -> int:
    """A cBPF interpreter for the instructions bpf.py emits (anything else is an error);
    ``rand`` is what the kernel's random ancillary load returns."""
    a = x = pc = 0
    mem = [0] * 16
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if code == BPF_LD | bpf.BPF_W | bpf.BPF_LEN:
            a = len(packet)
        elif code == BPF_LD | bpf.BPF_W | bpf.BPF_ABS and k == (bpf.SKF_AD_OFF + bpf.SKF_AD_RANDOM) & 0xFFFFFFFF:
            a = rand
        elif code in (BPF_LD | bpf.BPF_W | bpf.BPF_ABS, BPF_LD | bpf.BPF_B | bpf.BPF_ABS):
            size = 4 if code & 0x18 == bpf.BPF_W else 1
            if k + size > len(packet):
                return 0  # the kernel aborts the program on an out-of-bounds load
            a = int.from_bytes(packet[k:k + size], "big")
        elif code == BPF_LD | bpf.BPF_IMM:
            a = k
        elif code == BPF_LD | bpf.BPF_MEM:
            a = mem[k]
        elif code == bpf.BPF_ST:
            mem[k] = a
        elif cls == BPF_ALU:
            operand = x if code & bpf.BPF_X else k
            a = {bpf.BPF_SUB: lambda: a - operand, bpf.BPF_AND: lambda: a & operand,
                 bpf.BPF_OR: lambda: a | operand, bpf.BPF_LSH: lambda: a << operand}[code & 0xF0]() & 0xFFFFFFFF
        elif code == BPF_MISC | bpf.BPF_TAX:
            x = a
        elif code == BPF_MISC | bpf.BPF_TXA:
            a = x
        elif cls == BPF_JMP and not code & bpf.BPF_X:
            taken = {bpf.BPF_JEQ: a == k, bpf.BPF_JGT: a > k, bpf.BPF_JGE: a >= k}[code & 0xF0]
            pc += jt if taken else jf
        elif cls == BPF_RET:
            return k
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


SIZES = {1: 148, 2: 92, 3: 64}


def is_wireguard(kind: int, n: int) -> bool:
    """The specification, written independently of the program: one WireGuard message."""
    if kind in SIZES:
        return n == SIZES[kind]
    return kind == 4 and n >= 32 and ((n - 16) % 16 == 0 or n >= 32 + 68)  # 68: the smallest MTU


def run_shape(kind: int, n: int) -> bool:
    """Or what the GRO program promises to pass besides: a length a coalesced run led by a
    ``kind`` handshake message can have (the message, then at least a 32-byte one)."""
    return is_wireguard(kind, n) or (kind in SIZES and n >= SIZES[kind] + 32)


def real_runs() -> set[tuple[int, int]]:
    """Every (first type, length) of a run up to MAX_LEN: equal datagrams, then at most one
    shorter (or equal) last datagram of any type."""
    sizes = {**{kind: [size] for kind, size in SIZES.items()}, 4: [n for n in range(32, MAX_LEN + 1) if is_wireguard(4, n)]}
    every = [size for group in sizes.values() for size in group]
    runs = set()
    for kind, firsts in sizes.items():
        for first in firsts:
            for count in range(1, MAX_LEN // first + 1):
                runs.add((kind, first * count))
                runs.update((kind, first * count + last) for last in every
                            if last <= first and first * count + last <= MAX_LEN)
    return runs


def udp(payload: bytes) -> bytes:
    return b"\x00" * UDP_HEADER + payload  # what the socket filter sees: the UDP header first


@pytest.mark.parametrize("gro", [False, True])
def test_every_first_byte_and_length(gro: bool) -> None:
    program = bpf.wireguard_filter(gro)
    want = run_shape if gro else is_wireguard
    wrong = []
    for kind in range(256):
        for n in range(MAX_LEN + 1):
            payload = (bytes([kind]) + b"\x00\x00\x00" + b"\xa5" * max(0, n - 4))[:n]
            if bool(run(program, udp(payload))) != (n >= 4 and want(kind, n)):
                wrong.append((kind, n))
    assert not wrong, wrong[:20]


def test_gro_program_passes_every_real_run() -> None:
    program = bpf.wireguard_filter(gro=True)
    dropped = [(kind, n) for kind, n in sorted(real_runs())
               if not run(program, udp(bytes([kind]) + bytes(n - 1)))]
    assert not dropped, dropped[:20]


def transport(index: int, n: int = 48) -> bytes:
    return b"\x04\x00\x00\x00" + index.to_bytes(4, "little") + bytes(n - 8)


def test_receiver_indices() -> None:
    live = [7, 0xDEADBEEF, 1 << 31]
    for gro in (False, True):
        program = bpf.wireguard_filter(gro, receiver_indices=live)
        for index in live:
            assert run(program, udp(transport(index))) == bpf.ACCEPT
            assert run(program, udp(transport(index, 1452))) == bpf.ACCEPT
            assert run(program, udp(transport(index, 40))) == 0  # the length is still checked
        for index in (0, 8, 0xEFBEADDE, (1 << 31) + 1):
            assert run(program, udp(transport(index))) == 0
        assert run(program, udp(b"\x01\x00\x00\x00" + bytes(144))) == bpf.ACCEPT  # not transport
    assert run(bpf.wireguard_filter(receiver_indices=[]), udp(transport(7))) == 0  # no session
    with pytest.raises(ValueError):
        bpf.wireguard_filter(receiver_indices=range(bpf.MAX_FILTER_INDICES + 1))


def counted(index: int, counter: int, n: int = 48) -> bytes:
    """A transport message to ``index`` with ``counter`` (64-bit little-endian, bytes 8-15)."""
    return transport(index, n)[:8] + counter.to_bytes(8, "little") + bytes(n - 16)


def engine_may_accept(counter: int, floor: int) -> bool:
    """What a floor promises, written apart from the program: below it, dropped; a counter of
    2^32 or more is left to Python (the filter compares the low word only)."""
    return counter >= floor or counter >> 32 != 0


def test_counter_floors_below_at_above() -> None:
    floors = {7: 1000, 0xDEADBEEF: 0x01020304, 1 << 31: 0xFFFFFFFF, 42: 0}
    live = [*floors, 9]  # 9: a live index without a floor (a handshake's)
    counters = [0, 1, 255, 256, 65535, 65536, 0xFFFFFF, 0x1000000, 0x7FFFFFFF, 0x80000000,
                0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, (1 << 32) + 5, 1 << 40, (1 << 64) - 1]
    wrong = []
    for gro in (False, True):
        program = bpf.wireguard_filter(gro, receiver_indices=live, counter_floors=floors)
        for index in live:
            floor = floors.get(index, 0)
            near = [floor + d for d in (-257, -256, -255, -2, -1, 0, 1, 255, 256) if floor + d >= 0]
            for counter in sorted({*counters, *near}):
                for n in (32, 48, 1452):
                    got = run(program, udp(counted(index, counter, n))) == bpf.ACCEPT
                    if got != engine_may_accept(counter, floor):
                        wrong.append((gro, hex(index), hex(counter), n))
            assert run(program, udp(counted(index, 1 << 20, 40))) == 0  # the length is still checked
        for index in (0, 8, 43, 0xEFBEADDE):  # unknown indices stay out, whatever the counter
            assert run(program, udp(counted(index, 1 << 33))) == 0
            assert run(program, udp(counted(index, 5000))) == 0
        assert run(program, udp(b"\x01\x00\x00\x00" + bytes(144))) == bpf.ACCEPT  # not transport
    assert not wrong, wrong[:20]


def test_counter_floor_on_every_index_of_a_full_filter() -> None:
    """MAX_FILTER_INDICES indices, each with its own floor: each sees only its own."""
    live = [0x9E3779B9 * (i + 1) & 0xFFFFFFFF for i in range(bpf.MAX_FILTER_INDICES)]
    floors = {index: 1000 + 3 * i for i, index in enumerate(live)}
    program = bpf.wireguard_filter(True, receiver_indices=live, counter_floors=floors)
    assert len(program) <= bpf.BPF_MAXINSNS
    for index, floor in floors.items():
        assert run(program, udp(counted(index, floor))) == bpf.ACCEPT
        assert run(program, udp(counted(index, floor - 1))) == 0
        assert run(program, udp(counted(index, floor - 1 + (1 << 32)))) == bpf.ACCEPT


def test_counter_floors_need_their_index_checked() -> None:
    with pytest.raises(ValueError):
        bpf.wireguard_filter(counter_floors={7: 10})
    with pytest.raises(ValueError):
        bpf.wireguard_filter(receiver_indices=[8], counter_floors={7: 10})
    no_floor = bpf.wireguard_filter(receiver_indices=[7])
    assert bpf.wireguard_filter(receiver_indices=[7], counter_floors={7: 0}) == no_floor


def test_initiations_shed_at_random_under_load() -> None:
    program = bpf.wireguard_filter(True, initiation_keep=4096)
    initiation = udp(b"\x01\x00\x00\x00" + bytes(144))
    assert run(program, initiation, rand=0x12340FFF) == bpf.ACCEPT  # low 16 bits 4095 < 4096
    assert run(program, initiation, rand=0x00001000) == 0
    assert run(program, udp(b"\x01\x00\x00\x00" + bytes(140)), rand=0) == 0  # length still checked
    for rand in (0, 0xFFFF):  # the other types are not shed
        assert run(program, udp(transport(1))) == bpf.ACCEPT
        assert run(program, udp(b"\x02\x00\x00\x00" + bytes(88)), rand=rand) == bpf.ACCEPT


def test_reserved_bytes_must_be_zero() -> None:
    for gro in (False, True):
        program = bpf.wireguard_filter(gro)
        for reserved in (b"\x01\x00\x00", b"\x00\x80\x00", b"\x00\x00\xff"):
            for kind, n in ((1, 148), (2, 92), (3, 64), (4, 32), (4, 1440)):
                assert run(program, udp(bytes([kind]) + reserved + bytes(n - 4))) == 0
        assert run(program, udp(b"\x04\x00\x00\x00" + bytes(28))) == bpf.ACCEPT


def test_assembler_rejects_backward_and_far_jumps() -> None:
    with pytest.raises(ValueError):
        bpf.assemble([bpf.Label("top"), bpf.jump(bpf.BPF_JEQ, 0, "top", 0), bpf.ret(0)])
    with pytest.raises(ValueError):
        bpf.assemble([bpf.jump(bpf.BPF_JEQ, 0, "end", 0), *[bpf.ret(0)] * 300, bpf.Label("end"), bpf.ret(1)])


# ---------------------------------------------------------------------------------------------
# The real kernel, on loopback


def _receiver(gro: bool, program_gro: bool) -> tuple[socket.socket, socket.socket]:
    r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    r.bind(("127.0.0.1", 0))
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    r.setblocking(False)
    if gro:
        r.setsockopt(17, 104, 1)  # UDP_GRO
    sockfilter.attach(r, bpf.wireguard_filter(program_gro))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(r.getsockname())
    return r, s


def _drain(r: socket.socket, expect: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            got.append(r.recv(65535))
        except BlockingIOError:
            if len(got) >= expect:
                time.sleep(0.05)  # anything unexpected still in flight
                try:
                    got.append(r.recv(65535))
                except BlockingIOError:
                    return got
            else:
                time.sleep(0.01)
    return got


def test_kernel_agrees_on_a_representative_subset() -> None:
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        cases = [(kind, n) for kind in (0, 1, 2, 3, 4, 5, 0x41, 0xFF)
                 for n in (4, 11, 12, 31, 32, 33, 47, 48, 63, 64, 65, 91, 92, 93, 96, 147, 148, 149, 180, 1440)]
        expected = []
        for i, (kind, n) in enumerate(cases):
            payload = bytes([kind]) + b"\x00\x00\x00" + i.to_bytes(2, "big") + b"\x5a" * (n - 6)
            s.send(payload)
            if is_wireguard(kind, n):
                expected.append(payload)
        s.send(b"\x04\x00\x01\x00" + bytes(28))  # a reserved byte set
        s.send(b"")  # an empty datagram
        got = _drain(r, len(expected))
        assert sorted(got) == sorted(expected)
        assert sockfilter.kernel_drops(r) == len(cases) + 2 - len(expected)


TRANSPORT_160 = b"\x04\x00\x00\x00" + bytes(156)
INITIATION = b"\x01\x00\x00\x00" + bytes(144)
KEEPALIVE = b"\x04\x00\x00\x00" + bytes(28)
RUNS = {  # GSO sends: equal segments, the last may be shorter
    "transport, closed by an initiation": (TRANSPORT_160 * 3 + INITIATION, 160),
    "initiations, closed by a keepalive": (INITIATION * 2 + KEEPALIVE, 148),
}


def _send_run(s: socket.socket, name: str) -> bytes:
    data, segment = RUNS[name]
    try:
        s.sendmsg([data], [(17, 103, struct.pack("=H", segment))])  # UDP_SEGMENT
    except OSError as exc:
        pytest.skip(f"no UDP GSO here: {exc}")
    return data


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("gro", [False, True])
def test_gso_run_survives(gro: bool, name: str) -> None:
    """fzpoll's GSO sender may end a run with a datagram of another type to the same address. A
    GRO socket receives the run whole and the filter sees its total length: the GRO program
    passes it. Without GRO the kernel splits the run before the filter."""
    r, s = _receiver(gro=gro, program_gro=gro)
    with r, s:
        data = _send_run(s, name)
        segment = RUNS[name][1]
        got = _drain(r, 1 if gro else -(-len(data) // segment))
        assert b"".join(got) == data
        assert sockfilter.kernel_drops(r) == 0


def test_exact_program_on_a_gro_socket_would_drop_a_run() -> None:
    """Why the GRO form exists: the exact program rejects a coalesced run as one datagram."""
    r, s = _receiver(gro=True, program_gro=False)
    with r, s:
        _send_run(s, "initiations, closed by a keepalive")
        assert _drain(r, 0) == []
        assert sockfilter.kernel_drops(r) == 1


def test_kernel_index_check_and_random_shedding() -> None:
    """The real kernel runs the index check and the random load (SKF_AD_RANDOM) as we do."""
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        initiation = b"\x01\x00\x00\x00" + bytes(144)
        sockfilter.attach(r, bpf.wireguard_filter(receiver_indices=[7, 1 << 31], initiation_keep=0))
        for datagram in (transport(7), transport(8), transport(1 << 31), initiation):
            s.send(datagram)
        assert sorted(_drain(r, 2)) == sorted([transport(7), transport(1 << 31)])
        sockfilter.attach(r, bpf.wireguard_filter(initiation_keep=65536))
        s.send(initiation)
        assert _drain(r, 1) == [initiation]


def test_kernel_agrees_on_counter_floors() -> None:
    """The real kernel assembles the little-endian counter and compares it as the oracle does."""
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        floors = {7: 0x01020304, 9: 5}
        sockfilter.attach(r, bpf.wireguard_filter(receiver_indices=[7, 9, 11], counter_floors=floors))
        cases = [(index, counter) for index in (7, 9, 11, 12)
                 for counter in (0, 4, 5, 6, 0x01020303, 0x01020304, 0x01020305, 0x04030201, 0xFFFFFFFF,
                                 1 << 32, 0x01020303 + (1 << 32))]
        expected = []
        for index, counter in cases:
            datagram = counted(index, counter)
            s.send(datagram)
            if index != 12 and engine_may_accept(counter, floors.get(index, 0)):
                expected.append(datagram)
        got = _drain(r, len(expected))
        assert sorted(got) == sorted(expected)
        assert sockfilter.kernel_drops(r) == len(cases) - len(expected)


class FakeEngine:
    def __init__(self) -> None:
        self.indices: dict[int, int] = {}  # receiver index -> newest counter accepted
        self.load_until = 0.0
        self.drops: dict[str, int] = {}
        self.handshakes = 0  # the engine's generation also moves when an index is reused

    def receive_counters(self) -> dict[int, int]:
        return dict(self.indices)

    def live_indices(self) -> frozenset[int]:
        return frozenset(self.indices)

    def index_generation(self) -> int:
        return hash((frozenset(self.indices), self.handshakes))  # changes with the set, as the engine's counter

    def is_under_load(self, now: float) -> bool:
        return now < self.load_until


def test_prefilter_control_follows_the_engine() -> None:
    engine = FakeEngine()
    control = sockfilter.PrefilterControl(engine, gro=False, check_indices=True)
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        control(0.0)
        assert control.updates == 1  # nothing changed: no new program
        s.send(transport(5))
        engine.indices[5] = -1  # a new session, announced in this pass
        control(0.0)
        s.send(transport(5))
        assert _drain(r, 1) == [transport(5)]  # the one sent before the pass was dropped
        engine.load_until = 10.0
        control(1.0)
        assert control.updates == 3 and control.under_load
        control(11.0)
        assert control.updates == 4 and not control.under_load


def test_more_indices_than_the_kernel_checks_need_no_new_program() -> None:
    """Beyond MAX_FILTER_INDICES the program does not check indices: a handshake then costs no
    re-attach, and a pass with no handshake does not even build the set."""
    engine = FakeEngine()
    engine.indices = {i: -1 for i in range(sockfilter.MAX_FILTER_INDICES + 1)}
    control = sockfilter.PrefilterControl(engine, gro=False, check_indices=True)
    r, _s = _receiver(gro=False, program_gro=False)
    with r, _s:
        assert control.set_sockets([r], gro=False)
        updates = control.updates
        engine.indices[10**6] = -1
        control(0.0)
        assert control.updates == updates
        engine.indices.clear()  # back under the limit: the kernel checks indices again
        control(0.0)
        assert control.updates == updates + 1


def _floored_control(newest: int) -> tuple[FakeEngine, sockfilter.PrefilterControl]:
    engine = FakeEngine()
    engine.indices = {5: newest, 9: -1}  # 9: a session that has received nothing yet
    return engine, sockfilter.PrefilterControl(engine, gro=False, check_indices=True)


def _passes(r: socket.socket, s: socket.socket, datagrams: list[bytes]) -> list[bytes]:
    for datagram in datagrams:
        s.send(datagram)
    return _drain(r, 0)


def test_replay_flood_puts_counter_floors_in_the_kernel() -> None:
    """Replays above REPLAY_FLOOD_RATE switch the floors on (newest - margin per session), the
    kernel's drops keep them on while the replays no longer reach the engine, they follow the
    newest counter at every refresh, and they go REPLAY_FLOOD_HOLD after the flood."""
    margin, step = sockfilter.REPLAY_FLOOR_MARGIN, sockfilter.REPLAY_FLOOD_CHECK
    engine, control = _floored_control(10_000)
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        now = 1.0
        control(now)  # the first sample: nothing yet
        old = counted(5, 10_000 - margin - 1)
        assert _passes(r, s, [old]) == [old]  # no flood: no floor, the engine decides
        now += step
        engine.drops["replayed"] = int(sockfilter.REPLAY_FLOOD_RATE * step) + 1
        control(now)
        assert control.replay.active and control.replay.activations == 1
        edge = [counted(5, 10_000 - margin), counted(5, 10_001), counted(9, 0), counted(5, 1 << 32)]
        assert sorted(_passes(r, s, [old, *edge])) == sorted(edge)
        drops = sockfilter.kernel_drops(r)
        for _ in range(int(sockfilter.REPLAY_FLOOD_RATE * step) + 1):  # the flood goes on, in the kernel
            s.send(old)
        assert _drain(r, 0) == [] and sockfilter.kernel_drops(r) > drops
        engine.indices[5] = 50_000  # the session moved on
        now += step
        control(now)
        assert control.replay.active
        assert _passes(r, s, [counted(5, 50_000 - margin - 1), counted(5, 50_000 - margin)]) == [
            counted(5, 50_000 - margin)]
        updates = control.updates
        now += step
        control(now)  # the replays stopped; the floors hold, with nothing to refresh
        assert control.replay.active and control.updates == updates
        now += sockfilter.REPLAY_FLOOD_HOLD
        control(now)
        assert not control.replay.active and control.updates == updates + 1
        assert _passes(r, s, [old]) == [old]


def test_replays_below_the_rate_set_no_floor() -> None:
    """A few replays (a duplicating network) never narrow what the kernel lets through."""
    engine, control = _floored_control(10_000)
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        now = 1.0
        for _ in range(100):
            now += sockfilter.REPLAY_FLOOD_CHECK
            engine.drops["replayed"] = engine.drops.get("replayed", 0) + 5
            control(now)
            assert not control.replay.active
        assert control.updates == 1
        old = counted(5, 0)
        assert _passes(r, s, [old]) == [old]


def test_a_new_session_under_floors_has_none() -> None:
    """A handshake during a replay flood (even one reusing an index) rebuilds the floors: the
    new session's counters start at 0."""
    engine, control = _floored_control(10_000)
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        control(1.0)
        engine.drops["replayed"] = 10_000
        control(1.0 + sockfilter.REPLAY_FLOOD_CHECK)
        assert control.replay.active
        engine.indices[5] = -1  # index 5 now names a new session: the same set of indices
        engine.handshakes += 1
        control(1.0 + sockfilter.REPLAY_FLOOD_CHECK)  # same pass time: not a sample, a handshake
        assert _passes(r, s, [counted(5, 0)]) == [counted(5, 0)]
        engine.indices[7] = -1  # a new index: the set changed
        control(1.0 + sockfilter.REPLAY_FLOOD_CHECK)
        assert _passes(r, s, [counted(7, 0), counted(5, 1)]) == [counted(7, 0), counted(5, 1)]


def _flood_on(engine: FakeEngine, control: sockfilter.PrefilterControl, now: float) -> float:
    """Replays above the rate: the floors come on at the returned time."""
    control(now)
    engine.drops["replayed"] = engine.drops.get("replayed", 0) + 10_000
    now += sockfilter.REPLAY_FLOOD_CHECK
    control(now)
    assert control.replay.active
    return now


def test_a_refused_refresh_leaves_no_stale_program(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A kernel that refuses a refresh mid-flood must not leave the last program (its floors and
    its indices) in place: the sockets fall back to unfiltered, logged, and the sessions made
    afterwards are not dropped by a program that never heard of them."""
    engine, control = _floored_control(10_000)
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        now = _flood_on(engine, control, 1.0)
        assert _passes(r, s, [counted(5, 0)]) == []  # the floor is in the kernel

        def refuse(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
            raise OSError(12, "Cannot allocate memory")

        monkeypatch.setattr(sockfilter, "attach", refuse)
        engine.indices[5] = 20_000
        control(now + sockfilter.REPLAY_FLOOD_CHECK)  # the refresh is refused: no exception
        assert "prefilter unavailable" in caplog.text
        engine.indices[77] = -1  # a session made after the refusal
        engine.handshakes += 1
        control(now + 2 * sockfilter.REPLAY_FLOOD_CHECK)
        fresh = [counted(77, 0), counted(5, 0)]  # the engine decides now, not a stale program
        assert sorted(_passes(r, s, fresh)) == sorted(fresh)


def test_floors_are_reported_only_when_the_kernel_has_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``fzpoll show`` reports as the counter floors (``floors_on``) is what the attached
    program does: beyond MAX_FILTER_INDICES it checks no index and so has no floor, and after a
    refused attach the sockets have no program at all, while a replay flood is still on."""
    engine, control = _floored_control(10_000)
    engine.indices.update({1000 + i: 10_000 for i in range(sockfilter.MAX_FILTER_INDICES)})
    r, s = _receiver(gro=False, program_gro=False)
    with r, s:
        assert control.set_sockets([r], gro=False)
        now = _flood_on(engine, control, 1.0)
        assert _passes(r, s, [counted(5, 0)]) == [counted(5, 0)]  # too many indices: no floor
        assert not control.floors_on
        engine.indices = {5: 10_000}  # under the limit again: the floors reach the kernel
        control(now)
        assert _passes(r, s, [counted(5, 0)]) == [] and control.floors_on

        def refuse(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(sockfilter, "attach", refuse)
        engine.indices[5] = 20_000
        control(now + sockfilter.REPLAY_FLOOD_CHECK)
        assert _passes(r, s, [counted(5, 0)]) == [counted(5, 0)]
        assert not control.floors_on and not control.attached


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sockfilter.DISABLE_ENV, "1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert sockfilter.attach_wireguard(sock, gro=False) is False
    monkeypatch.setenv(sockfilter.DISABLE_ENV, "0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert sockfilter.attach_wireguard(sock, gro=False) is True


def test_refused_filter_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """A socket that cannot take a filter (here: a closed one) stays usable, logged, not raised."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    assert sockfilter.attach_wireguard(sock, gro=True) is False
    assert "prefilter unavailable" in caplog.text


def test_replay_guard_reads_kernel_drops_only_while_they_matter() -> None:
    """The sockets' kernel drops (a getsockopt per socket) are read at a sample only when the
    floors are on or go on at it: not in every quiet 50 ms, on a ping's latency path."""
    guard = sockfilter.ReplayGuard()
    reads: list[int] = []
    kernel = [0]

    def drops() -> int:
        reads.append(1)
        return kernel[0]

    step = sockfilter.REPLAY_FLOOD_CHECK
    assert guard.sample(step, 0, drops) is False and reads == []  # quiet: not read
    flood = int(sockfilter.REPLAY_FLOOD_RATE * step) + 1
    assert guard.sample(2 * step, flood, drops) is True and len(reads) == 1  # goes on: the baseline
    kernel[0] = flood  # the floors drop them in the kernel now
    assert guard.sample(3 * step, flood, drops) is True and len(reads) == 2  # on: kept on by them
    assert guard.active
