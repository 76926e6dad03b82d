"""Where a step hands its messages: any ``Outlet``. The tracker gives its step pipeline the delivery's outbox
when it enters (``gradtrack.delivery.outbox``); until then, and where nothing is reported, messages are
discarded. The step path knows only this protocol, never what delivers."""

from __future__ import annotations

from typing import Protocol, final

from gradtrack.handover.messages import Message

__all__ = ["Discard", "Outlet"]


class Outlet(Protocol):
    """What a step hands messages to; ``dropped`` counts those lost under back-pressure."""

    @property
    def dropped(self) -> int: ...

    def send(self, message: Message) -> None: ...

    def flush(self, timeout: float) -> bool: ...

    def close(self, timeout: float) -> list[str]: ...


@final
class Discard:
    """The outlet of a pipeline no tracker has entered yet: nothing to deliver to."""

    dropped = 0

    def send(self, message: Message) -> None:
        pass

    def flush(self, timeout: float) -> bool:
        return True

    def close(self, timeout: float) -> list[str]:
        return []
