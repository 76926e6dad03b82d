"""MkDocs hooks: the command-line reference is the ``--help`` of each command, made at build time.

A page that holds ``<!-- gradtrack --help -->`` gets the help of ``gradtrack`` and of every command that
the installed plugins add, so the reference cannot drift from the code (``make docs`` builds with the
project's venv, where both backends are installed).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- gradtrack --help -->"


def _help_pages() -> str:
    from gradtrack.cli import parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: a fixed width builds the same page anywhere
    try:
        root = parser()
        [commands] = [a for a in root._actions if isinstance(a, argparse._SubParsersAction)]
        sections = ["## `gradtrack`", f"```text\n{root.format_help().strip()}\n```"]
        for name, command in commands.choices.items():
            sections += [f"## `gradtrack {name}`", f"```text\n{command.format_help().strip()}\n```"]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(MARKER, _help_pages()) if MARKER in markdown else markdown
