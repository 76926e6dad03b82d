"""Self-healing: snapshots of the training state while the run is healthy, and the rollback that restores
one when it diverges (``rollback``).

May import: the contract only.
"""
