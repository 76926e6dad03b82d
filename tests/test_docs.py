"""The documentation site: every public class and function has a docstring and a place in the API reference.

``make test`` builds the site with ``mkdocs build --strict``, so a reference that no longer resolves, a broken
link or a missing anchor fails there. What a strict build cannot see is a public name that nobody put in the
reference, or a docstring that is missing: the rendered page is then merely empty. That is checked here, on
the source as mkdocstrings reads it (griffe, without importing anything).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).parent.parent
# What users import: gradtrack's exports, the trainer callbacks, and the backends they may build themselves.
EXPORTING = ("gradtrack", "gradtrack.integrations.lightning", "gradtrack.integrations.transformers")
BACKENDS = ("gradtrack.delivery.console.ConsoleBackend", "gradtrack_mlflow.backend.MLflowBackend",
            "gradtrack_wandb.backend.WandbBackend")  # fmt: skip
VALUES = {"__version__", "hookimpl", "hookspec"}  # not classes or functions: described in the reference's prose


def load(path: str) -> Any:
    package, _, rest = path.partition(".")
    root = griffe.load(package, search_paths=[ROOT, ROOT / "backends"])
    return root[rest] if rest else root


def public() -> dict[str, Any]:
    """Every public class and function, by the path it is defined at."""
    found: dict[str, Any] = {}
    for module_path in EXPORTING:
        module = load(module_path)
        for name in module.exports:
            if name in VALUES:
                continue
            target = module[name].final_target if module[name].is_alias else module[name]
            found[target.path] = target
    for path in BACKENDS:
        found[path] = load(path)
    return found


def reference() -> tuple[set[str], str]:
    """The paths the reference renders with ``::: path`` blocks, and the text of every page."""
    text = "\n".join(page.read_text() for page in sorted((ROOT / "docs").rglob("*.md")))
    return set(re.findall(r"^::: ([\w.]+)$", text, re.M)), text


def test_every_public_class_and_function_has_a_docstring_and_a_place_in_the_reference() -> None:
    rendered, _text = reference()
    objects = public()
    assert len(objects) > 30  # gradtrack's exports were found at all
    undocumented = sorted(path for path, obj in objects.items() if not (obj.docstring and obj.docstring.value.strip()))
    assert undocumented == [], "public without a docstring"
    unrendered = sorted(path for path in objects if path not in rendered and path.rsplit(".", 1)[0] not in rendered)
    assert unrendered == [], "public but in no ::: block of docs/reference (add it to the page it belongs on)"


def test_every_public_member_of_the_tracker_and_every_hook_is_documented() -> None:
    tracker = load("gradtrack.tracker.GradTracker")
    members = {
        name: member
        for name, member in tracker.members.items()
        if not name.startswith("_") and (member.is_function or "property" in member.labels)
    }
    assert {"observe", "step", "flush", "summary", "diverged"} <= set(members)
    assert sorted(name for name, member in members.items() if not member.docstring) == []
    hookspecs = load("gradtrack.hookspecs")
    hooks = [member for name, member in hookspecs.members.items() if name.startswith("gradtrack_")]
    assert len(hooks) >= 9 and all(hook.docstring for hook in hooks)
    assert "gradtrack.hookspecs" in reference()[0]


def test_the_values_without_docstrings_are_described_in_the_reference() -> None:
    api = (ROOT / "docs" / "reference" / "api.md").read_text()
    assert all(f"`gradtrack.{name}`" in api for name in VALUES)
