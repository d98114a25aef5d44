"""A new learning-rate schedule: step decay, x0.1 at half and again at three quarters of the run."""

from detector.engine.schedules import LRSchedule, register_schedule


@register_schedule("step")
class StepSchedule(LRSchedule):
    def factor(self, iteration: int) -> float:
        progress = self.epoch_of(iteration) / self.epochs
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
