"""Accuracy vs sparsity on the **test** split, side by side in one process.

Protocol (`_protocol.py`): one dense model per (model, data, seed) trained on the train
split; every method starts from a copy of it and fine-tunes with the same schedule; the
held-out batch of keras_ibprune is the validation split. Defaults were chosen beforehand
on validation by `bench_select.py` (other seeds); this script reads test accuracy once.
Seeds 0..N-1, mean ± standard error; each comparison with the IB default is the per-seed
paired difference (same dense start), called a tie when it is within one standard error.

Writes `results/accuracy.md`, `results/accuracy.json` and `results/accuracy_vs_sparsity.png`.

Example:

    python benchmarks/bench_accuracy.py --seeds 3
    python benchmarks/bench_accuracy.py --quick        # digits, lenet300, one seed
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

METHODS = ["tfmot", "ib", "magnitude@erk", "wanda@erk", "obs@erk", "gaussian_obd"]
BASELINES = ["magnitude@erk", "wanda@erk", "obs@erk", "tfmot"]


def _table(block, sparsities):
    lines = ["| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for m, per in block["methods"].items():
        cells = [P.fmt(per.get(str(s), {}).get("test", [])) for s in sparsities]
        lines.append(f"| {P.LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _verdicts(block, sparsities):
    lines = ["| IB default minus | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    ib = block["methods"].get("ib", {})
    for b in BASELINES:
        if b not in block["methods"]:
            continue
        cells = []
        for s in sparsities:
            a, c = ib.get(str(s), {}).get("test", []), block["methods"][b].get(
                str(s), {}).get("test", [])
            if len(a) != len(c) or not a:
                cells.append("–")
                continue
            m, se, verdict = P.paired(a, c)
            cells.append(f"{m:+.2f} ± {se:.2f} ({verdict})")
        lines.append(f"| {P.LABELS.get(b, b)} | " + " | ".join(cells) + " |")
    return lines


def _bars(results):
    """The issue's bars, checked from the numbers (mean of seeds, paired SE)."""
    out = []
    for key, block in results.items():
        ib, mag = block["methods"].get("ib"), block["methods"].get("magnitude@erk")
        if not ib or not mag:
            continue
        for s in (0.9, 0.95, 0.98, 0.99):
            a, c = ib.get(str(s), {}).get("test", []), mag.get(str(s), {}).get("test", [])
            if len(a) < 2 or len(a) != len(c):
                continue
            m, se, _ = P.paired(a, c)
            need = "≥ +0.50" if s >= 0.98 else "not below −1 SE"
            ok = (m >= 0.5) if s >= 0.98 else (m >= -se)
            ok = ok and m >= -se
            out.append(f"| {key} | {100 * s:g} % | {m:+.2f} ± {se:.2f} | {need} | "
                       f"{'met' if ok else '**missed**'} |")
        if key == "lenet5/mnist":
            for s, goal in ((0.95, 98.0), (0.98, 97.5), (0.99, 96.0)):
                vals = ib.get(str(s), {}).get("test", [])
                if vals:
                    m, se = P.mean_se(vals)
                    out.append(f"| {key} | {100 * s:g} % | IB {m:.2f} ± {se:.2f} | ≥ {goal} | "
                               f"{'met' if m >= goal else '**missed**'} |")
    if not out:
        return []
    return ["| model/data | sparsity | IB − magnitude+ERK (points) | bar | status |",
            "|---|---|---|---|---|", *out]


def write(results, args, out, elapsed):
    sparsities = [float(s) for s in args.sparsities.split(",")]
    lines = [
        "# Accuracy vs sparsity on the test split (keras_ibprune vs baselines vs tfmot)",
        "",
        f"- Command: `python benchmarks/bench_accuracy.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today().isoformat()}; machine: 2-core CPU, no GPU "
        f"({platform.machine()}); wall time {elapsed / 60:.1f} min",
        f"- Protocol: `benchmarks/_protocol.py`: dense {args.dense_epochs} epochs on the train "
        f"split, then {args.prune_epochs} pruning epochs (sparsity ramp over {args.ramp}, "
        "PolynomialDecay power 3), Adam 1e-3, batch 64; held-out batch = the validation split "
        "(≤ 1024); defaults chosen on validation by `bench_select.py` (seeds 100+). Test "
        f"accuracy %, mean ± standard error over seeds 0..{args.seeds - 1}.",
        "- Splits: MNIST = the MNIST test set, 7000 train / 1000 validation / 2000 test; "
        "digits = scikit-learn 8x8 digits, 1077 / 360 / 360.",
        "",
    ]
    if args.rerun:
        lines[2:3] = [
            f"- Command: `python benchmarks/bench_accuracy.py {' '.join(sys.argv[1:])}`: the "
            f"methods {args.rerun} were run again (code changed); the other methods' figures "
            "are kept from the previous full run (`python benchmarks/bench_accuracy.py "
            "--seeds 3`), on the same dense starts, re-trained and checked identical seed by "
            "seed.",
        ]
    bars = _bars(results)
    if bars:
        lines += ["## The bars", "", *bars, ""]
    for key, block in results.items():
        lines += [f"## {key} (dense {P.fmt(block['dense'])} %)", "",
                  *_table(block, sparsities), "", "Paired differences (points, same dense "
                  "start per seed; tie = within one standard error):", "",
                  *_verdicts(block, sparsities), ""]
    lines.append("![accuracy vs sparsity](accuracy_vs_sparsity.png)")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    (out / "accuracy.json").write_text(json.dumps(results, indent=1))
    _plot(results, out)


def _plot(results, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    handles = {}
    for ax, key in zip(axes[0], keys):
        for m, per in results[key]["methods"].items():
            sps = sorted(per, key=float)
            dens = [100 * (1 - float(s)) for s in sps]
            stats = [P.mean_se(per[s]["test"]) for s in sps]
            h = ax.errorbar(dens, [v[0] for v in stats], yerr=[v[1] for v in stats],
                            marker="o", ms=3, capsize=2, lw=1.2 if m != "ib" else 2.2)
            handles[P.LABELS.get(m, m).replace("*", "")] = h
        ax.set_xscale("log")
        ax.invert_xaxis()
        ticks = [20, 10, 5, 2, 1]
        ax.set_xticks(ticks, [f"{100 - t}%" for t in ticks])
        ax.set_title(key)
        ax.set_xlabel("sparsity (log density axis)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out / "accuracy_vs_sparsity.png", dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="lenet5,lenet300")
    p.add_argument("--data", default="mnist,digits")
    p.add_argument("--sparsities", default="0.8,0.9,0.95,0.98,0.99")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--prune-epochs", type=int, default=6)
    p.add_argument("--ramp", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="digits, lenet300, 0.9/0.98, 1 seed")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--rerun", default=None,
                   help="comma-separated methods to run again; the other methods' figures are "
                   "kept from OUT/accuracy.json (the dense starts are re-trained and must "
                   "match the stored ones exactly)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.data, args.sparsities, args.seeds = "lenet300", "digits", "0.9,0.98", 1
    methods = args.methods.split(",")
    for m in methods:
        P.parse(m)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets = [d for d in args.data.split(",") if d != "mnist" or _data.mnist_available()]
    results, start = {}, time.time()
    previous = None
    if args.rerun:
        methods = args.rerun.split(",")
        for m in methods:
            P.parse(m)
        previous = json.loads((out / "accuracy.json").read_text())
        results = json.loads(json.dumps(previous))  # every block, in the stored order
    for data_name in datasets:
        data = _data.splits(data_name)
        for model_name in args.models.split(","):
            key = f"{model_name}/{data_name}"
            block = results.setdefault(key, {"dense": [], "methods": {m: {} for m in methods}})
            if previous is not None:  # keep the other methods' cells, replace these
                block["dense"] = []
                for m in methods:
                    block["methods"][m] = {}
            for seed in range(args.seeds):
                dense = P.train_dense(model_name, data[0], seed, args.dense_epochs)
                block["dense"].append(float(dense.evaluate(*data[2], verbose=0)[1]))
                if previous is not None and block["dense"][-1] != previous[key]["dense"][seed]:
                    raise SystemExit(
                        f"{key} seed {seed}: the dense start differs from the stored run "
                        f"({block['dense'][-1]} vs {previous[key]['dense'][seed]}); run the "
                        "whole benchmark instead of --rerun.")
                for s in [float(v) for v in args.sparsities.split(",")]:
                    for m in methods:
                        r = P.run(m, dense, model_name, data, s, seed, args.prune_epochs,
                                  args.ramp)
                        cell = block["methods"][m].setdefault(str(s), {"test": [], "val": []})
                        cell["test"].append(r["test"])
                        cell["val"].append(r["val"])
                        print(f"{key} seed={seed} s={s} {m:16s} test={r['test']:.4f} "
                              f"sparsity={r['sparsity']:.4f} ({r['seconds']:.0f}s)", flush=True)
                write(results, args, out, time.time() - start)
    print((out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
