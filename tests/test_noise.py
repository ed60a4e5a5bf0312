"""The handshake core against the Cacophony Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s vector.

The vector file is /work/shared/vectors/noise-ikpsk2-25519-chachapoly-blake2s.json (from the
Cacophony vectors as shipped in the `snow` repository); its values are copied below as hex so the
test does not depend on the shared folder.
"""

import pytest

from fzpoll.wireguard import crypto
from fzpoll.wireguard import noise

PROLOGUE = bytes.fromhex("4a6f686e2047616c74")
PSK = bytes.fromhex("54686973206973206d7920417573747269616e20706572737065637469766521")
INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
INIT_EPHEMERAL = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
RESP_EPHEMERAL = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
HANDSHAKE_HASH = bytes.fromhex("f5191b875290abcd41347ac3622d9679688a7e980229cb937ef748336cfde0e5")
MESSAGES = [
    ("4c756477696720766f6e204d69736573",
     "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944001e21de9f98ddd8e2ad57527207feb5"
     "6253c9c94a9e496782ecfcb2a75fbcaf1b52948cc48daefe660c62119ab5000980c84831215f2441eba616548e832985"
     "464cf17e51ee93109008399a21f7e13f"),
    ("4d757272617920526f746862617264",
     "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843cb765f2caef0751b8f007572dab03222"
     "17755c0632f365717edbf34d33e87a"),
    ("462e20412e20486179656b", "8153ca9833bc3c1b91a7e66e5f4d4f5b59bf9e64c2f20d15f0bba7"),
    ("4361726c204d656e676572", "07af0c9c86e1b4e80f36b04ff7688d51141af3debd0332f0a705ef"),
    ("4a65616e2d426170746973746520536179", "6ab1467c0448cc78394494abaaf23afce0e234315d6e2624dcbfa8a21c1c4d073d"),
    ("457567656e2042f6686d20766f6e2042617765726b",
     "dfc346c0d2296ae6cf1acf6f12b8456a1dba228cf8d8b774aacf1c47fc53aa80ebc7a4c292"),
]


def _handshake():
    init = noise.SymmetricState(PROLOGUE)
    resp = noise.SymmetricState(PROLOGUE)
    resp_public = crypto.dh_public(RESP_STATIC)
    payload1, expected1 = (bytes.fromhex(x) for x in MESSAGES[0])
    e, s, p = noise.write_message1(init, INIT_STATIC, resp_public, INIT_EPHEMERAL, payload1)
    assert e + s + p == expected1
    remote_static, got1 = noise.read_message1(resp, RESP_STATIC, resp_public, e, s, p)
    assert remote_static == crypto.dh_public(INIT_STATIC)
    assert got1 == payload1
    payload2, expected2 = (bytes.fromhex(x) for x in MESSAGES[1])
    e2, p2 = noise.write_message2(resp, e, remote_static, RESP_EPHEMERAL, PSK, payload2)
    assert e2 + p2 == expected2
    assert noise.read_message2(init, INIT_STATIC, INIT_EPHEMERAL, e2, PSK, p2) == payload2
    return init, resp


def test_handshake_messages_and_hash_match_vector():
    init, resp = _handshake()
    assert init.h == resp.h == HANDSHAKE_HASH


def test_transport_messages_match_vector():
    init, resp = _handshake()
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    counters = {"i": 0, "r": 0}
    for n, (payload_hex, expected_hex) in enumerate(MESSAGES[2:]):
        side = "i" if n % 2 == 0 else "r"
        key = i_send if side == "i" else r_send
        ct = crypto.aead_encrypt(key, counters[side], bytes.fromhex(payload_hex), b"")
        assert ct.hex() == expected_hex
        counters[side] += 1


def test_tampered_message1_fails_authentication():
    init = noise.SymmetricState(PROLOGUE)
    resp = noise.SymmetricState(PROLOGUE)
    resp_public = crypto.dh_public(RESP_STATIC)
    e, s, p = noise.write_message1(init, INIT_STATIC, resp_public, INIT_EPHEMERAL, b"x")
    bad = bytes([s[0] ^ 1]) + s[1:]
    with pytest.raises(crypto.CryptoError):
        noise.read_message1(resp, RESP_STATIC, resp_public, e, bad, p)


def test_low_order_ephemeral_is_invalid_point():
    resp = noise.SymmetricState(PROLOGUE)
    with pytest.raises(crypto.InvalidPoint):
        noise.read_message1(resp, RESP_STATIC, crypto.dh_public(RESP_STATIC), bytes(32), bytes(48), bytes(16))
