"""Delivering the hand-over to backends: where they run (``outbox``), the reporter process and the training
process's end of it (``reporter_main``, ``reporter``), one worker per backend (``dispatch``), finding them
(``plugins``), the built-in console backend, and what backends share: credentials kept out (``secrets``), the
run's description (``notes``), the plots and the history they are drawn from (``plots``, ``history``).

May import: the contract and ``handover``; never the step path, the policies, judgement or healing (the reporter
process never loads torch).
"""
