"""The pruning engine: masks it writes, what it protects, the optimizer state it clears."""

import glob
import warnings

import keras
import numpy as np
import pytest

import keras_ibprune as kib


def _mlp(seed=0, hidden=16, classes=3):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8,))
    h = keras.layers.Dense(hidden, activation="relu", name="fc")(inp)
    out = keras.layers.Dense(classes, name="logits")(h)
    return keras.Model(inp, out)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8)).astype("float32"), rng.integers(0, 3, n)


@pytest.mark.jax
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("sparsity", [0.99, 0.999])
def test_output_units_keep_a_weight_and_no_tensor_is_emptied(allocation, sparsity):
    model = kib.prune(_mlp())
    pruner = kib.Pruner(model, kib.ConstantSparsity(sparsity), score="magnitude",
                        allocation=allocation)
    pruner.reset()
    pruner.update(1.0)
    masks = {w.layer.name: w.masks[0].numpy() for w in pruner.wrappers}
    assert np.all(masks["logits"].sum(axis=0) >= 1)  # every output unit stays connected
    assert all(m.sum() >= 1 for m in masks.values())
    # Without the output constraint a tensor still never goes empty.
    model = kib.prune(_mlp())
    pruner = kib.Pruner(model, kib.ConstantSparsity(sparsity), score="magnitude",
                        allocation=allocation, keep_connected=False)
    pruner.reset()
    pruner.update(1.0)
    assert all(w.masks[0].numpy().sum() >= 1 for w in pruner.wrappers)


OPTIMIZERS = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.5),
    "adafactor": lambda: keras.optimizers.Adafactor(1e-2),
    "nadam_ema": lambda: keras.optimizers.Nadam(1e-2, use_ema=True),
}


@pytest.mark.parametrize("checkpoint_first", [True, False])
@pytest.mark.parametrize("opt", [
    pytest.param(name, marks=pytest.mark.jax if name == "adam" else pytest.mark.slow)
    for name in OPTIMIZERS])
def test_weights_stay_zero_at_every_step_with_stateful_optimizers(opt, checkpoint_first,
                                                                    tmp_path):
    model = kib.prune(_mlp())
    model.compile(OPTIMIZERS[opt](), keras.losses.SparseCategoricalCrossentropy(True))
    wrappers = kib.stats.find_wrappers(model)
    leaks = []

    class Spy(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            _ = self.model  # JAX: write the trainer's state back into the variables
            for w in wrappers:
                m, v = w.masks[0].numpy(), w.layer.kernel.numpy()
                leaks.append(float(np.abs(v[m == 0]).max(initial=0.0)))

    ckpt = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "ck_{epoch}_{batch}.weights.h5"), save_weights_only=True, save_freq=3)
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 1), score="magnitude")
    x, y = _data()
    cbs = [ckpt, cb, Spy()] if checkpoint_first else [cb, ckpt, Spy()]
    model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=cbs)
    assert kib.sparsity(model) == pytest.approx(0.5, abs=0.02)
    # Masks are set at the end of epoch 0 (step 8); every later step keeps pruned weights 0.
    assert max(leaks[8 * len(wrappers):]) == 0.0
    saved = sorted(glob.glob(str(tmp_path / "ck_[23]_*.weights.h5")))
    assert saved
    for path in saved:  # checkpoints written in epochs 2 and 3 are sparse
        model.load_weights(path)
        for w in wrappers:
            assert np.mean(w.layer.kernel.numpy() == 0) >= 0.5 - 1e-9, path


@pytest.mark.jax
def test_log_names_stay_unique_when_nested_layers_share_a_name():
    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.ff = keras.layers.Dense(8, activation="relu", name="ff")

        def call(self, x):
            return x + self.ff(x)

    inp = keras.Input((8,))
    out = keras.layers.Dense(3, name="logits")(Block(name="b1")(Block(name="b0")(inp)))
    model = kib.prune(keras.Model(inp, out))
    x, y = _data()
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.5), held_out=(x, y),
                        log_information=True)
    pruner.reset()
    pruner.update(1.0)
    logs = pruner.logs()
    per_layer = [k for k in logs if k.startswith("sparsity/")]
    assert len(per_layer) == len(pruner.wrappers) == 3
    assert "sparsity/logits" in logs  # unique names stay as they were
    assert len([k for k in logs if k.startswith("I_TY/")]) == 3


@pytest.mark.jax
def test_n_m_pattern_with_the_ib_score_ends_exactly_n_m(tmp_path):
    model = kib.prune(_mlp(hidden=32), pattern="2:4")
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(True))
    x, y = _data(128)
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.5, 0, 2), held_out=(x[:64], y[:64]))
    model.fit(x[64:], y[64:], batch_size=16, epochs=3, verbose=0, callbacks=[cb])
    for w in kib.stats.find_wrappers(model):
        m = w.masks[0].numpy()
        assert np.all(m.reshape(-1, 4, m.shape[-1]).sum(axis=1) == 2), w.name  # 8 inputs
    path = tmp_path / "nm.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [w.pattern for w in kib.stats.find_wrappers(loaded)] == [(2, 4), (2, 4)]


def test_pattern_beyond_its_cap_warns():
    model = kib.prune(_mlp(), pattern=(1, 4))
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.9), score="magnitude")
    with pytest.warns(UserWarning, match="pattern 1:4 removes at most 75%"):
        pruner.reset()


def test_update_at_an_unchanged_target_is_skipped_and_masks_kept():
    model = kib.prune(_mlp())
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.5), score="magnitude")
    pruner.reset()
    assert pruner.update(0)  # the first update prunes
    before = [m.numpy().copy() for w in pruner.wrappers for m in w.masks]
    for w in pruner.wrappers:  # the kept weights move, as in training
        w.prunable_weights[0].assign(w.prunable_weights[0] * 3.0 + 0.1)
    assert not pruner.update(1)  # same target, no regrowth: nothing can change, skipped
    after = [m.numpy() for w in pruner.wrappers for m in w.masks]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))
    assert pruner.update(1, force=True)  # forced updates still run
    w = pruner.wrappers[0]
    w.masks[0].assign(np.ones(w.masks[0].shape, "float32"))  # masks changed by hand
    assert pruner.update(2) and pruner.current_sparsity() == pytest.approx(0.5, abs=1e-3)
    regrow = kib.Pruner(model, kib.ConstantSparsity(0.5), score="magnitude", regrow=True)
    regrow.reset()
    assert regrow.update(0) and regrow.update(1)  # regrowth may swap weights: never skipped


class _StarveHidden(kib.Score):
    """|w|, scaled down a million-fold for the hidden layer: a global threshold empties it."""

    def __call__(self, stats):
        scale = 1e-6 if stats.wrapper.layer.name == "fc" else 1.0
        return [scale * np.abs(w) for w in stats.weights]


@pytest.mark.parametrize("allocation, warns", [("global", True), ("global_erk_floor", False)])
def test_a_layer_left_with_less_than_a_weight_per_unit_is_named(allocation, warns):
    model = kib.prune(_mlp(hidden=32))
    pruner = kib.Pruner(model, kib.ConstantSparsity(0.9), score=_StarveHidden(),
                        allocation=allocation)
    pruner.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.update(0)
        pruner.update(1, force=True)  # said once per training run
    said = [w for w in caught if "fewer kept weights than output units" in str(w.message)]
    assert len(said) == int(warns)
    fc = next(w for w in pruner.wrappers if w.layer.name == "fc").masks[0].numpy()
    # the warning tells the truth: under a quarter of the model's density, < 1 per unit
    assert (fc.mean() < 0.25 * 0.1 and fc.sum() < 32) == warns
    if warns:
        assert "fc" in str(said[0].message) and "logits" not in str(said[0].message)


def test_starved_counts_depthwise_channels_as_units():
    from keras_ibprune.allocation import starved

    # (3, 3, 16, 1) depthwise kernel: 16 channels; 144 weights at 0.99 keep 1.4 < 16.
    assert starved([(3, 3, 16, 1), (16, 8), (5,)], [0.99, 0.9, 0.999], target=0.9) == [0]
    assert starved([(3, 3, 16, 1)], [0.95], target=0.9) == []  # 7.2 < 16, but not starved
    # against the model: a uniform allocation thins a small fan-in as much
    assert starved([(3, 3, 16, 1)], [0.99], target=0.98) == []
