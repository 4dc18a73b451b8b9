"""Stopping a long job without losing it: SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`) asks `train`,
`memorize` and `continual` to finish the step they are in, save, say how to resume, and exit non-zero; a second
signal stops at once, without saving (`StoppedAtOnce`, a KeyboardInterrupt, raised where the job is).

    with StopRequest() as stop:
        while ...:
            step()
            if stop.requested:
                save(); raise Interrupted(stop.signum, "... resume with ...")

Handlers can only be installed by the main thread; elsewhere (a job run from a worker thread) `StopRequest` does
nothing and `requested` stays False, as before.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

__all__ = ["StopRequest", "Interrupted", "StoppedAtOnce", "SaveClock"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A job stopped early at a signal, after saving; the message says where it saved and how to resume.
    `exit_code` is the shell's convention for a signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StoppedAtOnce(KeyboardInterrupt):
    """The second signal: the job stops where it is, without saving. `exit_code`: 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into `requested = True` and restores the previous
    handlers on exit. The second signal restores them and raises `StoppedAtOnce` (a KeyboardInterrupt) where the
    job is, for SIGTERM as for Ctrl-C."""

    def __init__(self, what: str = "the current step"):
        self.what = what
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now, whatever handler was there before
            self._restore()
            raise StoppedAtOnce(signum)
        self.signum = signum
        print(
            f"\nnestlearn: {signal.Signals(signum).name} received: finishing {self.what}, then saving "
            "(send it again to stop at once, without saving)",
            file=sys.stderr,
            flush=True,
        )


class SaveClock:
    """Time-based checkpoints: `due()` is True once every `minutes` (0: never), counted from the last `reset()`."""

    def __init__(self, minutes: float):
        if minutes < 0:
            raise ValueError(f"save_every_minutes={minutes} must be >= 0 (0: off)")
        self.seconds, self.last = minutes * 60, time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()
