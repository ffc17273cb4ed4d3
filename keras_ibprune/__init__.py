"""keras_ibprune: information-bottleneck pruning for Keras 3.

Wrap a model with `prune`, add the `IBPruning` callback to `fit`, then `strip_pruning`
(or `shrink`) and `export_tflite`.
"""

from importlib.metadata import PackageNotFoundError, version

from keras_ibprune import allocation, masks, schedules, scores, stats
from keras_ibprune.callbacks import IBPruning, Pruner
from keras_ibprune.prune import prune, strip_pruning
from keras_ibprune.registry import get_prunable_weights, is_prunable, register_prunable
from keras_ibprune.schedules import (
    ConstantSparsity,
    Iterative,
    OneShot,
    PolynomialDecay,
    Schedule,
)
from keras_ibprune.scores import MagnitudeScore, RandomScore, Score
from keras_ibprune.summary import SparsitySummary, sparsity, sparsity_summary
from keras_ibprune.wrapper import PruneWrapper

try:
    __version__ = version("keras-ibprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConstantSparsity",
    "IBPruning",
    "Iterative",
    "MagnitudeScore",
    "OneShot",
    "PolynomialDecay",
    "PruneWrapper",
    "Pruner",
    "RandomScore",
    "Schedule",
    "Score",
    "SparsitySummary",
    "allocation",
    "get_prunable_weights",
    "is_prunable",
    "masks",
    "prune",
    "register_prunable",
    "schedules",
    "scores",
    "sparsity",
    "sparsity_summary",
    "stats",
    "strip_pruning",
    "__version__",
]
