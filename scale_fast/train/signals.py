"""Stop signals while training: the first finishes the step and checkpoints, a second aborts."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional


class Aborted(KeyboardInterrupt):
    """A second stop signal: training ends at once, without a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGINT/SIGTERM while training: the first is noted (the loop finishes its step, checkpoints
    and stops), a second raises Aborted at once.  Installed only from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        print(f"\nscale-fast: {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
