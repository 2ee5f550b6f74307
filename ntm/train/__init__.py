"""The training layer: objectives (``ntm.train.objectives``), the one fit loop (``ntm.train.loop``),
checkpoints, and the three entry points ``train``, ``finetune`` and ``distill``."""
from .distill import distill
from .finetune import finetune
from .loop import EMA, fit, make_optimizer
from .objectives import (DistillObjective, FinetuneObjective, FlowMatchingObjective, NTMObjective,
                         TrainingNoise)
from .runs import train

__all__ = ["train", "finetune", "distill", "fit", "make_optimizer", "EMA", "NTMObjective", "FinetuneObjective",
           "FlowMatchingObjective", "DistillObjective", "TrainingNoise"]
