"""What the W&B run says while it goes, besides its rows: alerts at a bounded rate, and the notes' rollbacks.

wandb is not imported here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import final

__all__ = ["NOTE_ROLLBACKS", "Throttle", "rollback_note"]

NOTE_ROLLBACKS = 10  # the latest rollbacks the notes list (the summary keeps more)


@final
class Throttle:
    """One kind of alert at most every ``every`` seconds: the first event at once, then the first one after
    ``every`` seconds have passed, saying how many events it stands for (W&B's ``wait_duration`` would drop
    the others without a word)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last = -math.inf
        self._held = 0

    def due(self, first: bool) -> int:
        """0: hold this event back; else the number of events this alert stands for, this one included."""
        self._held += 1
        now = time.monotonic()
        if not (first or now - self._last >= self.every):
            return 0
        held, self._held, self._last = self._held, 0, now
        return held


def rollback_note(rollbacks: Sequence[tuple[int, int]], count: int, lr_scale: float, headline: bool) -> str:
    """The notes' lines on the rollbacks so far: ``rollbacks`` the latest (step, restored step) pairs, ``count``
    all of them; ``headline``: start with one (a run that diverged has its own)."""
    shown = rollbacks[-NOTE_ROLLBACKS:]
    earlier = f" ({count - len(shown)} earlier not listed)" if count > len(shown) else ""
    lines = [f"### gradtrack: rolled back {count} time(s), not diverged\n"] if headline else []
    lines += [f"Rollbacks{earlier}:\n", *(f"- step {step}: rolled back to step {restored}" for step, restored in shown)]
    lines += ["", f"Learning rate now x{lr_scale:g}.\n"]
    return "\n".join(lines)
