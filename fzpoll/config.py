"""The wg-quick style configuration file.

::

    [Interface]
    PrivateKey = <base64 or hex>        # required
    ListenPort = 51820
    Address = 100.64.0.1/32, fd00::1    # repeatable; a bare address is /32 or /128
    MTU = 1420
    DNS = 100.100.111.1, corp.example   # IP addresses are servers, other names search domains
    FwMark = 0x1234                     # or off
    Table = auto                        # off, auto, a number or a name from rt_tables
    PreUp = ...                         # wg-quick hooks, repeatable, run through bash; %i is
    PostUp = ...                        #   the interface (see fzpoll.up.hooks)
    PreDown = ...
    PostDown = ...

    [Peer]                              # repeatable
    PublicKey = <base64 or hex>         # required, unique
    PresharedKey = <base64 or hex>
    Endpoint = vpn.example.com:51820    # or 192.0.2.1:51820, [2001:db8::1]:51820
    AllowedIPs = 0.0.0.0/0, ::/0        # repeatable
    PersistentKeepalive = 25            # 0-65535 or off

    [Resource]                          # repeatable: a DNS resource reached through a peer
    Name = *.example.com                # app.example.com, *.example.com, ?.example.com
    Peer = <public key of a [Peer] above or below>
    Address = 10.0.0.0/24               # optional, repeatable

    [Gateway]                           # at most one: this host is the gateway of DNS resources
    Resources = *.corp.example, db.internal.example   # repeatable; the patterns of [Resource] Name
    DNS = 10.97.1.10                    # the resolver for those names (default: /etc/resolv.conf's)

Keys and section names are case-insensitive; ``#`` starts a comment anywhere on a line. Every
problem raises :class:`ConfigError` naming file, line and key; error messages never echo the value
of a key field. Hostnames in ``Endpoint`` are kept as written: resolving them is the daemon's job.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

from fzpoll.errors import LocalError
from fzpoll.wireguard.keys import PresharedKey, PrivateKey, PublicKey, redact

__all__ = [
    "Config",
    "ConfigError",
    "Endpoint",
    "InterfaceConfig",
    "PeerConfig",
    "ResourceConfig",
    "GatewayConfig",
    "load_config",
    "parse_config",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

MIN_MTU = 576  # the IPv4 minimum every host must accept (RFC 791); IPv6 needs 1280
MAX_MTU = 65535


class ConfigError(LocalError):
    """A problem in a config file: ``"{path}:{line}: {key}: {problem}"``."""

    def __init__(self, path: str, line: int, key: str, problem: str) -> None:
        # Problems may quote the value: a key pasted into the wrong field is masked here.
        problem = redact(problem)
        super().__init__(f"{path}:{line}: {key}: {problem}")
        self.path = path
        self.line = line
        self.key = key
        self.problem = problem


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class Endpoint:
    """A peer's ``host:port`` as written; ``host`` is an IP literal or a name to resolve later."""

    host: str
    port: int

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address if it is an IP literal, else None (a name to resolve)."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class InterfaceConfig:
    private_key: PrivateKey
    listen_port: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    mtu: int | None = None
    dns: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    fwmark: int | None = None  # None: not given; 0: off
    table: str | None = None  # None: not given (auto); "off", "auto", digits, or an rt_tables name
    pre_up: tuple[str, ...] = ()
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()

    def hooks(self, phase: str) -> tuple[str, ...]:
        """The commands of ``phase`` ("PreUp", "PostUp", "PreDown" or "PostDown"), in file order."""
        return {"PreUp": self.pre_up, "PostUp": self.post_up, "PreDown": self.pre_down,
                "PostDown": self.post_down}[phase]


@dataclass(frozen=True)
class PeerConfig:
    public_key: PublicKey
    preshared_key: PresharedKey | None = None
    endpoint: Endpoint | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    persistent_keepalive: int | None = None  # None: not given; 0: off


@dataclass(frozen=True)
class ResourceConfig:
    name: str  # lower case, no trailing dot; may start with "*." or "?."
    peer: PublicKey
    addresses: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    resources: tuple[str, ...]  # patterns as [Resource] Name
    dns: IPAddress | None = None  # None: the system's resolver


@dataclass(frozen=True)
class Config:
    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...] = ()
    resources: tuple[ResourceConfig, ...] = ()
    warnings: tuple[str, ...] = ()  # "path:line: Key: ignored ..." for wg-quick-only keys
    gateway: GatewayConfig | None = None

    def to_uapi_set(self) -> str:
        """The UAPI ``set=1`` request for this config, ending with its terminating blank line.

        It replaces all peers. Endpoints given as hostnames are left out: the daemon resolves
        them and sets them itself. The text holds the private key: never log it.
        """
        iface = self.interface
        lines = ["set=1", f"private_key={iface.private_key.hex()}"]
        if iface.listen_port is not None:
            lines.append(f"listen_port={iface.listen_port}")
        if iface.fwmark is not None:
            lines.append(f"fwmark={iface.fwmark}")
        lines.append("replace_peers=true")
        for peer in self.peers:
            lines.append(f"public_key={peer.public_key.hex()}")
            if peer.preshared_key is not None:
                lines.append(f"preshared_key={peer.preshared_key.hex()}")
            if peer.endpoint is not None and peer.endpoint.ip is not None:
                lines.append(f"endpoint={peer.endpoint}")
            if peer.persistent_keepalive is not None:
                lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={net}" for net in peer.allowed_ips)
        return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------------------------
# Value parsers: each takes the value text and returns the parsed value or raises _Bad(problem).
# List parsers return lists, which repeated keys extend.


class _Bad(Exception):
    pass


def _integer(text: str, low: int, high: int, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _Bad(f"{what} must be a whole number from {low} to {high}, not {text!r}")
    return int(text)


def _key(cls: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return cls.from_text(text)
        except LocalError:
            raise _Bad("not a valid key (32 bytes in base64 or hex)") from None  # value not shown

    return parse


def _items(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise _Bad("empty item in comma-separated list")
    return items


def _ip(factory: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        out = []
        for item in _items(text):
            try:
                out.append(factory(item))
            except ValueError:
                raise _Bad(f"not a valid {what}: {item!r}") from None
        return out

    return parse


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _is_hostname(name: str) -> bool:
    labels = name.lower().removesuffix(".").split(".")
    return len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _port(text: str) -> int:
    return _integer(text, 0, 65535, "port")


def _mtu(text: str) -> int:
    return _integer(text, MIN_MTU, MAX_MTU, "MTU")


def _dns(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in _items(text):
        try:
            out.append(("server", ipaddress.ip_address(item)))
        except ValueError:
            if not _is_hostname(item):
                raise _Bad(f"neither an IP address nor a search domain: {item!r}") from None
            out.append(("search", item.lower().removesuffix(".")))
    return out


def _fwmark(text: str) -> int:
    if text.lower() == "off":
        return 0
    try:
        mark = int(text, 16) if text[:2].lower() == "0x" else _integer(text, 0, 2**32 - 1, "")
    except (ValueError, _Bad):
        mark = -1
    if "_" in text or not 0 <= mark < 2**32:
        raise _Bad(f"must be off or a 32-bit number (decimal or 0x hex), not {text!r}")
    return mark


_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _table_setting(text: str) -> str:
    """wg-quick's ``Table``: off, auto, a number (any 32-bit one) or a name from rt_tables."""
    if text.lower() in ("off", "auto"):
        return text.lower()
    if text.isascii() and text.isdigit():
        _integer(text, 0, 2**32 - 1, "a table number")
        return str(int(text))
    if not _TABLE_NAME.fullmatch(text):
        raise _Bad(f"must be off, auto, a table number or a table name, not {text!r}")
    return text


def _hook(text: str) -> list[str]:
    return [text]


def _endpoint(text: str) -> Endpoint:
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ok = bool(sep) and isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
        except ValueError:
            ok = False
        if not ok:
            raise _Bad(f"expected [IPv6]:port, not {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise _Bad(f"expected host:port, not {text!r}")
        if ":" in host:
            raise _Bad(f"an IPv6 endpoint needs brackets, as [{host}]:{port}")
        if not _is_hostname(host) or (host.rsplit(".", 1)[-1].isdigit() and not _is_ipv4(host)):
            raise _Bad(f"not a valid host name or IPv4 address: {host!r}")
    number = _integer(port, 1, 65535, "port")
    return Endpoint(host.lower() if ":" not in host else host, number)


def _keepalive(text: str) -> int:
    return 0 if text.lower() == "off" else _integer(text, 0, 65535, "keepalive interval")


_WILDCARDS = ("*.", "?.")


def _resource_name(text: str) -> str:
    name = text.lower().removesuffix(".")
    rest = name[2:] if name.startswith(_WILDCARDS) else name
    if not rest or not _is_hostname(rest):
        raise _Bad(f"expected a name like app.example.com, *.example.com or ?.example.com, not {text!r}")
    return name


def _resource_names(text: str) -> list[str]:
    return [_resource_name(item) for item in _items(text)]


def _gateway_dns(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Bad(f"expected the IP address of a DNS server, not {text!r}") from None


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)


# ---------------------------------------------------------------------------------------------
# Section tables


class _KeySpec(NamedTuple):
    name: str  # canonical spelling, used in errors and as the field key
    parse: Callable[[str], Any] | None  # None: a wg-quick key we accept and ignore
    repeat: bool = False  # list values; the key may appear more than once


def _table(*specs: _KeySpec) -> dict[str, _KeySpec]:
    return {spec.name.lower(): spec for spec in specs}


_IGNORED = ("SaveConfig",)
HOOK_PHASES = ("PreUp", "PostUp", "PreDown", "PostDown")

_SECTIONS: dict[str, tuple[str, dict[str, _KeySpec]]] = {
    "interface": (
        "Interface",
        _table(
            _KeySpec("PrivateKey", _key(PrivateKey)),
            _KeySpec("ListenPort", _port),
            _KeySpec("Address", _ip(ipaddress.ip_interface, "IP address or CIDR"), True),
            _KeySpec("MTU", _mtu),
            _KeySpec("DNS", _dns, True),
            _KeySpec("FwMark", _fwmark),
            _KeySpec("Table", _table_setting),
            *(_KeySpec(name, _hook, True) for name in HOOK_PHASES),
            *(_KeySpec(name, None, True) for name in _IGNORED),
        ),
    ),
    "peer": (
        "Peer",
        _table(
            _KeySpec("PublicKey", _key(PublicKey)),
            _KeySpec("PresharedKey", _key(PresharedKey)),
            _KeySpec("Endpoint", _endpoint),
            _KeySpec("AllowedIPs", _ip(_network, "IP network"), True),
            _KeySpec("PersistentKeepalive", _keepalive),
        ),
    ),
    "resource": (
        "Resource",
        _table(
            _KeySpec("Name", _resource_name),
            _KeySpec("Peer", _key(PublicKey)),
            _KeySpec("Address", _ip(_network, "IP address or network"), True),
        ),
    ),
    "gateway": (
        "Gateway",
        _table(
            _KeySpec("Resources", _resource_names, True),
            _KeySpec("DNS", _gateway_dns),
        ),
    ),
}

_REQUIRED = {"Interface": ("PrivateKey",), "Peer": ("PublicKey",), "Resource": ("Name", "Peer"),
             "Gateway": ("Resources",)}


class _Section:
    """A section being read: its values by canonical key, and the line each key first appeared."""

    def __init__(self, kind: str, line: int) -> None:
        self.kind = kind
        self.line = line
        self.values: dict[str, Any] = {}
        self.lines: dict[str, int] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


# ---------------------------------------------------------------------------------------------
# Reading


_SAFE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
_SECTION_LINE = re.compile(r"\[\s*([^\]]*?)\s*\]")


def _shown(key: str) -> str:
    """``key`` as it may appear in an error: a pasted secret must not leak through it."""
    return key if _SAFE_KEY.fullmatch(key) else "<malformed key>"


def _read_sections(text: str, path: str) -> tuple[list[_Section], list[str]]:
    sections: list[_Section] = []
    warnings: list[str] = []
    current: _Section | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        match = _SECTION_LINE.fullmatch(line)
        if match:
            kind = match.group(1)
            if kind.lower() not in _SECTIONS:
                raise ConfigError(path, number, f"[{_shown(kind)}]", "unknown section")
            current = _Section(_SECTIONS[kind.lower()][0], number)
            sections.append(current)
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not key:
            raise ConfigError(path, number, _shown(key), "expected 'Key = Value'")
        if current is None:
            raise ConfigError(path, number, _shown(key), "key before any [Section]")
        spec = _SECTIONS[current.kind.lower()][1].get(key.lower())
        if spec is None:
            raise ConfigError(path, number, _shown(key), f"unknown key in [{current.kind}]")
        if spec.parse is None:
            warnings.append(f"{path}:{number}: {spec.name}: ignored (fzpoll never rewrites its configuration file)")
            continue
        _set(current, spec, value, path, number)
    return sections, warnings


def _set(section: _Section, spec: _KeySpec, value: str, path: str, number: int) -> None:
    if spec.name in section.values and not spec.repeat:
        first = section.lines[spec.name]
        raise ConfigError(path, number, spec.name, f"given twice in one section (first on line {first})")
    value = value.replace("\t", " ")
    if not value.isascii() or not value.isprintable():
        raise ConfigError(path, number, spec.name, "value has non-ASCII or control characters")
    if not value and not spec.repeat:
        raise ConfigError(path, number, spec.name, "empty value")
    try:
        parsed = spec.parse(value) if value else []  # type: ignore[misc]
    except _Bad as exc:
        raise ConfigError(path, number, spec.name, str(exc)) from None
    section.lines.setdefault(spec.name, number)
    if spec.repeat:
        section.values.setdefault(spec.name, []).extend(parsed)
    else:
        section.values[spec.name] = parsed


def _require(section: _Section, path: str) -> None:
    for key in _REQUIRED[section.kind]:
        if key not in section.values:
            raise ConfigError(path, section.line, key, f"required in [{section.kind}] but missing")


def _unique(items: list[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(items))


def _build_interface(section: _Section) -> InterfaceConfig:
    dns = section.get("DNS", [])
    return InterfaceConfig(
        private_key=section.values["PrivateKey"],
        listen_port=section.get("ListenPort"),
        addresses=_unique(section.get("Address", [])),
        mtu=section.get("MTU"),
        dns=_unique([value for kind, value in dns if kind == "server"]),
        dns_search=_unique([value for kind, value in dns if kind == "search"]),
        fwmark=section.get("FwMark"),
        table=section.get("Table"),
        pre_up=tuple(section.get("PreUp", [])),
        post_up=tuple(section.get("PostUp", [])),
        pre_down=tuple(section.get("PreDown", [])),
        post_down=tuple(section.get("PostDown", [])),
    )


def _build_peer(section: _Section) -> PeerConfig:
    return PeerConfig(
        public_key=section.values["PublicKey"],
        preshared_key=section.get("PresharedKey"),
        endpoint=section.get("Endpoint"),
        allowed_ips=_unique(section.get("AllowedIPs", [])),
        persistent_keepalive=section.get("PersistentKeepalive"),
    )


def _build_resource(section: _Section) -> ResourceConfig:
    return ResourceConfig(
        name=section.values["Name"],
        peer=section.values["Peer"],
        addresses=_unique(section.get("Address", [])),
    )


def parse_config(text: str, path: str = "<string>") -> Config:
    """Parse a config file's text; ``path`` names it in errors. Raises :class:`ConfigError`."""
    sections, warnings = _read_sections(text, path)
    for section in sections:
        _require(section, path)
    interfaces = [s for s in sections if s.kind == "Interface"]
    if not interfaces:
        raise ConfigError(path, 1, "[Interface]", "section missing")
    if len(interfaces) > 1:
        raise ConfigError(path, interfaces[1].line, "[Interface]", "section given twice")

    own = interfaces[0].values["PrivateKey"].public_key
    peers: dict[PublicKey, _Section] = {}
    for section in (s for s in sections if s.kind == "Peer"):
        key = section.values["PublicKey"]
        if key == own:
            raise ConfigError(path, section.lines["PublicKey"], "PublicKey",
                              "this is the interface's own public key (from its PrivateKey): "
                              "an interface cannot be its own peer")
        if key in peers:
            first = peers[key].line
            raise ConfigError(
                path, section.lines["PublicKey"], "PublicKey", f"duplicate peer (first on line {first})"
            )
        peers[key] = section

    names: dict[str, int] = {}
    for section in (s for s in sections if s.kind == "Resource"):
        if section.values["Peer"] not in peers:
            raise ConfigError(path, section.lines["Peer"], "Peer", "no [Peer] has this public key")
        name = section.values["Name"]
        if name in names:
            raise ConfigError(
                path, section.lines["Name"], "Name", f"duplicate resource (first on line {names[name]})"
            )
        names[name] = section.line

    gateways = [s for s in sections if s.kind == "Gateway"]
    if len(gateways) > 1:
        raise ConfigError(path, gateways[1].line, "[Gateway]", "section given twice")
    gateway = None
    if gateways:
        gateway = GatewayConfig(_unique(gateways[0].values["Resources"]), gateways[0].get("DNS"))

    return Config(
        interface=_build_interface(interfaces[0]),
        peers=tuple(_build_peer(s) for s in peers.values()),
        resources=tuple(_build_resource(s) for s in sections if s.kind == "Resource"),
        warnings=tuple(warnings),
        gateway=gateway,
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file (UTF-8). Warns, in ``Config.warnings``, if others can read it.

    Refuses a file anyone may write (its hooks run as root), and hooks in a file owned by a user
    other than root or us: whoever can write the file can run commands as the daemon.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            info = os.fstat(f.fileno())
            mode, owner = info.st_mode, info.st_uid
            data = f.read()
    except OSError as exc:
        raise ConfigError(name, 0, "-", f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(name, line, "-", "file is not UTF-8") from None
    if mode & stat.S_IWOTH:
        raise ConfigError(name, 0, "-", "file is world-writable: anyone could change its keys, "
                          "routes and hooks (which run as root); chmod 600")
    config = parse_config(text, name)
    hooks = any(config.interface.hooks(phase) for phase in HOOK_PHASES)
    if hooks and owner not in (0, os.geteuid()):
        raise ConfigError(name, 0, "-", f"has PreUp/PostUp/PreDown/PostDown hooks but belongs to uid "
                          f"{owner}, who could make us run any command; chown root")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warning = f"{name}:0: -: readable by group or others but holds a private key (chmod 600)"
        config = Config(config.interface, config.peers, config.resources, config.warnings + (warning,),
                        config.gateway)
    return config
