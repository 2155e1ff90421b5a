"""The optional wall-clock cap on the demo's training runs, whose budgets are step counts.

A step count trains the same model on any machine; only the time it takes depends on the machine and its load (the
README gives the times on a quiet 2-core CPU). A cap bounds that time on a slow or shared machine, but stopping early
leaves the learning rate mid-schedule and the model undertrained, so a run the cap cut short says so loudly on the
console, in its metrics file and in the demo summary.
"""

import sys
import time


class TimeCap:
    """Whether a run of `requested_steps` steps must stop early because `minutes` of wall clock have passed.

    `minutes=None` is no cap. The clock starts at `start()` and counts everything from there (evaluations included):
    a cap is a bound on the time the user waits.
    """

    def __init__(self, minutes: float | None, requested_steps: int):
        if minutes is not None and minutes <= 0:
            raise ValueError(f"the time cap must be positive minutes or None, got {minutes}")
        if requested_steps < 1:
            raise ValueError(f"the number of training steps must be at least 1, got {requested_steps}")
        self.minutes = minutes
        self.requested_steps = requested_steps
        self.stopped_at_step: int | None = None
        self._started: float | None = None

    def start(self) -> None:
        self._started = time.perf_counter()

    @property
    def elapsed_seconds(self) -> float:
        if self._started is None:
            raise RuntimeError("TimeCap.start() was not called")
        return time.perf_counter() - self._started

    def should_stop(self, steps_done: int) -> bool:
        """True (and remembered) when the cap has passed while steps remain; a finished run never counts as cut."""
        if self.minutes is None or steps_done >= self.requested_steps:
            return False
        if self.elapsed_seconds < 60 * self.minutes:
            return False
        self.stopped_at_step = steps_done
        return True

    @property
    def stopped(self) -> bool:
        return self.stopped_at_step is not None

    @property
    def note(self) -> str | None:
        """'stopped by the time cap (M min) at step X of Y', or None when the run did all its steps."""
        if not self.stopped:
            return None
        return (f"stopped by the time cap ({self.minutes:g} min) at step {self.stopped_at_step} of "
                f"{self.requested_steps}")  # fmt: skip

    def metrics(self) -> dict:
        return {
            "requested_steps": self.requested_steps,
            "time_cap_minutes": self.minutes,
            "stopped_by_time_cap": self.stopped,
            "time_cap_note": self.note,
        }

    def warn_if_stopped(self, what: str, option: str) -> None:
        """A framed warning on stderr, hard to miss among progress bars, when the cap cut `what` short."""
        if not self.stopped:
            return
        print(loud_warning(f"{what} {self.note}.",
                           "The learning rate did not finish its schedule: the model is undertrained and its figures",
                           f"are not those of a full run. Re-run without {option} (or with a larger cap)."),
              file=sys.stderr, flush=True)  # fmt: skip


def loud_warning(*lines: str) -> str:
    bar = "!" * 100
    return "\n".join(["", bar, *(f"!!! WARNING: {line}" if i == 0 else f"!!! {line}" for i, line in enumerate(lines)),
                      bar, ""])  # fmt: skip
