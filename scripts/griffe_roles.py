"""A griffe extension for the API reference: the Sphinx roles some docstrings use, as Markdown code.

The docstrings are written for readers of the source (``:class:`~gradtrack.events.Summary```); Markdown
has no roles, so mkdocstrings would print them as they are. Each becomes the code span of the name a
reader would see (``Summary``), which needs no link target and so can never break the strict build.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_code, obj.docstring.value)
