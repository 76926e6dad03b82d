"""Build the sdist and the wheel as a release would, and check what a user would install.

Run by ``make test``: ``python -m build`` (isolated, as a release builds), ``twine check --strict`` on
both, then the wheel's contents: the core and both backends, their entry points in the ``gradtrack``
group and the ``gradtrack`` command, ``py.typed``, the version from ``gradtrack/_version.py``, and none
of the test helpers. Exits non-zero naming every problem found.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def version() -> str:
    found = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "gradtrack" / "_version.py").read_text(), re.M)
    if found is None:
        raise SystemExit('gradtrack/_version.py has no __version__ = "..." line')
    return found.group(1)


def wheel_problems(wheel: Path, expected_version: str) -> list[str]:
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name for name in names if name.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
    for path in ("gradtrack/__init__.py", "gradtrack/py.typed", "gradtrack/hookspecs.py",
                 "gradtrack_mlflow/__init__.py", "gradtrack_mlflow/backend.py",
                 "gradtrack_wandb/__init__.py", "gradtrack_wandb/backend.py"):  # fmt: skip
        if path not in names:
            problems.append(f"the wheel lacks {path}")
    tops = {name.split("/", 1)[0] for name in names if not name.startswith(info)}
    if tops != {"gradtrack", "gradtrack_mlflow", "gradtrack_wandb"}:
        problems.append(f"the wheel's top-level packages are {sorted(tops)}")
    if f"\nVersion: {expected_version}\n" not in metadata:
        problems.append(f"the wheel's METADATA does not say Version: {expected_version}")
    plugins = dict(entry_points["gradtrack"]) if entry_points.has_section("gradtrack") else {}
    if plugins != {"mlflow": "gradtrack_mlflow", "wandb": "gradtrack_wandb"}:
        problems.append(f"the wheel's gradtrack entry points are {plugins}")
    scripts = dict(entry_points["console_scripts"]) if entry_points.has_section("console_scripts") else {}
    if scripts.get("gradtrack") != "gradtrack.cli:main":
        problems.append(f"the wheel's console scripts are {scripts}")
    return problems


def sdist_problems(sdist: Path, expected_version: str) -> list[str]:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = ("pyproject.toml", "README.md", "CHANGELOG.md", "gradtrack/_version.py", "gradtrack/py.typed",
              "backends/gradtrack_mlflow/__init__.py", "backends/gradtrack_wandb/__init__.py")  # fmt: skip
    problems = [f"the sdist lacks {path}" for path in wanted if path not in names]
    if not sdist.name.startswith(f"gradtrack-{expected_version}."):
        problems.append(f"the sdist is named {sdist.name}, not for version {expected_version}")
    return problems


def main() -> int:
    expected_version = version()
    with tempfile.TemporaryDirectory(prefix="gradtrack-dist-") as out:
        built = subprocess.run([sys.executable, "-m", "build", "--outdir", out, str(ROOT)],
                               capture_output=True, text=True)  # fmt: skip
        if built.returncode != 0:
            print(built.stdout[-3000:], built.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        [wheel] = Path(out).glob("*.whl")
        [sdist] = Path(out).glob("*.tar.gz")
        checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                                 capture_output=True, text=True)  # fmt: skip
        problems = [] if checked.returncode == 0 else [f"twine check: {checked.stdout}{checked.stderr}".strip()]
        problems += wheel_problems(wheel, expected_version) + sdist_problems(sdist, expected_version)
        for problem in problems:
            print(f"check_dist: {problem}", file=sys.stderr)
        if not problems:
            print(f"check_dist: {wheel.name} and {sdist.name} built and checked")
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
