"""``gradtrack`` command line: what is installed, and the settings a run would report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradtrack._version import __version__
from gradtrack.plugins import AUTOLOAD_ENV, KNOWN_EXTRAS, available_backends

__all__ = ["main"]


def _backends() -> int:
    installed = available_backends()
    for name in installed:
        print(name)
    missing = [f"{name} (pip install '{extra}')" for name, extra in KNOWN_EXTRAS.items() if name not in installed]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradtrack", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradtrack {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "backends", help=f"list the backends backend= accepts here (entry points unless {AUTOLOAD_ENV} is set)"
    )
    args = parser.parse_args(argv)
    if args.command == "backends":
        return _backends()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
