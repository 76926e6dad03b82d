"""What crosses from the training process to its backends: the typed messages (``messages``), their frames on
the pipe (``channel``), what backends receive made from them (``records``), the run's summary both sides fold
from them (``summary``), and the ``Outlet`` a step hands them to (``outlet``).

May import: the contract and ``gradtrack.judge.quantiles``; never ``delivery`` or the step path.
"""
