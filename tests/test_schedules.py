import keras
import numpy as np
import pytest

import keras_ibprune as kib
from keras_ibprune import schedules

pytestmark = pytest.mark.jax  # also runs on the JAX backend (.ci/run)


@pytest.mark.parametrize("begin,end", [(0, 4), (1, 4), (2, 5), (0, 3), (3, 10)])
def test_polynomial_reaches_final_exactly_at_end_of_epoch_end_minus_1(begin, end):
    s = kib.PolynomialDecay(0.1, 0.9, begin_epoch=begin, end_epoch=end)
    # Progress t = epoch + 1 at the end of `epoch`.
    assert s(end - 1 + 1) == 0.9
    assert s(end + 5) == 0.9
    assert s(begin) == pytest.approx(0.1)
    values = [s(t) for t in range(begin + 1, end + 1)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # tfmot semantics: the first update is at t = begin (begin_step), applying s_i.
    assert [s.is_update(t) for t in range(0, end + 3)] == [
        begin <= t <= end for t in range(0, end + 3)
    ]


def test_polynomial_formula():
    s = kib.PolynomialDecay(0.0, 0.8, 0, 4, power=3)
    assert s(2) == pytest.approx(0.8 * (1 - 0.5**3))


def test_constant_and_one_shot():
    c = kib.ConstantSparsity(0.5, begin_epoch=1, end_epoch=3)
    assert [c(t) for t in (0, 1, 2, 5)] == [0.0, 0.5, 0.5, 0.5]
    assert [c.is_update(t) for t in (0, 1, 2, 3, 4)] == [False, True, True, True, False]
    o = kib.OneShot(0.7, epoch=2)
    assert [o.is_update(t) for t in range(6)] == [False, False, False, True, False, False]
    assert o(3) == 0.7 and o(2) == 0.0


def test_iterative_cycles_prune_same_fraction_of_what_remains():
    s = kib.Iterative(0.875, cycles=3, epochs_per_cycle=2)
    updates = [t for t in range(0, 10) if s.is_update(t)]
    assert updates == [2, 4, 6]
    dens = [1 - s(t) for t in updates]
    np.testing.assert_allclose(dens, [0.5, 0.25, 0.125])


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: kib.PolynomialDecay(0.0, 1.0, 0, 4),
            "final_sparsity.*Received: final_sparsity=1.0",
        ),
        (lambda: kib.PolynomialDecay(-0.1, 0.5, 0, 4), "initial_sparsity"),
        (lambda: kib.PolynomialDecay(0.0, 0.5, 3, 3), "end_epoch.*greater than.*begin_epoch"),
        (lambda: kib.ConstantSparsity(0.5, 2, 1), "end_epoch"),
        (lambda: kib.ConstantSparsity(1.5), "sparsity"),
        (lambda: kib.OneShot(0.5, epoch=-1), "epoch"),
        (lambda: kib.Iterative(0.5, cycles=0), "cycles"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_not_a_schedule():
    with pytest.raises(ValueError, match="needs its target sparsity.*Received: schedule='poly'"):
        schedules.get("poly")
    with pytest.raises(ValueError, match="must be a keras_ibprune.schedules.Schedule"):
        schedules.get(3)
    with pytest.raises(ValueError, match="does not describe a Schedule"):
        schedules.deserialize(keras.saving.serialize_keras_object(kib.MagnitudeScore()))
    with pytest.raises(ValueError, match="Schedule"):
        kib.IBPruning(schedule=[0.5])


@pytest.mark.parametrize(
    "s",
    [
        kib.PolynomialDecay(0.0, 0.9, 1, 5, power=2),
        kib.ConstantSparsity(0.3, 1, 4),
        kib.OneShot(0.5, 2),
        kib.Iterative(0.9, 4, 2, 1),
    ],
)
def test_schedule_serialization_round_trip(s):
    restored = schedules.deserialize(schedules.serialize(s))
    assert schedules.get(schedules.serialize(s)).get_config() == s.get_config()
    assert type(restored) is type(s) and restored.get_config() == s.get_config()
    assert [restored(t) for t in range(8)] == [s(t) for t in range(8)]


def test_custom_schedule_subclass():
    class Half(kib.Schedule):
        def __call__(self, t):
            return 0.5

        def get_config(self):
            return {}

    assert schedules.get(Half()).final_sparsity == 0.5


def test_tfmot_schedule_is_accepted(monkeypatch):
    # tfmot sets TF_USE_LEGACY_KERAS=1 when imported; keep that out of the other tests.
    monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    sched = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=40, frequency=10)
    s = schedules.get(sched, steps_per_epoch=10)
    assert s(4) == pytest.approx(0.8)
    assert s.is_update(1)


@pytest.mark.parametrize("spe,begin,end,freq", [(4, 2, 6, 4), (5, 1, 3, 5), (3, 0, 2, 3)])
def test_polynomial_matches_tfmot_at_epoch_boundaries(spe, begin, end, freq):
    """Same updates and targets as tfmot's step schedule with frequency = steps per epoch."""
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    ref = tfmot.sparsity.keras.PolynomialDecay(
        0.2, 0.8, begin_step=begin * spe, end_step=end * spe, frequency=freq)
    ours = kib.PolynomialDecay(0.2, 0.8, begin, end)
    for epoch_t in range(0, end + 3):
        should, target = ref(np.int64(epoch_t * spe))
        assert ours.is_update(epoch_t) == bool(should), epoch_t
        if bool(should):
            assert ours(epoch_t) == pytest.approx(float(target), abs=1e-6), epoch_t
