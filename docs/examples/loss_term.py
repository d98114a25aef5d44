"""A new loss term: an L1 penalty on BatchNorm scales (network slimming) beside YOLOv5's box/obj/cls terms."""

from torch import nn

from detector.engine.trainer import Trainer


class BatchNormSparsity:
    """Wraps the trainer's loss and adds the term ``bn_l1``: ``weight`` x the sum of |BatchNorm scale|."""

    def __init__(self, loss, model: nn.Module, weight: float = 1e-5) -> None:
        self.loss, self.weight = loss, weight
        self.scales = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def __call__(self, raw_maps, targets):
        terms = dict(self.loss(raw_maps, targets))
        terms["bn_l1"] = self.weight * sum(scale.abs().sum() for scale in self.scales)
        return terms


class SparseTrainer(Trainer):
    def build_loss(self):
        return BatchNormSparsity(super().build_loss(), self.model)
