"""SIGTERM / SIGINT -> save and exit 0, agreed by all ranks at a step boundary.

The deepspeed launcher, on SIGTERM, terminates the ranks one after another with a 30 s grace each, and a
cluster scheduler may signal any subset of ranks. A signal handler therefore only sets a flag (no
collective may run inside it: the other ranks may be in the middle of an all-reduce); at the next step
boundary every rank contributes its flag to a MAX all-reduce, so all ranks stop at the same step, save one
checkpoint together and exit 0 within the grace. A second SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
import sys

from wider import parallel


class Preemption:
    def __init__(self) -> None:
        self.flag = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        self.signal_name = signal.Signals(signum).name
        print(f"[rank signal] {self.signal_name} received: saving a checkpoint at the next step boundary",
              file=sys.stderr, flush=True)

    def agreed(self, device) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        return parallel.all_reduce_max(1.0 if self.flag else 0.0, device) > 0.0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
