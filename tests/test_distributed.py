"""Distributed pruning: TF multi-worker custom loop, `fit` under MWMS, JAX data parallel.

All of it runs several processes (two TF workers on 127.0.0.1, JAX processes with gloo
collectives), so every test is marked slow (run by .ci/run's slow pass).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"_kib_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_tf_workers_resume_after_kill_with_the_masks_of_one_process(tmp_path):
    pytest.importorskip("tensorflow")
    result = _example("multi_worker").main(
        ["--quick", "--kill-after", "2", "--workdir", str(tmp_path), "--timeout", "400"])
    assert result["same_workers"], "the two workers derived different masks"
    assert result["same_single"], "masks differ from the one-process run"
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("held_out", ["arrays", "files"])
def test_two_tf_workers_sharded_statistics_equal_one_process(tmp_path, held_out):
    """Each worker computes the statistics of its shard (`files`: a dataset function, each
    worker reads only its shard); the all-reduced sums equal the one-process statistics and
    every worker derives the one-process masks."""
    pytest.importorskip("tensorflow")
    result = _example("multi_worker").main(
        ["--quick", "--sharded", held_out, "--workdir", str(tmp_path), "--timeout", "400"])
    assert result["stats_keys_match"]
    assert result["stats_rel"] < 1e-5, result
    assert result["same_workers"], "the two workers derived different masks"
    assert result["same_single"], "masks differ from the one-process run"
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.slow
def test_callback_in_a_two_worker_strategy_scope_fails_early_with_a_pointer(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, tensorflow as tf, keras, keras_ibprune as kib
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        with strategy.scope():
            model = kib.prune(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
            model.compile("sgd", "mse")
            try:
                cb = kib.IBPruning(0.5, score="magnitude")
            except RuntimeError as e:
                print("RAISED", e, flush=True)
        """
    )
    path = tmp_path / "mwms.py"
    path.write_text(script)
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in (s1, s2)]}
    procs = []
    for i in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": i}}))
        procs.append(subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    outs = [p.communicate(timeout=300) for p in procs]
    for out, err in outs:
        assert "RAISED" in out, out + err[-3000:]
        assert "examples/multi_worker.py" in out
        assert "Received: strategy=MultiWorkerMirroredStrategy with 2 workers" in out


@pytest.mark.slow
def test_jax_data_parallel_devices_and_processes_match_one_device(tmp_path):
    pytest.importorskip("jax")
    result = _example("jax_data_parallel").main(["--workdir", str(tmp_path)])
    for mode in ("devices", "processes"):
        assert result[mode]["agree"], mode
        assert result[mode]["differ"] == 0, (mode, result[mode])
        assert result[mode]["stats_agree"], mode
        assert result[mode]["stats_rel"] < 1e-5, (mode, result[mode])
    # Two processes: each computed one of the two held-out batches, then the totals merged.
    assert result["processes"]["local_batches"] == [1, 1], result["processes"]
    assert result["devices"]["local_batches"] == [2] == [result["devices"]["batches"]]
