"""Mask layouts: block sizes and N:M patterns are checked with clear errors."""

import keras
import pytest

from keras_ibprune.wrapper import PruneWrapper

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)

L = keras.layers


@pytest.mark.parametrize("pattern", ["4:4", "0:2", "2", (3,), "a:b"])
def test_bad_pattern_is_a_clear_error(pattern):
    with pytest.raises(ValueError, match="N:M sparsity.*Received: pattern="):
        PruneWrapper(L.Dense(4), pattern=pattern)
    with pytest.raises(ValueError, match="granularity='weight' without"):
        PruneWrapper(L.Dense(4), granularity="channel", pattern="2:4")
