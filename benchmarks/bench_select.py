"""Choose the IB defaults on **validation** data only (test accuracy is never read here).

Every variant runs the protocol of `_protocol.py` (same dense start per seed) and is scored
by its validation accuracy; the seeds (100, 101, ...) differ from the reporting seeds of
`bench_accuracy.py` (0, 1, 2, ...). The table ranks variants by their mean validation
accuracy over all (model, data, sparsity) cells, and the package defaults are set to the
winner. Writes `results/selection.md` and `results/selection.json` (`--name` for another stem).

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


REFERENCE = "magnitude@erk"


def write(results, args, out, elapsed):
    """Ranks variants by their worst margin over magnitude + ERK across cells (maximin).

    The issue the default answers is "beat magnitude + ERK on every architecture", so the
    rule is the worst cell, not the mean: a mean over cells is dominated by collapsed
    cells (digits at 99 %, where accuracies spread over tens of points). The mean
    accuracy is shown too; the first version of this script ranked by it.
    """
    cells = sorted({c for per in results.values() for c in per})
    ref = results.get(REFERENCE, {})
    lines = [
        "# Selection of the IB defaults (validation accuracy only)",
        "",
        f"- Command: `python benchmarks/bench_select.py {' '.join(sys.argv[1:])}`"
        + (" (the table rewritten from the runs' JSON)" if args.from_json else ""),
        f"- Date: {datetime.date.today().isoformat()}; machine: 2-core CPU, no GPU "
        f"({platform.machine()})" + ("" if args.from_json else
                                      f"; wall time {elapsed / 60:.1f} min"),
        f"- Protocol: `benchmarks/_protocol.py` (dense {args.dense_epochs} epochs, "
        f"{args.prune_epochs} pruning epochs, ramp over {args.ramp}); seeds "
        f"{args.first_seed}..{args.first_seed + args.seeds - 1}; held-out batch = validation "
        "split; validation accuracy %, mean ± standard error over seeds.",
        f"- Rule: highest worst-cell margin over `{REFERENCE}` (maximin, ties broken by the "
        "mean margin; the issue asks to beat it on every architecture). The mean accuracy "
        "over cells (the first rule of this script) is shown as a column; it is dominated "
        "by collapsed cells such as digits at 99 %.",
        "",
        "| variant | worst margin | mean margin | mean accuracy | " + " | ".join(cells) + " |",
        "|---|---|---|---|" + "---|" * len(cells),
    ]
    ranking, incomplete = [], []
    for method, per in results.items():
        if not all(c in per for c in cells):
            incomplete.append(method)
            continue
        margins = [100 * (np.mean(per[c]) - np.mean(ref[c])) for c in cells if c in ref]
        worst = min(margins) if margins else float("nan")
        mean_m = float(np.mean(margins)) if margins else float("nan")
        mean_acc = 100 * float(np.mean([np.mean(per[c]) for c in cells]))
        ranking.append((worst if method != REFERENCE else -np.inf, mean_m, mean_acc, method))
    for worst, mean_m, mean_acc, method in sorted(ranking, reverse=True):
        per = results[method]
        w = "–" if method == REFERENCE else f"{worst:+.2f}"
        m = "–" if method == REFERENCE else f"{mean_m:+.2f}"
        lines.append(f"| `{method}` | {w} | {m} | {mean_acc:.2f} | "
                     + " | ".join(P.fmt(per.get(c, [])) for c in cells) + " |")
    for method in incomplete:  # not run on every cell: shown, not ranked
        per = results[method]
        lines.append(f"| `{method}` (not run on every cell) | – | – | – | "
                     + " | ".join(P.fmt(per.get(c, [])) for c in cells) + " |")
    if ranking:
        best = max(ranking)[3]
        by_mean = max(ranking, key=lambda r: r[2])[3]
        lines += ["", f"Selected (maximin): `{best}`. Highest mean accuracy: `{by_mean}`.", ""]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=1))


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
    p.add_argument("--name", default="selection", help="output file stem in --out")
    p.add_argument("--from-json", help="rewrite the table from selection JSON files "
                   "(comma-separated; several rounds merge), no runs")
    args = p.parse_args(argv)
    if args.from_json:  # several files (rounds) merge: their cells are disjoint
        merged = {}
        for path in args.from_json.split(","):
            for method, per in json.loads(pathlib.Path(path).read_text()).items():
                merged.setdefault(method, {}).update(per)
        write(merged, args, pathlib.Path(args.out), 0.0)
        print((pathlib.Path(args.out) / f"{args.name}.md").read_text())
        return
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
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
