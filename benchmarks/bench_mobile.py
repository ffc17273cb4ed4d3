"""Phone-model benchmark (issue #12): MobileNetV2 (alpha 0.35) dense vs pruned, in LiteRT.

Builds `keras.applications.MobileNetV2(alpha=0.35, weights=None)` on the MNIST split of
`_data.py`, padded to SIZE x SIZE x 3 (SIZE = 32k + 1: every stride-2 layer then pads
symmetrically, which XNNPACK's sparse path needs; see `keras_ibprune.xnnpack`), trains it
densely, and fine-tunes from the same dense weights:

* `unstructured 90 %`: `kib.prune(model)` (every prunable layer), IB score, global allocation;
* `xnnpack policy 90 %`: `kib.prune(model, policy="xnnpack_sparse")` (the 1x1 convolutions
  only), same score, schedule and epochs.

Each model is exported float32 with `export_tflite(sparse=True)` (dense model: dense
encoding) and measured: test accuracy of the file, file / gzip bytes, the number of 1x1
convolutions in a subgraph meeting XNNPACK's sparse-inference conditions, and median latency
of one inference with 1 and 4 threads. Latencies are measured in interleaved rounds (every
file once per round, ROUNDS rounds) and the median over rounds is reported, so load on the
machine hits all variants alike.

    .venv/bin/python benchmarks/bench_mobile.py --quick   # 1 seed, 33 px, short training
    .venv/bin/python benchmarks/bench_mobile.py           # 97 px, longer training
"""

import argparse
import datetime
import gzip
import json
import pathlib
import platform
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402

SPARSITY = 0.9
ROUNDS = 7


def _pad(x, size):
    """(n, 28, 28, 1) in [0, 1] -> (n, size, size, 3), centred, float32."""
    before = (size - x.shape[1]) // 2
    after = size - x.shape[1] - before
    x = np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))
    return np.repeat(x, 3, axis=-1).astype("float32")


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = next(
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return name


def _finetune(kib, keras, dense, train, val, policy, epochs):
    model = keras.models.clone_model(dense)
    model.set_weights(dense.get_weights())
    pruned = kib.prune(model, policy=policy)
    pruned.compile(
        keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    schedule = kib.PolynomialDecay(0.0, SPARSITY, 0, max(epochs - 1, 1))
    held = (val[0][:256], val[1][:256])
    pruned.fit(
        train[0],
        train[1],
        epochs=epochs,
        batch_size=64,
        verbose=0,
        callbacks=[kib.IBPruning(schedule, held_out=held, held_out_size=256)],
    )
    return kib.strip_pruning(pruned)


def _latencies(paths, sample):
    from keras_ibprune import _tflite_runner

    runners = {
        (name, t): _tflite_runner.Runner(path, num_threads=t)
        for name, path in paths.items()
        for t in (1, 4)
    }
    times = {key: [] for key in runners}
    for _ in range(ROUNDS):
        for key, runner in runners.items():
            times[key].append(runner.latency_ms(sample, 30))
    return {key: float(np.median(v)) for key, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "mobile.md"))
    args = p.parse_args(argv)
    import keras

    import keras_ibprune as kib
    from keras_ibprune import _tflite_runner, _xnnpack_tflite

    size, n_train, epochs, ft_epochs = (33, 3000, 5, 3) if args.quick else (97, 8000, 8, 6)
    keras.utils.set_random_seed(0)
    (xtr, ytr), (xva, yva), (xte, yte) = _data.splits("mnist", seed=0)
    xtr, ytr = _pad(xtr[:n_train], size), ytr[:n_train]
    xva, xte = _pad(xva, size), _pad(xte, size)
    dense = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=0.35, weights=None, classes=10
    )
    for layer in dense.layers:  # keras.applications' 0.999 needs far more steps than a
        if isinstance(layer, keras.layers.BatchNormalization):  # short run has
            layer.momentum = 0.9
    dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    dense.fit(xtr, ytr, epochs=epochs, batch_size=64, verbose=0)
    models = {
        "dense": dense,
        "unstructured 90 %": _finetune(kib, keras, dense, (xtr, ytr), (xva, yva), None, ft_epochs),
        "xnnpack policy 90 %": _finetune(
            kib, keras, dense, (xtr, ytr), (xva, yva), "xnnpack_sparse", ft_epochs
        ),
    }
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kib-mobile-"))
    rows, paths = {}, {}
    for name, model in models.items():
        path = str(tmp / (name.split()[0] + ".tflite"))
        rep = kib.export_tflite(
            model,
            path,
            sparse=name != "dense",
            verify_data=xte[:256],
            latency_runs=0,
            compare_dense=False,
        )
        pred = _tflite_runner.Runner(path).predict(xte)
        acc = float(np.mean(pred.argmax(1) == yte))
        data = pathlib.Path(path).read_bytes()
        one_by_one = [
            r for r in rep.op_table if r["op"] == "CONV_2D" and r["weight_shape"][1:3] == [1, 1]
        ]
        rows[name] = {
            "accuracy": acc,
            "file_bytes": len(data),
            "gzip_bytes": len(gzip.compress(data, 9)),
            "sparse_1x1_convs": sum(
                r["xnnpack_sparse"] and r["weights"] != "dense" for r in one_by_one
            ),
            "notes": rep.notes,
        }
        paths[name] = path
    lat = _latencies(paths, xte[:1])
    for name in rows:
        rows[name]["latency_ms_1"], rows[name]["latency_ms_4"] = lat[(name, 1)], lat[(name, 4)]
    host_sparse = _xnnpack_tflite.host_runs_sparse()
    base = rows["dense"]
    lines = [
        "# Phone model: MobileNetV2 (alpha 0.35), dense vs pruned, LiteRT",
        "",
        f"Written by `benchmarks/bench_mobile.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today().isoformat()}: MNIST split of `_data.py` ({n_train} training "
        f"images) padded to {size}x{size}x3, dense training {epochs} epochs, pruning "
        f"fine-tune {ft_epochs} epochs from the same dense weights (IB score, polynomial "
        f"schedule to {SPARSITY:.0%}), 1 seed. Float32 files; latency = median over "
        f"{ROUNDS} interleaved rounds of the median of 30 invocations (batch 1), "
        f"LiteRT interpreter (`{_tflite_runner.Runner(paths['dense']).name}`, default "
        "XNNPACK delegate).",
        "",
        f"Host: {_cpu()} ({platform.machine()}); XNNPACK sparse inference on this host: "
        f"{'yes' if host_sparse else 'no (x86 with AVX: XNNPACK turns the sparse path off)'}.",
        "",
        "Batch-norm momentum 0.9 (keras.applications uses 0.999, too slow for a short run).",
        "",
        "| variant | test accuracy | file bytes | gzip bytes | sparse-stored 1x1 convs in "
        "XNNPACK's sparse subgraph (of 34) | 1 thread ms | 4 threads ms | "
        "speed-up vs dense (1 thread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['accuracy']:.4f} | {r['file_bytes']:,} | {r['gzip_bytes']:,} | "
            f"{r['sparse_1x1_convs']} | {r['latency_ms_1']:.3f} | {r['latency_ms_4']:.3f} | "
            f"{base['latency_ms_1'] / r['latency_ms_1']:.2f}x |"
        )
    out = pathlib.Path(args.out)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(
        json.dumps(
            {"size": size, "quick": args.quick, "host_runs_sparse": host_sparse, "rows": rows},
            indent=1,
        ),
        encoding="utf-8",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
