"""Phone-model benchmark (issue #12): MobileNets dense vs pruned, float and int8, in LiteRT.

Builds a `keras.applications` MobileNet with `weights=None` on the MNIST split of
`_data.py`, padded to SIZE x SIZE x 3 (SIZE = 32k + 1: every stride-2 layer then pads
symmetrically, which XNNPACK's sparse path needs; see `keras_ibprune.xnnpack`), trains it
densely, and fine-tunes copies of the same dense weights (IB score, Adam 1e-3, batch 64,
sparsity ramped over all but the last two fine-tuning epochs, held-out batch from the
validation split):

* `unstructured 90 %`: `kib.prune(model)` (every prunable layer);
* `xnnpack policy 90 %`: `kib.prune(model, policy="xnnpack_sparse")` (the 1x1 convolutions
  XNNPACK's sparse path can run; refused, with the check's message, on models it cannot);
* `channels -67 % FLOPs + shrink`: `kib.prune(model, granularity="channel")`,
  `IBPruning(target="flops")` to 2/3 of the FLOPs removed, then `kib.shrink`;
* with `--nm`: `unstructured 50 %` and `2:4` (`pattern="2:4"`).

Each model is exported float32 and int8 (`sparse=True` for the masked models, dense for
the dense and the shrunk ones; int8 calibrated on 200 validation images) and measured: test
accuracy of the file in the interpreter, top-1 agreement of the int8 file with Keras, file
/ gzip bytes, the number of sparse-stored 1x1 convolutions inside a subgraph meeting
XNNPACK's sparse-inference conditions, and median latency of one inference with 1 and 4
threads. Latencies are measured in interleaved rounds (every file once per round, ROUNDS
rounds; median over rounds), so load on the machine hits all variants alike.

One process per model writes `results/mobile_<model>.json` (the files stay in a temporary
folder); `--retime MODEL ...` re-measures their latencies with nothing else running, and
`--table` writes `results/mobile.md` from every such JSON present. `--allocations A B ...`
instead compares allocations for unstructured 90 % on validation data only
(`results/mobile_allocation_<model>.md`).

    B=benchmarks/bench_mobile.py   # the runs in BENCHMARKS.md (about 15 min each on 2 cores)
    .venv/bin/python $B --model mobilenet_v2_035 --nm --train 4000 --epochs 6 --ft-epochs 5
    .venv/bin/python $B --model mobilenet_v3_small --train 4000 --epochs 6 --ft-epochs 5
    .venv/bin/python $B --model mobilenet_v2_100 --train 3000 --epochs 6 --ft-epochs 5
    .venv/bin/python benchmarks/bench_mobile.py --retime mobilenet_v2_035 \
        mobilenet_v3_small mobilenet_v2_100 --table
    .venv/bin/python benchmarks/bench_mobile.py --model mobilenet_v2_035 --train 4000 \
        --epochs 6 --ft-epochs 5 --allocations global erk uniform global_erk_floor
    .venv/bin/python benchmarks/bench_mobile.py --model mobilenet_v2_035 --quick  # smoke
"""

import argparse
import datetime
import gzip
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402

ROUNDS = 15
MODELS = {  # key: (label, keras.applications class, keyword arguments)
    "mobilenet_v2_035": ("MobileNetV2 (alpha 0.35)", "MobileNetV2", {"alpha": 0.35}),
    "mobilenet_v2_100": ("MobileNetV2 (alpha 1.0)", "MobileNetV2", {"alpha": 1.0}),
    "mobilenet_v3_small": (
        "MobileNetV3Small",
        "MobileNetV3Small",
        {"include_preprocessing": False},
    ),
}
VARIANTS = {  # name: (kib.prune kwargs, IBPruning kwargs, sparsity, shrink)
    "unstructured 90 %": ({}, {}, 0.9, False),
    "xnnpack policy 90 %": ({"policy": "xnnpack_sparse"}, {}, 0.9, False),
    "channels -67 % FLOPs + shrink": (
        {"granularity": "channel"},
        {"target": "flops"},
        2 / 3,
        True,
    ),
}
NM_VARIANTS = {
    "unstructured 50 %": ({}, {}, 0.5, False),
    "2:4": ({"pattern": "2:4"}, {}, 0.5, False),
}


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
        return next(
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _build(keras, key, size):
    _, cls, kwargs = MODELS[key]
    model = getattr(keras.applications, cls)(
        input_shape=(size, size, 3), weights=None, classes=10, **kwargs
    )
    for layer in model.layers:  # keras.applications' 0.999 needs far more steps than a
        if isinstance(layer, keras.layers.BatchNormalization):  # short run has
            layer.momentum = 0.9
    return model


def _accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=256, verbose=0).argmax(1) == y))


def _dense_start(keras, key, size, n_train, epochs):
    """`(dense model, train, validation, test)`: the padded splits and the dense model
    trained on the first `n_train` training images (seed 0)."""
    keras.utils.set_random_seed(0)
    (xtr, ytr), (xva, yva), (xte, yte) = _data.splits("mnist", seed=0)
    xtr, ytr = _pad(xtr[:n_train], size), ytr[:n_train]
    xva, xte = _pad(xva, size), _pad(xte, size)
    dense = _build(keras, key, size)
    dense.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    dense.fit(xtr, ytr, epochs=epochs, batch_size=64, verbose=0)
    return dense, (xtr, ytr), (xva, yva), (xte, yte)


def _prune_and_fit(kib, keras, dense, data, prune_kwargs, pruner_kwargs, sparsity, epochs):
    """A wrapped copy of `dense`, IB-pruned to `sparsity` during `epochs` epochs (ramp over
    all but the last two), held-out batch from the validation split."""
    (xtr, ytr), (xva, yva) = data
    model = keras.models.clone_model(dense)
    model.set_weights(dense.get_weights())
    pruned = kib.prune(model, **prune_kwargs)  # ValueError: policy refused
    pruned.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    schedule = kib.PolynomialDecay(0.0, sparsity, 0, max(epochs - 2, 1))
    cb = kib.IBPruning(schedule, held_out=(xva[:512], yva[:512]), **pruner_kwargs)
    pruned.fit(xtr, ytr, epochs=epochs, batch_size=64, verbose=0, callbacks=[cb])
    return pruned


def _finetune(kib, keras, dense, data, variant, epochs):
    prune_kwargs, pruner_kwargs, sparsity, do_shrink = variant
    pruned = _prune_and_fit(kib, keras, dense, data, prune_kwargs, pruner_kwargs, sparsity,
                            epochs)
    out = kib.shrink(pruned) if do_shrink else kib.strip_pruning(pruned)
    return out, float(kib.sparsity(pruned))  # of the masked weights (channels: 0)


def _meta(key, size, n_train, epochs, ft_epochs, start):
    """What every run records about itself."""
    return {
        "model": key,
        "label": MODELS[key][0],
        "size": size,
        "n_train": n_train,
        "epochs": epochs,
        "ft_epochs": ft_epochs,
        "date": datetime.date.today().isoformat(),
        "seconds": round(time.time() - start),
        "machine": f"{_cpu()} ({platform.machine()}), {os.cpu_count()} CPUs",
    }


def compare_allocations(key, size, n_train, epochs, ft_epochs, allocations, sparsity):
    """Validation accuracy of unstructured IB pruning to `sparsity` with each allocation,
    from one dense start, and each run's emptiest tensors (selection: validation only)."""
    import keras

    import keras_ibprune as kib
    from keras_ibprune.stats import find_wrappers

    start = time.time()
    dense, train, (xva, yva), _ = _dense_start(keras, key, size, n_train, epochs)
    rows = [{"allocation": "dense", "val": _accuracy(dense, xva, yva)}]
    for allocation in allocations:
        keras.utils.set_random_seed(1)
        pruned = _prune_and_fit(
            kib, keras, dense, (train, (xva, yva)), {}, {"allocation": allocation}, sparsity,
            ft_epochs,
        )
        density = {
            w.layer.name: float(np.mean(np.asarray(w.masks[0]))) for w in find_wrappers(pruned)
        }
        emptiest = sorted(density.items(), key=lambda kv: kv[1])[:3]
        rows.append(
            {
                "allocation": allocation,
                "val": _accuracy(pruned, xva, yva),
                "sparsity": float(kib.sparsity(pruned)),
                "emptiest": emptiest,
                "density": density,
            }
        )
        print(rows[-1]["allocation"], rows[-1]["val"], emptiest, flush=True)
    return dict(_meta(key, size, n_train, epochs, ft_epochs, start), target=sparsity,
                rows=rows)


def allocation_table(run, command):
    lines = [
        f"# Allocation on {run['label']} at {run['target']:.0%}: validation only",
        "",
        f"Written by `{command}` on {run['date']} ({run['machine']}; {run['seconds']} s): "
        f"MNIST padded to {run['size']} px, {run['n_train']} training images, dense "
        f"{run['epochs']} epochs, then IB pruning of every prunable layer with each "
        f"allocation, {run['ft_epochs']} epochs from the same dense weights (one seed). "
        "Keras validation accuracy (1,000 images); the three emptiest tensors (kept "
        "fraction of their weights).",
        "",
        "| allocation | validation accuracy | sparsity | emptiest tensors |",
        "|---|---|---|---|",
    ]
    for r in run["rows"]:
        empt = ", ".join(f"{n} {d:.4f}" for n, d in r.get("emptiest", [])) or "-"
        sp = f"{r['sparsity']:.3f}" if "sparsity" in r else "-"
        lines.append(f"| {r['allocation']} | {r['val']:.4f} | {sp} | {empt} |")
    return "\n".join(lines) + "\n"


def _export(kib, model, path, sparse, quantize, calib, verify):
    from keras_ibprune import _tflite_runner

    rep = kib.export_tflite(
        model,
        path,
        sparse=sparse,
        quantize=quantize,
        representative_data=calib if quantize else None,
        verify_data=verify,
        tolerance=float("inf"),  # measured and reported, not enforced
        min_agreement=0.0,
        latency_runs=0,
        compare_dense=False,
    )
    data = pathlib.Path(path).read_bytes()
    return dict(
        _one_by_one(rep.op_table),
        file_bytes=len(data),
        gzip_bytes=len(gzip.compress(data, 9)),
        top1_agreement=rep.top1_agreement,
        notes=rep.notes,
        path=path,
        runner=_tflite_runner.Runner(path),
    )


def _one_by_one(op_table):
    """1x1 convolutions of the file, and how many are in XNNPACK's sparse subgraph (they run
    XNNPACK's sparse kernels on ARM, whatever their storage: it counts zeros over the whole
    subgraph)."""
    convs = [
        r
        for r in op_table
        if r["op"] == "CONV_2D" and r["weight_shape"] and r["weight_shape"][1:3] == [1, 1]
    ]
    return {
        "sparse_1x1_convs": sum(r["xnnpack_sparse"] for r in convs),
        "one_by_one_convs": len(convs),
    }


def _latencies(paths, sample):
    """`{(key, threads): median ms}`: ROUNDS rounds, every file once per round in a new
    random order (so drift and cache effects hit all alike), median of 30 invocations."""
    from keras_ibprune import _tflite_runner

    runners = {
        (name, t): _tflite_runner.Runner(path, num_threads=t)
        for name, path in paths.items()
        for t in (1, 4)
    }
    keys = list(runners)
    times = {key: [] for key in keys}
    rng = np.random.default_rng(0)
    for _ in range(ROUNDS):
        for k in rng.permutation(len(keys)):
            times[keys[k]].append(runners[keys[k]].latency_ms(sample, 30))
    return {key: float(np.median(v)) for key, v in times.items()}


def retime(results_dir, key):
    """Re-measures the latencies (and the sparse-subgraph count) of a run's saved files,
    e.g. with nothing else on the machine; the files stay where the run wrote them."""
    from keras_ibprune import oplist

    path = results_dir / f"mobile_{key}.json"
    run = json.loads(path.read_text(encoding="utf-8"))
    missing = [r["path"] for r in run["rows"] if not os.path.exists(r.get("path", ""))]
    if missing:
        raise SystemExit(f"--retime needs the run's files; missing: {missing}")
    (_, _), (_, _), (xte, _) = _data.splits("mnist", seed=0)
    lat = _latencies({(r["variant"], r["encoding"]): r["path"] for r in run["rows"]},
                     _pad(xte[:1], run["size"]))
    for r in run["rows"]:
        r["latency_ms_1"] = lat[((r["variant"], r["encoding"]), 1)]
        r["latency_ms_4"] = lat[((r["variant"], r["encoding"]), 4)]
        r.update(_one_by_one(oplist.op_table(pathlib.Path(r["path"]).read_bytes())[0]))
    run["retimed"] = datetime.datetime.now().isoformat(timespec="minutes")
    _write_json(path, run)


def run_model(key, size, n_train, epochs, ft_epochs, nm):
    import keras

    import keras_ibprune as kib
    from keras_ibprune import _xnnpack_tflite

    start = time.time()
    dense, (xtr, ytr), (xva, yva), (xte, yte) = _dense_start(keras, key, size, n_train, epochs)
    models, variants = {"dense": (dense, 0.0)}, dict(VARIANTS, **(NM_VARIANTS if nm else {}))
    refused = {}
    for name, variant in variants.items():
        keras.utils.set_random_seed(1)
        try:
            models[name] = _finetune(
                kib, keras, dense, ((xtr, ytr), (xva, yva)), variant, ft_epochs
            )
        except ValueError as err:
            if "policy" not in variant[0]:
                raise
            refused[name] = str(err)
        print(name, "trained", round(time.time() - start), flush=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kib-mobile-"))
    rows, paths = [], {}
    for i, (name, (model, sparsity)) in enumerate(models.items()):
        shrunk = name.endswith("shrink")
        sparse = name != "dense" and not shrunk
        for quantize in (None, "int8"):
            path = str(tmp / f"{i}_{quantize or 'float'}.tflite")
            r = _export(kib, model, path, sparse, quantize, xva[:200], xte[:500])
            runner = r.pop("runner")
            r.update(
                variant=name,
                encoding="int8" if quantize else "float32",
                sparsity=sparsity,
                params=int(model.count_params()),
                flops=int(kib.count_flops(model)),  # what the runtime computes: all
                # weights of a sparse file are expanded at load, so only shrink lowers it
                keras_val=_accuracy(model, xva, yva),
                keras_test=_accuracy(model, xte, yte),
                test_accuracy=float(np.mean(runner.predict(xte).argmax(1) == yte)),
            )
            rows.append(r)
            paths[(name, r["encoding"])] = path
        print(name, "exported", round(time.time() - start), flush=True)
    lat = _latencies(paths, xte[:1])
    for r in rows:
        r["latency_ms_1"] = lat[((r["variant"], r["encoding"]), 1)]
        r["latency_ms_4"] = lat[((r["variant"], r["encoding"]), 4)]
    return dict(
        _meta(key, size, n_train, epochs, ft_epochs, start),
        refused=refused,
        rows=rows,
        host_runs_sparse=_xnnpack_tflite.host_runs_sparse(),
        keras=keras.__version__,
    )


def _write_json(path, payload):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def table(results_dir):
    """`results/mobile.md` from every `mobile_<model>.json` present, in MODELS order."""
    runs = [
        json.loads((results_dir / f"mobile_{key}.json").read_text(encoding="utf-8"))
        for key in MODELS
        if (results_dir / f"mobile_{key}.json").exists()
    ]
    if not runs:
        raise SystemExit(f"No results/mobile_<model>.json in {results_dir}: run a model first.")
    lines = [
        "# Phone models: MobileNets dense vs pruned, float32 and int8, in LiteRT",
        "",
        "Written by `benchmarks/bench_mobile.py --table` from the runs below (one process "
        "per model, one seed: accuracies are single runs, not means). MNIST split of "
        "`_data.py` padded to SIZE x SIZE x 3; dense training, then each variant fine-tunes "
        "the same dense weights (IB score, Adam 1e-3, sparsity ramped over all but the "
        "last two epochs). Batch-norm momentum 0.9 (keras.applications' 0.999 is too slow "
        "for short runs). Latency: median over "
        f"{ROUNDS} rounds (every file once per round, in a new random order) of the median "
        "of 30 single-image invocations, LiteRT interpreter, default XNNPACK delegate; "
        "speed-up = dense float32 1-thread latency / this file's. On this x86 host a masked "
        "float32 file expands its weights at load (DENSIFY) and runs the same dense kernels "
        "as the dense file, so differences between those rows are noise and memory layout, "
        "not sparsity; only `shrink` removes work here. 4 threads oversubscribe a 2-core "
        "machine. Accuracy = the file's test accuracy (2,000 images) in the interpreter; "
        "agreement = int8 file vs Keras top-1 on 500 test images; FLOPs = what the file "
        "computes (masked weights included).",
        "",
    ]
    for run in runs:
        cmd = run["command"]
        lines += [
            f"## {run['label']}, {run['size']} px",
            "",
            f"`{cmd}` (train {run['n_train']} images, dense {run['epochs']} epochs, "
            f"fine-tune {run['ft_epochs']} epochs) on {run['date']}, {run['machine']}, "
            f"keras {run['keras']}, {run['seconds']} s"
            + (f"; latencies re-measured on {run['retimed']} (`--retime {run['model']}`, "
               "nothing else running)" if run.get("retimed") else "")
            + ". XNNPACK sparse inference on this "
            "host: "
            + (
                "yes"
                if run["host_runs_sparse"]
                else "no (x86 with AVX: XNNPACK turns the sparse path off, so sparse files "
                "run dense kernels here)"
            )
            + ".",
            "",
        ]
        for name, why in run["refused"].items():
            lines += [f"`{name}` refused by the graph check: {why}", ""]
        dense = next(
            r for r in run["rows"] if r["variant"] == "dense" and r["encoding"] == "float32"
        )
        lines += [
            "| variant | file | weight sparsity | FLOPs vs dense | Keras val | test acc (file) "
            "| int8 agreement | file bytes | gzip bytes | vs dense float file | 1x1 convs in "
            "XNNPACK's sparse subgraph | 1 thread ms | 4 threads ms | speed-up (1 thread) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in run["rows"]:
            agree = "-" if r["encoding"] == "float32" else f"{r['top1_agreement']:.4f}"
            lines.append(
                f"| {r['variant']} | {r['encoding']} | {r['sparsity']:.3f} | "
                f"{r['flops'] / dense['flops']:.3f} | "
                f"{r['keras_val']:.4f} | {r['test_accuracy']:.4f} | {agree} | "
                f"{r['file_bytes']:,} | {r['gzip_bytes']:,} | "
                f"{r['file_bytes'] / dense['file_bytes']:.3f}x | "
                f"{r['sparse_1x1_convs']} of {r['one_by_one_convs']} | "
                f"{r['latency_ms_1']:.3f} | {r['latency_ms_4']:.3f} | "
                f"{dense['latency_ms_1'] / r['latency_ms_1']:.2f}x |"
            )
        lines.append("")
    out = results_dir / "mobile.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, out)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS))
    p.add_argument("--size", type=int, default=33, help="32k + 1 pixels (default 33)")
    p.add_argument("--train", type=int, default=7000, help="training images (default all)")
    p.add_argument("--epochs", type=int, default=8, help="dense epochs")
    p.add_argument("--ft-epochs", type=int, default=6, help="fine-tuning epochs per variant")
    p.add_argument("--nm", action="store_true", help="add unstructured 50 %% and 2:4")
    p.add_argument("--quick", action="store_true", help="smoke run: 1000 images, 2+3 epochs")
    p.add_argument("--table", action="store_true", help="write results/mobile.md")
    p.add_argument("--allocations", nargs="+", default=[],
                   help="with --model: compare these allocations at 90 %% on validation")
    p.add_argument("--retime", nargs="+", choices=sorted(MODELS), default=[],
                   help="re-measure the latencies of these models' saved files")
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    results = pathlib.Path(args.results)
    n_train, epochs, ft = (1000, 2, 3) if args.quick else (args.train, args.epochs,
                                                             args.ft_epochs)
    command = " ".join(["python benchmarks/bench_mobile.py", *(argv or sys.argv[1:])])
    if args.model and args.allocations:
        run = compare_allocations(args.model, args.size, n_train, epochs, ft,
                                  args.allocations, 0.9)
        _write_json(results / f"mobile_allocation_{args.model}.json", run)
        out = results / f"mobile_allocation_{args.model}.md"
        out.write_text(allocation_table(run, command), encoding="utf-8")
        print(out.read_text(encoding="utf-8"))
        return
    if args.model:
        run = run_model(args.model, args.size, n_train, epochs, ft, args.nm)
        run.update(
            nm=args.nm,
            quick=args.quick,
            command=command,
        )
        _write_json(results / f"mobile_{args.model}.json", run)
    for key in args.retime:
        retime(results, key)
    if args.table:
        print(table(results))
    if not (args.model or args.table or args.retime):
        p.error("give --model, --retime, --table or a combination")


if __name__ == "__main__":
    main()
