import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _cases import MODEL_KINDS, data, pruned_model, small_cnn

import keras_ibprune as kib


def _compile(model):
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit(model, cb, epochs, x=None, y=None, **kw):
    if x is None:
        x, y = data(96)
    return model.fit(
        x, y, batch_size=32, epochs=epochs, callbacks=[cb], verbose=0, shuffle=False, **kw
    )


@pytest.mark.jax
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_target_sparsity_reached_exactly_per_layer(kind):
    model = _compile(pruned_model(kind))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.75, 0, 2), score="magnitude")
    history = _fit(model, cb, epochs=3)
    for w in kib.stats.find_wrappers(model):
        for m, v in zip(w.masks, w.prunable_weights):
            m = m.numpy()
            assert int((m == 0).sum()) == round(0.75 * m.size), w.name
            # Stored weights are exactly zero under the mask after fit (Adam momentum too).
            assert np.all(v.numpy()[m == 0] == 0)
    assert history.history["sparsity"][-1] == pytest.approx(0.75, abs=1e-3)
    assert history.history["sparsity"][0] < history.history["sparsity"][1] < 0.76


def test_layer_logs_epoch_reach_csvlogger(tmp_path):
    model = _compile(kib.prune(small_cnn()))
    csv = tmp_path / "log.csv"
    cb = kib.IBPruning(kib.ConstantSparsity(0.5), score="magnitude", layer_logs="epoch")
    x, y = data(64)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[cb, keras.callbacks.CSVLogger(str(csv))])
    header = csv.read_text().splitlines()[0].split(",")
    assert {"sparsity", "sparsity/conv", "sparsity/fc1", "sparsity/logits"} <= set(header)


def test_per_layer_logs_stay_off_the_progress_bar(capsys):
    model = _compile(kib.prune(small_cnn()))
    seen = []
    spy = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(set(logs)))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), score="magnitude")
    x, y = data(64)
    history = model.fit(x, y, epochs=3, verbose=2, callbacks=[cb, spy])
    printed = capsys.readouterr().out
    assert "sparsity/" not in printed and "sparsity: 0.5" in printed
    assert "sparsity" in seen[-1] and not any("/" in k for k in seen[-1])
    h = history.history
    for layer in ("conv", "fc1", "logits"):  # one entry per epoch, aligned with "sparsity"
        assert len(h[f"sparsity/{layer}"]) == len(h["sparsity"]) == 3
    assert h["sparsity/fc1"][-1] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="Received: layer_logs='bar'"):
        kib.IBPruning(0.5, layer_logs="bar")


def test_verbose_prints_one_line_per_update(capsys):
    model = _compile(kib.prune(small_cnn()))
    _fit(model, kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), verbose=1), epochs=4)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("IBPruning:")]
    assert len(lines) == 2 and "sparsity 0.5" in lines[-1]


@pytest.mark.jax
def test_update_every_steps():
    model = _compile(kib.prune(small_cnn()))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.6, 0, 1), update_every=1)
    seen = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(kib.sparsity(self.model))

    x, y = data(96)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb, Spy()])
    # Steps 1 and 2 update inside the epoch; step 3 is the epoch end (updated once there).
    assert 0 < seen[0] < seen[1] < 0.6
    assert seen[0] == pytest.approx(0.6 * (1 - (2 / 3) ** 3), abs=2e-3)
    assert kib.sparsity(model) == pytest.approx(0.6, abs=1e-3)


@pytest.mark.slow
def test_resume_from_saved_model_gives_same_masks(tmp_path):
    x, y = data(96)
    sched = kib.PolynomialDecay(0.0, 0.8, 0, 4)

    def fresh():
        keras.utils.set_random_seed(7)
        return _compile(kib.prune(small_cnn()))

    full = fresh()
    _fit(full, kib.IBPruning(sched), epochs=5, x=x, y=y)

    part = fresh()
    _fit(part, kib.IBPruning(sched), epochs=2, x=x, y=y)
    part.save(tmp_path / "mid.keras")
    resumed = keras.models.load_model(tmp_path / "mid.keras")
    _fit(resumed, kib.IBPruning(sched), epochs=5, x=x, y=y, initial_epoch=2)

    for a, b in zip(kib.stats.find_wrappers(full), kib.stats.find_wrappers(resumed)):
        for ma, mb in zip(a.masks, b.masks):
            np.testing.assert_array_equal(ma.numpy(), mb.numpy())
    assert kib.sparsity(resumed) == pytest.approx(0.8, abs=1e-3)


def test_backup_and_restore(tmp_path):
    x, y = data(64)
    model = _compile(kib.prune(small_cnn()))
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("simulated interruption")

    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 4))
    with pytest.raises(RuntimeError, match="simulated"):
        model.fit(x, y, epochs=5, verbose=0, callbacks=[cb, backup, Crash()])
    history = model.fit(x, y, epochs=5, verbose=0, callbacks=[cb, backup])
    assert len(history.history["sparsity"]) < 5  # resumed, not restarted
    assert history.history["sparsity"][-1] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.jax
def test_no_wrapper_is_an_error_at_train_begin():
    model = _compile(small_cnn())
    with pytest.raises(ValueError, match="contains no PruneWrapper.*kib.prune"):
        _fit(model, kib.IBPruning(kib.ConstantSparsity(0.5)), epochs=1)


def test_unknown_score_and_allocation():
    with pytest.raises(ValueError, match="Unknown score.*Received: score='l0'"):
        kib.IBPruning(kib.ConstantSparsity(0.5), score="l0")
    with pytest.raises(ValueError, match="Unknown allocation.*Received: allocation='best'"):
        kib.IBPruning(kib.ConstantSparsity(0.5), allocation="best")
    with pytest.raises(ValueError, match="update_every"):
        kib.IBPruning(kib.ConstantSparsity(0.5), update_every=0)


def test_random_score_and_erk_allocation_and_min_density():
    model = _compile(kib.prune(small_cnn()))
    cb = kib.IBPruning(
        kib.OneShot(0.9), score=kib.RandomScore(seed=3), allocation="erk", min_density=0.2
    )
    _fit(model, cb, epochs=1)
    per = {w.layer.name: 1 - w.masks[0].numpy().mean() for w in kib.stats.find_wrappers(model)}
    assert all(s <= 0.8 + 1e-6 for s in per.values())
    assert per["fc1"] == pytest.approx(0.8, abs=1e-3) and per["conv"] < per["fc1"]


@pytest.mark.jax
def test_pruner_in_a_custom_loop():
    model = kib.prune(small_cnn())
    pruner = kib.Pruner(model, kib.PolynomialDecay(0.0, 0.5, 0, 2))
    pruner.reset()
    assert not pruner.update(0)
    assert pruner.update(1) and pruner.update(2)
    assert pruner.current_sparsity() == pytest.approx(0.5, abs=1e-3)
    assert pruner.logs()["sparsity/fc1"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("kwargs", [
    {"score": "random", "allocation": "erk", "update_every": 10, "min_density": 0.05},
    {"score": kib.IBScore(fisher="empirical", damping=0.1), "log_information": True,
     "held_out_size": 512, "exclude": ["fc1"], "keep_connected": "all"},
    {"target": "flops", "min_width": 4, "round_to": 8, "regrow": True, "output": 0,
     "layer_logs": "epoch"},
])
def test_callback_config_round_trip(kwargs):
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.9, 1, 5), **kwargs)
    config = cb.get_config()
    again = kib.IBPruning.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cb))
    assert isinstance(restored, kib.IBPruning) and restored.get_config() == config
    assert type(restored.pruner.score) is type(cb.pruner.score)
    assert restored.pruner.score.get_config() == cb.pruner.score.get_config()


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    script = textwrap.dedent(
        """
        import sys, numpy as np, tensorflow as tf
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, keras_ibprune as kib
        sys.path.insert(0, sys.argv[1])
        from _cases import small_cnn, data
        x, y = data(64)
        def run(strategy):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                model = kib.prune(small_cnn())
                model.compile(keras.optimizers.SGD(0.05),
                              keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0,
                      callbacks=[kib.IBPruning(kib.PolynomialDecay(0.0, 0.7, 0, 2))])
            return [m.numpy() for w in kib.stats.find_wrappers(model) for m in w.masks]
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert mirrored.num_replicas_in_sync == 2
        a, b = run(mirrored), run(tf.distribute.get_strategy())
        same = all(np.array_equal(p, q) for p, q in zip(a, b))
        sp = 1 - np.concatenate([m.ravel() for m in a]).mean()
        print("RESULT", same, round(float(sp), 3))
        """
    )
    path = tmp_path / "mirrored.py"
    path.write_text(script)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, str(path), os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "RESULT True 0.7" in out.stdout, out.stdout + out.stderr[-3000:]


class _MaskSpy(keras.callbacks.Callback):
    """Records the overall mask sparsity after every step and every epoch."""

    def __init__(self):
        super().__init__()
        self.steps, self.epochs, self.first = [], [], None

    def on_train_batch_begin(self, batch, logs=None):
        if self.first is None:
            self.first = kib.sparsity(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(kib.sparsity(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(kib.sparsity(self.model))


@pytest.mark.jax
def test_update_every_n_steps_is_exact_across_epoch_ends():
    model = _compile(kib.prune(small_cnn()))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 3), update_every=3, score="magnitude")
    spy = _MaskSpy()
    x, y = data(32)
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[cb, spy])
    seq = [0.0] + spy.steps  # 4 steps per epoch, 12 in all
    changed = [i for i in range(1, len(seq)) if seq[i] != seq[i - 1]]
    assert changed == [3, 6, 9, 12]


@pytest.mark.jax
def test_schedule_start_matches_tfmot_begin_step():
    # begin_epoch = 2: initial_sparsity at the end of epoch 1 (tfmot: at step begin_step).
    model = _compile(kib.prune(small_cnn()))
    spy = _MaskSpy()
    cb = kib.IBPruning(kib.PolynomialDecay(0.3, 0.8, begin_epoch=2, end_epoch=4),
                       score="magnitude")
    x, y = data(96)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, callbacks=[cb, spy])
    expected = [0.0, 0.3, 0.8 - 0.5 * 0.5**3, 0.8, 0.8]
    np.testing.assert_allclose(spy.epochs, expected, atol=2e-3)
    # begin_epoch = 0: initial_sparsity before the first training step (tfmot's step 0).
    model = _compile(kib.prune(small_cnn()))
    spy = _MaskSpy()
    cb = kib.IBPruning(kib.PolynomialDecay(0.3, 0.8, 0, 2), score="magnitude")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[cb, spy])
    assert spy.first == pytest.approx(0.3, abs=2e-3)


@pytest.mark.jax
def test_unreachable_final_sparsity_warns_at_begin_and_end():
    model = _compile(kib.prune(small_cnn()))
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 10), score="magnitude")
    with pytest.warns(UserWarning) as record:
        _fit(model, cb, epochs=3)
    texts = [str(r.message) for r in record if "IBPruning" in str(r.message)]
    assert any("final sparsity 0.8" in t and "3 epochs" in t for t in texts)
    assert any("training ended" in t for t in texts)
    # A fit that reaches the target says nothing.
    import warnings

    model = _compile(kib.prune(small_cnn()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, kib.IBPruning(kib.PolynomialDecay(0.0, 0.8, 0, 2), score="magnitude"),
             epochs=3)
    assert not [w for w in caught if "IBPruning" in str(w.message)]


@pytest.mark.jax
def test_lazily_built_subclassed_model_needs_no_manual_build():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = kib.PruneWrapper(keras.layers.Dense(16, activation="relu"))
            self.out = kib.PruneWrapper(keras.layers.Dense(10))

        def call(self, x):
            return self.out(self.fc(keras.ops.reshape(x, (-1, 64))))

    model = _compile(Net())
    assert not model.built
    _fit(model, kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), score="magnitude"),
         epochs=3)
    assert kib.sparsity(model) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("schedule,final", [
    (kib.OneShot(0.5, epoch=0), 0.5),
    (kib.Iterative(0.75, cycles=2, epochs_per_cycle=1), 0.75),
    (kib.PolynomialDecay(0.0, 0.8, 0, 2), 0.8),
])
@pytest.mark.slow  # >= 4 s on 2 cores: run by .ci/run's slow pass
def test_update_every_n_applies_points_between_grid_steps(schedule, final):
    model = _compile(kib.prune(small_cnn()))
    cb = kib.IBPruning(schedule, update_every=3, score="magnitude")
    x, y = data(80)  # 10 steps per epoch: 3 does not divide them
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[cb])
    assert kib.sparsity(model) == pytest.approx(final, abs=2e-3)


def test_update_every_with_steps_per_execution():
    model = kib.prune(small_cnn())
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=2)
    spy = _MaskSpy()
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.6, 0, 2), update_every=3, score="magnitude")
    x, y = data(48)  # 6 steps per epoch, reported every 2
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[cb, spy])
    assert len(set(spy.steps)) >= 4  # updates at steps 4, 6, 10, 12 (first report >= 3k)
    assert kib.sparsity(model) == pytest.approx(0.6, abs=2e-3)


def test_resuming_after_the_schedule_ended_does_not_warn():
    import warnings

    model = _compile(kib.prune(small_cnn()))
    sched = kib.PolynomialDecay(0.0, 0.9, 0, 2)
    _fit(model, kib.IBPruning(sched, score="magnitude"), epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, kib.IBPruning(sched, score="magnitude"), epochs=4, initial_epoch=3)
    assert not [w for w in caught if "IBPruning" in str(w.message)]
