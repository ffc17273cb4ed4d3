"""Does this CPU run XNNPACK's sparse path? Dense vs sparse MobileNetV2 files, same process.

No training: `keras.applications.MobileNetV2(alpha=0.35, weights=None)` at SIZE px (32k + 1,
so every stride-2 layer pads symmetrically), its 1x1 convolutions pruned to 90 % in one shot
with `kib.prune(model, policy="xnnpack_sparse")` and magnitude scores, then stripped and
exported twice with `export_tflite`: the dense encoding and the sparse one (DENSIFY'd 1x1
weights, the layout XNNPACK's sparse path takes). Reported: how many ops the sparse file
has in XNNPACK's sparse subgraph, the single-thread latency of both files (median over
interleaved rounds, so load hits both alike), and whether their outputs are bit-identical
(the sparse kernels sum in another order, so identical outputs mean the same dense kernels
ran).

    .venv/bin/python benchmarks/bench_sparse_path.py [--size 225] [--rounds 15]
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SPARSITY = 0.9


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=225)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--out", default=str(HERE / "results" / "sparse_path.md"))
    args = p.parse_args(argv)

    import keras

    import keras_ibprune as kib
    from keras_ibprune import _tflite_runner, _xnnpack_tflite

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        input_shape=(args.size, args.size, 3), alpha=0.35, weights=None, classes=10
    )
    pruned = kib.prune(model, policy="xnnpack_sparse")
    pruner = kib.Pruner(pruned, kib.OneShot(SPARSITY), score="magnitude")
    pruner.reset()
    pruner.update(1, force=True)
    small = kib.strip_pruning(pruned)
    x = np.random.default_rng(0).random((8, args.size, args.size, 3), dtype="float32")

    with tempfile.TemporaryDirectory() as d:
        paths, reports = {}, {}
        for name, sparse in (("dense", False), ("sparse", True)):
            paths[name] = os.path.join(d, f"{name}.tflite")
            reports[name] = kib.export_tflite(
                small,
                paths[name],
                sparse=sparse,
                verify_data=x,
                latency_runs=0,
                compare_dense=False,
            )
        runners = {k: _tflite_runner.Runner(v, num_threads=1) for k, v in paths.items()}
        times = {k: [] for k in runners}
        for _ in range(args.rounds):
            for k, r in runners.items():
                times[k].append(r.latency_ms(x[:1], args.runs))
        outs = {k: r.predict(x) for k, r in runners.items()}
        interpreter = runners["dense"].name
    ops = reports["sparse"].op_table
    in_subgraph = sum(bool(r.get("xnnpack_sparse")) for r in ops)
    sparse_1x1 = sum(
        bool(r.get("xnnpack_sparse")) and r["weights"] != "dense"
        for r in ops
        if r["op"] == "CONV_2D" and r["weight_shape"][1:3] == [1, 1]
    )
    med = {k: float(np.median(v)) for k, v in times.items()}
    diff = float(np.max(np.abs(outs["dense"] - outs["sparse"])))
    row = {
        "size": args.size,
        "ops": len(ops),
        "ops_in_sparse_subgraph": in_subgraph,
        "sparse_1x1_convs": sparse_1x1,
        "latency_ms": med,
        "latency_min_ms": {k: float(np.min(v)) for k, v in times.items()},
        "speedup": med["dense"] / med["sparse"],
        "bit_identical": bool(np.array_equal(outs["dense"], outs["sparse"])),
        "max_abs_diff": diff,
        "host_runs_sparse": _xnnpack_tflite.host_runs_sparse(),
        "cpu": _cpu(),
        "interpreter": interpreter,
    }
    lines = [
        "# XNNPACK sparse path on this CPU: dense vs sparse MobileNetV2 file",
        "",
        f"Written by `python benchmarks/bench_sparse_path.py {' '.join(sys.argv[1:])}` on "
        f"{datetime.date.today().isoformat()}; {row['cpu']} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs shared with other jobs); `{interpreter}`, default XNNPACK "
        f"delegate. MobileNetV2 alpha 0.35, {args.size} px, random weights, 1x1 convolutions "
        f'{SPARSITY:.0%} zero (`policy="xnnpack_sparse"`, magnitude, one shot). Latency: 1 '
        f"thread, batch 1, median over {args.rounds} interleaved rounds of the median of "
        f"{args.runs} invocations.",
        "",
        "| ops | in XNNPACK's sparse subgraph | sparse 1x1 convs | dense ms (min) | "
        "sparse ms (min) | dense / sparse | outputs bit-identical | this CPU runs the sparse "
        "path |",
        "|---|---|---|---|---|---|---|---|",
        f"| {row['ops']} | {in_subgraph} | {sparse_1x1} | {med['dense']:.3f} "
        f"({row['latency_min_ms']['dense']:.3f}) | {med['sparse']:.3f} "
        f"({row['latency_min_ms']['sparse']:.3f}) | {row['speedup']:.2f}x | "
        f"{'yes' if row['bit_identical'] else f'no (max diff {diff:.1e})'} | "
        f"{'yes' if row['host_runs_sparse'] else 'no (x86 with AVX)'} |",
    ]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(row, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
