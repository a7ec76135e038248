"""M8's data source: eqlab's `FamilySource`, but over all 1797 digits and with BatchNorm frozen.

`FamilySource` takes the first ``examples`` of the 75% training split (1348 digits at most) and puts
the model in train mode. The benchmark wants all 1797 digits and the same function as M1-M6 (eval
mode, see bench/models.py), so this subclass only changes the data and the mode; model building,
the loss and the fixed micro-batching are FamilySource's. Ray pickles it by reference, so the actors
import ``bench`` (run.py puts the repo root on PYTHONPATH before Ray starts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eqlab.models import build_task
from eqlab.pipeline.spectra import FamilySource, microbatches


@dataclass(frozen=True)
class AllDigitsSource(FamilySource):
    def __call__(self, dtype):
        task = build_task(self.family, self.options, seed=self.seed, dtype=dtype)
        X = torch.cat([task.train[0], task.test[0]])
        y = torch.cat([task.train[1], task.test[1]])
        task.model.eval()  # BN frozen: the weights (and running stats) come from ShardedHessian.load
        return task.model, nn.CrossEntropyLoss(), microbatches((X[: self.examples], y[: self.examples]),
                                                             self.microbatch)
