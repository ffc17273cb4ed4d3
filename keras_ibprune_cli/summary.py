"""`keras-ibprune summary`: the per-layer sparsity table, parameters and FLOPs of a model."""

from __future__ import annotations

from keras_ibprune_cli import _common as C

NAME = 'summary'
HELP = "print the per-layer sparsity table, parameters and FLOPs of a .keras model"
EPILOG = (
    "example:\n  keras-ibprune summary pruned.keras"
)


def configure(p):
    p.add_argument("model", help="path to a .keras model (wrapped or stripped)")


def run(args):
    import keras_ibprune as kib

    model = C.load_model(args.model)
    print(f"model '{model.name}' ({type(model).__name__}) from {args.model}")
    print(kib.sparsity_summary(model))
    try:
        print(f"parameters: {kib.count_params(model):,}  "
              f"FLOPs per example: {kib.count_flops(model):,}")
    except (ValueError, TypeError, AttributeError) as err:
        print(f"parameters: {model.count_params():,}  (FLOPs not counted: {err})")
    return 0
