"""The clip policies: the ``ClipPolicy`` protocol and its device operations (``policy``), norm and value
clipping and the registry (``clipping``), the adaptive ones (``adaptive``).

May import: the contract, ``gradtrack.measure`` (the measured ``GradBatch``) and ``gradtrack.judge`` (the
quantile helper, the detectors the adaptive policies read); never the hand-over or delivery.
"""
