"""A pool worker's share of placement: the models the registry assigns it, in its heartbeat answers.

Each answer lists every model assigned to this worker. A new one is followed like a FOVEA_WORKER_MODELS
entry NAME (load, warm up, ready; alias moves followed); one no longer listed leaves (ModelManager.leave:
not ready in heartbeats at once, answering for unload_delay_s, then unloaded). A model that fails to
load is tried again after a back-off that doubles up to load_retry_max_s, not at every heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from worker.models import ModelManager

logger = logging.getLogger(__name__)


class Assignments:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.config = manager.config
        self.assigned: set[str] = set()
        self.errors: dict[str, str] = {}
        """Model -> why its last load failed (cleared when it loads)."""
        self._retry: dict[str, tuple[float, float]] = {}
        """Model -> (monotonic time of its next try, the wait after that one fails)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def apply(self, names: Sequence[str]) -> None:
        """Take a heartbeat answer's assigned_models (only when its assignment_known is true)."""
        if len(names) > self.config.max_assigned_models:
            logger.error(
                "assigned %d models, more than max_assigned_models=%d; following the first %d",
                len(names),
                self.config.max_assigned_models,
                self.config.max_assigned_models,
            )
            names = names[: self.config.max_assigned_models]
        wanted = set(names) - self.manager.fixed
        for name in sorted(self.assigned - wanted):
            self._retry.pop(name, None)
            self.errors.pop(name, None)
            self.manager.leave(name)
        for name in sorted(wanted - self.assigned):
            logger.info("assigned %s", name)
        self.assigned = wanted
        now = time.monotonic()
        for name in sorted(wanted):
            if name in self._tasks or self.manager.serving(name):
                continue
            if self._retry.get(name, (0.0, 0.0))[0] > now:
                continue
            self._tasks[name] = asyncio.create_task(self._follow(name))

    async def _follow(self, name: str) -> None:
        try:
            await self.manager.follow(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the others
            wait = self._retry.get(name, (0.0, self.config.load_retry_s))[1]
            self._retry[name] = (time.monotonic() + wait, min(wait * 2, self.config.load_retry_max_s))
            self.errors[name] = str(exc)[:300]
            logger.error("cannot serve assigned %s (next try in %.1fs): %s", name, wait, exc)
        else:
            self._retry.pop(name, None)
            self.errors.pop(name, None)
        finally:
            self._tasks.pop(name, None)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
