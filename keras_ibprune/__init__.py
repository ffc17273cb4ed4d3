"""keras_ibprune: information-bottleneck pruning for Keras 3.

Wrap a model with `prune`, add the `IBPruning` callback to `fit`, then `strip_pruning`
(or `shrink`) and `export_tflite`.
"""

from importlib.metadata import PackageNotFoundError, version

from keras_ibprune import (
    allocation,
    channels,
    estimators,
    information,
    masks,
    obs,
    schedules,
    scores,
    stats,
)
from keras_ibprune.callbacks import IBPruning
from keras_ibprune.export import ExportReport, ExportVerificationError, export_tflite
from keras_ibprune.flops import count_flops, count_params
from keras_ibprune.gates import VIBGate, set_gate_gamma
from keras_ibprune.graph import ChannelGroup, channel_groups
from keras_ibprune.information import GaussianOBDScore, IBScore, OBSScore
from keras_ibprune.legacy import load_legacy_model
from keras_ibprune.metrics import evaluate
from keras_ibprune.prune import prune, strip_pruning
from keras_ibprune.pruner import Pruner
from keras_ibprune.quantize import quantize_aware
from keras_ibprune.registry import get_prunable_weights, is_prunable, register_prunable
from keras_ibprune.schedules import (
    ConstantSparsity,
    Iterative,
    OneShot,
    PolynomialDecay,
    Schedule,
)
from keras_ibprune.scores import (
    ActivationScore,
    APoZScore,
    BNGammaScore,
    GradientScore,
    L1Score,
    MagnitudeScore,
    RandomScore,
    Score,
    TaylorScore,
    VIBScore,
)
from keras_ibprune.shrink import check_widths, shrink
from keras_ibprune.summary import (
    SparsitySummary,
    plot_information_plane,
    plot_units_kept,
    sparsity,
    sparsity_summary,
)
from keras_ibprune.wrapper import PruneWrapper
from keras_ibprune.xnnpack import check_xnnpack_sparse

try:
    __version__ = version("keras-ibprune")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "APoZScore",
    "VIBGate",
    "VIBScore",
    "ActivationScore",
    "BNGammaScore",
    "ChannelGroup",
    "ConstantSparsity",
    "ExportReport",
    "ExportVerificationError",
    "GaussianOBDScore",
    "GradientScore",
    "IBScore",
    "L1Score",
    "IBPruning",
    "Iterative",
    "MagnitudeScore",
    "OBSScore",
    "OneShot",
    "PolynomialDecay",
    "PruneWrapper",
    "Pruner",
    "RandomScore",
    "Schedule",
    "Score",
    "TaylorScore",
    "SparsitySummary",
    "allocation",
    "channel_groups",
    "channels",
    "check_widths",
    "check_xnnpack_sparse",
    "count_flops",
    "count_params",
    "estimators",
    "evaluate",
    "export_tflite",
    "get_prunable_weights",
    "information",
    "is_prunable",
    "load_legacy_model",
    "masks",
    "obs",
    "plot_information_plane",
    "plot_units_kept",
    "set_gate_gamma",
    "prune",
    "quantize_aware",
    "register_prunable",
    "schedules",
    "scores",
    "shrink",
    "sparsity",
    "sparsity_summary",
    "stats",
    "strip_pruning",
    "__version__",
]
