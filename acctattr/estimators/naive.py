"""naive: v_k = Delta_k = theta_end(k) - theta_start(k), the task vector (SPEC section 2).

It ignores everything after stage k: the baseline the other estimators improve on.
"""

from __future__ import annotations

from functools import partial

from acctattr import heap
from acctattr.estimators.base import Estimator, Params


class Naive(Estimator):
    name = "naive"
    evaluate = "linear"
    # bench/scale.py, 124M GPT-2-style run: 3.7-3.9 checkpoints above start-up at its peak,
    # the model itself (theta_T) included, whatever the number of stages
    copies = 5

    def embed(self, k: int) -> Params:
        v = {name: self.streamed(name, partial(self.stages.delta, k, name))
             for name in self.training.trainable}
        self.stages.release()  # the files read for it: none stays open between stages
        heap.trim()  # the slices' float64 blocks, before the evaluation allocates
        return v
