"""Shared benchmark helpers: data sets (MNIST test split, scikit-learn digits) and models.

MNIST: the 10,000-image MNIST test set in IDX format, looked up relative to the repository
as ``../shared/data/mnist-t10k`` (or ``$KIB_MNIST_DIR``), split with a fixed seed into
8,000 training and 2,000 test images. Optional: when absent, `load("mnist")` raises and
the benchmarks fall back to scikit-learn's 8x8 digits (1,797 images, 1,437 / 360 split).

`splits(name)` is the protocol every accuracy benchmark uses: the training part split
again into train and **validation** (MNIST 7,000 / 1,000; digits 1,077 / 360), the test part
untouched. Held-out batches and every choice come from validation; test is reported once.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = pathlib.Path(os.environ.get("KIB_MNIST_DIR", REPO.parent / "shared/data/mnist-t10k"))


def _read_idx(path, header, shape):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw[header:], dtype=np.uint8).reshape(shape)


def mnist_available():
    return (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


def load_mnist(n_train=8000, seed=0):
    """MNIST test set split into `n_train` / `10000 - n_train` with `seed`; x in [0, 1]."""
    if not mnist_available():
        raise FileNotFoundError(f"MNIST IDX files not found in {MNIST_DIR}")
    x = _read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz", 16, (10000, 28, 28, 1))
    y = _read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz", 8, (10000,))
    order = np.random.default_rng(seed).permutation(len(x))
    x = x[order].astype("float32") / 255.0
    y = y[order].astype("int64")
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def load_digits(seed=0):
    """scikit-learn 8x8 digits, `(n, 8, 8, 1)` in [0, 1], 80 / 20 split with `seed`."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    x = (d.images / 16.0).astype("float32")[..., None]
    y = d.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n = int(0.8 * len(x))
    return (x[:n], y[:n]), (x[n:], y[n:])


VAL_SIZE = {"mnist": 1000, "digits": 360}


def splits(name, seed=0):
    """`(train, val, test)` pairs of `(x, y)`: validation is the end of the training part."""
    (x, y), test = load(name, seed=seed)
    n = len(x) - VAL_SIZE[name]
    return (x[:n], y[:n]), (x[n:], y[n:]), test


def load(name, seed=0):
    if name == "mnist":
        return load_mnist(seed=seed)
    if name == "digits":
        return load_digits(seed=seed)
    raise ValueError(f"Unknown data set. Expected 'mnist' or 'digits'. Received: {name!r}")


def lenet5(input_shape, num_classes=10, lib=None):
    """LeNet-5-Caffe: conv20(5x5)-pool-conv50(5x5)-pool-fc500-fc10 (431k weights on MNIST).

    `lib` is the Keras module to build with (`keras` by default, `tf_keras` for tfmot).
    Small inputs (8x8 digits) use 'same' padding so that both convolutions fit.
    """
    if lib is None:
        import keras as lib
    L = lib.layers
    pad = "valid" if input_shape[0] >= 28 else "same"
    return lib.Sequential(
        [
            lib.Input(shape=input_shape),
            L.Conv2D(20, 5, padding=pad, activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Conv2D(50, 5, padding=pad, activation="relu", name="conv2"),
            L.MaxPooling2D(2, name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(500, activation="relu", name="fc1"),
            L.Dense(num_classes, activation="softmax", name="fc2"),
        ],
        name="lenet5_caffe",
    )


def lenet300(input_shape, num_classes=10, lib=None):
    """LeNet-300-100: fc300-fc100-fc10 on flattened images (266k weights on MNIST)."""
    if lib is None:
        import keras as lib
    L = lib.layers
    return lib.Sequential(
        [
            lib.Input(shape=input_shape),
            L.Flatten(name="flatten"),
            L.Dense(300, activation="relu", name="fc1"),
            L.Dense(100, activation="relu", name="fc2"),
            L.Dense(num_classes, activation="softmax", name="fc3"),
        ],
        name="lenet_300_100",
    )


MODELS = {"lenet5": lenet5, "lenet300": lenet300}


def build(name, input_shape, num_classes=10, lib=None):
    if name not in MODELS:
        raise ValueError(f"Unknown model. Expected one of {sorted(MODELS)}. Received: {name!r}")
    return MODELS[name](input_shape, num_classes, lib=lib)
