"""`keras-ibprune prune`: IB-prune a trained model, one-shot or with fine-tuning.

The model is a `.keras` file or a legacy tf_keras `.h5` file / SavedModel directory.
"""

from __future__ import annotations

import os
import time

from keras_ibprune_cli import _common as C

NAME = 'prune'
HELP = "IB-prune a trained model (.keras, legacy .h5 or SavedModel), one-shot or fine-tuning"
EPILOG = (
    "examples:\n"
    "  keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 --out pruned.keras\n"
    "  keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 \\\n"
    "      --train train.npz --epochs 4 --out pruned.keras\n"
    "  keras-ibprune prune legacy.h5 --data held_out.npz --sparsity 0.8 --out pruned.keras\n\n"
    "legacy tf_keras files (.h5, SavedModel directories) are read with "
    "keras_ibprune.load_legacy_model.\n"
    ".npz files hold arrays 'x' and 'y': np.savez('held_out.npz', x=x_val, y=y_val)"
)


def configure(p):
    p.add_argument("model", help="the trained model: a .keras file, or a legacy tf_keras .h5 "
                                 "file or SavedModel directory")
    p.add_argument("--data", required=True, metavar="HELD_OUT.npz",
                   help="held-out data (x, y) the IB scores are computed on")
    p.add_argument("--sparsity", type=float, required=True,
                   help="target fraction of pruned weights (units with --granularity "
                        "channel), in [0, 1)")
    p.add_argument("--out", required=True, metavar="PRUNED.keras", help="output .keras file")
    p.add_argument("--epochs", type=int, default=0,
                   help="fine-tuning epochs; 0 (default) prunes one-shot without training. "
                        "With N > 0 the sparsity ramps up over the first half (PolynomialDecay)")
    p.add_argument("--train", metavar="TRAIN.npz", help="training data (x, y) for --epochs")
    p.add_argument("--score", default="ib",
                   help="score alias from keras_ibprune.scores.aliases(): ib (default, "
                        "information lost in nats), obs, magnitude, activation, gradient, "
                        "taylor, random, gaussian_obd; with --granularity channel also l1, "
                        "bn_gamma, apoz")
    p.add_argument("--allocation", default=None,
                   help="how sparsity is split across layers, from "
                        "keras_ibprune.allocation.ALLOCATIONS: uniform, global, erk, "
                        "global_erk_floor (default: the score's own)")
    p.add_argument("--granularity", default="weight", choices=["weight", "channel"],
                   help="weight: unstructured masks, stripped model; channel: whole units/"
                        "filters, physically removed with shrink (output layers kept)")
    p.add_argument("--exclude", action="append", metavar="LAYER",
                   help="layer name to leave dense (repeatable)")
    p.add_argument("--held-out-size", type=int, default=1024,
                   help="held-out samples used for scoring (default 1024)")
    p.add_argument("--batch-size", type=int, default=64, help="fine-tuning batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="fine-tuning Adam rate")
    p.add_argument("--loss", default="auto",
                   help="fine-tuning loss: 'auto' (the model's compiled loss, else one "
                        "matching y) or a Keras loss name")
    p.add_argument("--keep-wrappers", action="store_true",
                   help="save the wrapped model (masks kept) instead of the stripped one")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args):
    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    if not 0.0 <= args.sparsity < 1.0:
        raise C.CLIError(f"--sparsity must be in [0, 1). Received: {args.sparsity}")
    if args.epochs < 0:
        raise C.CLIError(f"--epochs must be >= 0. Received: {args.epochs}")
    if args.epochs > 0 and args.train is None:
        raise C.CLIError(
            "--epochs N > 0 fine-tunes while pruning and needs training data: pass "
            f"--train train.npz. Received: --epochs {args.epochs} without --train"
        )
    if args.train is not None and args.epochs == 0:
        raise C.CLIError(
            "--train is used only when fine-tuning: pass --epochs N (N > 0). Received: "
            f"--train {args.train} with --epochs 0"
        )
    C.check_out(args.out, ".keras")
    keras.utils.set_random_seed(args.seed)
    steps = 4
    model = C.load_model(args.model)
    x, y = C.load_npz(args.data, "--data", model)
    train = C.load_npz(args.train, "--train", model) if args.train else None
    C.step(1, steps, f"loaded '{model.name}' and {len(x)} held-out samples", start)
    classifier = C.is_classifier(model, x, y)
    if classifier:
        print(f"      held-out before: {C.metrics_line(model, x, y)}")

    channel = args.granularity == "channel"
    exclude = list(args.exclude or [])
    if channel:  # a model output's units cannot be removed
        exclude += [n for n in C.output_layer_names(model) if n not in exclude]
    try:
        pruned = kib.prune(model, granularity=args.granularity, exclude=exclude or None)
    except ValueError as err:
        raise C.CLIError(str(err)) from err
    score = args.score
    held_out = (x, y)
    if args.epochs == 0:
        print(f"      one-shot pruning to {args.sparsity:.0%} (score={score}) ...", flush=True)
        try:
            pruner = kib.Pruner(pruned, kib.OneShot(args.sparsity), score=score,
                                allocation=args.allocation, held_out=held_out,
                                held_out_size=args.held_out_size)
            pruner.reset()
            pruner.update(1)
        except ValueError as err:
            raise C.CLIError(str(err)) from err
        C.step(2, steps, f"masks set: sparsity {pruner.current_sparsity():.2%}", start)
    else:
        xtr, ytr = train
        loss = C.auto_loss(model, xtr, ytr) if args.loss == "auto" else args.loss
        metrics = ["accuracy"] if C.is_classifier(model, xtr, ytr) else []
        pruned.compile(keras.optimizers.Adam(args.learning_rate), loss, metrics=metrics)
        ramp = max(1, (args.epochs + 1) // 2)
        schedule = kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp)
        print(f"      pruning to {args.sparsity:.0%} over {ramp} epoch(s), fine-tuning "
              f"{args.epochs} epoch(s) on {len(xtr)} samples (score={score}) ...", flush=True)
        try:
            cb = kib.IBPruning(schedule, score=score, allocation=args.allocation,
                               held_out=held_out, held_out_size=args.held_out_size)
            pruned.fit(xtr, ytr, batch_size=args.batch_size, epochs=args.epochs,
                       callbacks=[cb, C.epoch_progress(args.epochs)], verbose=0)
        except ValueError as err:
            raise C.CLIError(str(err)) from err
        C.step(2, steps, f"pruned and fine-tuned: sparsity {cb.pruner.current_sparsity():.2%}",
              start)

    if args.keep_wrappers:
        final = pruned
        what = "wrapped model (continue pruning or strip later)"
    elif channel:
        try:
            final = kib.shrink(pruned)
        except ValueError as err:
            raise C.CLIError(f"cannot shrink the model: {err}") from err
        what = "shrunk model (pruned units removed)"
    else:
        final = kib.strip_pruning(pruned)
        what = "stripped model (plain Keras, no custom objects)"
    if channel and not args.keep_wrappers:
        err = float(np.max(np.abs(final.predict(x[:256], verbose=0)
                                  - pruned.predict(x[:256], verbose=0))))
        print(f"      shrunk: {model.count_params():,} -> {final.count_params():,} "
              f"parameters (max |difference| vs masked model {err:.2e})")
    C.step(3, steps, f"built the {what}", start)

    final.save(args.out)
    print(kib.sparsity_summary(final))
    if classifier:
        print(f"held-out after:  {C.metrics_line(final, x, y)}")
    size = os.path.getsize(args.out)
    src = C.model_bytes(args.model)
    C.step(4, steps, f"wrote {args.out} ({size:,} bytes; input {src:,} bytes)", start)
    return 0
