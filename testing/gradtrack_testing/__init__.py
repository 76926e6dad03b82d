"""gradtrack's test and benchmark helpers, one of each, importable instead of reached through ``sys.path``.

A distribution of its own (``testing/pyproject.toml``, installed by ``make``), never shipped in
gradtrack's wheel. Import from the module that holds a helper:

* ``mlflow_server``: ``MlflowServer``, a real ``mlflow server`` on 127.0.0.1 (sqlite or a given store);
* ``fault_server``: ``FaultServer``, a loopback proxy in front of it that fails on demand (or, with no
  upstream, a server that never answers);
* ``fault_training``: the 40-step run the fault tests inject their faults into;
* ``seed``: the seed's reference functions, as the seed wrote them;
* ``models``: the tests' tiny models, batches and training loop;
* ``healing``: a run that rolls back (``on_divergence="rollback"``) at the poisoned batches it is fed;
* ``recording``: ``RecordingBackend``, a plugin that keeps every hook call;
* ``probe_plugin``: a plugin found through an entry point, which runs in the reporter process;
* ``wandb_files``: a reader for the ``.wandb`` files an offline run writes;
* ``postgres``: a throwaway PostgreSQL server for the load test;
* ``skips``: skipping (or, in CI, failing) a test whose system package is missing;
* ``ports``: a free port on loopback.

Nothing is re-exported here: importing this package must stay free of torch, pytest and the SDKs,
because the reporter process imports ``probe_plugin`` (and tests check it never loads torch), and the
fault server runs in a process of its own in ``benchmarks/faults.py``.
"""
