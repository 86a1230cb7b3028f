"""The engine's answers to a policy's questions about queued work (`ExecView`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from haq.runtime.cache import Key

if TYPE_CHECKING:
    from haq.runtime.engine import Engine


class EngineView:
    """ExecView for the policies, from the engine's own queues and CUDA events."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def link_backlog_s(self) -> float:
        pending = sum(1 for ev in self.engine.pending.values() if ev is not None and not ev.query())
        return pending * self.engine.predictor.t_transfer()

    def cpu_backlog_s(self) -> float:
        return self.engine.cpu_assigned_s

    def ready_in_s(self, key: Key) -> float:
        ev = self.engine.pending.get(key)
        return self.engine.predictor.t_transfer() if ev is not None and not ev.query() else 0.0

    def copied_ahead(self, key: Key) -> bool:
        return key in self.engine.ahead
