"""evo: LLM training on PyTorch, written as pure functions.

Parameters are flat ``dict[str, Tensor]`` with logical axes beside them (``models``: model families
behind one contract), the training step is a pure ``(state, batch) -> (state, metrics)`` (``train``), and a ``Plan`` says how
to spread it over processes (``sharding``).
"""
from evo import data, models, optim, train, tree
from evo.config import Experiment
from evo.sharding import Plan, shard

__all__ = ["Experiment", "Plan", "data", "models", "optim", "shard", "train", "tree"]
__version__ = "0.1.0"
