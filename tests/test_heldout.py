import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_ibprune as kib
from keras_ibprune import heldout as S

L = keras.layers


def _cnn():
    inp = keras.Input((9, 9, 2))
    h = L.Conv2D(4, 3, activation="relu", name="conv")(inp)
    out = L.Dense(3, activation="softmax", name="out")(L.Flatten()(h))
    return kib.prune(keras.Model(inp, out))


def _xy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 9, 9, 2)).astype("float32"), np.arange(n) % 3


def test_held_out_arrays_from_arrays_dataset_and_generator():
    model = _cnn()
    x, y = _xy(50)
    xa, ya = S.held_out_arrays((x, y), size=32, model=model)
    assert xa.shape == (32, 9, 9, 2) and ya.shape == (32,)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    xb, yb = S.held_out_arrays(ds.batch(8), size=20, model=model)
    np.testing.assert_array_equal(xb, x[:20])
    xc, yc = S.held_out_arrays(ds, size=20, model=model)  # unbatched elements
    np.testing.assert_array_equal(yc, y[:20])

    def gen():
        for i in range(0, 50, 10):
            yield x[i : i + 10], y[i : i + 10]

    xd, _ = S.held_out_arrays(gen(), size=25, model=model)
    assert len(xd) == 25
    xe, ye = S.held_out_arrays(x, size=10)
    assert ye is None and len(xe) == 10


def test_infinite_dataset_and_generator_are_capped():
    x, y = _xy(8)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(4)
    xa, _ = S.held_out_arrays(ds, size=30)
    assert len(xa) == 30

    def forever():
        for i in itertools.count():
            yield x[i % 8 : i % 8 + 1], y[i % 8 : i % 8 + 1]

    xb, _ = S.held_out_arrays(forever(), size=12)
    assert len(xb) == 12


def test_bad_held_out_data():
    model = _cnn()
    x, y = _xy()
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Held-out x contains NaN.*sample 3"):
        S.held_out_arrays((bad, y), model=model)
    with pytest.raises(ValueError, match="Held-out y contains NaN"):
        S.held_out_arrays((x, np.full(len(x), np.inf)), model=model)
    with pytest.raises(ValueError, match=r"same number of samples.*len\(x\)=40, len\(y\)=39"):
        S.held_out_arrays((x, y[:-1]))
    with pytest.raises(ValueError, match=r"does not fit.*held-out x.shape=\(40, 8, 8, 2\)"):
        S.held_out_arrays((x[:, :8, :8], y), model=model)
    with pytest.raises(ValueError, match="empty"):
        S.held_out_arrays(iter([]))
    with pytest.raises(ValueError, match="held_out_size"):
        S.held_out_arrays((x, y), size=1)


def test_multi_output_targets_need_output():
    x, y = _xy()
    with pytest.raises(ValueError, match="pass `output=`"):
        S.held_out_arrays((x, [y, y]))
    _, picked = S.held_out_arrays((x, {"a": y, "b": y + 1}), output="b")
    np.testing.assert_array_equal(picked, y + 1)
    _, first = S.held_out_arrays((x, [y, -y]), output=1)
    np.testing.assert_array_equal(first, -y)


def test_check_labels():
    with pytest.raises(ValueError, match="single class.*label-free mode"):
        S.check_labels(np.zeros(10, int))
    with pytest.raises(ValueError, match=r"at least 2 samples.*classes \[2\]"):
        S.check_labels(np.array([0, 0, 1, 1, 2]))
    S.check_labels(np.array([0.1, 0.5, 0.3]))  # regression targets: nothing to check
    S.check_labels(np.eye(3)[[0, 1, 2, 0, 1, 2]])


# ------------------------------------------------------------- several inputs
def _two_input_model(dict_inputs=True):
    ids = keras.Input((6,), dtype="int32", name="token_ids")
    num = keras.Input((3,), name="numeric")
    e = L.GlobalAveragePooling1D()(L.Embedding(20, 4, name="emb")(ids))
    z = L.Concatenate()([e, L.Dense(4, name="num_fc")(num)])
    out = L.Dense(2, activation="softmax", name="cls")(z)
    inputs = {"token_ids": ids, "numeric": num} if dict_inputs else [ids, num]
    return keras.Model(inputs, out)


def _two_inputs(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return ({"token_ids": rng.integers(0, 20, (n, 6)).astype("int32"),
             "numeric": rng.normal(size=(n, 3)).astype("float32")}, np.arange(n) % 2)


@pytest.mark.parametrize("dict_inputs", [True, False])
def test_several_inputs_from_dicts_lists_datasets_and_generators(dict_inputs):
    model = _two_input_model(dict_inputs)
    x, y = _two_inputs(30)
    xa, ya = S.held_out_arrays((x, y), size=20, model=model)
    assert set(xa) == {"token_ids", "numeric"} and len(ya) == 20
    assert xa["token_ids"].shape == (20, 6) and xa["token_ids"].dtype == np.int32
    np.testing.assert_array_equal(xa["numeric"], x["numeric"][:20])  # capped together
    if not dict_inputs:  # a list in the model's input order
        xl, _ = S.held_out_arrays(([x["token_ids"], x["numeric"]], y), size=20, model=model)
        np.testing.assert_array_equal(xl["token_ids"], xa["token_ids"])
    else:  # a list is ambiguous for a model built on a dict
        with pytest.raises(ValueError, match="takes a dict of inputs"):
            S.held_out_arrays(([x["token_ids"], x["numeric"]], y), model=model)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    for data in (ds, ds.batch(7)):  # unbatched and batched elements
        xd, yd = S.held_out_arrays(data, size=17, model=model)
        assert xd["numeric"].shape == (17, 3) and len(yd) == 17
        np.testing.assert_array_equal(xd["token_ids"], x["token_ids"][:17])

    def gen():
        for i in range(0, 30, 10):
            yield {k: v[i : i + 10] for k, v in x.items()}, y[i : i + 10]

    xg, _ = S.held_out_arrays(gen(), size=25, model=model)
    assert xg["token_ids"].shape == (25, 6)
    # float-coded ids are fine when whole; they become the input's integer dtype
    xf, _ = S.held_out_arrays(({**x, "token_ids": x["token_ids"].astype("float32")}, y),
                              model=model)
    assert xf["token_ids"].dtype == np.int32


def test_several_inputs_errors_are_clear():
    model = _two_input_model()
    x, y = _two_inputs(30)
    with pytest.raises(ValueError, match=r"keyed by the model's input names.*missing "
                                         r"\['numeric'\], unknown \['num'\]"):
        S.held_out_arrays(({"token_ids": x["token_ids"], "num": x["numeric"]}, y), model=model)
    with pytest.raises(ValueError, match=r"same number of samples.*'numeric': 29"):
        S.held_out_arrays(({**x, "numeric": x["numeric"][:29]}, y), model=model)
    with pytest.raises(ValueError, match=r"has 2 inputs: pass held-out x as a dict"):
        S.held_out_arrays((x["numeric"], y), model=model)
    with pytest.raises(ValueError, match=r"one array per model input \(2"):
        S.held_out_arrays(([x["numeric"]] * 3, y), model=_two_input_model(False))
    with pytest.raises(ValueError, match=r"held-out x\['numeric'\] does not fit.*\(30, 4\)"):
        S.held_out_arrays(({**x, "numeric": np.zeros((30, 4), "float32")}, y), model=model)
    with pytest.raises(ValueError, match=r"integer input 'token_ids'.*expected integer ids"):
        S.held_out_arrays(({**x, "token_ids": x["token_ids"] + 0.5}, y), model=model)
    with pytest.raises(ValueError, match=r"x\['numeric'\] contains NaN.*sample 4"):
        bad = x["numeric"].copy()
        bad[4, 1] = np.nan
        S.held_out_arrays(({**x, "numeric": bad}, y), model=model)
    with pytest.raises(ValueError, match=r"len\(x\)=30, len\(y\)=29"):
        S.held_out_arrays((x, y[:29]), model=model)


def test_output_names_of_list_outputs_select_targets():
    inp = keras.Input((3,), name="x")
    model = keras.Model(inp, [L.Dense(2, name="a")(inp), L.Dense(1, name="b")(inp)])
    x = np.zeros((10, 3), "float32")
    _, picked = S.held_out_arrays((x, [np.arange(10), -np.arange(10)]), model=model,
                                  output="b")
    np.testing.assert_array_equal(picked, -np.arange(10))
    with pytest.raises(ValueError, match=r"names none of the model's outputs \['a', 'b'\]"):
        S.held_out_arrays((x, [np.arange(10)] * 2), model=model, output="c")


def test_a_list_of_inputs_without_a_model_is_keyed_by_position():
    x, y = S.held_out_arrays(([np.ones((10, 3)), np.zeros((10, 2))], np.arange(10) % 2), 6)
    assert sorted(x) == [0, 1] and x[0].shape == (6, 3) and x[1].shape == (6, 2)
    assert y.shape == (6,)
