"""SIGTERM and SIGINT as requests to stop: the run finishes its step, saves where it is, and exits.

Cluster schedulers send SIGTERM some time before they kill a job (torchrun passes it on to every process and waits
30 s), and Ctrl-C sends SIGINT to every process of the terminal. The first signal is only recorded; the training
loop checks it after each optimizer step. A second signal ends the process at once, as the signal would have.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """While entered, the first SIGTERM or SIGINT sets `signal`; the second ends the process by that signal."""

    def __init__(self, announce: bool = True):
        self.signal: int | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name} received: stopping after this step and saving last.pth "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
