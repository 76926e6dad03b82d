"""Judgement on the host numbers of each step: explosions, divergence and the skip rules (``detection``), the
device diagnosis of a first explosion (``diagnosis``), and the quantile helper they share with the policies
(``quantiles``).

May import: the contract only; never the hand-over or delivery (judgement is the same in every process).
"""
