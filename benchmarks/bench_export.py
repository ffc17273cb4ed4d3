"""Benchmark for `export_tflite` (issue #4): LeNet-5-Caffe pruned to 90 %, exported to TFLite.

Trains LeNet-5-Caffe densely, prunes it to 90 % three ways (from the same dense weights,
same fine-tuning): unstructured, and with the Dense kernels pruned in (4, 1) and (16, 1)
blocks of the Keras kernel (= the 1x4 / 1x16 blocks of TFLite's `(units, inputs)`
layout that the LiteRT FULLY_CONNECTED kernel runs sparse, float32 / int8). Each model is
exported float32-sparse and int8-sparse with `export_tflite`, verified on the test split,
and compared with tfmot (`prune_low_magnitude` + `EXPERIMENTAL_SPARSITY`, run in a
subprocess with `TF_USE_LEGACY_KERAS=1`).

Pruning uses `keras_ibprune.prune.PruneWrapper` + `keras_ibprune.callbacks.IBPruning`
(magnitude score, ERK allocation) when the package provides them, else a built-in
magnitude pruner with the same schedule and allocation.

    .venv/bin/python benchmarks/bench_export.py            # writes benchmarks/results/export.md
    .venv/bin/python benchmarks/bench_export.py --quick    # smoke run (digits, 1 epoch)
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402

SPARSITY = 0.9
VARIANTS = [("unstructured", None), ("fc blocks 4x1", (4, 1)), ("fc blocks 16x1", (16, 1))]


def _erk_densities(shapes, sparsity):
    """Erdős–Rényi-Kernel densities (capped at 1) with total density `1 - sparsity`."""
    sizes = np.array([np.prod(s) for s in shapes], dtype=float)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes])
    dense = np.zeros(len(shapes), bool)
    while True:
        budget = (1 - sparsity) * sizes.sum() - sizes[dense].sum()
        eps = budget / np.sum(raw[~dense] * sizes[~dense])
        dens = np.where(dense, 1.0, eps * raw)
        if np.all(dens <= 1.0):
            return dens
        dense |= dens > 1.0


def _fallback_masks(model, sparsity, blocks):
    kernels = [layer.kernel for layer in model.layers if hasattr(layer, "kernel")]
    dens = _erk_densities([k.shape for k in kernels], sparsity)
    masks = []
    for layer, density in zip([la for la in model.layers if hasattr(la, "kernel")], dens):
        k = np.abs(layer.kernel.numpy()).reshape(-1, layer.kernel.shape[-1])
        bi, bo = blocks.get(layer.name) or (1, 1)
        rows, cols = -(-k.shape[0] // bi) * bi, -(-k.shape[1] // bo) * bo
        padded = np.zeros((rows, cols))
        padded[: k.shape[0], : k.shape[1]] = k
        tiles = padded.reshape(rows // bi, bi, cols // bo, bo).mean(axis=(1, 3))
        n_keep = max(1, int(round(density * tiles.size)))
        keep = np.zeros(tiles.size, bool)
        keep[np.argsort(-tiles, axis=None)[:n_keep]] = True
        full = np.repeat(np.repeat(keep.reshape(tiles.shape), bi, 0), bo, 1)
        masks.append((layer.kernel, full[: k.shape[0], : k.shape[1]].reshape(layer.kernel.shape)))
    return masks


def _prune_fallback(model, blocks, x, y, epochs, final_sparsity):
    """Gradual magnitude pruning (cubic schedule over `epochs - 2`), zeros kept while training."""
    import keras

    state = {"masks": []}

    class KeepZeros(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            for var, mask in state["masks"]:
                var.assign(var.numpy() * mask)

        def on_epoch_end(self, epoch, logs=None):
            ramp = max(epochs - 2, 1)
            s = final_sparsity * (1 - (1 - min(epoch + 1, ramp) / ramp) ** 3)
            state["masks"] = _fallback_masks(model, s, blocks)
            self.on_train_batch_end(0)

    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=[KeepZeros()])
    return model


def _prune_kib(model, blocks, x, y, epochs, final_sparsity):
    import keras

    from keras_ibprune.callbacks import IBPruning
    from keras_ibprune.prune import strip_pruning
    from keras_ibprune.schedules import PolynomialDecay
    from keras_ibprune.wrapper import PruneWrapper

    def wrap(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if hasattr(layer, "kernel"):
            return PruneWrapper(copy, block_size=blocks.get(layer.name))
        return copy

    wrapped = keras.models.clone_model(model, clone_function=wrap)
    for old, new in zip(model.layers, wrapped.layers):
        (new.layer if isinstance(new, PruneWrapper) else new).set_weights(old.get_weights())
    wrapped.compile("adam", "sparse_categorical_crossentropy")
    schedule = PolynomialDecay(0.0, final_sparsity, 0, max(epochs - 2, 1))
    wrapped.fit(x, y, epochs=epochs, batch_size=64, verbose=0,
                callbacks=[IBPruning(schedule, score="magnitude", allocation="erk")])
    return strip_pruning(wrapped)


def _have_kib_pruning():
    try:
        import keras_ibprune.callbacks  # noqa: F401
        import keras_ibprune.wrapper  # noqa: F401
    except ImportError:
        return False
    return True


TFMOT_SCRIPT = r"""
import json, os, sys, tempfile
import numpy as np
sys.path[:0] = [os.environ["KIB_BENCH_DIR"], os.environ["KIB_REPO"]]
import tensorflow as tf, tf_keras
import tensorflow_model_optimization as tfmot
import _data
from keras_ibprune.metrics import evaluate
args = json.loads(sys.argv[1])
d = np.load(args["data"])
weights = np.load(args["weights"])
model = _data.lenet5(tuple(d["x_train"].shape[1:]), lib=tf_keras)
model.set_weights([weights[f"w{i}"] for i in range(len(weights.files))])
steps = int(np.ceil(len(d["x_train"]) / 64))
sched = tfmot.sparsity.keras.PolynomialDecay(0.0, args["sparsity"], 0,
                                             max(args["epochs"] - 2, 1) * steps, frequency=steps)
pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=sched)
pruned.compile("adam", "sparse_categorical_crossentropy")
pruned.fit(d["x_train"], d["y_train"], epochs=args["epochs"], batch_size=64, verbose=0,
           callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
final = tfmot.sparsity.keras.strip_pruning(pruned)
pred = final.predict(d["x_test"], verbose=0).argmax(1)
out = {"keras_accuracy": float(np.mean(pred == d["y_test"]))}
for name, quant in (("float", False), ("int8", True)):
    conv = tf.lite.TFLiteConverter.from_keras_model(final)
    conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if quant:
        conv.optimizations.append(tf.lite.Optimize.DEFAULT)
        rep = d["x_train"][:200]
        conv.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    blob = conv.convert()
    path = os.path.join(tempfile.mkdtemp(), name + ".tflite")
    open(path, "wb").write(blob)
    out[name] = {"bytes": len(blob), **evaluate(path, d["x_test"], d["y_test"])}
print("TFMOT_JSON " + json.dumps(out))
"""


def _run_tfmot(dense_weights, data, epochs):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(os.path.join(tmp, "w.npz"), **{f"w{i}": w for i, w in enumerate(dense_weights)})
        (x_train, y_train), (x_test, y_test) = data
        np.savez(os.path.join(tmp, "d.npz"), x_train=x_train, y_train=y_train,
                 x_test=x_test, y_test=y_test)
        args = {"data": os.path.join(tmp, "d.npz"), "weights": os.path.join(tmp, "w.npz"),
                "epochs": epochs, "sparsity": SPARSITY}
        env = dict(os.environ, TF_USE_LEGACY_KERAS="1", KIB_BENCH_DIR=str(HERE),
                   KIB_REPO=str(HERE.parent), TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run([sys.executable, "-c", TFMOT_SCRIPT, json.dumps(args)], env=env,
                              capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("TFMOT_JSON "):
            return json.loads(line[len("TFMOT_JSON "):])
    print("tfmot run failed:\n" + proc.stderr[-3000:], file=sys.stderr)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["auto", "mnist", "digits"], default="auto")
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--prune-epochs", type=int, default=6, help="pruning + fine-tuning")
    parser.add_argument("--no-tfmot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="digits, 1+3 epochs, no tfmot")
    parser.add_argument("--out", default=str(HERE / "results" / "export.md"))
    args = parser.parse_args(argv)
    if args.quick:
        args.data, args.epochs, args.prune_epochs, args.no_tfmot = "digits", 1, 3, True

    import keras
    import tensorflow as tf

    from keras_ibprune.export import export_tflite
    from keras_ibprune.metrics import evaluate

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(2)
    name = "mnist" if args.data == "mnist" or (
        args.data == "auto" and _data.mnist_available()) else "digits"
    (x_train, y_train), (x_test, y_test) = _data.load(name, seed=0)
    keras.utils.set_random_seed(0)
    t0 = time.time()
    dense = _data.lenet5(x_train.shape[1:])
    dense.compile("adam", "sparse_categorical_crossentropy")
    dense.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=0)
    dense_weights = dense.get_weights()
    use_kib = _have_kib_pruning()
    prune_fn = _prune_kib if use_kib else _prune_fallback
    work = tempfile.mkdtemp(prefix="kib-bench-export-")
    rows = []
    dense_report = export_tflite(dense, os.path.join(work, "dense.tflite"), sparse=False,
                                 verify_data=x_test, latency_runs=300, compare_dense=False)
    rows.append({"model": "dense (not pruned)", "export": "float32 dense",
                 "report": dense_report, "keras": evaluate(dense, x_test, y_test),
                 "tflite": evaluate(dense_report.path, x_test, y_test)})
    for label, block in VARIANTS:
        keras.utils.set_random_seed(1)
        model = _data.lenet5(x_train.shape[1:])
        model.set_weights(dense_weights)
        model.compile("adam", "sparse_categorical_crossentropy")
        blocks = {"fc1": block, "fc2": block} if block else {}
        pruned = prune_fn(model, blocks, x_train, y_train, args.prune_epochs, SPARSITY)
        keras_metrics = evaluate(pruned, x_test, y_test)
        for quant in (None, "int8"):
            path = os.path.join(work, f"{label.replace(' ', '_')}_{quant}.tflite")
            report = export_tflite(pruned, path, quantize=quant, representative_data=x_train[:500],
                                   verify_data=x_test, tolerance=1.0, min_agreement=0.0,
                                   latency_runs=300)
            rows.append({"model": f"90 % {label}", "export": f"{quant or 'float32'} sparse",
                         "report": report, "keras": keras_metrics,
                         "tflite": evaluate(path, x_test, y_test)})
        print(f"{label}: done ({time.time() - t0:.0f}s)", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    tfmot = None if args.no_tfmot else _run_tfmot(dense_weights, ((x_train, y_train),
                                                                  (x_test, y_test)),
                                                  args.prune_epochs)
    _write(args, name, len(x_train), len(x_test), rows, tfmot, use_kib, time.time() - t0)


def _write(args, data_name, n_train, n_test, rows, tfmot, use_kib, seconds):
    dense_float = rows[0]["report"].file_bytes
    cmd = ".venv/bin/python benchmarks/bench_export.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    lines = [
        "## Export to TFLite / LiteRT (issue #4)", "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().strftime('%a %b %d %H:%M:%S %Z %Y')}",
        f"- Machine: 2-core CPU ({platform.machine()}, {platform.system()}), Python "
        f"{platform.python_version()}; latency = median of 300 single-thread invocations, "
        f"batch 1, ai-edge-litert interpreter. Wall time {seconds:.0f} s.",
        f"- Data: {data_name}, {n_train} train / {n_test} test (seed 0). LeNet-5-Caffe "
        f"(conv20-conv50-fc500-fc10), {args.epochs} dense epochs, then {args.prune_epochs} "
        f"epochs of gradual magnitude pruning to {SPARSITY:.0%} (ERK allocation, "
        f"{'keras_ibprune IBPruning' if use_kib else 'built-in magnitude pruner'}).",
        f"- Ratios are file bytes / the dense float32 file ({dense_float:,} B).", "",
        "| model | export | file B | gzip B | ratio | Keras acc | TFLite acc | top-1 agree "
        "| max abs diff | latency ms | FC weights stored as | DENSIFY ops |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        r = row["report"]
        fc = [t for t in r.tensors if t["shape"][0] in (500, 10) and len(t["shape"]) == 2]
        fc_store = "; ".join(
            f"{t['storage']} ({'sparse exec' if t['executed_sparse'] else 'DENSIFY'})"
            if t["storage"] != "dense" else "dense" for t in fc)
        lines.append(
            f"| {row['model']} | {row['export']} | {r.file_bytes:,} | {r.gzip_bytes:,} | "
            f"{r.file_bytes / dense_float:.4f} | {row['keras']['accuracy']:.4f} | "
            f"{row['tflite']['accuracy']:.4f} | {r.top1_agreement:.4f} | {r.max_abs_diff:.2g} | "
            f"{r.latency_ms:.4f} | {fc_store} | {r.ops.count('DENSIFY')} |")
    if tfmot:
        for name in ("float", "int8"):
            t = tfmot[name]
            lines.append(
                f"| tfmot 90 % (prune_low_magnitude) | {name} + EXPERIMENTAL_SPARSITY | "
                f"{t['bytes']:,} | - | {t['bytes'] / dense_float:.4f} | "
                f"{tfmot['keras_accuracy']:.4f} | {t['accuracy']:.4f} | - | - | - | - | - |")
    lines += ["", "Bars: " + _bars(rows, dense_float), "", NOTES]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        [{k: (v.as_dict() if k == "report" else v) for k, v in row.items()} for row in rows]
        + [{"tfmot": tfmot}], indent=1, default=str))
    print("\n".join(lines))


NOTES = """Which sparse layouts LiteRT runs sparse (TF 2.21 converter, ai-edge-litert 2.3, read from
the flatbuffers by `export_tflite`'s report):

- FULLY_CONNECTED weights are *executed sparse* (no DENSIFY) only with 1x4 blocks (float32)
  or 1x16 blocks (int8, full-integer) of TFLite's `(units, inputs)` weight layout. In
  keras_ibprune terms that is `block_size=(4, 1)` / `(16, 1)` on a Dense kernel
  `(inputs, units)` (4 / 16 consecutive inputs of one unit); `block_size=(1, 4)` (4
  units of one input) is *not* recognised and ends up CSR + DENSIFY. A (16, 1)-blocked
  model serves both: the float converter finds 1x4 blocks in it.
- Unstructured FC sparsity and every CONV_2D kernel are *stored* sparse (CSR, uint8/uint16
  indices: ~2 bytes of index per kept float) and expanded by a DENSIFY op when the
  interpreter is prepared: smaller file, same compute and peak memory as dense.
- float16 + block-sparse FC: the converter feeds the sparse fp16 tensor straight into
  DEQUANTIZE (NaN outputs); `export_tflite` inserts the missing DENSIFY.
- Dynamic-range ("hybrid") FC with 1x16 int8 blocks is wrong for batch > 1 (right at
  batch 1); `export_tflite` inserts a DENSIFY there too (stored sparse, executed dense).
- The default XNNPACK delegate refuses int8 files whose FC weights go through DENSIFY, and
  sparse dynamic-range files ("failed to delegate FULLY_CONNECTED / CONV_2D node"): on a
  phone create the interpreter with `BUILTIN_WITHOUT_DEFAULT_DELEGATES` (the report says
  when this happened; the 1x16-block int8 file runs with the default resolver). Dense
  float files run under XNNPACK, so float sparse latency is about the dense one here; the
  int8 1x16 file is the fastest.
"""


def _bars(rows, dense_float):
    by = {(r["model"], r["export"]): r for r in rows}
    unstructured = by[("90 % unstructured", "float32 sparse")]
    checks = []
    for label in ("fc blocks 4x1", "fc blocks 16x1"):
        r = by[(f"90 % {label}", "float32 sparse")]
        ratio = r["report"].file_bytes / dense_float
        drop = 100 * (unstructured["keras"]["accuracy"] - r["keras"]["accuracy"])
        checks.append(f"float sparse ({label}) ratio {ratio:.4f} "
                      f"{'<=' if ratio <= 0.12 else '>'} 0.12 at {drop:+.2f} points vs "
                      f"unstructured ({'ok' if drop <= 0.3 else 'MISS'} <= 0.3)")
    for r in rows[1:]:
        rep, bar = r["report"], 0.995 if r["export"].startswith("float") else 0.98
        ok = rep.top1_agreement >= bar
        checks.append(f"{r['model']} {r['export']}: agreement {rep.top1_agreement:.4f} "
                      f"({'ok' if ok else 'MISS'} >= {bar})")
        if r["export"].startswith("int8"):
            ratio = rep.file_bytes / dense_float
            gap = 100 * abs(r["tflite"]["accuracy"] - r["keras"]["accuracy"])
            checks.append(f"{r['model']} int8 ratio {ratio:.4f} "
                          f"({'ok' if ratio <= 0.05 else 'MISS'} <= 0.05), "
                          f"accuracy gap {gap:.2f} points "
                          f"({'ok' if gap <= 0.5 else 'MISS'} <= 0.5)")
    return "\n- " + "\n- ".join(checks)


if __name__ == "__main__":
    main()
