"""The device work of a step: which parameters, their norms in one fused pass and one transfer, AMP's scale,
and the one collective across ranks.

``params`` (what is measured, kept current while the model changes), ``stats`` (the fused measurement and the
one device-to-host transfer), ``amp`` (what a GradScaler did to the gradients), ``distributed`` (the strategy and
the step's one collective). May import: the contract (``gradtrack.events``, ``state``, ``validate``); nothing
of the other parts.
"""
