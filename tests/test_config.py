import base64
import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fzpoll.errors import LocalError
from fzpoll.config import Config, ConfigError, Endpoint, GatewayConfig, load_config, parse_config
from fzpoll.wireguard.keys import PresharedKey, PrivateKey

PRIV = PrivateKey(bytes(range(1, 33)))
PEER_A = PrivateKey(bytes(range(33, 65))).public_key
PEER_B = PrivateKey(bytes(range(65, 97))).public_key
PSK = PresharedKey(bytes(range(97, 129)))
IFACE = f"[Interface]\nPrivateKey = {PRIV.base64()}\n"
PEER = f"[Peer]\nPublicKey = {PEER_A.base64()}\n"

GOOD = f"""\
# a full example
[Interface]
PrivateKey = {PRIV.base64()}
ListenPort = 51820
Address = 100.64.0.1, fd00:2021:1111::1/64   # bare v4 means /32
address = 10.9.0.1/24
MTU = 1380
DNS = 100.100.111.1, fd00:2021:1111:8000:100:100:111:1, corp.example.
FwMark = 0x1234
PostUp = iptables -A FORWARD -i %i -j ACCEPT
SaveConfig = false

[Peer]
PublicKey = {PEER_A.base64()}
PresharedKey = {PSK.hex()}
Endpoint = 192.0.2.1:51820
AllowedIPs = 100.64.0.2/32, 10.99.0.7/16
AllowedIPs = ::/0
PersistentKeepalive = 25

[peer]
publickey = {PEER_B.hex()}
Endpoint = vpn.Example.com:4500
PersistentKeepalive = off

[Resource]
Name = *.example.com
Peer = {PEER_A.base64()}
Address = 10.0.0.5, 10.1.0.0/16

[Resource]
Name = ?.internal.example
Peer = {PEER_B.base64()}
"""


def test_good_file():
    config = parse_config(GOOD, "wg0.conf")
    iface = config.interface
    assert iface.private_key == PRIV
    assert iface.listen_port == 51820
    assert [str(a) for a in iface.addresses] == ["100.64.0.1/32", "fd00:2021:1111::1/64", "10.9.0.1/24"]
    assert iface.mtu == 1380
    assert [str(a) for a in iface.dns] == ["100.100.111.1", "fd00:2021:1111:8000:100:100:111:1"]
    assert iface.dns_search == ("corp.example",)
    assert iface.fwmark == 0x1234
    assert iface.post_up == ("iptables -A FORWARD -i %i -j ACCEPT",)
    assert iface.pre_up == iface.pre_down == iface.post_down == () and iface.table is None
    assert config.warnings == (
        "wg0.conf:11: SaveConfig: ignored (fzpoll never rewrites its configuration file)",
    )
    a, b = config.peers
    assert a.public_key == PEER_A and a.preshared_key == PSK
    assert a.endpoint == Endpoint("192.0.2.1", 51820)
    assert [str(n) for n in a.allowed_ips] == ["100.64.0.2/32", "10.99.0.0/16", "::/0"]
    assert a.persistent_keepalive == 25
    assert b.public_key == PEER_B and b.preshared_key is None and b.allowed_ips == ()
    assert b.endpoint == Endpoint("vpn.example.com", 4500) and b.endpoint.ip is None
    assert b.persistent_keepalive == 0
    r1, r2 = config.resources
    assert (r1.name, r1.peer) == ("*.example.com", PEER_A)
    assert [str(n) for n in r1.addresses] == ["10.0.0.5/32", "10.1.0.0/16"]
    assert (r2.name, r2.peer, r2.addresses) == ("?.internal.example", PEER_B, ())


def test_repr_hides_secrets():
    config = parse_config(GOOD)
    text = repr(config) + str(config)
    for secret in (PRIV, PSK):
        assert secret.base64() not in text and secret.hex() not in text


def test_to_uapi_set():
    assert parse_config(GOOD).to_uapi_set() == (
        "set=1\n"
        f"private_key={PRIV.hex()}\n"
        "listen_port=51820\n"
        f"fwmark={0x1234}\n"
        "replace_peers=true\n"
        f"public_key={PEER_A.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "endpoint=192.0.2.1:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=100.64.0.2/32\n"
        "allowed_ip=10.99.0.0/16\n"
        "allowed_ip=::/0\n"
        f"public_key={PEER_B.hex()}\n"  # hostname endpoint: left for the daemon to resolve
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "\n"
    )


def test_ipv6_endpoint_in_uapi():
    text = f"{IFACE}[Peer]\nPublicKey={PEER_A.base64()}\nEndpoint=[2001:DB8::1]:51820\n"
    config = parse_config(text)
    assert config.peers[0].endpoint == Endpoint("2001:DB8::1", 51820)
    assert "endpoint=[2001:DB8::1]:51820\n" in config.to_uapi_set()
    assert "listen_port" not in config.to_uapi_set() and "fwmark" not in config.to_uapi_set()


def _render(config: Config) -> str:
    """Write a Config back as a file, to check that parsing it again gives the same Config."""
    iface = config.interface
    out = ["[Interface]", f"PrivateKey = {iface.private_key.base64()}"]
    if iface.listen_port is not None:
        out.append(f"ListenPort = {iface.listen_port}")
    out += [f"Address = {a}" for a in iface.addresses]
    if iface.mtu is not None:
        out.append(f"MTU = {iface.mtu}")
    out += [f"DNS = {d}" for d in (*iface.dns, *iface.dns_search)]
    if iface.fwmark is not None:
        out.append(f"FwMark = {iface.fwmark:#x}")
    if iface.table is not None:
        out.append(f"Table = {iface.table}")
    for phase in ("PreUp", "PostUp", "PreDown", "PostDown"):
        out += [f"{phase} = {command}" for command in iface.hooks(phase)]
    for peer in config.peers:
        out += ["", "[Peer]", f"PublicKey = {peer.public_key.base64()}"]
        if peer.preshared_key:
            out.append(f"PresharedKey = {peer.preshared_key.base64()}")
        if peer.endpoint:
            out.append(f"Endpoint = {peer.endpoint}")
        if peer.allowed_ips:
            out.append("AllowedIPs = " + ", ".join(map(str, peer.allowed_ips)))
        if peer.persistent_keepalive is not None:
            out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
    for res in config.resources:
        out += ["", "[Resource]", f"Name = {res.name}", f"Peer = {res.peer.base64()}"]
        out += [f"Address = {a}" for a in res.addresses]
    return "\n".join(out) + "\n"


def test_round_trip():
    config = parse_config(GOOD)
    again = parse_config(_render(config))
    assert again == Config(config.interface, config.peers, config.resources)


def test_load_config(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(GOOD)
    os.chmod(path, 0o600)
    config = load_config(path)
    assert config.peers[1].public_key == PEER_B
    assert all("readable" not in w for w in config.warnings)
    os.chmod(path, 0o644)
    assert "readable by group or others" in load_config(path).warnings[-1]


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.conf:0: -: cannot read"):
        load_config(tmp_path / "missing.conf")
    bad = tmp_path / "bad.conf"
    bad.write_bytes(b"[Interface]\n\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"bad\.conf:3: -: file is not UTF-8"):
        load_config(bad)



def test_gateway_section():
    config = parse_config(IFACE + "[Gateway]\nResources = *.Corp.Example, db.internal.example.\n"
                          "resources = ?.x.example\nDNS = fd97::53\n")
    assert config.gateway == GatewayConfig(("*.corp.example", "db.internal.example", "?.x.example"),
                                           ipaddress.ip_address("fd97::53"))
    assert parse_config(IFACE + "[Gateway]\nResources = a.example\n").gateway.dns is None
    assert parse_config(IFACE).gateway is None


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("ListenPort = 1\n", "1: ListenPort", "key before any"),
        ("[Interface]\nListenPort = 1\n", "1: PrivateKey", "required in [Interface]"),
        (IFACE + "[Peer]\nEndpoint = 1.2.3.4:5\n", "3: PublicKey", "required in [Peer]"),
        (IFACE + PEER + "[Resource]\nName = a.example\n", "5: Peer", "required in [Resource]"),
        (IFACE + PEER + "[Resource]\nPeer = " + PEER_A.base64() + "\n", "5: Name", "required"),
        ("", "1: [Interface]", "section missing"),
        (IFACE + IFACE, "3: [Interface]", "section given twice"),
        (IFACE + "[Wireguard]\n", "3: [Wireguard]", "unknown section"),
        (IFACE + "Colour = blue\n", "3: Colour", "unknown key in [Interface]"),
        (IFACE + "PublicKey = x\n", "3: PublicKey", "unknown key in [Interface]"),
        (IFACE + "just_words\n", "3: just_words", "expected 'Key = Value'"),
        (IFACE + "just words\n", "3: <malformed key>", "expected 'Key = Value'"),
        (IFACE + "ListenPort = 1\nListenPort = 2\n", "4: ListenPort", "given twice"),
        (IFACE + "ListenPort = 70000\n", "3: ListenPort", "0 to 65535"),
        (IFACE + "ListenPort = 1_000\n", "3: ListenPort", "whole number"),
        (IFACE + "ListenPort =\n", "3: ListenPort", "empty value"),
        (IFACE + "MTU = 100\n", "3: MTU", "576 to 65535"),
        (IFACE + "Address = 10.0.0.1/33\n", "3: Address", "not a valid IP address or CIDR"),
        (IFACE + "Address = 10.0.0.1,,10.0.0.2\n", "3: Address", "empty item"),
        (IFACE + "DNS = 1.1.1.1, bad_domain!\n", "3: DNS", "neither an IP address"),
        (IFACE + "FwMark = 0x1ffffffff\n", "3: FwMark", "32-bit"),
        (IFACE + "FwMark = on\n", "3: FwMark", "32-bit"),
        ("[Interface]\nPrivateKey = abc\n", "2: PrivateKey", "not a valid key"),
        (IFACE + "[Peer]\nPublicKey = " + "A" * 43 + "\n", "4: PublicKey", "not a valid key"),
        (IFACE + PEER + "PresharedKey = zz\n", "5: PresharedKey", "not a valid key"),
        (IFACE + PEER + "Endpoint = 1.2.3.4\n", "5: Endpoint", "host:port"),
        (IFACE + PEER + "Endpoint = 2001:db8::1:51820\n", "5: Endpoint", "needs brackets"),
        (IFACE + PEER + "Endpoint = [10.0.0.1]:51820\n", "5: Endpoint", "[IPv6]:port"),
        (IFACE + PEER + "Endpoint = 1.2.3.4:0\n", "5: Endpoint", "1 to 65535"),
        (IFACE + PEER + "Endpoint = 1.2.3.999:1\n", "5: Endpoint", "not a valid host name"),
        (IFACE + PEER + "Endpoint = bad host:1\n", "5: Endpoint", "not a valid host name"),
        (IFACE + PEER + "AllowedIPs = 10.0.0.0/8, nope\n", "5: AllowedIPs", "not a valid IP network"),
        (IFACE + PEER + "PersistentKeepalive = 65536\n", "5: PersistentKeepalive", "0 to 65535"),
        (IFACE + PEER + "AllowedIPs = 10.0.0.1/32\tx\n", "5: AllowedIPs", "not a valid"),
        (IFACE + PEER + "Endpoint = caf\u00e9.example:1\n", "5: Endpoint", "non-ASCII"),
        (IFACE + PEER + PEER, "6: PublicKey", "duplicate peer (first on line 3)"),
        (IFACE + PEER + "[Resource]\nName = *.\nPeer = " + PEER_A.base64(), "6: Name", "expected a name"),
        (IFACE + PEER + "[Resource]\nName = a.*.example\n", "6: Name", "expected a name"),
        (IFACE + "[Resource]\nName = a.example\nPeer = " + PEER_B.base64(), "5: Peer", "no [Peer] has"),
        (
            IFACE + PEER + ("[Resource]\nName = a.example\nPeer = " + PEER_A.base64() + "\n") * 2,
            "9: Name",
            "duplicate resource (first on line 5)",
        ),
        (IFACE + "[Gateway]\nDNS = 10.97.1.10\n", "3: Resources", "required in [Gateway]"),
        (IFACE + "[Gateway]\nResources = a..example\n", "4: Resources", "expected a name"),
        (IFACE + "[Gateway]\nResources = *.a.example\nDNS = resolver.example\n", "5: DNS", "IP address"),
        (IFACE + "[Gateway]\nResources = a.example\n" * 2, "5: [Gateway]", "section given twice"),
    ],
)
def test_errors_name_file_line_key(text, where, problem):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/fzpoll/wg0.conf")
    message = str(info.value)
    assert message.startswith(f"/etc/fzpoll/wg0.conf:{where}: "), message
    assert problem in message
    assert info.value.path == "/etc/fzpoll/wg0.conf"


def test_errors_do_not_echo_secrets():
    for pasted in (PRIV.base64(), PRIV.hex()):  # a key pasted without "PrivateKey ="
        with pytest.raises(ConfigError) as info:
            parse_config(f"[Interface]\nPrivateKey = {PRIV.base64()}\n{pasted}\n")
        assert str(info.value).startswith("<string>:3: <malformed key>: ")
    broken = PRIV.base64()[:-2] + "!="
    with pytest.raises(ConfigError) as info:
        parse_config(f"[Interface]\nPrivateKey = {broken}\n")
    assert broken[:20] not in str(info.value)


def test_hex_keys_and_case_insensitive_sections():
    text = f"[INTERFACE]\nprivatekey={PRIV.hex()}\n[PEER]\nPUBLICKEY={PEER_A.hex()}\nallowedips=\n"
    config = parse_config(text)
    assert config.interface.private_key == PRIV
    assert config.peers[0].allowed_ips == ()


def test_fwmark_forms():
    for value, mark in (("off", 0), ("0", 0), ("4660", 4660), ("0x1234", 0x1234), ("0XfF", 255)):
        assert parse_config(IFACE + f"FwMark = {value}\n").interface.fwmark == mark


LINE_PARTS = st.sampled_from(
    [
        "[Interface]", "[Peer]", "[Resource]", "[", "]", "=", " = ", ",", "#", ":", "[::1]", "/",
        "PrivateKey", "PublicKey", "PresharedKey", "ListenPort", "Address", "DNS", "MTU", "FwMark",
        "Endpoint", "AllowedIPs", "PersistentKeepalive", "Name", "Peer", "PostUp", "off", "0x",
        PRIV.base64(), PEER_A.base64(), PEER_A.hex(), "10.0.0.1/24", "::/0", "*.", "?.", "example.com",
        "65535", "65536", "-1", "\t", "\r", "\x00", "\u0663", "\u2028",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(LINE_PARTS | st.text(max_size=8), max_size=6).map("".join), max_size=12))
def test_fuzz_only_config_error(lines):
    try:
        parse_config("\n".join(lines), "fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf:")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text):
    try:
        parse_config(text)
    except ConfigError:
        pass


def test_allowed_ips_normalized_and_deduplicated():
    config = parse_config(IFACE + PEER + "AllowedIPs = 10.1.2.3/8, 10.0.0.0/8\n")
    assert config.peers[0].allowed_ips == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize("text, expected", [
    ("off", "off"), ("OFF", "off"), ("auto", "auto"), ("1234", "1234"), ("0051820", "51820"),
    ("main", "main"), ("vpn_table", "vpn_table"),
])
def test_table_setting(text, expected):
    assert parse_config(IFACE + f"Table = {text}\n").interface.table == expected


@pytest.mark.parametrize("text", ["4294967296", "a b", "-1", "t;rm"])
def test_bad_table_setting(text):
    with pytest.raises(ConfigError) as info:
        parse_config(IFACE + f"Table = {text}\n", "wg0.conf")
    assert info.value.key == "Table" and info.value.line == 3


def test_hooks_keep_order_and_text():
    config = parse_config(IFACE + "PreUp = echo a=b > /tmp/%i\nPostDown = x\npreup = echo 2\n"
                          "PostUp = a | b && c\n")
    iface = config.interface
    assert iface.pre_up == ("echo a=b > /tmp/%i", "echo 2")
    assert iface.post_up == ("a | b && c",) and iface.post_down == ("x",) and iface.pre_down == ()
    assert config.warnings == ()


def test_peer_with_the_interfaces_own_key_is_an_error():
    text = IFACE + f"\n[Peer]\nPublicKey = {PEER_A.base64()}\n\n[Peer]\nPublicKey = {PRIV.public_key.base64()}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "wg0.conf")
    assert (info.value.line, info.value.key) == (8, "PublicKey")
    assert "own public key" in str(info.value) and PRIV.public_key.base64() not in str(info.value)


def test_world_writable_file_is_refused(tmp_path):
    path = tmp_path / "wg0.conf"
    path.write_text(IFACE)
    path.chmod(0o602)
    with pytest.raises(ConfigError, match="world-writable"):
        load_config(path)
    path.chmod(0o600)
    assert load_config(path).warnings == ()


def test_hooks_in_a_file_of_another_user_are_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = tmp_path / "wg0.conf"
    path.write_text(IFACE + "PostUp = true\n")
    path.chmod(0o600)
    os.chown(path, 4242, 4242)
    with pytest.raises(ConfigError, match="uid 4242"):
        load_config(path)
    path.write_text(IFACE)
    load_config(path)  # no hooks: another owner is only the usual matter of keys


@pytest.mark.parametrize("field,form", [
    (f, form) for f in ("Endpoint", "AllowedIPs", "PersistentKeepalive", "MTU") for form in ("base64", "hex", "urlsafe")
] + [("AllowedIPs", "unpadded")])
def test_a_key_pasted_into_the_wrong_field_never_reaches_the_error(field: str, form: str) -> None:
    secret = PrivateKey(bytes(range(7, 39)))
    text = {"base64": secret.base64(), "hex": secret.hex(), "unpadded": secret.base64().rstrip("="),
            "urlsafe": base64.urlsafe_b64encode(secret.raw).decode()}[form]
    value = f"{text}:51820" if field == "Endpoint" else text
    if field == "MTU":
        conf = f"[Interface]\nPrivateKey = {PRIV.base64()}\nMTU = {value}\n"
    else:
        conf = (f"[Interface]\nPrivateKey = {PRIV.base64()}\n[Peer]\n"
                + (f"PublicKey = {PEER_A.base64()}\n" if field != "PublicKey" else "")
                + f"{field} = {value}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(conf, "wg0.conf")
    message = str(info.value)
    assert "wg0.conf:" in message
    for shown in (secret.base64(), secret.base64().rstrip("="), secret.hex(), text, text[:40]):
        assert shown not in message


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0", "wgx"], "must be from 1 to"),
    (["--batch-size", "-1", "wgx"], "must be from 1 to"),
    (["--batch-size", "1e3", "wgx"], "must be a whole number"),
    (["up", "--batch-size", "99999", "x.conf"], "must be from 1 to"),
    (["demo", "--seconds", "0"], "must be greater than 0"),
    (["demo", "--seconds", "nan"], "must be greater than 0"),
])
def test_numeric_options_are_validated_with_a_clear_error(argv, message, capsys) -> None:
    from fzpoll.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_daemon_options_refuse_a_batch_size_below_one() -> None:
    from fzpoll.daemon import Options

    for bad in (0, -1, True, 2.5):
        with pytest.raises(LocalError, match="batch size"):
            Options("wgx", batch_size=bad)
