"""Print the version and location of each Python dependency, as the interpreter running it sees them.

    python3 tools/deps-versions.py                        # what the suite will run on
    python3 tools/deps-versions.py --from /usr/lib/python3/dist-packages   # and fail if elsewhere

CI prints this before each of its two runs (PyPI set, Debian set), so a log says what was tested.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# (import name, distribution name): runtime deps, then the test deps.
DEPENDENCIES = (("nacl", "PyNaCl"), ("pyroute2", "pyroute2"), ("dnslib", "dnslib"),
                ("pytest", "pytest"), ("hypothesis", "hypothesis"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="prefix", help="fail unless every dependency is imported from here")
    args = parser.parse_args()
    wrong = []
    print(f"Python {sys.version.split()[0]} {sys.executable}")
    for module, dist in DEPENDENCIES:
        path = importlib.import_module(module).__file__ or "?"
        print(f"{dist} {importlib.metadata.version(dist)} {path}")
        if args.prefix and not path.startswith(args.prefix.rstrip("/") + "/"):
            wrong.append(module)
    if wrong:
        print(f"not from {args.prefix}: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
