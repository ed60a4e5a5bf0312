"""The layers stay apart: the protocol cores are sans-IO, the loop knows no protocol.

Read from the source (ast), so the check covers every import statement, also the ones inside a
function, and fails with the module and line that broke the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fzpoll"

# Modules that take bytes and ``now`` and return packets and deadlines: no fd, no clock, no thread.
SANS_IO = sorted(
    [*PACKAGE.glob("wireguard/*.py"), *PACKAGE.glob("gateway/*.py"), PACKAGE / "dns" / "stub.py",
     PACKAGE / "dns" / "lookup.py", PACKAGE / "dns" / "upstream.py", PACKAGE / "dns" / "tcpserver.py",
     PACKAGE / "uapi" / "protocol.py", PACKAGE / "uapi" / "transaction.py", PACKAGE / "uapi" / "values.py",
     PACKAGE / "ippacket.py", PACKAGE / "errors.py"]
)
FORBIDDEN_IN_SANS_IO = {"socket", "select", "selectors", "time", "os", "fcntl", "threading", "subprocess",
                        "asyncio", "signal"}
SANS_IO_MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in SANS_IO}


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, with its line (``from x import y`` gives x and x.y)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_the_sans_io_set_is_what_the_layout_says() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in SANS_IO}
    assert {"wireguard/engine.py", "wireguard/handshake.py", "dns/stub.py", "uapi/protocol.py",
            "uapi/transaction.py", "uapi/values.py"} <= names
    assert {"gateway/control.py", "gateway/nat.py", "gateway/packet.py", "dns/tcpserver.py"} <= names


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_sans_io_modules_touch_no_fd_clock_or_thread(path: Path) -> None:
    bad = []
    for line, name in imports(path):
        top = name.split(".")[0]
        if top in FORBIDDEN_IN_SANS_IO:
            bad.append(f"line {line}: import {name}")
        elif top == "fzpoll" and name.count(".") >= 1:
            # fzpoll modules it may import: other sans-IO modules (or names defined in them)
            module = name if name in SANS_IO_MODULES else name.rpartition(".")[0]
            if module not in SANS_IO_MODULES and name not in SANS_IO_MODULES and module != "fzpoll":
                bad.append(f"line {line}: import {name} (not a sans-IO module)")
    assert not bad, f"{path.relative_to(PACKAGE)} breaks the sans-IO rule:\n" + "\n".join(bad)


def test_the_rule_catches_an_import_of_socket(tmp_path: Path) -> None:
    """The checker itself: a core module that imports socket, even inside a function, is caught."""
    sample = tmp_path / "core.py"
    sample.write_text("import struct\n\ndef f():\n    import socket\n    from os import path\n")
    names = [name.split(".")[0] for _, name in imports(sample)]
    assert "socket" in names and "os" in names and set(names) & FORBIDDEN_IN_SANS_IO == {"socket", "os"}
