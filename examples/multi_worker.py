"""Multi-worker IB pruning with `tf.distribute.MultiWorkerMirroredStrategy` and `kib.Pruner`.

Keras 3's `fit` does not run under `MultiWorkerMirroredStrategy` (keras-team/keras#20585:
"Attempt to convert a value (PerReplica...)"), so `kib.IBPruning` refuses that strategy
with a pointer here. A custom loop works: every worker runs the same `train_step` through
`strategy.run` (gradients all-reduced by TensorFlow's collectives), and after each epoch every
worker calls `pruner.update(epoch + 1)`. The statistics are computed on the same held-out
batch from identical (all-reduced) weights, so each worker derives the same masks — no
extra communication. A `tf.train.CheckpointManager` saves model, optimizer, masks and the
epoch counter after every epoch; a killed cluster restarted with the same command resumes
mid-pruning with the same masks.

    python examples/multi_worker.py                # 2 local workers on 127.0.0.1 + 1-process
                                                   # reference; compares the masks
    python examples/multi_worker.py --quick        # (or KIB_QUICK=1) fewer epochs
    python examples/multi_worker.py --kill-after 2 # kill both workers after epoch 2, restart,
                                                   # resume from the checkpoint
    python examples/multi_worker.py --sharded      # statistics sharded over the workers, each
                                                   # reading only its held-out shard
                                                   # (`--sharded arrays`: all read everything)

One worker by hand (what the launcher runs; the cluster comes from TF_CONFIG):

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:23456", "127.0.0.1:23457"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/multi_worker.py --worker --workdir /tmp/kib_mw
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

GLOBAL_BATCH = 64
KILLED = 3  # exit code of a worker stopped by --kill-after


def _data(seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype("float32").reshape(-1, 64)
    y = d.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = (len(x) - 400) // GLOBAL_BATCH * GLOBAL_BATCH  # whole global batches
    return (x[400 : 400 + n_train], y[400 : 400 + n_train]), (x[:400], y[:400])


def _save(workdir, name, arrays):
    fd, tmp = tempfile.mkstemp(dir=workdir, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, os.path.join(workdir, name))  # never a half-written file


def _statistics(pruner):
    """The held-out statistics of the current weights, flat: `{"<layer>/<key>": array}`."""
    return {f"{s.wrapper.name}/{k}": np.asarray(v) for s in pruner.collect()
            for k, v in s.summary.items() if isinstance(v, np.ndarray)}


def run_worker(workdir, epochs, sparsity, kill_after=None, single=False, sharded=None):
    """One worker (or, with `single=True`, the one-process reference) of the loop.

    `sharded`: shard the held-out statistics over the workers (`strategy=`) and save the
    statistics of the initial weights for comparison; `"arrays"`: every worker holds the
    held-out arrays and computes its replicas' slices, `"files"`: a dataset function
    `held_out(input_context)`, every worker reads only its shard.
    """
    import keras
    import tensorflow as tf

    import keras_ibprune as kib

    strategy = (tf.distribute.get_strategy() if single
                else tf.distribute.MultiWorkerMirroredStrategy())
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = resolver.task_id if resolver is not None and not single else 0
    (xtr, ytr), (xval, yval) = _data()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kib.prune(keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu", name="fc1"),
            keras.layers.Dense(64, activation="relu", name="fc2"),
            keras.layers.Dense(10, name="logits"),
        ]))
        optimizer = keras.optimizers.Adam(2e-3)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    # Every variable, listed: weights, masks, BatchNorm statistics, optimizer state, epoch.
    # (`tf.train.Checkpoint(model=model)` reaches the masks too since 0.3; a flat list does
    # not depend on how layers hold their variables.)
    ckpt = tf.train.Checkpoint(variables=list(model.variables),
                               optimizer_variables=list(optimizer.variables), epoch=epoch_var)
    # Every worker must write (collectives); only worker 0's directory is the real one.
    ckpt_dir = os.path.join(workdir, "ckpt" if task_id == 0 else f"ckpt_tmp_{task_id}")
    manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=1)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        print(f"[worker {task_id}] resumed after epoch {int(epoch_var.numpy())}", flush=True)

    schedule = kib.PolynomialDecay(0.0, sparsity, begin_epoch=1, end_epoch=max(2, epochs - 1))
    held_out, size = (xval, yval), 1024
    if sharded == "files" and not single:  # every worker reads only its shard

        def held_out(input_context):
            ds = tf.data.Dataset.from_tensor_slices((xval, yval))  # or a list of files
            return ds.shard(input_context.num_input_pipelines,
                            input_context.input_pipeline_id).batch(64)

        size = None  # streamed
    pruner = kib.Pruner(model, schedule, held_out=held_out, held_out_size=size,  # IB score
                        strategy=strategy if sharded and not single else None)
    pruner.optimizer = optimizer  # zero the optimizer state of pruned weights too
    pruner.reset()
    tag = "single" if single else f"worker{task_id}"
    if sharded and int(epoch_var.numpy()) == 0:  # every worker takes part (collectives)
        _save(workdir, f"stats_{tag}.npz", _statistics(pruner))

    ds = tf.data.Dataset.from_tensor_slices((xtr, ytr)).batch(GLOBAL_BATCH)
    if not single:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        ds = ds.with_options(options)
    dist_ds = strategy.experimental_distribute_dataset(ds)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def step_fn(x, y):
        with tf.GradientTape() as tape:
            per_example = loss_fn(y, model(x, training=True))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def train_step(x, y):
        losses = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    for epoch in range(int(epoch_var.numpy()), epochs):
        losses = [float(train_step(x, y)) for x, y in dist_ds]
        if not pruner.update(epoch + 1):  # the same masks on every worker
            pruner.rezero()
        epoch_var.assign(epoch + 1)
        manager.save()
        print(f"[worker {task_id}] epoch {epoch + 1}: loss {np.mean(losses):.4f}, "
              f"sparsity {pruner.current_sparsity():.4f}", flush=True)
        if kill_after is not None and epoch + 1 == kill_after:
            print(f"[worker {task_id}] killed after epoch {epoch + 1}", flush=True)
            sys.stdout.flush()
            os._exit(KILLED)  # no cleanup, like a SIGKILL after the checkpoint

    masks = {f"{w.name}/{i}": m.numpy() for w in pruner.wrappers for i, m in enumerate(w.masks)}
    _save(workdir, f"masks_{tag}.npz", masks)
    acc = float(np.mean(np.argmax(model.predict(xval, verbose=0), -1) == yval))
    print(f"[worker {task_id}] done: sparsity {pruner.current_sparsity():.4f}, "
          f"validation accuracy {acc:.2%}", flush=True)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _launch(workdir, argv, timeout):
    """Starts two local workers, waits for both (bounded), returns their exit codes."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                     "index": i}}))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--workdir", workdir, *argv], env=env))
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"multi-worker run did not finish within {timeout}s") from None
    return codes


def main(argv=None):
    quick_env = os.environ.get("KIB_QUICK") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help="run one worker (TF_CONFIG set)")
    p.add_argument("--single", action="store_true", help="run the one-process reference")
    p.add_argument("--workdir", default=None, help="checkpoints and masks (default: temp)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--kill-after", type=int, default=None,
                   help="stop every worker after this epoch's checkpoint, then restart")
    p.add_argument("--sharded", nargs="?", const="files", choices=["arrays", "files"],
                   help="shard the held-out statistics over the workers (Pruner(strategy=)); "
                        "'files' (default): each worker reads only its shard")
    p.add_argument("--quick", action="store_true", default=quick_env)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each launch")
    args = p.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 8)
    if args.worker or args.single:
        run_worker(args.workdir, epochs, args.sparsity,
                   kill_after=None if args.single else args.kill_after, single=args.single,
                   sharded=args.sharded)
        return None

    workdir = args.workdir or tempfile.mkdtemp(prefix="kib_multi_worker_")
    os.makedirs(workdir, exist_ok=True)
    common = ["--epochs", str(epochs), "--sparsity", str(args.sparsity)]
    common += ["--sharded", args.sharded] if args.sharded else []
    if args.kill_after is not None:
        codes = _launch(workdir, [*common, "--kill-after", str(args.kill_after)],
                        args.timeout)
        print(f"first launch exit codes {codes} (killed after epoch {args.kill_after})")
        if codes != [KILLED, KILLED]:
            raise SystemExit(f"workers failed: exit codes {codes}")
    codes = _launch(workdir, common, args.timeout)
    if codes != [0, 0]:
        raise SystemExit(f"workers failed: exit codes {codes}")
    ref_dir = os.path.join(workdir, "single")
    os.makedirs(ref_dir, exist_ok=True)
    run_worker(ref_dir, epochs, args.sparsity, single=True, sharded=args.sharded)

    def load(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}

    w0, w1 = (load(os.path.join(workdir, f"masks_worker{i}.npz")) for i in range(2))
    ref = load(os.path.join(ref_dir, "masks_single.npz"))
    same_workers = all(np.array_equal(w0[k], w1[k]) for k in w0)
    same_single = all(np.array_equal(w0[k], ref[k]) for k in ref)
    sparsity = 1.0 - float(np.mean(np.concatenate([m.ravel() for m in w0.values()])))
    print(f"masks identical on both workers: {same_workers}; identical to the one-process "
          f"run: {same_single}; sparsity {sparsity:.4f}")
    result = {"same_workers": same_workers, "same_single": same_single, "sparsity": sparsity}
    if args.sharded:  # statistics of the initial weights: sharded on 2 workers vs 1 process
        s0, s1 = (load(os.path.join(workdir, f"stats_worker{i}.npz")) for i in range(2))
        sref = load(os.path.join(ref_dir, "stats_single.npz"))
        result["stats_keys_match"] = set(s0) == set(sref) == set(s1)
        result["stats_rel"] = max(
            float(np.abs(s[k] - v).max() / (np.abs(v).max() + 1e-30))
            for s in (s0, s1) for k, v in sref.items())
        print(f"sharded statistics vs one process: max relative difference "
              f"{result['stats_rel']:.2e}")
    return result


if __name__ == "__main__":
    main()
