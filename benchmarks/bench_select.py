"""Choose the IB defaults on **validation** data only (test accuracy is never read here).

Every variant runs the protocol of `_protocol.py` (same dense start per seed) and is scored
by its validation accuracy; the seeds (100, 101, ...) differ from the reporting seeds of
`bench_accuracy.py` (0, 1, 2, ...). The table ranks variants by their mean validation
accuracy over all (model, data, sparsity) cells, and the package defaults are set to the
winner. Writes `results/selection.md` and `results/selection.json`.

Example:

    python benchmarks/bench_select.py --seeds 2
    python benchmarks/bench_select.py --models lenet300 --data digits --seeds 1   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402
import _protocol as P  # noqa: E402
import numpy as np  # noqa: E402

VARIANTS = [
    "ib",
    "ib:diagonal_correction=True",
    "ib:fisher=empirical",
    "ib:reconstruct=False",
    "ib:damping=0.1",
    "ib:damping=0.001",
    "ib@erk",
    "magnitude@erk",
]


def write(results, args, out, elapsed):
    cells = sorted({c for per in results.values() for c in per})
    lines = [
        "# Selection of the IB defaults (validation accuracy only)",
        "",
        f"- Command: `python benchmarks/bench_select.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today().isoformat()}; machine: 2-core CPU, no GPU "
        f"({platform.machine()}); wall time {elapsed / 60:.1f} min",
        f"- Protocol: `benchmarks/_protocol.py` (dense {args.dense_epochs} epochs, "
        f"{args.prune_epochs} pruning epochs, ramp over {args.ramp}); seeds "
        f"{args.first_seed}..{args.first_seed + args.seeds - 1}; held-out batch = validation "
        "split; validation accuracy %, mean ± standard error over seeds.",
        "",
        "| variant | mean over cells | " + " | ".join(cells) + " |",
        "|---|---|" + "---|" * len(cells),
    ]
    ranking = []
    for method, per in results.items():
        means = [np.mean(per[c]) for c in cells if c in per]
        ranking.append((float(np.mean(means)) if len(means) == len(cells) else -1, method))
    for score, method in sorted(ranking, reverse=True):
        per = results[method]
        lines.append(f"| `{method}` | {100 * score:.2f} | "
                     + " | ".join(P.fmt(per.get(c, [])) for c in cells) + " |")
    best = max(ranking)[1] if ranking else None
    lines += ["", f"Highest mean validation accuracy: `{best}`.", ""]
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    (out / "selection.json").write_text(json.dumps(results, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet5,lenet300")
    p.add_argument("--data", default="mnist,digits")
    p.add_argument("--sparsities", default="0.95,0.98,0.99")
    p.add_argument("--methods", default="|".join(VARIANTS),
                   help="methods separated by '|' (or by ',' when none has arguments)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=100)
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=6)
    p.add_argument("--ramp", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    methods = args.methods.split("|") if "|" in args.methods else args.methods.split(",")
    for m in methods:
        P.parse(m)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.data.split(",") if d != "mnist" or _data.mnist_available()]
    results, start = {m: {} for m in methods}, time.time()
    for data_name in datasets:
        data = _data.splits(data_name)
        for model_name in args.models.split(","):
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                dense = P.train_dense(model_name, data[0], seed, args.dense_epochs)
                for s in [float(v) for v in args.sparsities.split(",")]:
                    cell = f"{model_name}/{data_name} {100 * s:g} %"
                    for m in methods:
                        r = P.run(m, dense, model_name, data, s, seed, args.prune_epochs,
                                  args.ramp)
                        results[m].setdefault(cell, []).append(r["val"])
                        print(f"{cell} seed={seed} {m:32s} val={r['val']:.4f} "
                              f"({r['seconds']:.0f}s)", flush=True)
                write(results, args, out, time.time() - start)
    print((out / "selection.md").read_text())


if __name__ == "__main__":
    main()
