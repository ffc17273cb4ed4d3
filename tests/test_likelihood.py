import numpy as np
import pytest
from keras import ops

from keras_ibprune.likelihood import likelihood_kind, log_likelihood, output_of


def test_kinds_from_outputs_and_labels():
    probs = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert likelihood_kind(probs, "classes") == "probs"
    assert likelihood_kind(np.array([[2.0, -1.0]]), "classes") == "logits"
    assert likelihood_kind(np.array([[0.3], [0.9]]), "classes") == "binary_probs"
    assert likelihood_kind(np.array([[3.0], [-2.0]]), "classes") == "binary_logits"
    assert likelihood_kind(probs, "continuous") == "gaussian"


def test_log_likelihood_of_given_and_sampled_labels():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], "float32")
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    given = float(ops.convert_to_numpy(log_likelihood(logits, "logits", None, np.array([0, 1]))))
    assert given == pytest.approx(logp[0, 0] + logp[1, 1], rel=1e-5)
    probs = np.exp(logp).astype("float32")
    same = float(ops.convert_to_numpy(log_likelihood(probs, "probs", None, np.array([0, 1]))))
    assert same == pytest.approx(given, rel=1e-4)
    # Inverse-CDF sampling: u below the first class's probability picks class 0, etc.
    u = np.array([0.01, 0.99], "float32")
    sampled = float(ops.convert_to_numpy(log_likelihood(logits, "logits", u, None)))
    assert sampled == pytest.approx(logp[0, 0] + logp[1, 2], rel=1e-5)
    out = np.array([[1.0], [2.0]], "float32")
    gauss = float(ops.convert_to_numpy(log_likelihood(out, "gaussian", None, np.array([[1.5],
                                                                                       [2.0]]))))
    assert gauss == pytest.approx(-0.5 * 0.25)


def test_output_of_multi_output_models():
    assert output_of({"a": 1, "b": 2}, "b") == 2 and output_of({"a": 1, "b": 2}, None) == 1
    assert output_of([1, 2], 1) == 2 and output_of((1, 2), None) == 1 and output_of(3, None) == 3


def test_resolve_output_names_indices_and_errors():
    import keras

    import keras_ibprune as kib
    from keras_ibprune.likelihood import resolve_output

    inp = keras.Input((3,))
    a, b = keras.layers.Dense(2, name="a")(inp), keras.layers.Dense(1, name="b")(inp)
    listed, keyed = keras.Model(inp, [a, b]), keras.Model(inp, {"p": a, "q": b})
    assert resolve_output(listed, "b") == 1 and resolve_output(listed, 0) == 0
    assert resolve_output(kib.prune(listed), "b") == 1  # the wrapped layer's name works
    assert resolve_output(keyed, "q") == "q" and resolve_output(keyed, 1) == "q"
    assert resolve_output(listed, None) is None
    with pytest.raises(ValueError, match=r"names none of the model's outputs \['a', 'b'\]"):
        resolve_output(listed, "c")
    with pytest.raises(ValueError, match="index below 2"):
        resolve_output(listed, 2)
    with pytest.raises(ValueError, match=r"outputs \['p', 'q'\]"):
        resolve_output(keyed, "a")
    with pytest.raises(ValueError, match="pass `output=` as an index"):
        output_of([1, 2], "b")
