"""``gradtrack``: the command line. ``backends`` is built in; plugins add theirs (the MLflow plugin adds
``runs``, ``report``, ``watch`` and ``replay``) through the ``gradtrack_cli_commands`` hook.

Exit codes: 0 success; 1 the command ran but found or delivered something wrong (see its ``--help``);
2 bad arguments or nothing to work on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradtrack._version import __version__
from gradtrack.delivery.plugins import AUTOLOAD_ENV, KNOWN_EXTRAS, available_backends, discovery_manager

__all__ = ["main"]


def _backends(args: argparse.Namespace) -> int:
    installed = available_backends()
    for name in installed:
        print(name)
    missing = [f"{name} (pip install '{extra}')" for name, extra in KNOWN_EXTRAS.items() if name not in installed]
    if missing:
        print(f"not installed: {', '.join(missing)}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    """The whole command line: the built-in command and every plugin's."""
    root = argparse.ArgumentParser(
        prog="gradtrack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root.add_argument("--version", action="version", version=f"gradtrack {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    backends = commands.add_parser(
        "backends", help=f"list the backends backend= accepts here (entry points unless {AUTOLOAD_ENV} is set)"
    )
    backends.set_defaults(handler=_backends)
    discovery_manager().hook.gradtrack_cli_commands(subparsers=commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
