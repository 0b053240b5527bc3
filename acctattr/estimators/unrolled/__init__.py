"""The unrolled estimator: later stages simulated on their training loss (estimator.py),
in parts: the flat view of the run (flat.py), the simulated actual path and its
reproduction check (path.py), the SGD flow, the Adam flow with its batch-noise fit, the
linear propagator, and Lanczos matrix functions."""

from acctattr.estimators.unrolled.estimator import Unrolled
from acctattr.estimators.unrolled.path import Reproduction

__all__ = ["Reproduction", "Unrolled"]
