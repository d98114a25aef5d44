"""A new hook: end the run cleanly once a time budget is spent (what a tuner's trial scheduler does)."""

import time

from detector.engine.callbacks import Callback


class TimeBudget(Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_fit_start(self, trainer) -> None:
        self.start = time.monotonic()

    def on_step_end(self, trainer) -> None:
        if time.monotonic() - self.start > self.seconds:
            trainer.request_stop(f"time budget of {self.seconds:g} s spent")
