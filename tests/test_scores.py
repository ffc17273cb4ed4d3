import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune import scores as S
from keras_ibprune import stats as ST

L = keras.layers


def _views(n=1500, seed=0):
    """Two independent noisy views of a binary label, and the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.stack([y + 0.5 * rng.normal(size=n), y + 0.5 * rng.normal(size=n)], 1)
    return (x - x.mean(0)).astype("float32"), y


def _linear_model(kernel):
    inp = keras.Input((kernel.shape[0],))
    h = L.Dense(kernel.shape[1], use_bias=False, name="hidden")(inp)
    out = L.Dense(2, activation="softmax", name="out")(h)
    model = kib.prune(keras.Model(inp, out))
    ST.find_wrappers(model)[0].layer.kernel.assign(kernel.astype("float32"))
    return model


def _stats(model, x, y):
    return ST.collect(model, ST.find_wrappers(model), held_out=(x, y), summaries=True)


def test_ib_weight_score_prefers_the_label_carrying_unit():
    rng = np.random.default_rng(1)
    x, y = _views()
    x[:, 1] = rng.normal(size=len(x)) * x[:, 0].std()  # same energy, no label information
    model = _linear_model(np.eye(2))
    s = S.IBScore()(_stats(model, x, y)[0])[0]
    assert s[0, 0] > 20 * s[1, 1] >= 0 and s[0, 0] > 0


def test_ib_weight_score_sees_duplicated_units():
    x, y = _views()
    # hidden units: 0 and 1 are copies of view a, unit 2 is view b (unique).
    kernel = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    model = _linear_model(kernel)
    st = _stats(model, x, y)[0]
    joint = S.IBScore()(st)[0]
    assert joint[0, 0] < 0.5 * joint[1, 2] and joint[0, 1] < 0.5 * joint[1, 2]
    marginal = S.IBScore(joint=False)(st)[0]
    assert marginal[0, 0] == pytest.approx(marginal[1, 2], rel=0.3)


def test_ib_unit_scores_and_logs():
    x, y = _views()
    kernel = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])  # unit 3 is dead
    model = _linear_model(kernel)
    score = S.IBScore(beta=0.0)
    st = _stats(model, x, y)
    u = score.unit_scores(st[0])
    # The unique view beats its duplicated twin; the dead (constant) unit ranks last.
    assert u[2] > 5 * max(u[0], u[1]) and u[3] < min(u[0], u[1], u[2])
    # The compression term (β > 0) charges the active units; the dead one still ranks last
    # (a unit carrying nothing must never be kept over a live one: shrink would keep it).
    costly = S.IBScore(beta=1.0).unit_scores(st[0])
    assert costly[0] < u[0] and costly[3] < min(costly[:3])
    logs = score.logs()
    assert logs["I_TY/hidden"] > 0.3 and logs["I_XT/hidden"] > logs["I_TY/hidden"]


def test_ib_score_ema_and_reset():
    x, y = _views()
    model = _linear_model(np.eye(2))
    score = S.IBScore(ema=0.5)
    st = _stats(model, x, y)[0]
    first = score(st)[0]
    st.weights = [2 * w for w in st.weights]
    second = score(st)[0]
    np.testing.assert_allclose(second, 0.5 * first + 0.5 * 4 * first, rtol=1e-6)
    score.reset()
    np.testing.assert_allclose(score(st)[0], 4 * first, rtol=1e-6)
    with pytest.raises(ValueError, match="ema"):
        S.IBScore(ema=1.0)


@pytest.mark.parametrize("estimator", ["binned", "hsic"])
def test_ib_score_other_estimators(estimator):
    rng = np.random.default_rng(2)
    x, y = _views(600)
    x[:, 1] = rng.normal(size=len(x)) * x[:, 0].std()
    model = _linear_model(np.eye(2))
    s = S.IBScore(estimator=estimator)(_stats(model, x, y)[0])[0]
    assert np.all(np.isfinite(s)) and s[0, 0] > s[1, 1]


def test_activation_score_is_weight_times_input_rms():
    x, y = _views()
    x[:, 1] *= 3.0
    model = _linear_model(np.ones((2, 2)))
    s = S.ActivationScore()(_stats(model, x, y)[0])[0]
    rms = np.sqrt((x.astype(np.float64) ** 2).mean(0))
    np.testing.assert_allclose(s, np.ones((2, 2)) * rms[:, None], rtol=1e-4)


def test_gradient_and_taylor_scores():
    x, y = _views(200)
    model = _linear_model(np.eye(2))
    model.compile("sgd", "sparse_categorical_crossentropy")
    ws = ST.find_wrappers(model)
    st = ST.collect(model, ws, held_out=(x, y), gradients=True, loss=keras.losses.get(
        "sparse_categorical_crossentropy"))
    g = S.GradientScore()(st[0])[0]
    t = S.TaylorScore()(st[0])[0]
    assert g.shape == (2, 2) and np.all(g >= 0) and g.max() > 0
    np.testing.assert_allclose(t, np.abs(st[0].weights[0] * st[0].grads[0]), rtol=1e-6)
    assert t[0, 1] == 0.0  # zero weight: zero Taylor score


def test_registry_and_configs():
    for name, cls in [("ib", S.IBScore), ("activation", S.ActivationScore),
                      ("gradient", S.GradientScore), ("taylor", S.TaylorScore)]:
        assert isinstance(S.get(name), cls)
    assert S.get("ib").default_allocation == "ib"
    score = S.IBScore(estimator="binned", beta=0.1)
    again = S.get(keras.saving.serialize_keras_object(score))
    assert again.get_config() == score.get_config()
    with pytest.raises(ValueError, match="Unknown estimator"):
        S.IBScore(estimator="mine")
    with pytest.raises(ValueError, match="Unknown score"):
        S.get("fisher")
