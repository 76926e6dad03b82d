"""Metric keys valid for the tracker, deterministic and distinct."""

from __future__ import annotations

import re

from gradtrack.naming import MLFLOW_INVALID, sanitize_names

VALID = re.compile(r"^[/\w.\- :]*$")


def test_rejected_names_become_valid_distinct_keys() -> None:
    names = ["a[0]", "a(0)", "x,y", "a//b", "/lead", "ok.weight", "a_0_"]
    keys = sanitize_names(names, prefix="grad_norm/")
    assert len(set(keys.values())) == len(names)
    for key in keys.values():
        assert VALID.match(key) and "//" not in key and not key.startswith("/") and len(key) <= 250
    assert keys["ok.weight"] == "grad_norm/ok.weight"
    assert keys["a//b"] == "grad_norm/a/b"


def test_the_same_names_give_the_same_keys_in_any_order() -> None:
    names = ["a[0]", "a(0)", "b", "c d", "é.weight"]
    assert sanitize_names(names) == sanitize_names(list(reversed(names)))


def test_long_names_are_cut_with_a_hash() -> None:
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    keys = sanitize_names([long_a, long_b], prefix="grad_norm/")
    assert keys[long_a] != keys[long_b]
    assert all(len(k) <= 250 for k in keys.values())
    assert not re.search(MLFLOW_INVALID, keys[long_a])


def test_fold_case_keeps_keys_distinct_for_trackers_that_ignore_case() -> None:
    names = ["layer.Weight", "layer.weight", "other"]
    assert len({k.lower() for k in sanitize_names(names).values()}) == 2  # plain: only exact collisions
    keys = sanitize_names(names, fold_case=True)
    assert len({k.lower() for k in keys.values()}) == 3 and keys["other"] == "other"
    assert keys == sanitize_names(list(reversed(names)), fold_case=True)
