"""gradtrack's test and benchmark helpers, one of each, importable instead of reached through ``sys.path``.

A distribution of its own (``testing/pyproject.toml``, installed by ``make``), never shipped in
gradtrack's wheel. Import from the module that holds a helper:

* ``seed``: the seed's reference functions, as the seed wrote them.

Nothing is re-exported here: importing this package must stay free of torch, pytest and the SDKs,
because the reporter process imports ``probe_plugin`` (and tests check it never loads torch), and the
fault server runs in a process of its own in ``benchmarks/faults.py``.
"""
