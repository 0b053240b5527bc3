"""naive: v_k = Delta_k = theta_end(k) - theta_start(k), the task vector (SPEC section 2).

It ignores everything after stage k: the baseline the other estimators improve on.
"""

from __future__ import annotations

from functools import partial

from acctattr.estimators.base import Estimator, Params


class Naive(Estimator):
    name = "naive"
    evaluate = "linear"
    # bench/unrolled_memory.py measures frozen (which reads the same tensors) at 13-17 copies
    copies = 16

    def embed(self, k: int) -> Params:
        return {name: self.streamed(name, partial(self.stages.delta, k, name))
                for name in self.training.trainable}
