import os

import keras
import pytest


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}, cpus {os.cpu_count()}"


def pytest_collection_modifyitems(config, items):
    """On a backend other than TensorFlow, run only the tests marked `jax`; skip the rest.

    The suite is written for the TensorFlow backend (TFLite export, `tf.data`, distribution
    strategies, tf_keras files); `@pytest.mark.jax` marks the tests that hold on the JAX
    backend too. `KERAS_BACKEND=jax python -m pytest -m jax` runs them (as .ci/run does);
    without `-m jax` every other test is reported as skipped, with the reason.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(
        reason=f"TensorFlow-backend test (not marked `jax`); KERAS_BACKEND={backend}"
    )
    for item in items:
        if item.get_closest_marker("jax") is None:
            item.add_marker(skip)
