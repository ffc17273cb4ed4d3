"""The `keras-ibprune` command line: `demo`, `prune`, `export`, `summary` and `bench`.

Every command has `--help`. Data files are `.npz` archives holding an `x` array (model
inputs, batch first) and a `y` array (labels: class ids, one-hot rows or regression
targets), e.g. written with `np.savez("held_out.npz", x=x_val, y=y_val)`.

    keras-ibprune demo
    keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 --out pruned.keras
    keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 \\
        --train train.npz --epochs 4 --out pruned.keras
    keras-ibprune export pruned.keras pruned.tflite --quantize int8 --data held_out.npz
    keras-ibprune summary pruned.keras
    keras-ibprune bench

User errors (a missing file, a missing `.npz` key, data of the wrong shape) print one
`keras-ibprune COMMAND: error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_COMMANDS = {}


class CLIError(Exception):
    """A user error: printed as `keras-ibprune COMMAND: error: MESSAGE`, exit status 2."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def command(name, help_text, epilog=None):
    """Registers `fn(args)` as a sub-command; `fn.configure(parser)` adds its flags."""

    def deco(fn):
        _COMMANDS[name] = (fn, help_text, epilog)
        return fn

    return deco


def _digits(seed=0):
    """scikit-learn's digits (1797 8x8 images, shipped with the package): train/val/test."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    n_test, n_val = 360, 240
    return (
        (x[n_test + n_val :], y[n_test + n_val :]),
        (x[n_test : n_test + n_val], y[n_test : n_test + n_val]),
        (x[:n_test], y[:n_test]),
    )


def _demo_model():
    import keras

    L = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(),
            L.Conv2D(32, 3, padding="same", activation="relu", name="conv2"),
            L.MaxPooling2D(),
            L.Flatten(),
            L.Dense(128, activation="relu", name="fc1"),
            L.Dense(10, name="logits"),
        ],
        name="digits_cnn",
    )


def _accuracy(model, x, y):
    import numpy as np

    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def _demo(args):
    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    (xtr, ytr), (xval, yval), (xte, yte) = _digits(args.seed)
    print(
        f"keras-ibprune demo: scikit-learn digits, {len(xtr)} train / {len(xval)} held-out / "
        f"{len(xte)} test, target sparsity {args.sparsity:.0%}"
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = _demo_model()
    dense.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=args.dense_epochs, verbose=0)
    dense_acc = _accuracy(dense, xte, yte)
    print(f"[1/3] dense model trained ({args.dense_epochs} epochs): test accuracy {dense_acc:.2%}")

    ramp = max(1, args.prune_epochs // 2)
    schedule = kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp)

    def prune_and_strip(**callback_args):
        pruned = kib.prune(dense)
        pruned.compile(keras.optimizers.Adam(2e-3), loss, metrics=["accuracy"])
        cb = kib.IBPruning(schedule, held_out=(xval, yval), **callback_args)
        pruned.fit(xtr, ytr, batch_size=64, epochs=args.prune_epochs, callbacks=[cb], verbose=0)
        return kib.strip_pruning(pruned)

    final = prune_and_strip(verbose=1)
    pruned_acc = _accuracy(final, xte, yte)
    print("[2/3] pruned with IBPruning (information-bottleneck score) and stripped")
    baseline_acc = _accuracy(prune_and_strip(score="magnitude", allocation="uniform"), xte, yte)

    before, after = kib.sparsity_summary(dense), kib.sparsity_summary(final)
    print("[3/3] before / after")
    w = max(len(r["layer"]) for r in after.rows)
    print(
        f"{'layer':<{w}}  {'weights':>8}  {'nonzero before':>14}  {'nonzero after':>13}  "
        f"{'sparsity':>8}"
    )
    for rb, ra in zip(before.rows, after.rows):
        print(
            f"{ra['layer']:<{w}}  {ra['weights']:>8}  {rb['nonzero']:>14}  {ra['nonzero']:>13}  "
            f"{ra['sparsity']:>8.1%}"
        )
    print(
        f"{'total':<{w}}  {after.total_weights:>8}  {before.total_nonzero:>14}  "
        f"{after.total_nonzero:>13}  {after.sparsity:>8.1%}"
    )
    print(
        f"test accuracy: dense {dense_acc:.2%} -> pruned {pruned_acc:.2%} "
        f"({after.total_nonzero} of {after.total_weights} prunable weights kept, "
        f"{before.total_nonzero / max(after.total_nonzero, 1):.1f}x fewer)"
    )
    print(
        f"same schedule with magnitude scores and uniform per-layer sparsity (tfmot's rule): "
        f"{baseline_acc:.2%}"
    )
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0 if np.isfinite(pruned_acc) else 1


def _demo_configure(p):
    p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity (default 0.9)")
    p.add_argument("--dense-epochs", type=int, default=20, help="dense training epochs")
    p.add_argument("--prune-epochs", type=int, default=12, help="pruning/fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed")


command("demo", "train, IB-prune and strip a small CNN on scikit-learn's digits")(_demo)
_demo.configure = _demo_configure


# --------------------------------------------------------------------------- helpers
def _load_model(path):
    """Loads a `.keras` file (wrapped or stripped); a clear `CLIError` when it can't."""
    if not os.path.isfile(path):
        raise CLIError(f"model file not found. Expected a .keras file. Received: {path}")
    import keras

    import keras_ibprune  # noqa: F401  (registers PruneWrapper for loading)

    try:
        return keras.models.load_model(path)
    except Exception as err:  # noqa: BLE001 - any load failure is a user-facing error
        raise CLIError(
            f"cannot load the model ({type(err).__name__}: {str(err)[:300]}). Expected a "
            f".keras file written by `model.save`. Received: {path}"
        ) from err


def _input_shape(model):
    """The model's input shape `(None, ...)`, or None when it has no single known input."""
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return None
    if isinstance(shape, tuple) and all(s is None or isinstance(s, int) for s in shape):
        return shape
    return None


def load_npz(path, what="data", model=None, need_y=True):
    """Reads `x` (and `y`) from an `.npz` file, checking keys, lengths and shapes.

    Args:
        path: path of the `.npz` file.
        what: what the file is for, used in error messages (e.g. `"--data"`).
        model: optional model whose input shape `x` must fit.
        need_y: whether `y` is required (else it may be absent, returned as None).

    Returns:
        `(x, y)` numpy arrays; `x` as float32, `y` as stored (or None).

    Raises:
        CLIError: a missing or unreadable file, a missing key, empty arrays, `x`/`y`
            length mismatch, or an `x` that does not fit the model's input.
    """
    import zipfile

    import numpy as np

    expected = "an .npz file with arrays 'x' and 'y'" if need_y else (
        "an .npz file with an array 'x' (and optionally 'y')")
    if not os.path.isfile(path):
        raise CLIError(f"{what} file not found. Expected {expected}. Received: {path}")
    if not zipfile.is_zipfile(path):
        raise CLIError(
            f"cannot read the {what} file: it is not an .npz (zip) archive. Expected "
            f"{expected} (np.savez). Received: {path}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.files)
            missing = [k for k in (("x", "y") if need_y else ("x",)) if k not in keys]
            if missing:
                raise CLIError(
                    f"{what} file has no array named {' or '.join(map(repr, missing))}. "
                    f"Expected {expected}. Received: {path} with keys {keys}"
                )
            x = npz["x"]
            y = npz["y"] if "y" in keys else None
    except CLIError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CLIError(
            f"cannot read the {what} file ({type(err).__name__}: {str(err)[:200]}). "
            f"Expected {expected} (np.savez). Received: {path}"
        ) from err
    if x.dtype.kind not in "biuf" or x.ndim < 1 or len(x) == 0:
        raise CLIError(
            f"{what} array 'x' must be a non-empty numeric array, batch first. "
            f"Received: x with shape {x.shape} and dtype {x.dtype} in {path}"
        )
    if y is not None and (y.ndim < 1 or len(y) != len(x)):
        raise CLIError(
            f"{what} arrays 'x' and 'y' must hold the same number of samples. "
            f"Received: x.shape={x.shape}, y.shape={y.shape} in {path}"
        )
    shape = _input_shape(model) if model is not None else None
    if shape is not None:
        dims = zip(shape[1:], x.shape[1:])
        ok = x.ndim == len(shape) and all(s is None or s == d for s, d in dims)
        if not ok:
            want = ", ".join("None" if s is None else str(s) for s in shape[1:])
            want = f"(batch, {want})"
            raise CLIError(
                f"{what} array 'x' does not fit the model input: expected shape {want}. "
                f"Received: x.shape={x.shape} in {path}"
            )
    return x.astype("float32"), y


def _check_out(path, suffix):
    if not path.endswith(suffix):
        raise CLIError(f"the output file name must end with '{suffix}'. Received: {path}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError(
            f"the directory of the output file does not exist: {directory}. Received: {path}"
        )


def _is_classifier(model, x, y):
    """True for class-label targets and a multi-unit output (accuracy etc. make sense)."""
    import numpy as np

    if y is None:
        return False
    shape = getattr(model, "output_shape", None)
    units = shape[-1] if isinstance(shape, tuple) and shape and isinstance(shape[-1], int) else 0
    if y.ndim == 1 and y.dtype.kind in "biu":
        return units > 1
    return y.ndim == 2 and y.shape[1] == units and units > 1 and bool(np.all((y == 0) | (y == 1)))


def _auto_loss(model, x, y):
    """Loss for fine-tuning: the model's compiled loss, else one fitting `y` and the output."""
    import keras
    import numpy as np

    loss = getattr(model, "loss", None)
    if loss is not None:
        return loss
    probs = np.asarray(model.predict(x[:64], verbose=0))
    is_prob = bool(np.all(probs >= 0) and np.allclose(probs.sum(-1), 1.0, atol=1e-3))
    if y.ndim == 1 and y.dtype.kind in "biu":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=not is_prob)
    if _is_classifier(model, x, y):
        return keras.losses.CategoricalCrossentropy(from_logits=not is_prob)
    return keras.losses.MeanSquaredError()


def _metrics_line(model, x, y):
    import keras_ibprune as kib

    m = kib.evaluate(model, x, y)
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def _output_layer_names(model):
    names = []
    for t in getattr(model, "outputs", None) or []:
        op = getattr(getattr(t, "_keras_history", None), "operation", None)
        if op is not None:
            names.append(op.name)
    return names


def _epoch_progress(epochs):
    """A callback printing one line per epoch: loss, accuracy, sparsity, time."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "accuracy") if k in logs]
            if "sparsity" in logs:
                parts.append(f"sparsity {logs['sparsity']:.2%}")
            print(f"      epoch {epoch + 1}/{epochs}: {', '.join(parts)} "
                  f"({time.perf_counter() - self._t0:.1f}s)", flush=True)

    return EpochProgress()


def _step(i, n, text, start):
    print(f"[{i}/{n}] {text} ({time.perf_counter() - start:.1f}s)", flush=True)


# ----------------------------------------------------------------------------- summary
def _summary(args):
    import keras_ibprune as kib

    model = _load_model(args.model)
    print(f"model '{model.name}' ({type(model).__name__}) from {args.model}")
    print(kib.sparsity_summary(model))
    try:
        print(f"parameters: {kib.count_params(model):,}  "
              f"FLOPs per example: {kib.count_flops(model):,}")
    except (ValueError, TypeError, AttributeError) as err:
        print(f"parameters: {model.count_params():,}  (FLOPs not counted: {err})")
    return 0


def _summary_configure(p):
    p.add_argument("model", help="path to a .keras model (wrapped or stripped)")


command(
    "summary",
    "print the per-layer sparsity table, parameters and FLOPs of a .keras model",
    "example:\n  keras-ibprune summary pruned.keras",
)(_summary)
_summary.configure = _summary_configure


# ------------------------------------------------------------------------------- prune
def _prune(args):
    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1). Received: {args.sparsity}")
    if args.epochs < 0:
        raise CLIError(f"--epochs must be >= 0. Received: {args.epochs}")
    if args.epochs > 0 and args.train is None:
        raise CLIError(
            "--epochs N > 0 fine-tunes while pruning and needs training data: pass "
            f"--train train.npz. Received: --epochs {args.epochs} without --train"
        )
    if args.train is not None and args.epochs == 0:
        raise CLIError(
            "--train is used only when fine-tuning: pass --epochs N (N > 0). Received: "
            f"--train {args.train} with --epochs 0"
        )
    _check_out(args.out, ".keras")
    keras.utils.set_random_seed(args.seed)
    steps = 4
    model = _load_model(args.model)
    x, y = load_npz(args.data, "--data", model)
    train = load_npz(args.train, "--train", model) if args.train else None
    _step(1, steps, f"loaded '{model.name}' and {len(x)} held-out samples", start)
    classifier = _is_classifier(model, x, y)
    if classifier:
        print(f"      held-out before: {_metrics_line(model, x, y)}")

    channel = args.granularity == "channel"
    exclude = list(args.exclude or [])
    if channel:  # a model output's units cannot be removed
        exclude += [n for n in _output_layer_names(model) if n not in exclude]
    try:
        pruned = kib.prune(model, granularity=args.granularity, exclude=exclude or None)
    except ValueError as err:
        raise CLIError(str(err)) from err
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
            raise CLIError(str(err)) from err
        _step(2, steps, f"masks set: sparsity {pruner.current_sparsity():.2%}", start)
    else:
        xtr, ytr = train
        loss = _auto_loss(model, xtr, ytr) if args.loss == "auto" else args.loss
        metrics = ["accuracy"] if _is_classifier(model, xtr, ytr) else []
        pruned.compile(keras.optimizers.Adam(args.learning_rate), loss, metrics=metrics)
        ramp = max(1, (args.epochs + 1) // 2)
        schedule = kib.PolynomialDecay(0.0, args.sparsity, begin_epoch=0, end_epoch=ramp)
        print(f"      pruning to {args.sparsity:.0%} over {ramp} epoch(s), fine-tuning "
              f"{args.epochs} epoch(s) on {len(xtr)} samples (score={score}) ...", flush=True)
        try:
            cb = kib.IBPruning(schedule, score=score, allocation=args.allocation,
                               held_out=held_out, held_out_size=args.held_out_size)
            pruned.fit(xtr, ytr, batch_size=args.batch_size, epochs=args.epochs,
                       callbacks=[cb, _epoch_progress(args.epochs)], verbose=0)
        except ValueError as err:
            raise CLIError(str(err)) from err
        _step(2, steps, f"pruned and fine-tuned: sparsity {cb.pruner.current_sparsity():.2%}",
              start)

    if args.keep_wrappers:
        final = pruned
        what = "wrapped model (continue pruning or strip later)"
    elif channel:
        try:
            final = kib.shrink(pruned)
        except ValueError as err:
            raise CLIError(f"cannot shrink the model: {err}") from err
        what = "shrunk model (pruned units removed)"
    else:
        final = kib.strip_pruning(pruned)
        what = "stripped model (plain Keras, no custom objects)"
    if channel and not args.keep_wrappers:
        err = float(np.max(np.abs(final.predict(x[:256], verbose=0)
                                  - pruned.predict(x[:256], verbose=0))))
        print(f"      shrunk: {model.count_params():,} -> {final.count_params():,} "
              f"parameters (max |difference| vs masked model {err:.2e})")
    _step(3, steps, f"built the {what}", start)

    final.save(args.out)
    print(kib.sparsity_summary(final))
    if classifier:
        print(f"held-out after:  {_metrics_line(final, x, y)}")
    size = os.path.getsize(args.out)
    src = os.path.getsize(args.model)
    _step(4, steps, f"wrote {args.out} ({size:,} bytes; input {src:,} bytes)", start)
    return 0


def _prune_configure(p):
    p.add_argument("model", help="the trained model, a .keras file")
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
                   help="score: ib (default, information bottleneck), magnitude, activation, "
                        "gradient, taylor, random; with --granularity channel also l1, "
                        "bn_gamma, apoz")
    p.add_argument("--allocation", default=None,
                   choices=["uniform", "global", "erk", "ib"],
                   help="how sparsity is split across layers (default: the score's own)")
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


command(
    "prune",
    "IB-prune a trained .keras model, one-shot or with fine-tuning",
    "examples:\n"
    "  keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 --out pruned.keras\n"
    "  keras-ibprune prune model.keras --data held_out.npz --sparsity 0.9 \\\n"
    "      --train train.npz --epochs 4 --out pruned.keras\n\n"
    ".npz files hold arrays 'x' and 'y': np.savez('held_out.npz', x=x_val, y=y_val)",
)(_prune)
_prune.configure = _prune_configure


# ------------------------------------------------------------------------------ export
def _export(args):
    import keras_ibprune as kib

    start = time.perf_counter()
    quantize = None if args.quantize == "none" else args.quantize
    _check_out(args.out, ".tflite")
    if quantize == "int8" and args.data is None:
        raise CLIError("--quantize int8 needs calibration inputs: pass --data FILE.npz with "
                       "an array 'x'. Received: no --data")
    model = _load_model(args.model)
    x = y = None
    if args.data is not None:
        x, y = load_npz(args.data, "--data", model, need_y=False)
    _step(1, 3, f"loaded '{model.name}'" + (f" and {len(x)} samples" if x is not None else ""),
          start)
    print(f"      converting (quantize={quantize or 'none'}, sparse={not args.dense}), "
          "verifying against Keras, timing ...", flush=True)
    try:
        report = kib.export_tflite(model, args.out, sparse=not args.dense, quantize=quantize,
                               representative_data=x, verify_data=x,
                               latency_runs=args.latency_runs, tolerance=args.tolerance,
                               min_agreement=args.min_agreement)
    except kib.ExportVerificationError as err:
        raise CLIError(f"the exported file does not match the Keras model (pass --tolerance "
                       f"/ --min-agreement to accept a larger difference): {err}",
                       status=1) from err
    except (ValueError, OSError) as err:
        raise CLIError(str(err)) from err
    _step(2, 3, f"wrote {args.out}", start)
    print(report)
    if y is not None and _is_classifier(model, x, y):
        plain = kib.strip_pruning(model) if kib.stats.find_wrappers(model) else model
        for name, target in (("keras", plain), ("tflite", args.out)):
            m = kib.evaluate(target, x, y)
            print(f"{name:<7} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
    _step(3, 3, f"done: {report.file_bytes:,} bytes", start)
    return 0


def _export_configure(p):
    p.add_argument("model", help="a .keras model (wrapped or stripped)")
    p.add_argument("out", help="output .tflite file")
    p.add_argument("--quantize", default="none", choices=["none", "dynamic", "float16", "int8"],
                   help="weight/activation quantization (int8 needs --data)")
    p.add_argument("--data", metavar="DATA.npz",
                   help="inputs 'x' for int8 calibration and verification; with 'y' also "
                        "accuracy/precision/recall/F1 of Keras and TFLite")
    p.add_argument("--dense", action="store_true",
                   help="do not use TFLite's sparse tensor encoding")
    p.add_argument("--latency-runs", type=int, default=50,
                   help="timed interpreter runs (0 to skip)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |Keras - TFLite| relative to max(1, max |Keras|) (default per "
                        "quantization: 1e-4 float, 1e-2 float16, 5e-2 dynamic, 0.2 int8)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="minimum top-1 agreement with Keras (default 0.995 float, 0.98 int8)")


command(
    "export",
    "export a .keras model to a verified (sparse, optionally quantized) .tflite file",
    "examples:\n"
    "  keras-ibprune export pruned.keras pruned.tflite\n"
    "  keras-ibprune export pruned.keras pruned_int8.tflite --quantize int8 "
    "--data held_out.npz",
)(_export)
_export.configure = _export_configure


# ------------------------------------------------------------------------------- bench
def _bench(args):
    import json
    import statistics
    import tempfile

    import keras
    import numpy as np

    import keras_ibprune as kib

    start = time.perf_counter()
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        sparsities = [-1.0]
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise CLIError(f"--sparsities must be comma-separated values in [0, 1). "
                       f"Received: {args.sparsities}")
    scores = [s.strip() for s in args.scores.split(",")]
    n_steps = 2 + len(scores) * len(sparsities) + (0 if args.no_export else 1)
    step = 0

    def progress(text):
        nonlocal step
        step += 1
        _step(step, n_steps, text, start)

    keras.utils.set_random_seed(args.seed)
    (xtr, ytr), (xval, yval), (xte, yte) = _digits(args.seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    print(f"keras-ibprune bench: digits CNN, {len(xtr)} train / {len(xval)} held-out / "
          f"{len(xte)} test; sparsities {sparsities}, scores {scores}")

    dense = _demo_model()
    dense.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    dense.fit(xtr, ytr, batch_size=64, epochs=args.dense_epochs, verbose=0)
    dense_acc = _accuracy(dense, xte, yte)
    progress(f"dense model: test accuracy {dense_acc:.2%}")

    # Training overhead: epochs of the plain vs the wrapped model (+ callback), interleaved.
    plain = keras.models.clone_model(dense)
    plain.set_weights(dense.get_weights())
    plain.compile(keras.optimizers.Adam(1e-3), loss)
    wrapped = kib.prune(dense)
    wrapped.compile(keras.optimizers.Adam(1e-3), loss)
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), score="magnitude")
    times = {"plain": [], "wrapped": []}
    for r in range(args.rounds + 1):
        for name, m, cbs in (("plain", plain, []), ("wrapped", wrapped, [cb])):
            t0 = time.perf_counter()
            m.fit(xtr, ytr, batch_size=64, epochs=r + 1, initial_epoch=r, callbacks=cbs,
                  verbose=0, shuffle=False)
            if r:  # round 0 traces the train step
                times[name].append(time.perf_counter() - t0)
    overhead = statistics.median(times["wrapped"]) / statistics.median(times["plain"])
    progress(f"training overhead (wrapped + callback vs plain, median epoch): {overhead:.2f}x")

    results = {}
    models = {}
    ramp = max(1, (args.epochs + 1) // 2)
    for score in scores:
        for s in sparsities:
            keras.utils.set_random_seed(args.seed)
            pruned = kib.prune(dense)
            pruned.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
            cb = kib.IBPruning(kib.PolynomialDecay(0.0, s, 0, ramp), score=score,
                               held_out=(xval, yval))
            t0 = time.perf_counter()
            pruned.fit(xtr, ytr, batch_size=64, epochs=args.epochs, callbacks=[cb], verbose=0)
            final = kib.strip_pruning(pruned)
            acc = _accuracy(final, xte, yte)
            results[(score, s)] = acc
            models[(score, s)] = final
            progress(f"{score:>9} @ {s:.0%}: test accuracy {acc:.2%} "
                     f"(sparsity {kib.sparsity(final):.2%}, {time.perf_counter() - t0:.1f}s)")

    print(f"\naccuracy vs sparsity ({args.epochs} pruning/fine-tuning epochs from the same "
          f"dense weights; dense {dense_acc:.2%})")
    print("| sparsity | " + " | ".join(scores) + " |")
    print("|---|" + "---|" * len(scores))
    for s in sparsities:
        print(f"| {s:.0%} | " + " | ".join(f"{results[(sc, s)]:.2%}" for sc in scores) + " |")

    sizes = {}
    if not args.no_export:
        s_exp = min(sparsities, key=lambda s: abs(s - 0.9))
        final = models[(scores[0], s_exp)]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                f32 = kib.export_tflite(final, os.path.join(tmp, "f.tflite"), verify_data=xte,
                                    latency_runs=20)
                i8 = kib.export_tflite(final, os.path.join(tmp, "i.tflite"), quantize="int8",
                                   representative_data=xval, verify_data=xte,
                                   latency_runs=20, min_agreement=0.9)
        except kib.ExportVerificationError as err:
            progress(f"export of the {scores[0]} @ {s_exp:.0%} model not verified: {err}")
        else:
            sizes = {"float32 dense": f32.dense_bytes, "float32 sparse": f32.file_bytes,
                     "int8 dense": i8.dense_bytes, "int8 sparse": i8.file_bytes}
            progress(f"exported the {scores[0]} @ {s_exp:.0%} model")
            print(f"\nTFLite file sizes ({scores[0]} @ {s_exp:.0%}, bytes)")
            for k, v in sizes.items():
                print(f"  {k:<15} {v:>9,}")
            print(f"  latency (1 thread, batch 1): float32 sparse {f32.latency_ms:.3f} ms, "
                  f"int8 sparse {i8.latency_ms:.3f} ms")
    if args.json:
        out = {"dense_accuracy": dense_acc, "overhead": overhead,
               "accuracy": {f"{sc}@{s}": a for (sc, s), a in results.items()},
               "tflite_bytes": sizes}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    print(f"done in {time.perf_counter() - start:.0f}s")
    return 0 if np.isfinite(dense_acc) else 1


def _bench_configure(p):
    p.add_argument("--sparsities", default="0.5,0.8,0.9,0.95",
                   help="comma-separated target sparsities (default 0.5,0.8,0.9,0.95)")
    p.add_argument("--scores", default="ib,magnitude",
                   help="comma-separated scores to compare (default ib,magnitude)")
    p.add_argument("--dense-epochs", type=int, default=15, help="dense training epochs")
    p.add_argument("--epochs", type=int, default=6, help="pruning/fine-tuning epochs")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs for the overhead")
    p.add_argument("--no-export", action="store_true", help="skip the TFLite size table")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--seed", type=int, default=0, help="random seed")


command(
    "bench",
    "a small benchmark on digits: training overhead, IB vs magnitude accuracy, TFLite sizes",
    "example:\n  keras-ibprune bench --sparsities 0.8,0.95 --json bench.json\n\n"
    "The full benchmarks (MNIST, tfmot side by side) are in benchmarks/ of the source tree.",
)(_bench)
_bench.configure = _bench_configure


# -------------------------------------------------------------------------------- main
def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-ibprune",
        description="Information-bottleneck pruning for Keras 3.",
        epilog="Run `keras-ibprune COMMAND --help` for the flags of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (fn, help_text, epilog) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        configure = getattr(fn, "configure", None)
        if configure:
            configure(p)
        p.set_defaults(_fn=fn)
    return parser


def main(argv=None):
    """Entry point of the `keras-ibprune` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    try:
        return args._fn(args)
    except CLIError as err:
        print(f"keras-ibprune {args.command}: error: {err}", file=sys.stderr)
        return err.status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
