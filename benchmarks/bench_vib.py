"""VIB gates vs unit scores at equal FLOPs, plus the issue #10 bars and TFLite latency.

Protocol (one process, every method side by side, per model and seed):

1. A dense model is trained `--dense-epochs` on the train split (snapshot A), then
   `--gate-epochs` more (snapshot B, the dense reference).
2. **VIB**: a copy of A gets VIB gates (`kib.prune(..., granularity="channel",
   gates="vib", gamma=γ)`) and trains `--gate-epochs` with the KL term, so every method
   has seen the same number of epochs. For each FLOPs target the units with the lowest
   α = μ²/σ² go in one shot (`score="vib"`, `target="flops"`), then
   `--finetune-epochs` of fine-tuning (gates and KL still on).
3. **Baselines** (held-out IB unit score, L1, BN-γ, random): a copy of B is masked in one
   shot at the same FLOPs target (`target="flops"`, the validation split as held-out
   data for "ib") and fine-tuned `--finetune-epochs`.
4. Every method's allocation (`--allocations`: uniform = each layer loses the same FLOPs
   fraction, global = one ranking per unit of FLOPs) and VIB's γ (`--gammas`) are chosen
   per model and FLOPs target on **validation** accuracy of seed 0; seeds 1.. use them.
   Test accuracy is read once per run and reported as mean ± SE over seeds; VIB −
   baseline is a paired per-seed difference, called a tie when its magnitude is within
   one SE.
5. Bars: LeNet-300-100 at 10x fewer FLOPs and LeNet-5-Caffe at 8x (VIB, chosen setting): the
   masked model is shrunk (exactness checked), exported to float TFLite and its median
   single-thread latency compared with the dense model's in the same run (seed 0).

Writes `results/vib.md` and `results/vib.json`.

    python benchmarks/bench_vib.py [--seeds 3] [--models lenet300,lenet5,vgg_bn] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _data  # noqa: E402
from _protocol import fmt, paired  # noqa: E402

BASELINES = ("ib", "l1", "bn_gamma", "random")
LEVELS = {"lenet300": (4, 8, 10, 16), "lenet5": (4, 8, 16), "vgg_bn": (4, 8, 16)}
BARS = {"lenet300": (10, 1.0), "lenet5": (8, 0.5)}  # (FLOPs reduction, max points lost)


def vgg_bn(input_shape, num_classes=10):
    """A small VGG-style CNN with BatchNorm: (conv-BN-ReLU)x4 (8-16-16-32), pooling, GAP.

    BatchNorm momentum 0.9: with ~55 steps per epoch Keras' default 0.99 leaves the moving
    statistics near their initial values and the model predicts one class at inference.
    """
    import keras

    L = keras.layers
    inp = keras.Input(input_shape)
    h = inp
    for i, (f, pool) in enumerate([(8, True), (16, False), (16, True), (32, False)]):
        h = L.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i + 1}")(h)
        h = L.ReLU()(L.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(h))
        if pool:
            h = L.MaxPooling2D(2)(h)
    h = L.GlobalAveragePooling2D()(h)
    out = L.Dense(num_classes, activation="softmax", name="out")(h)
    return keras.Model(inp, out, name="vgg_bn")


def build(name, shape):
    return vgg_bn(shape) if name == "vgg_bn" else _data.build(name, shape)


def _compile(model, lr):
    import keras

    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    return model


def _acc(model, split):
    x, y = split
    return float(np.mean(np.argmax(model.predict(x, batch_size=512, verbose=0), -1) == y))


def _accs(model, val, test):
    """Validation and test accuracy from one `predict` (one trace)."""
    x = np.concatenate([val[0], test[0]])
    pred = np.argmax(model.predict(x, batch_size=1024, verbose=0), -1)
    n = len(val[0])
    return float(np.mean(pred[:n] == val[1])), float(np.mean(pred[n:] == test[1]))


def _one_shot(model, score, factor, held_out, allocation):
    import keras_ibprune as kib

    pruner = kib.Pruner(
        model,
        kib.OneShot(1.0 - 1.0 / factor),
        score=score,
        target="flops",
        held_out=held_out,
        allocation=allocation,
    )
    pruner.reset()
    pruner.update(1, force=True)
    return 1.0 / (1.0 - pruner._channels.removed())


def _latency(model, x, runs):
    from keras_ibprune.export import export_tflite

    with tempfile.TemporaryDirectory() as d:
        rep = export_tflite(
            model,
            os.path.join(d, "m.tflite"),
            sparse=False,
            verify=True,
            verify_data=x[:64],
            latency_runs=runs,
            compare_dense=False,
        )
    return rep.latency_ms


def run_seed(name, data, args, seed, cands, rows, bars):
    """One seed of every method; `cands[(method, level)]` lists the (γ, allocation) pairs
    to run (all of the grid on seed 0, the validation-chosen one afterwards)."""
    import keras

    import keras_ibprune as kib

    train, val, test = data
    fit = dict(batch_size=args.batch, verbose=0)
    keras.utils.set_random_seed(seed)
    dense = _compile(build(name, train[0].shape[1:]), args.lr)
    dense.fit(*train, epochs=args.dense_epochs, **fit)
    snap_a = dense.get_weights()
    dense.fit(*train, epochs=args.gate_epochs, **fit)
    ref = dict(zip(("val", "test"), _accs(dense, val, test)))
    rows.append(
        dict(
            model=name,
            seed=seed,
            method="dense",
            level=1,
            factor=1.0,
            gamma=None,
            alloc=None,
            **ref,
        )
    )
    print(f"{name} seed {seed} dense: val {ref['val']:.4f} test {ref['test']:.4f}", flush=True)

    for level in LEVELS[name]:
        for method in BASELINES:
            if method == "bn_gamma" and name != "vgg_bn":
                continue  # no BatchNorm: BN-γ falls back to L1's ranking (same masks)
            for _, alloc in cands[(method, level)]:
                keras.utils.set_random_seed(seed + 100)
                pruned = _compile(kib.prune(dense, granularity="channel"), args.lr)
                got = _one_shot(pruned, method, level, val, alloc)
                pruned.fit(*train, epochs=args.finetune_epochs, **fit)
                rows.append(
                    dict(
                        model=name,
                        seed=seed,
                        method=method,
                        level=level,
                        factor=got,
                        gamma=None,
                        alloc=alloc,
                        **dict(zip(("val", "test"), _accs(pruned, val, test))),
                    )
                )
                print(
                    f"{name} seed {seed} {method} {alloc} {level}x: val "
                    f"{rows[-1]['val']:.4f} test {rows[-1]['test']:.4f}",
                    flush=True,
                )

    base = build(name, train[0].shape[1:])
    base.set_weights(snap_a)
    wanted = {c for level in LEVELS[name] for c in cands[("vib", level)]}
    for gamma in sorted({g for g, _ in wanted}):
        keras.utils.set_random_seed(seed + 200)
        gated = _compile(kib.prune(base, granularity="channel", gates="vib", gamma=gamma), args.lr)
        gated.fit(*train, epochs=args.gate_epochs, **fit)
        trained = gated.get_weights()
        for level in LEVELS[name]:
            for g, alloc in cands[("vib", level)]:
                if g != gamma:
                    continue
                keras.utils.set_random_seed(seed + 300)
                model = _compile(
                    kib.prune(base, granularity="channel", gates="vib", gamma=gamma), args.lr
                )
                model.set_weights(trained)
                got = _one_shot(model, "vib", level, None, alloc)
                model.fit(*train, epochs=args.finetune_epochs, **fit)
                row = dict(
                    model=name,
                    seed=seed,
                    method="vib",
                    level=level,
                    factor=got,
                    gamma=gamma,
                    alloc=alloc,
                    **dict(zip(("val", "test"), _accs(model, val, test))),
                )
                rows.append(row)
                print(
                    f"{name} seed {seed} vib γ={gamma:g} {alloc} {level}x: val "
                    f"{row['val']:.4f} test {row['test']:.4f}",
                    flush=True,
                )
                if seed == 0 and BARS.get(name, (None,))[0] == level:
                    bars[(name, gamma, alloc)] = (model, dense, row, ref)  # shrunk once chosen


def _bar(model, dense, test, args, row, ref):
    import keras_ibprune as kib

    small = kib.shrink(model)
    x = test[0]
    diff = float(
        np.max(np.abs(small.predict(x[:256], verbose=0) - model.predict(x[:256], verbose=0)))
    )
    lat_d, lat_s = _latency(dense, x, args.latency_runs), _latency(small, x, args.latency_runs)
    return {
        "flops_dense": kib.count_flops(dense),
        "flops_small": kib.count_flops(small),
        "shrink_diff": diff,
        "latency_dense_ms": lat_d,
        "latency_small_ms": lat_s,
        "test_small": _acc(small, test),
        "test_dense": ref["test"],
        "widths": [
            int(la.units if hasattr(la, "units") else la.filters)
            for la in small.layers
            if hasattr(la, "units") or hasattr(la, "filters")
        ],
    }


def grid(args, name):
    """Every (method, level) -> its seed-0 candidates: (γ, allocation) pairs."""
    allocs = args.allocations.split(",")
    gammas = [float(g) for g in args.gammas.split(",")]
    out = {}
    for level in LEVELS[name]:
        for method in BASELINES:
            out[(method, level)] = [(None, a) for a in allocs]
        out[("vib", level)] = [(g, a) for g in gammas for a in allocs]
    return out


def select(rows, name, cands):
    """The candidate with the best validation accuracy on seed 0, per (method, level)."""
    out = {}
    for (method, level), options in cands.items():
        runs = [
            r
            for r in rows
            if r["model"] == name
            and r["method"] == method
            and r["seed"] == 0
            and r["level"] == level
        ]
        if runs:
            best = max(runs, key=lambda r: r["val"])
            out[(method, level)] = [(best["gamma"], best["alloc"])]
        else:
            out[(method, level)] = options[:1]
    return out


def report(rows, bars, args, data, seconds):
    train, val, test = data
    lines = [
        f"# VIB gates vs unit scores at equal FLOPs ({args.data}: {len(train[0])} train / "
        f"{len(val[0])} validation / {len(test[0])} test)",
        "",
        f"- Command: `python benchmarks/bench_vib.py {' '.join(sys.argv[1:])}`",
        f"- Date: {datetime.date.today()}; machine: {platform.machine()} {os.cpu_count()} CPUs "
        f"shared with other jobs, no GPU; wall time {seconds / 60:.1f} min.",
        f"- Budget (reduced to fit ~30 min on 2 shared cores): {args.dense_epochs} dense + "
        f"{args.gate_epochs} epochs (gate training for VIB, more dense training for the "
        f"others), one-shot masks, {args.finetune_epochs} fine-tuning epochs; Adam "
        f"{args.lr:g}, batch {args.batch}. Chosen on seed 0's validation accuracy only, "
        f"per model, method and FLOPs target: the allocation ({args.allocations}) for "
        f"every method and γ ({args.gammas}) for VIB; seeds 0..{args.seeds - 1} use the "
        "choice.",
        "- Allocation: `uniform` = every layer loses the same FLOPs fraction, units ranked "
        "within each layer; `global` = one ranking of score per unit of FLOPs across layers "
        "(raw α for VIB, layer-normalized scores for the others).",
        "- Test accuracy (%): mean ± SE over seeds, with the chosen setting in brackets. "
        "Δ = VIB − method, paired per seed (points); |Δ| ≤ SE is a tie. BN-γ runs on "
        "vgg_bn only: the LeNets have no BatchNorm and BN-γ would fall back to L1's ranking "
        "(the same masks).",
        "",
        "| model | FLOPs | dense | VIB (γ, allocation) | IB unit score | L1 | BN-γ | random | "
        "Δ vs IB | Δ vs L1 | Δ vs random |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in [m for m in args.models.split(",") if m in args.chosen]:
        dense = [r["test"] for r in rows if r["model"] == name and r["method"] == "dense"]
        for level in LEVELS[name]:

            def acc(method, name=name, level=level):
                choice = args.chosen[name].get((method, level), [(None, None)])[0]
                rs = sorted(
                    (
                        r
                        for r in rows
                        if r["model"] == name
                        and r["method"] == method
                        and r["level"] == level
                        and (r["gamma"], r["alloc"]) == choice
                    ),
                    key=lambda r: r["seed"],
                )
                return [r["test"] for r in rs]

            def label(method, name=name, level=level):
                gamma, alloc = args.chosen[name].get((method, level), [(None, None)])[0]
                return f" ({gamma:g}, {alloc})" if gamma is not None else f" ({alloc})"

            vib = acc("vib")
            cells = [fmt(vib) + label("vib")]
            cells += [fmt(acc(m)) + (label(m) if acc(m) else "") for m in BASELINES]
            for m in ("ib", "l1", "random"):
                other = acc(m)
                if len(other) == len(vib) and vib:
                    d, se, verdict = paired(vib, other)
                    cells.append(f"{d:+.2f} ± {se:.2f} ({verdict})")
                else:
                    cells.append("–")
            lines.append(f"| {name} | {level}x | {fmt(dense)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Bars (VIB, seed 0, shrunk model)",
        "",
        "| model | FLOPs reduction | widths | test: dense → shrunk (pts lost) | bar | "
        "max abs(masked − shrunk) | TFLite ms: dense → shrunk (speed-up) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in bars.items():
        red = b["flops_dense"] / b["flops_small"]
        lost = 100 * (b["test_dense"] - b["test_small"])
        want_red, want_lost = BARS[name]
        met = red >= want_red * 0.995 and lost <= want_lost
        lines.append(
            f"| {name} | {red:.2f}x | {b['widths']} | {100 * b['test_dense']:.2f} → "
            f"{100 * b['test_small']:.2f} ({lost:+.2f}) | ≥{want_red}x at ≤{want_lost} pt: "
            f"{'met' if met else 'missed'} | {b['shrink_diff']:.1e} | "
            f"{b['latency_dense_ms']:.3f} → {b['latency_small_ms']:.3f} "
            f"({b['latency_dense_ms'] / b['latency_small_ms']:.2f}x) |"
        )
    lines += [
        "",
        "Bars are read on seed 0's test split (one run each); the table above is the "
        "multi-seed comparison. The issue's latency bar asks for ≥5x lower latency.",
    ]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="mnist" if _data.mnist_available() else "digits")
    p.add_argument("--models", default="lenet300,lenet5,vgg_bn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-epochs", type=int, default=3)
    p.add_argument("--gate-epochs", type=int, default=4)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--gammas", default="1e-5,1e-4,1e-3")
    p.add_argument("--allocations", default="uniform,global")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vib"))
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.dense_epochs, args.gate_epochs, args.finetune_epochs = 1, 1, 1
        args.seeds, args.latency_runs, args.gammas = 1, 10, "1e-3"
        args.allocations = "uniform"
    start = time.perf_counter()
    data = _data.splits(args.data)
    rows, bars, args.chosen = [], {}, {}
    for name in args.models.split(","):
        cands = grid(args, name)
        for seed in range(args.seeds):
            run_seed(name, data, args, seed, cands, rows, bars)
            if seed == 0:
                cands = args.chosen[name] = select(rows, name, cands)
                if name in BARS:  # the chosen setting's seed-0 run at the bar's level
                    gamma, alloc = cands[("vib", BARS[name][0])][0]
                    model, dense, row, ref = bars.pop((name, gamma, alloc))
                    bars[name] = _bar(model, dense, data[2], args, row, ref)
                    for key in [k for k in bars if isinstance(k, tuple)]:
                        bars.pop(key)
        print(f"{name} done at {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        _write(rows, bars, args, data, time.perf_counter() - start)  # after every model


def _write(rows, bars, args, data, seconds):
    lines = report(rows, bars, args, data, seconds)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "rows": rows,
                "bars": bars,
                "chosen": {
                    k: {f"{m}@{lv}": c for (m, lv), c in v.items()} for k, v in args.chosen.items()
                },
                "args": {k: v for k, v in vars(args).items() if k != "chosen"},
            },
            indent=1,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
