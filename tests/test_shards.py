"""Dataset functions `held_out(input_context)`: sharded reading, lockstep, errors."""

import numpy as np
import pytest
import tensorflow as tf
from _cases import MIRRORED_SETUP
from _cases import tiny_conv_fc as _model
from _cases import tiny_xy as _xy

import keras_ibprune as kib
from keras_ibprune.shards import is_dataset_fn


def _summaries(pruner):
    return [
        {k: v for k, v in s.summary.items() if isinstance(v, np.ndarray)} for s in pruner.collect()
    ]


def test_a_dataset_function_is_called_with_an_input_context_and_gives_the_array_statistics():
    x, y = _xy()
    contexts = []

    def held_out(input_context):
        contexts.append(input_context)
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id).batch(
            32
        )

    assert is_dataset_fn(held_out) and not is_dataset_fn(lambda: iter([(x, y)]))
    assert not is_dataset_fn(tf.data.Dataset.from_tensor_slices(x))
    runs = []
    for data, size in (((x, y), 90), (held_out, None)):
        model = _model()
        pruner = kib.Pruner(model, 0.6, held_out=data, held_out_size=size)
        pruner.reset()
        runs.append(_summaries(pruner))
        pruner.update(1, force=True)
        runs[-1].append([m.numpy() for w in pruner.wrappers for m in w.masks])
    ctx = contexts[0]
    assert isinstance(ctx, tf.distribute.InputContext)
    assert (ctx.num_input_pipelines, ctx.input_pipeline_id, ctx.num_replicas_in_sync) == (1, 0, 1)
    for ref, got in zip(runs[0][:-1], runs[1][:-1]):
        assert set(ref) == set(got)
        for k, v in ref.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5 * np.abs(v).max(), err_msg=k)
    assert all(np.array_equal(a, b) for a, b in zip(runs[0][-1], runs[1][-1]))


def test_a_wrong_dataset_function_is_a_clear_error():
    x, y = _xy(20)
    model = _model()
    arrays = kib.Pruner(model, 0.5, held_out=lambda ctx: (x, y), held_out_size=None)
    with pytest.raises(ValueError, match="must return a tf.data.Dataset. Received: tuple"):
        arrays.reset()

    def held_out(ctx):
        return tf.data.Dataset.from_tensor_slices((x, y)).shard(
            ctx.num_input_pipelines, ctx.input_pipeline_id
        )

    with pytest.raises(ValueError, match="pass held_out_size=None. Received: held_out_size=1024"):
        kib.Pruner(model, 0.5, held_out=held_out).reset()
    with pytest.raises(ValueError, match="not per-sample statistics"):
        kib.Pruner(model, 0.5, held_out=held_out, held_out_size=None, log_information=True).reset()
    infinite = kib.Pruner(
        model,
        0.5,
        held_out=lambda ctx: tf.data.Dataset.from_tensor_slices((x, y)).repeat(),
        held_out_size=None,
    )
    with pytest.raises(ValueError, match="finite dataset"):
        infinite.reset()


_MIRRORED_FN = MIRRORED_SETUP + """
contexts = []

def held_out(ctx):
    contexts.append((ctx.num_input_pipelines, ctx.input_pipeline_id, ctx.num_replicas_in_sync))
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id).batch(50)

def run(**kw):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kib.prune(small_cnn())
        model.build((None, 8, 8, 1))
    pruner = kib.Pruner(model, 0.7, **kw)
    pruner.reset()
    stats = [{k: v for k, v in s.summary.items() if isinstance(v, np.ndarray)}
             for s in pruner.collect()]
    pruner.update(1, force=True)
    return stats, [m.numpy() for w in pruner.wrappers for m in w.masks]

ref, ref_masks = run(held_out=(x, y), held_out_size=300)
got, masks = run(held_out=held_out, held_out_size=None, strategy=strategy)
worst = 0.0
for a, b in zip(ref, got):
    assert set(a) == set(b), set(a) ^ set(b)
    for k, v in a.items():
        worst = max(worst, float(np.abs(v - b[k]).max() / (np.abs(v).max() + 1e-30)))
print("CONTEXT", contexts[0])
print("RESULT", worst < 1e-5, worst, all(np.array_equal(a, b) for a, b in zip(ref_masks, masks)))
"""


@pytest.mark.slow  # a fresh TF process with two logical CPUs
def test_a_dataset_function_under_mirrored_strategy_gives_the_single_device_statistics(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "mirrored_fn.py"
    script.write_text(_MIRRORED_FN)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run(
        [sys.executable, str(script), os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "CONTEXT (1, 0, 2)" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "RESULT True" in r.stdout and r.stdout.rstrip().endswith("True"), (
        r.stdout + r.stderr[-3000:]
    )
