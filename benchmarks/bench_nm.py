"""N:M sparsity against unstructured sparsity at the same density (issue 12, item 3).

For each model and seed one dense model is trained on the train split of `_data.splits`;
every variant fine-tunes a copy of it with the protocol of `_protocol.run` (IB score, its
default allocation, Adam 1e-3, sparsity ramped over RAMP epochs, PRUNE_EPOCHS epochs,
held-out batch from the validation split):

* `unstructured 50 %` vs `2:4` (`kib.prune(model, pattern="2:4")`: every unit keeps 2 of
  each 4 consecutive inputs, the IB score choosing which), and
* `unstructured 75 %` vs `1:4`.

The table gives test accuracy (mean ± SE over seeds) and the paired per-seed difference
N:M − unstructured; a difference within its SE is a tie. Issue 12's bar: 2:4 within 0.3
points of unstructured 50 %.

    .venv/bin/python benchmarks/bench_nm.py                  # LeNet-5, 3 seeds
    .venv/bin/python benchmarks/bench_nm.py --models lenet5 lenet300 --seeds 0 1 2
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _data  # noqa: E402
import _protocol  # noqa: E402
import keras  # noqa: E402

DENSE_EPOCHS, PRUNE_EPOCHS, RAMP = 3, 6, 4
PAIRS = [  # (unstructured variant, N:M variant, sparsity)
    ("unstructured 50 %", "2:4", 0.5),
    ("unstructured 75 %", "1:4", 0.75),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["lenet5"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    start = time.time()
    dataset = "mnist" if _data.mnist_available() else "digits"
    data = _data.splits(dataset)
    runs = {}  # (model, variant) -> list of per-seed results
    for model_name in args.models:
        for seed in args.seeds:
            dense = _protocol.train_dense(model_name, data[0], seed, DENSE_EPOCHS)
            for unstructured, pattern, sparsity in PAIRS:
                for variant, kwargs in ((unstructured, None), (pattern, {"pattern": pattern})):
                    r = _protocol.run(
                        "ib", dense, model_name, data, sparsity, seed, PRUNE_EPOCHS, RAMP,
                        prune_kwargs=kwargs,
                    )
                    runs.setdefault(f"{model_name}|{variant}", []).append(r)
                    print(model_name, seed, variant, r, flush=True)
    cmd = "python benchmarks/bench_nm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": cmd.strip(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, keras {keras.__version__}",
        "seconds": round(time.time() - start),
        "dataset": dataset,
        "seeds": args.seeds,
    }
    lines = [
        "# N:M vs unstructured sparsity at equal density",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['machine']}; "
        f"{meta['seconds']} s). {dataset} split of `_data.py`; dense {DENSE_EPOCHS} epochs, "
        f"then per variant {PRUNE_EPOCHS} epochs of IB pruning from the same dense weights "
        f"(ramp over {RAMP} epochs). Test accuracy in %, mean ± SE over {len(args.seeds)} "
        "seeds; the difference is paired per seed (N:M − unstructured), a tie when within "
        "its SE.",
        "",
        "| model | sparsity | unstructured | N:M | N:M test | unstructured test | "
        "N:M − unstructured (points) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for unstructured, pattern, sparsity in PAIRS:
            a = runs[f"{model_name}|{pattern}"]
            b = runs[f"{model_name}|{unstructured}"]
            m, se, verdict = _protocol.paired([r["test"] for r in a], [r["test"] for r in b])
            real = sum(r["sparsity"] for r in a) / len(a)
            lines.append(
                f"| {model_name} | {sparsity:.0%} (N:M reached {real:.3f}) | {unstructured} | "
                f"{pattern} | {_protocol.fmt([r['test'] for r in a])} | "
                f"{_protocol.fmt([r['test'] for r in b])} | {m:+.2f} ± {se:.2f} | {verdict} |"
            )
    out = HERE / "results"
    (out / "nm.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    (out / "nm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
