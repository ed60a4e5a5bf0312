"""WireGuard protocol constants, named as the whitepaper names them (section 5.4 and 6).

Values follow the whitepaper and wireguard-go, so timers and replay behaviour match the peers
we interoperate with. Nothing else in fzpoll hard-codes a protocol number.
"""

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Message types (5.4.2 - 5.4.7): the first byte of each datagram, then three reserved zeros.
MESSAGE_HANDSHAKE_INITIATION = 1
MESSAGE_HANDSHAKE_RESPONSE = 2
MESSAGE_HANDSHAKE_COOKIE = 3
MESSAGE_TRANSPORT_DATA = 4

# Message sizes in bytes.
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
AEAD_TAG_SIZE = 16
KEEPALIVE_SIZE = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE
KEY_SIZE = 32
PADDING_MULTIPLE = 16

# Timers and limits (6.1 - 6.5).
REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334  # wireguard-go adds up to 334 ms of jitter to REKEY_TIMEOUT
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020  # initiations from one peer closer than this are ignored
UNDER_LOAD_AFTER_TIME = 1.0  # cookie replies stay on this long after the load falls
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 retries, then give up
ZERO_KEYS_AFTER_TIME = 3 * REJECT_AFTER_TIME

# The anti-replay window (RFC 6479 layout, as wireguard-go): 128 blocks of 64 bits, one block
# always kept free, so 8128 counters behind the newest are accepted.
REPLAY_BLOCK_BITS = 64
REPLAY_RING_BLOCKS = 128
REPLAY_WINDOW_SIZE = (REPLAY_RING_BLOCKS - 1) * REPLAY_BLOCK_BITS

# TAI64N label: 2^62 + 10 (TAI-UTC offset as wireguard-go uses it); nanoseconds are masked down
# to ~16 ms so a peer cannot learn our clock precisely.
TAI64_BASE = 2**62 + 10
TAI64N_NANOSECOND_MASK = ~0xFFFFFF

# Bounds on our own memory (not in the paper; chosen by us).
MAX_STAGED_PACKETS = 128  # packets queued per peer while a handshake is under way
MAX_STAGED_PACKETS_TOTAL = 4096  # ... and over all peers (~6 MiB of 1420-byte packets)
HANDSHAKE_RATE_PER_SOURCE = 20.0  # handshakes/s per source IP while under load (wireguard-go)
HANDSHAKE_BURST_PER_SOURCE = 5
UNDER_LOAD_WINDOW = 0.125  # handshake messages are counted in windows this long ...
UNDER_LOAD_HANDSHAKES_PER_WINDOW = 16  # ... and more than this many in one turns on cookies
MAX_HANDSHAKES_PER_PASS = 8  # under load, handshake messages a pass may process; the rest are shed
MAX_RATE_LIMITER_SOURCES = 4096  # per-source token buckets kept at once
DEFAULT_MTU = 1420
DEFAULT_BATCH_SIZE = 64  # packets read per ready fd per wakeup of the loop

# Firezone connlib's in-tunnel control packets ("p2p control", fzpoll.gateway.control): IPv6 from
# :: to :: with this next header (IANA "reserved"); the engine hands them out instead of to TUN.
FZ_P2P_CONTROL_NEXT_HEADER = 0xFF
MAX_QUEUED_CONTROL_PACKETS = 256  # held for control_packets_received(); beyond: dropped, counted
