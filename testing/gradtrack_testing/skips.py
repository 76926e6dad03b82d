"""Skipping a test whose system package (PostgreSQL, Chromium) is missing here, or failing it in CI.

Why it exists: the load and browser tests need system packages a developer's machine may lack; there
they are skipped with the reason, while CI, which must run every test, turns the same skip into a failure.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["missing_system_dependency"]


def missing_system_dependency(reason: str) -> NoReturn:
    """Skip a test whose system package is absent here, or fail it where CI asks for every test to run.

    ``.ci/run`` sets GRADTRACK_REQUIRE_ALL_TESTS=1: a CI machine that could not install PostgreSQL or
    Chromium must go red, not report a green run with the load and browser tests quietly skipped.
    """
    if os.environ.get("GRADTRACK_REQUIRE_ALL_TESTS") == "1":
        pytest.fail(f"{reason} (GRADTRACK_REQUIRE_ALL_TESTS=1: no test may be skipped)", pytrace=False)
    pytest.skip(reason)
