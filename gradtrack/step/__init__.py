"""One step, top to bottom: measure, clip, one transfer, judge, hand over (``pipeline``); the same inside a
DeepSpeed engine (``deepspeed``); and the tracker that measures nothing says so (``silence``).

May import: the contract, ``measure``, ``policies``, ``judge``, ``heal`` and ``handover``; never ``delivery``
(what runs backends): the step hands its messages to an ``Outlet`` the tracker gives it.
"""
