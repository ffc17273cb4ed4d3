"""Sparsity schedules: training progress (in epochs) -> target sparsity.

A schedule is evaluated at *progress* ``t``: the number of epochs completed, as a float
(``t = 0`` when training starts, ``t = epoch + 1`` at the end of epoch ``epoch``; with
``update_every=N`` steps, fractions in between). ``schedule(t)`` is the target sparsity and
``schedule.is_update(t)`` says whether masks are recomputed at ``t``. As in tfmot, the
first update of `ConstantSparsity` and `PolynomialDecay` happens at ``t = begin_epoch``
(tfmot's ``begin_step``): before the first training step when ``begin_epoch=0``.
Subclass `Schedule` for your own.

Example:

```python
s = kib.PolynomialDecay(0.0, 0.9, begin_epoch=0, end_epoch=4)
[round(s(t), 3) for t in range(0, 6)]   # [0.0, 0.52, 0.788, 0.886, 0.9, 0.9]
```
"""

from __future__ import annotations

import math

import keras

_EPS = 1e-9


def _check_sparsity(name, value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0.0 <= v < 1.0):
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return v


def _check_epoch(name, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int. Received: {name}={value!r}")
    return value


class Schedule:
    """Base class: maps training progress `t` (completed epochs, float) to sparsity.

    Subclasses implement `__call__(t) -> float` and may override `is_update(t)`
    (default: update whenever `t` lies in the active window `[begin, end]`).
    """

    begin_epoch = 0
    end_epoch = None

    def __call__(self, t: float) -> float:
        raise NotImplementedError

    def is_update(self, t: float) -> bool:
        """Whether masks are recomputed at progress `t`."""
        if t < self.begin_epoch - _EPS:
            return False
        return self.end_epoch is None or t <= self.end_epoch + _EPS

    @property
    def final_sparsity(self) -> float:
        return self(1e9)

    def get_config(self):
        raise NotImplementedError

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_ibprune")
class ConstantSparsity(Schedule):
    """Holds `sparsity` from progress `begin_epoch` on (tfmot's `ConstantSparsity`).

    The first update is at `t = begin_epoch`: before the first training step for
    `begin_epoch=0` (prune a pretrained model, then fine-tune), at the end of epoch
    `begin_epoch - 1` otherwise. Masks are recomputed at every update in
    `[begin_epoch, end_epoch]` (on, when `end_epoch` is None); with the default monotone
    masks the level stays and nothing regrows. To train a fresh model a while before
    pruning it, set `begin_epoch >= 1` or use `PolynomialDecay`.

    Args:
        sparsity: target fraction of zero weights, in [0, 1).
        begin_epoch: completed epochs at which the first update happens (0 = at the start).
        end_epoch: last progress point at which masks change (None: never stop).
    """

    def __init__(self, sparsity, begin_epoch=0, end_epoch=None):
        self.sparsity = _check_sparsity("sparsity", sparsity)
        self.begin_epoch = _check_epoch("begin_epoch", begin_epoch)
        self.end_epoch = _check_epoch("end_epoch", end_epoch, allow_none=True)
        if self.end_epoch is not None and self.end_epoch <= self.begin_epoch:
            raise ValueError(
                "`end_epoch` must be greater than `begin_epoch`. Received: "
                f"begin_epoch={begin_epoch}, end_epoch={end_epoch}"
            )

    def __call__(self, t):
        return self.sparsity if t >= self.begin_epoch - _EPS else 0.0

    def get_config(self):
        return {
            "sparsity": self.sparsity,
            "begin_epoch": self.begin_epoch,
            "end_epoch": self.end_epoch,
        }


@keras.saving.register_keras_serializable(package="keras_ibprune")
class PolynomialDecay(Schedule):
    """Gradual pruning (Zhu & Gupta, 2017): sparsity rises polynomially, then holds.

    `s(t) = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** power` for
    `begin <= t <= end`; `s_i` before, `s_f` after. Updates happen at every progress point
    in `[begin, end]`, as in tfmot: the first one, at `t = begin_epoch`, applies
    `initial_sparsity` (before the first step when `begin_epoch=0`). With per-epoch updates
    the final sparsity is reached **exactly** at the end of epoch `end_epoch - 1` and held
    after.

    Args:
        initial_sparsity: sparsity applied at `begin_epoch`, in [0, 1).
        final_sparsity: sparsity from `end_epoch` on, in [0, 1).
        begin_epoch: completed epochs at which the first update happens (tfmot's
            `begin_step / steps_per_epoch`).
        end_epoch: progress at which `final_sparsity` is reached; > `begin_epoch`.
        power: exponent of the decay (3 in Zhu & Gupta).
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_epoch, end_epoch, power=3):
        self.initial_sparsity = _check_sparsity("initial_sparsity", initial_sparsity)
        self._final = _check_sparsity("final_sparsity", final_sparsity)
        self.begin_epoch = _check_epoch("begin_epoch", begin_epoch)
        self.end_epoch = _check_epoch("end_epoch", end_epoch)
        if self.end_epoch <= self.begin_epoch:
            raise ValueError(
                "`end_epoch` must be greater than `begin_epoch`. Received: "
                f"begin_epoch={begin_epoch}, end_epoch={end_epoch}"
            )
        if not (isinstance(power, (int, float)) and power > 0):
            raise ValueError(f"`power` must be a positive number. Received: power={power!r}")
        self.power = power

    def __call__(self, t):
        if t <= self.begin_epoch:
            return self.initial_sparsity
        p = min(1.0, (t - self.begin_epoch) / (self.end_epoch - self.begin_epoch))
        if p >= 1.0 - _EPS:
            return self._final
        si, sf = self.initial_sparsity, self._final
        return sf + (si - sf) * (1.0 - p) ** self.power

    def is_update(self, t):
        # Keep re-ranking after the ramp? No: hold the final masks (tfmot semantics).
        return self.begin_epoch - _EPS <= t <= self.end_epoch + _EPS

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self._final,
            "begin_epoch": self.begin_epoch,
            "end_epoch": self.end_epoch,
            "power": self.power,
        }


@keras.saving.register_keras_serializable(package="keras_ibprune")
class OneShot(Schedule):
    """Prunes once, to `sparsity`, at the end of epoch `epoch` (0-based).

    Args:
        sparsity: target sparsity in [0, 1).
        epoch: the epoch whose end applies the pruning (default 0). Use with a
            pretrained model to prune first and fine-tune after.
    """

    def __init__(self, sparsity, epoch=0):
        self.sparsity = _check_sparsity("sparsity", sparsity)
        self.epoch = _check_epoch("epoch", epoch)
        self.begin_epoch = self.epoch
        self.end_epoch = self.epoch + 1

    def __call__(self, t):
        return self.sparsity if t >= self.epoch + 1 - _EPS else 0.0

    def is_update(self, t):
        return abs(t - (self.epoch + 1)) < _EPS

    def get_config(self):
        return {"sparsity": self.sparsity, "epoch": self.epoch}


@keras.saving.register_keras_serializable(package="keras_ibprune")
class Iterative(Schedule):
    """Prune -> retrain cycles (Han et al., 2015; Frankle & Carbin, 2019).

    Each of `cycles` cycles trains `epochs_per_cycle` epochs, then prunes the same
    fraction of the remaining weights, so that after cycle `k` the density is
    `(1 - final_sparsity) ** (k / cycles)`.

    Args:
        final_sparsity: sparsity after the last cycle, in [0, 1).
        cycles: number of pruning steps (>= 1).
        epochs_per_cycle: epochs of (re)training before each pruning step (>= 1).
        begin_epoch: epochs trained before the first cycle starts.
    """

    def __init__(self, final_sparsity, cycles=3, epochs_per_cycle=1, begin_epoch=0):
        self._final = _check_sparsity("final_sparsity", final_sparsity)
        for name, v in (("cycles", cycles), ("epochs_per_cycle", epochs_per_cycle)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1. Received: {name}={v!r}")
        self.cycles = cycles
        self.epochs_per_cycle = epochs_per_cycle
        self.begin_epoch = _check_epoch("begin_epoch", begin_epoch)
        self.end_epoch = self.begin_epoch + cycles * epochs_per_cycle

    def _cycle(self, t):
        k = math.floor((t - self.begin_epoch) / self.epochs_per_cycle + _EPS)
        return max(0, min(self.cycles, k))

    def __call__(self, t):
        k = self._cycle(t)
        return 1.0 - (1.0 - self._final) ** (k / self.cycles)

    def is_update(self, t):
        if not (self.begin_epoch + _EPS < t <= self.end_epoch + _EPS):
            return False
        r = (t - self.begin_epoch) / self.epochs_per_cycle
        return abs(r - round(r)) < 1e-6

    def get_config(self):
        return {
            "final_sparsity": self._final,
            "cycles": self.cycles,
            "epochs_per_cycle": self.epochs_per_cycle,
            "begin_epoch": self.begin_epoch,
        }


class _TfmotSchedule(Schedule):
    """Adapts a tfmot (step-based) `PruningSchedule` to progress in epochs."""

    def __init__(self, schedule, steps_per_epoch):
        self.schedule = schedule
        self.steps_per_epoch = int(steps_per_epoch)
        self.begin_epoch = 0
        self.end_epoch = None

    def _eval(self, t):
        step = int(round(t * self.steps_per_epoch))
        should, sparsity = self.schedule(step)
        return bool(should), float(sparsity)

    def __call__(self, t):
        return self._eval(t)[1]

    def is_update(self, t):
        return self._eval(t)[0] or self._eval(t)[1] > 0

    def get_config(self):
        return {"steps_per_epoch": self.steps_per_epoch}


def _is_tfmot_schedule(obj):
    mod = type(obj).__module__ or ""
    return mod.startswith("tensorflow_model_optimization") and callable(obj)


def serialize(schedule):
    """Keras config of a `Schedule` (see `keras.saving.serialize_keras_object`)."""
    return keras.saving.serialize_keras_object(schedule)


def deserialize(config):
    """A `Schedule` from `serialize`'s output."""
    obj = keras.saving.deserialize_keras_object(config)
    if not isinstance(obj, Schedule):
        raise ValueError(f"The config does not describe a Schedule. Received: config={config!r}")
    return obj


def get(identifier, steps_per_epoch=None):
    """Returns a `Schedule` from a schedule, a config dict, a float or a tfmot schedule.

    A float `s` means `ConstantSparsity(s)`. A bare name cannot say which sparsity to reach,
    so strings are rejected with a pointer to the classes.
    """
    if isinstance(identifier, Schedule):
        return identifier
    if isinstance(identifier, float):
        return ConstantSparsity(identifier)
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if _is_tfmot_schedule(identifier):
        if not steps_per_epoch:
            raise ValueError(
                "A tfmot PruningSchedule counts steps; pass `steps_per_epoch` (or fit with a "
                f"known number of steps per epoch). Received: steps_per_epoch={steps_per_epoch}"
            )
        return _TfmotSchedule(identifier, steps_per_epoch)
    if isinstance(identifier, str):
        raise ValueError(
            "A schedule needs its target sparsity: pass e.g. `kib.PolynomialDecay(0.0, 0.9, "
            "0, 4)`, `kib.ConstantSparsity(0.9)` or the float 0.9. Received: "
            f"schedule={identifier!r}"
        )
    raise ValueError(
        "`schedule` must be a keras_ibprune.schedules.Schedule (ConstantSparsity, "
        "PolynomialDecay, OneShot, Iterative, or a subclass), a float sparsity, a config dict "
        f"or a tfmot PruningSchedule. Received: schedule={identifier!r}"
    )
