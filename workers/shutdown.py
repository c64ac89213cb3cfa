"""A worker told to stop (SIGTERM: scale-in, a deploy, a restart) stops long work at its next
safe point, instead of dying in it or holding its exit up.

Celery's warm shutdown stops consuming and waits for the tasks under way; a campaign chunk may
take minutes (a throttled relay), longer than a platform waits before its SIGKILL. So every
process of a worker reads one stop flag, and a chunk that finds it set starts no further
message, settles what it sent, gives its other claims back and is enqueued again at once for
another worker (:func:`dispatcher.campaigns.chunks._handed_back`: the path of a chunk whose
time is up).

- SIGTERM to the main process only (Kubernetes, ``docker stop``, an autoscaler): Celery's
  handler announces ``worker_shutting_down`` and the flag is set in a page of memory the
  prefork pool's processes share (made before they fork). A solo pool reads it in-process.
- SIGTERM to every process of the worker (Heroku, ``kill -TERM -<pgid>``): billiard's handler
  would end a pool process at once, mid-batch, leaving its claimed recipients to their leases
  (minutes). A pool process running a task sets its own flag instead and exits with the pool
  once the task returned; an idle one exits at once, as before.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
from types import FrameType
from typing import Any

from celery import Celery
from celery.signals import (
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_shutting_down,
)

from dispatcher.runtime import Runtime

log = logging.getLogger(__name__)


class SharedStop:
    """The stop flag of one worker: a byte of anonymous shared memory, made in the main process
    before the pool forks, that every pool process reads; and each process's own flag."""

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, 1)  # MAP_SHARED: forked children see the parent's writes
        self._here = False

    def set(self) -> None:
        """Every process of the worker is to stop."""
        self._page[0] = 1

    def set_here(self) -> None:
        """This process is to stop."""
        self._here = True

    def is_set(self) -> bool:
        return self._here or self._page[0] == 1


class _Shutdown:
    """The signal handlers of one app's worker in this process."""

    def __init__(self, app: Celery, rt: Runtime) -> None:
        self.app = app
        self.rt = rt
        self.flag: SharedStop | None = None
        self.in_pool = False  # this is a prefork pool process
        self.busy = False  # a task of the app runs in this process
        self.trapped = False  # this pool process's SIGTERM handler is in place

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        # Main process, before the pool forks.
        if getattr(sender, "app", None) is self.app:
            self.flag = SharedStop()
            self.rt.stopping = self.flag

    def on_shutting_down(self, sig: str = "", how: str = "", **_: Any) -> None:
        # Main process, inside Celery's signal handler: set a byte, nothing that may block.
        if self.flag is not None:
            self.flag.set()

    def on_process_init(self, **_: Any) -> None:
        # A pool process; billiard installs its own SIGTERM handler after this signal, so
        # ours goes in front of it when the first task starts.
        self.in_pool = True

    def on_task_start(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        self.busy = True
        if self.in_pool and not self.trapped:
            self.trapped = True
            previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._pool_term(previous))

    def on_task_end(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is self.app:
            self.busy = False

    def _pool_term(self, previous: Any) -> Any:
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.busy and self.flag is not None:
                self.flag.set_here()  # the task hands back; the pool ends the process after
                return
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        return handler


def install(app: Celery, rt: Runtime) -> None:
    """Make ``app``'s workers hand long work back when told to stop (see the module)."""
    s = _Shutdown(app, rt)
    worker_init.connect(s.on_worker_init, weak=False)
    worker_shutting_down.connect(s.on_shutting_down, weak=False)
    worker_process_init.connect(s.on_process_init, weak=False)
    task_prerun.connect(s.on_task_start, weak=False)
    task_postrun.connect(s.on_task_end, weak=False)
