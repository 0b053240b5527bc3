"""acctattr: which training stage is accountable for how a model behaves."""

__version__ = "0.1.0"
