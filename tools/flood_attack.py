"""The attacker side of tools/bench_flood.py: datagram pools and the flooding processes.

``python3 tools/flood_attack.py udp POOL HOST PORT SECONDS PPS``: ``sendmmsg`` of VLEN
datagrams per call from a pool prepared beforehand, on a connected UDP socket (PPS 0: no cap).
``python3 tools/flood_attack.py raw POOL HOST SECONDS PPS``: the same with whole IPv4 packets on a
raw socket (``IPPROTO_RAW``, so the pool chooses the source address: spoofed initiations).
``python3 tools/flood_attack.py uapi SOCKET SECONDS``: connect to a UAPI socket, send a request
(``get=1``, a bad ``set=1``, or garbage), read the answer, close; as fast as it can.
Each prints one JSON line with what it sent when SIGTERM (or its deadline) stops it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VLEN = 256  # datagrams per sendmmsg


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.POINTER(_IoVec)), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


def write_pool(path: str, messages: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(messages)))
        for m in messages:
            f.write(struct.pack("<H", len(m)) + m)


def read_pool(path: str) -> list[bytes]:
    data = Path(path).read_bytes()
    (count,) = struct.unpack_from("<I", data)
    out, pos = [], 4
    for _ in range(count):
        (n,) = struct.unpack_from("<H", data, pos)
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def _batches(messages: list[bytes]):
    """sendmmsg arrays of VLEN messages each, covering the whole pool (wrapped around to fill the
    last one); the buffers are kept referenced with them."""
    while len(messages) < VLEN:
        messages = messages * 2
    messages = messages + messages[:-len(messages) % VLEN]
    batches = []
    for start in range(0, len(messages) - VLEN + 1, VLEN):
        chunk = messages[start:start + VLEN]
        bufs = [ctypes.create_string_buffer(m, len(m)) for m in chunk]
        iovs = (_IoVec * VLEN)(*[_IoVec(ctypes.cast(b, ctypes.c_void_p), len(m)) for b, m in zip(bufs, chunk)])
        msgs = (_MMsgHdr * VLEN)()
        for i in range(VLEN):
            msgs[i].msg_hdr.msg_iov = ctypes.pointer(iovs[i])
            msgs[i].msg_hdr.msg_iovlen = 1
        batches.append((msgs, iovs, bufs))
    return batches


def _send_loop(fd: int, messages: list[bytes], max_seconds: float, pps_limit: float) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    batches = _batches(messages)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    sent = send_errors = 0
    start = time.monotonic()
    deadline = start + max_seconds
    while not stop:
        for msgs, _, _ in batches:
            n = libc.sendmmsg(fd, msgs, VLEN, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err not in (errno.ENOBUFS, errno.EAGAIN, errno.EINTR, errno.ECONNREFUSED, errno.EPERM):
                    raise OSError(err, os.strerror(err))
                send_errors += 1
            else:
                sent += n
            if stop:
                break
        now = time.monotonic()
        if now >= deadline:
            break
        if pps_limit > 0:
            ahead = sent / pps_limit - (now - start)
            if ahead > 0:
                time.sleep(min(ahead, 0.05))
    return {"sent": sent, "seconds": time.monotonic() - start, "send_errors": send_errors}


def flood_udp(argv: list[str]) -> dict:
    pool_path, host, port, max_seconds, pps_limit = argv
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect((host, int(port)))
    return _send_loop(sock.fileno(), read_pool(pool_path), float(max_seconds), float(pps_limit))


def flood_raw(argv: list[str]) -> dict:
    pool_path, host, max_seconds, pps_limit = argv
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # implies IP_HDRINCL
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.connect((host, 0))
    return _send_loop(sock.fileno(), read_pool(pool_path), float(max_seconds), float(pps_limit))


UAPI_REQUESTS = (b"get=1\n\n", b"set=1\nlisten_port=notanumber\n\n", b"\x00garbage\xff\n\n")


def flood_uapi(argv: list[str]) -> dict:
    path, max_seconds = argv[0], float(argv[1])
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    done = refused = 0
    start = time.monotonic()
    while not stop and time.monotonic() - start < max_seconds:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(path)
            s.sendall(UAPI_REQUESTS[done % len(UAPI_REQUESTS)])
            while not s.recv(65536).endswith(b"\n\n"):
                pass
            done += 1
        except OSError:
            refused += 1
        finally:
            s.close()
    return {"sent": done, "seconds": time.monotonic() - start, "send_errors": refused}


# =============================================================================================
# The pools (built by the benchmark, written with write_pool)


def pool_junk(n: int, rng: random.Random) -> list[bytes]:
    """Random bytes of varied sizes (1-1400, mostly small): different sizes defeat GRO."""
    return [rng.randbytes(rng.choice((rng.randint(1, 64), rng.randint(65, 256), rng.randint(257, 1400))))
            for _ in range(n)]


def pool_unknown_index(n: int, rng: random.Random) -> list[bytes]:
    """Well-formed transport headers, random receiver indices, sizes WireGuard can have."""
    return [b"\x04\x00\x00\x00" + rng.randbytes(4) + rng.randbytes(8) + rng.randbytes(16 * rng.randint(1, 15))
            for _ in range(n)]


def pool_initiations(n: int, responder_public: bytes) -> list[bytes]:
    """Initiations from an attacker key unknown to the target, each with a valid MAC1 (its public
    key is all it takes), built with fzpoll's own handshake code."""
    from fzpoll.wireguard import handshake
    from fzpoll.wireguard.keys import PrivateKey

    attacker = PrivateKey.generate(os.urandom)
    cookies = handshake.CookieGenerator(responder_public)
    now = time.time()
    out = []
    for i in range(n):
        body, _ = handshake.build_initiation(attacker.raw, responder_public, os.urandom(32),
                                             int.from_bytes(os.urandom(4), "little"), now + i * 1e-3)
        out.append(cookies.add_macs(body, 0.0))
    return out


def spoofed(payloads: list[bytes], dst: str, port: int, rng: random.Random, network: str = "10.99.0.0") -> list[bytes]:
    """Each payload in an IPv4/UDP packet from a different random source in ``network``/16 (UDP
    checksum 0: none, allowed on IPv4; the kernel fills in the IP checksum)."""
    base = struct.unpack("!I", socket.inet_aton(network))[0]
    daddr = socket.inet_aton(dst)
    out = []
    for payload in payloads:
        saddr = struct.pack("!I", base + rng.randint(1, 0xFFFE))
        udp = struct.pack("!HHHH", rng.randint(1024, 65535), port, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0, saddr, daddr)
        out.append(ip + udp)
    return out


def pool_dns(n: int, rng: random.Random, local_name: str) -> list[bytes]:
    """DNS queries: half for a resource name the stub answers itself, half for random names it
    must forward upstream (where nothing answers: its in-flight table fills)."""
    from dnslib import DNSRecord

    out = []
    for i in range(n):
        name = local_name if i % 2 else f"x{rng.getrandbits(40):x}.flood.example"
        query = DNSRecord.question(name, "A")
        query.header.id = rng.getrandbits(16)
        out.append(query.pack())
    return out


MODES = {"udp": flood_udp, "raw": flood_raw, "uapi": flood_uapi}


def main(argv: list[str]) -> int:
    result = MODES[argv[0]](argv[1:])
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
