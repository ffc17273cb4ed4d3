import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune import scores as S
from keras_ibprune.information import IBScore, OBSScore

L = keras.layers


def _views(n=1500, seed=0):
    """Two independent noisy views of a binary label, and the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.stack([y + 0.5 * rng.normal(size=n), y + 0.5 * rng.normal(size=n)], 1)
    return (x - x.mean(0)).astype("float32"), y


def _linear_model(kernel, train_on=None):
    """Fixed hidden layer `kernel`; the output layer trained on `train_on=(x, y)`."""
    inp = keras.Input((kernel.shape[0],))
    hidden = L.Dense(kernel.shape[1], use_bias=False, name="hidden", trainable=False)
    out = L.Dense(2, activation="softmax", name="out")(hidden(inp))
    model = keras.Model(inp, out)
    hidden.kernel.assign(kernel.astype("float32"))
    if train_on is not None:
        model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
        model.fit(*train_on, epochs=12, verbose=0, batch_size=256)
    return kib.prune(model)


def _stats(model, x, y, score, log=False):
    pruner = kib.Pruner(model, 0.5, score=score, held_out=(x, y), log_information=log)
    pruner.reset()
    return pruner.collect()


def test_ib_weight_score_carries_label_information():
    rng = np.random.default_rng(1)
    x, y = _views()
    x[:, 1] = rng.normal(size=len(x)) * x[:, 0].std()  # same energy, no label information
    model = _linear_model(np.eye(2), train_on=(x, y))
    s = IBScore()(_stats(model, x, y, "ib")[0])[0]
    # Same weight, same input energy: the label-carrying path is worth far more nats...
    assert s[0, 0] > 20 * s[1, 1] >= 0 and s[0, 0] > 0
    # ...while Wanda sees no difference.
    wanda = S.ActivationScore()(_stats(model, x, y, "activation")[0])[0]
    assert wanda[0, 0] == pytest.approx(wanda[1, 1], rel=0.1)


def test_ib_weight_score_discounts_redundant_inputs():
    x, y = _views()
    dup = np.concatenate([x, x[:, :1] + 1e-3 * np.random.default_rng(0).normal(
        size=(len(x), 1)).astype("float32")], 1)  # input 2 copies input 0
    model = _linear_model(np.ones((3, 1)), train_on=(dup, y))
    s = IBScore(damping=1e-4)(_stats(model, dup, y, "ib")[0])[0][:, 0]
    # Removing one copy costs nothing (the other takes over); the unique view is dear.
    assert s[0] < 0.05 * s[1] and s[2] < 0.05 * s[1]


def test_ib_unit_scores_and_logs():
    x, y = _views()
    kernel = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # unit 3 is dead
    model = _linear_model(kernel)
    score = IBScore(beta=0.0)
    st = _stats(model, x, y, score, log=True)
    u = score.unit_scores(st[0])
    # The unique view beats its duplicated twin; the dead (constant) unit ranks last.
    assert u[2] > 5 * max(u[0], u[1]) and u[3] < min(u[0], u[1], u[2])
    costly = IBScore(beta=1.0).unit_scores(st[0])
    assert costly[0] < u[0] and costly[3] < min(costly[:3])
    assert score.logs() == {}  # logs are measured on request only
    score.measure(st[0])
    logs = score.logs()
    assert 0.3 < logs["I_TY/hidden"] <= np.log(2) and logs["I_XT/hidden"] > logs["I_TY/hidden"]


def test_ib_binned_estimator_for_logs_and_units():
    rng = np.random.default_rng(2)
    x, y = _views(600)
    x[:, 1] = rng.normal(size=len(x)) * x[:, 0].std()
    model = _linear_model(np.eye(2))
    score = IBScore(estimator="binned")
    st = _stats(model, x, y, score, log=True)[0]
    u = score.unit_scores(st)
    score.measure(st)
    assert np.all(np.isfinite(u)) and u[0] > u[1]
    assert 0 < score.logs()["I_TY/hidden"] <= np.log(2)


@pytest.mark.slow  # >= 2.5 s on 2 cores: run by .ci/run's slow pass
def test_scores_are_stateless():
    x, y = _views()
    model = _linear_model(np.eye(2), train_on=(x, y))
    score = IBScore()
    st = _stats(model, x, y, score)[0]
    first = score(st)[0]
    st.weights = [2 * w for w in st.weights]
    np.testing.assert_allclose(score(st)[0], 4 * first, rtol=1e-6)  # no memory of `first`


def test_obs_score_is_the_layer_output_error():
    x, y = _views()
    model = _linear_model(np.eye(2))
    x, y = x[:1024], y[:1024]  # held_out_size
    st = _stats(model, x, y, "obs")[0]
    h = x.astype(np.float64).T @ x / len(x)
    hinv = np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(2))
    expected = 0.5 * np.eye(2) / np.diag(hinv)[:, None]
    np.testing.assert_allclose(OBSScore()(st)[0], expected, rtol=1e-4)


def test_activation_score_is_weight_times_input_rms():
    x, y = _views()
    x, y = x[:1024], y[:1024]  # held_out_size
    x[:, 1] *= 3.0
    model = _linear_model(np.ones((2, 2)))
    s = S.ActivationScore()(_stats(model, x, y, "activation")[0])[0]
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(0))
    np.testing.assert_allclose(s, np.ones((2, 2)) * rms[:, None], rtol=1e-4)


def test_gradient_and_taylor_scores():
    x, y = _views(200)
    model = _linear_model(np.eye(2))
    model.compile("sgd", "sparse_categorical_crossentropy")
    st = _stats(model, x, y, "taylor")
    g = S.GradientScore()(st[0])[0]
    t = S.TaylorScore()(st[0])[0]
    assert g.shape == (2, 2) and np.all(g >= 0) and g.max() > 0
    np.testing.assert_allclose(t, np.abs(st[0].weights[0] * st[0].grads[0]), rtol=1e-6)
    assert t[0, 1] == 0.0  # zero weight: zero Taylor score


@pytest.mark.parametrize("name", S.aliases())
def test_every_score_resolves_and_round_trips(name):
    score = S.get(name)
    assert isinstance(score, S.Score)
    again = S.deserialize(S.serialize(score))
    assert type(again) is type(score) and again.get_config() == score.get_config()
    assert type(S.get(type(score).__name__)) is type(score)  # class names resolve too


def test_registry_defaults_and_errors():
    assert S.get("ib").default_allocation == "global"
    assert S.get("obs").default_allocation == "erk"
    assert type(S.get("l1")) is S.MagnitudeScore  # "l1" names the filter-norm use
    custom = IBScore(fisher="empirical", damping=0.1, reconstruct=False)
    assert S.get(S.serialize(custom)).get_config() == custom.get_config()
    with pytest.raises(ValueError, match="Unknown score.*Received: score='fisher'"):
        S.get("fisher")
    with pytest.raises(ValueError, match="does not describe a Score"):
        S.deserialize(keras.saving.serialize_keras_object(kib.ConstantSparsity(0.5)))
