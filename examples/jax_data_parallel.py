"""IB pruning under Keras' own distribution API on JAX: `keras.distribution.DataParallel`.

`model.fit` with the `kib.IBPruning` callback runs unchanged: Keras shards each batch
across the devices and all-reduces the gradients; the callback computes its statistics on
the held-out data from the (replicated) weights, so every process derives the same masks.
With several processes each computes its share of the held-out batches and the float64
totals are merged with `jax.experimental.multihost_utils.process_allgather`.

    python examples/jax_data_parallel.py                 # both modes below + 1-device reference
    python examples/jax_data_parallel.py --mode devices  # 1 process, 2 virtual CPU devices
    python examples/jax_data_parallel.py --mode processes  # 2 processes on 127.0.0.1
                                                           # (jax.distributed, gloo collectives)

Each mode runs in fresh subprocesses (the JAX backend and the device count are fixed when
JAX starts) and writes its masks; the launcher compares them with the one-device run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

EPOCHS, GLOBAL_BATCH = 4, 64


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 32)).astype("float32")
    y = (x[:, :4].sum(1) > 0).astype("int64") + 2 * (x[:, 4] > 0)
    return (x[512:], y[512:]), (x[:512], y[:512])  # train, validation (held-out data)


def _worker(mode, out, process_id=0, port=None):
    import jax
    import keras

    if mode == "processes":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize(job_addresses=f"127.0.0.1:{port}", num_processes=2,
                                      process_id=process_id)
    import keras_ibprune as kib

    (x, y), (xv, yv) = _data()
    if mode != "single":
        # Every process feeds its own slice of each global batch (no auto-sharding of arrays).
        dist = keras.distribution.DataParallel(devices=jax.devices(),
                                               auto_shard_dataset=mode != "processes")
        keras.distribution.set_distribution(dist)
    batch = GLOBAL_BATCH
    if mode == "processes":
        batch = GLOBAL_BATCH // 2
        part = slice(process_id * batch, (process_id + 1) * batch)
        x = np.concatenate([x[i : i + GLOBAL_BATCH][part] for i in range(0, len(x), GLOBAL_BATCH)])
        y = np.concatenate([y[i : i + GLOBAL_BATCH][part] for i in range(0, len(y), GLOBAL_BATCH)])
    keras.utils.set_random_seed(0)
    model = kib.prune(keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(64, activation="relu", name="fc"),
        keras.layers.Dense(4, name="logits"),
    ]))
    # The statistics of the initial weights: with several processes each computes its
    # share of the held-out batches and the totals are merged (process_allgather).
    probe = kib.Pruner(model, 0.5, held_out=(xv, yv))
    probe.reset()
    stats = {f"{s.wrapper.name}/{k}": np.asarray(v) for s in probe.collect()
             for k, v in s.summary.items() if isinstance(v, np.ndarray)}
    stats["local_batches"] = np.asarray(probe._pass.local_batches)
    _save(out.replace("masks_", "stats_"), stats)
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, EPOCHS - 1), held_out=(xv, yv))
    model.fit(x, y, batch_size=batch, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[cb])
    masks = {f"{w.name}/{i}": np.asarray(m.numpy()) for w in kib.stats.find_wrappers(model)
             for i, m in enumerate(w.masks)}
    _save(out, masks)
    print(f"[{mode} {process_id}] devices {len(jax.devices())}, sparsity "
          f"{kib.sparsity(model):.4f}", flush=True)


def _save(path, arrays):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # never a half-written file


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode, workdir, timeout):
    env = dict(os.environ, KERAS_BACKEND="jax",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    if mode == "devices":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=2").strip()
    n = 2 if mode == "processes" else 1
    port = _port()
    procs = [subprocess.Popen([sys.executable, __file__, "--_worker", mode, "--_id", str(i),
                               "--_port", str(port), "--workdir", workdir], env=env)
             for i in range(n)]
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"mode {mode!r} did not finish within {timeout}s") from None
        if code != 0:
            for q in procs:
                q.kill()
            raise RuntimeError(f"mode {mode!r} failed with exit code {code}")
    return [os.path.join(workdir, f"masks_{mode}_{i}.npz") for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["devices", "processes", "all"], default="all")
    p.add_argument("--workdir", default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        out = os.path.join(args.workdir, f"masks_{args._worker}_{args._id}.npz")
        _worker(args._worker, out, args._id, args._port)
        return None
    workdir = args.workdir or tempfile.mkdtemp(prefix="kib_jax_dp_")
    os.makedirs(workdir, exist_ok=True)

    def load(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    paths = _spawn("single", workdir, args.timeout)
    ref, ref_stats = load(paths[0]), load(paths[0].replace("masks_", "stats_"))
    total = sum(m.size for m in ref.values())
    result = {}
    for mode in (["devices", "processes"] if args.mode == "all" else [args.mode]):
        paths = _spawn(mode, workdir, args.timeout)
        runs = [load(path) for path in paths]
        stats = [load(path.replace("masks_", "stats_")) for path in paths]
        differ = sum(int(np.sum(runs[0][k] != ref[k])) for k in ref)
        agree = all(np.array_equal(r[k], runs[0][k]) for r in runs for k in ref)
        keys = [k for k in ref_stats if k != "local_batches"]
        rel = max(float(np.abs(s[k] - ref_stats[k]).max() / (np.abs(ref_stats[k]).max() + 1e-30))
                  for s in stats for k in keys)
        same = all(np.array_equal(s[k], stats[0][k]) for s in stats for k in keys)
        result[mode] = {"differ": differ, "agree": agree, "total": total, "stats_rel": rel,
                        "stats_agree": same,
                        "local_batches": [int(s["local_batches"]) for s in stats],
                        "batches": int(ref_stats["local_batches"])}
        print(f"{mode}: {len(runs)} process(es) agree: {agree}; mask entries differing from "
              f"the one-device run: {differ} of {total}; statistics: identical in every "
              f"process {same}, max relative difference to one device {rel:.2e}, held-out "
              f"batches computed per process {result[mode]['local_batches']} of "
              f"{result[mode]['batches']}")
    return result


if __name__ == "__main__":
    main()
