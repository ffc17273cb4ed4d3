"""IB-update time and peak memory vs held-out size: in memory, streamed, two workers.

MobileNetV2 (alpha 0.35, 96x96x3, 10 classes, weights=None), random inputs made batch by
batch by a `tf.data` pipeline (only the cost is measured). One IB update = the default
score's statistics pass, factorizations, global threshold, masks and re-fit (0 -> 50 %).
Every measurement runs in a fresh process so that its peak resident memory (ru_maxrss)
is its own:

- `in memory`: `held_out_size=n` (today's default path; the held-out inputs are read into
  one array first);
- `streamed`: `held_out_size=None` with the dataset: batches of 256 streamed through the
  traced step, float64 totals on the host;
- `2 workers`: the streamed pass sharded over two local `MultiWorkerMirroredStrategy`
  workers (TF_CONFIG on 127.0.0.1, `Pruner(strategy=...)`): each computes half of every
  chunk, the sums are all-reduced; both end with the same masks (checked against the
  single-process masks).

Times are the process's one update, including `reset` (validating / counting the data) and
tracing the statistics step (~15 s here, constant in the size: compare differences); on this
2-core machine two workers share the same two cores, so they show the cost of the
collective, not a speed-up. Writes `results/heldout_scale.md` and `.json`.

    python benchmarks/bench_heldout_scale.py --sizes 1024 4096 16384 \
        --memory-sizes 1024 4096 --worker-sizes 1024 4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
BATCH = 256


def _dataset(tf, n):
    def batch(i):
        size = tf.minimum(BATCH, n - tf.cast(i, tf.int32) * BATCH)
        x = tf.random.stateless_normal((size, 96, 96, 3), seed=tf.stack([i, 0]))
        y = (tf.range(size, dtype=tf.int64) + i * BATCH) % 10
        return x, y

    return tf.data.Dataset.range(-(-n // BATCH)).map(batch)


def _one(mode, n, out):
    """One measurement in this process; writes a JSON line to `out`."""
    import resource

    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy() if mode == "workers" else None
    import keras

    import keras_ibprune as kib

    keras.utils.set_random_seed(0)
    scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
    with scope:
        base = keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35,
                                              weights=None, classes=10)
        model = kib.prune(base)
    ds = _dataset(tf, n)
    if mode == "memory":
        x = np.concatenate([b[0].numpy() for b in ds])
        y = np.concatenate([b[1].numpy() for b in ds])
        held, size = (x, y), n
    else:
        held, size = ds, None
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.5), held_out=held, held_out_size=size,
                        strategy=strategy)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    pruner.reset()  # validates (and for a stream counts) the held-out data
    pruner.update(1, force=True)  # includes tracing the statistics step (~15 s, constant)
    seconds = time.perf_counter() - t
    masks = np.concatenate([m.numpy().ravel() for w in pruner.wrappers for m in w.masks])
    np.save(out.with_suffix(".npy"), masks.astype(np.uint8))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out.write_text(json.dumps({"mode": mode, "n": n, "seconds": seconds, "rss_gib": rss,
                               "rss_before_gib": rss_before,
                               "sparsity": float(1 - masks.mean())}))


def _free_ports(k):
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _run(mode, n, tmp):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if mode != "workers":
        out = tmp / f"{mode}_{n}.json"
        subprocess.run([sys.executable, __file__, "--one", mode, str(n), str(out)], env=env,
                       check=True, timeout=1800)
        return [json.loads(out.read_text())], [out.with_suffix(".npy")]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs, outs = [], []
    for i in range(2):
        out = tmp / f"workers_{n}_{i}.json"
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": i}}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--one", mode, str(n), str(out)],
            env=dict(env, TF_CONFIG=json.dumps(tf_config))))
        outs.append(out)
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode})")
    return [json.loads(o.read_text()) for o in outs], [o.with_suffix(".npy") for o in outs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 4096],
                   help="sizes also measured with the in-memory path")
    p.add_argument("--worker-sizes", type=int, nargs="*", default=[1024, 4096],
                   help="sizes also measured with two workers")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        _one(args.one[0], int(args.one[1]), pathlib.Path(args.one[2]))
        return
    import tempfile

    import numpy as np

    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        for n in args.sizes:
            plan = (["memory"] if n in args.memory_sizes else []) + ["stream"] + (
                ["workers"] if n in args.worker_sizes else [])
            ref = None
            for mode in plan:
                res, masks = _run(mode, n, tmp)
                m = [np.load(f) for f in masks]
                if mode == "stream":
                    ref = m[0]
                diff = None if ref is None else max(int(np.sum(a != ref)) for a in m)
                rows.append({"n": n, "mode": mode, "seconds": max(r["seconds"] for r in res),
                             "rss_gib": max(r["rss_gib"] for r in res),
                             "rss_before_gib": max(r["rss_before_gib"] for r in res),
                             "mask_diff": diff, "mask_entries": int(m[0].size)})
                print(rows[-1], flush=True)
    _write(rows, args, time.perf_counter() - started)


def _write(rows, args, total):
    names = {"memory": "in memory (`held_out_size=n`)", "stream": "streamed (`None`)",
             "workers": "streamed, 2 workers"}
    base = {r["mode"]: r for r in rows if r["n"] == min(args.sizes)}
    cmd = ("python benchmarks/bench_heldout_scale.py --sizes " + " ".join(map(str, args.sizes))
           + " --memory-sizes " + " ".join(map(str, args.memory_sizes))
           + " --worker-sizes " + " ".join(map(str, args.worker_sizes)))
    lines = [
        "# IB update vs held-out size (MobileNetV2)",
        "",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.date.today()}; machine: {os.cpu_count()}-core CPU, no GPU "
        f"({platform.machine()}), shared with other jobs; total {total / 60:.1f} min.",
        "- MobileNetV2 alpha 0.35, 96x96x3, 10 classes, random data from a `tf.data` "
        "pipeline; one IB update (default score, 0 -> 50 %) in a fresh process per row, "
        "`reset` and tracing included; peak RSS = ru_maxrss of the process (the "
        "larger of the two workers).",
        "",
        "| held-out samples | path | IB update | time / time at "
        f"{min(args.sizes)} | peak RSS | RSS before the update | masks differing from "
        "streamed |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["seconds"] / base[r["mode"]]["seconds"] if r["mode"] in base else float("nan")
        diff = "–" if r["mask_diff"] is None else f"{r['mask_diff']} / {r['mask_entries']}"
        lines.append(f"| {r['n']} | {names[r['mode']]} | {r['seconds']:.1f} s | "
                     f"{ratio:.2f}x | {r['rss_gib']:.2f} GiB | {r['rss_before_gib']:.2f} GiB | "
                     f"{diff} |")
    out = HERE / "results" / "heldout_scale.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(out.read_text())


if __name__ == "__main__":
    main()
