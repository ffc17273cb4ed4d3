"""`IBPruning`: the Keras callback that runs a `Pruner` inside `model.fit`.

The callback owns only *when* to update (epoch ends or every N steps) and what to log;
everything else — validation, statistics, scores, allocation, masks — is the `Pruner`'s,
and its constructor arguments are accepted here unchanged.
"""

from __future__ import annotations

import math
import sys
import warnings

import keras

from keras_ibprune import stats as stats_lib
from keras_ibprune.pruner import Pruner

LAYER_LOGS = ("history", "epoch")


@keras.saving.register_keras_serializable(package="keras_ibprune")
class IBPruning(keras.callbacks.Callback):
    """Keras callback that prunes the `PruneWrapper`s of the model during `fit`.

    Masks update at epoch ends (`update_every="epoch"`) or exactly every `N` training
    steps (`update_every=N`, counted over the whole fit, epoch ends not included; a schedule
    point between two such steps — `OneShot`, an `Iterative` cycle end, the end of a
    `PolynomialDecay` ramp — is applied at the next one; with `steps_per_execution=k`, at
    the first reported step at or after each multiple of N), following the schedule; a
    schedule starting at `begin_epoch=0` also updates once before the first step (tfmot's
    step 0). A subclassed model that Keras builds lazily inside `fit` needs no
    manual build: the callback starts after the first step. A warning says when the fit's
    epochs cannot reach the schedule's final sparsity (at train begin and end). The epoch
    logs get `sparsity` (the fraction of zeros over the *pruned* tensors, as scheduled; the
    figure `kib.sparsity_summary` shows is over all the model's weights, pruned or not),
    the targets' and VIB gates' totals; per-layer entries (`sparsity/<layer>`,
    `I_TY/<layer>`, `vib/alpha/<layer>`...) go to `model.history` (the `History` that
    `fit` returns) by default, so that the progress bar stays readable, or into the epoch
    logs with `layer_logs="epoch"` (for CSVLogger and TensorBoard). The masks live in the
    model, so saving mid-way (or `BackupAndRestore`) and fitting on with `initial_epoch`
    resumes the schedule exactly.

    Args:
        schedule: a `Schedule` (e.g. `PolynomialDecay(0.0, 0.9, 0, 4)`), a float
            (constant sparsity), or a tfmot `PruningSchedule`.
        update_every: `"epoch"` or an int number of training steps.
        log_information: also log ``I_TY/<layer>`` and ``I_XT/<layer>`` (nats) every epoch
            for `kib.plot_information_plane(history)`; costs one statistics pass on epochs
            without a mask update.
        layer_logs: where per-layer entries go: `"history"` (only `model.history`, kept
            off the progress bar) or `"epoch"` (the epoch logs every later callback sees:
            the progress bar, CSVLogger, TensorBoard).
        **pruner_kwargs: every other `Pruner` argument: `score`, `allocation`, `held_out`
            (from validation data), `held_out_size`, `min_density`, `regrow`, `verbose`,
            `output`, `exclude`, `keep_connected`, `target`, `min_width`, `round_to`.

    Example:

    ```python
    pruned = kib.prune(model)
    pruned.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.9, begin_epoch=0, end_epoch=4),
                       held_out=(x_val[:1024], y_val[:1024]))
    pruned.fit(x, y, epochs=6, callbacks=[cb])
    ```
    """

    def __init__(self, schedule, update_every="epoch", log_information=False,
                 layer_logs="history", **pruner_kwargs):
        super().__init__()
        if layer_logs not in LAYER_LOGS:
            raise ValueError(
                f"`layer_logs` must be one of {LAYER_LOGS}. Received: layer_logs={layer_logs!r}"
            )
        self.layer_logs = layer_logs
        if not (update_every == "epoch" or (isinstance(update_every, int)
                                            and not isinstance(update_every, bool)
                                            and update_every >= 1)):
            raise ValueError(
                "`update_every` must be 'epoch' or a positive int number of steps. "
                f"Received: update_every={update_every!r}"
            )
        self.update_every = update_every
        # `fit` under a multi-worker strategy fails inside Keras before any callback runs;
        # a callback created in the strategy's scope can still say so, with the way out.
        _check_strategy(None)
        self.pruner = Pruner(None, schedule, log_information=log_information, _stacklevel=3,
                             **pruner_kwargs)  # validates every argument now
        self._steps = None
        self._epochs = None
        self._epoch = 0
        self._first_epoch = None
        self._ready = False
        self._last_step, self._last_t = 0, None

    @property
    def log_information(self):
        return self.pruner.log_information

    @property
    def schedule(self):
        return self.pruner.schedule

    @property
    def score(self):
        return self.pruner.score

    def on_train_begin(self, logs=None):
        params = self.params or {}
        self._steps = params.get("steps")
        self._epochs = params.get("epochs")
        self._epoch = 0
        self._first_epoch = None
        self._ready = False
        self._last_step, self._last_t = 0, None
        self.pruner.model = self.model
        _check_strategy(self.model)
        if self.update_every != "epoch" and not self._steps:
            warnings.warn(
                f"IBPruning: update_every={self.update_every} needs the number of steps per "
                "epoch, which this fit does not know (a dataset of unknown length): masks "
                "update at epoch ends instead. Pass `steps_per_epoch` to `fit` to get updates "
                "every N steps.", stacklevel=2)
        if self._wrappers_built():
            self._start()
        # else: a subclassed model that Keras builds inside its first training step; the
        # pruner starts at the end of that step (`on_train_batch_end`).

    def _wrappers_built(self):
        wrappers = stats_lib.find_wrappers(self.model)
        return not wrappers or all(w.built and w._masks_built for w in wrappers)

    def _start(self):
        self.pruner.reset(steps_per_epoch=self._steps)
        self._ready = True
        self._warn_unreachable()

    def _step_updates(self):
        return self.update_every != "epoch" and bool(self._steps)

    def _grid(self, t_end):
        """Progress points at which this callback evaluates the schedule, up to `t_end`."""
        if not self._step_updates():
            return [float(t) for t in range(0, int(math.floor(t_end + 1e-9)) + 1)]
        n, steps = self.update_every, self._steps
        return [k * n / steps for k in range(0, int(math.floor(t_end * steps / n + 1e-9)) + 1)]

    def _best_reachable(self, t_end):
        """The highest target this callback applies on its grid up to progress `t_end`
        (schedule points between grid points count: they are applied at the next one)."""
        sched = self.pruner.schedule
        grid = self._grid(t_end)
        if len(grid) > 2000:  # tfmot schedules cost ~ms per evaluation: sample the grid
            grid = grid[:: len(grid) // 1000] + grid[-200:]
        last = grid[-1] if grid else 0.0
        points = [t for t in grid if sched.is_update(t)]
        points += [float(t) for t in range(0, int(math.floor(last + 1e-9)) + 1)
                   if sched.is_update(t)]
        return max((float(sched(t)) for t in points), default=0.0)

    def _warn_unreachable(self):
        """Warns when this fit's epochs end before the schedule's final sparsity."""
        sched, epochs = self.pruner.schedule, self._epochs
        if not epochs:
            return
        final = float(sched.final_sparsity)
        best = self._best_reachable(float(epochs))
        if best < final - 1e-6:
            end = getattr(sched, "end_epoch", None)
            when = f" at progress {end} epochs" if end is not None else ""
            grid = (f" with update_every={self.update_every} steps"
                    if self._step_updates() else "")
            warnings.warn(
                f"IBPruning: the schedule reaches its final sparsity {final:g}{when}, but "
                f"this fit runs {epochs} epochs{grid}: pruning will stop at {best:.4g}. Fit "
                "for more epochs, end the schedule earlier, or go on later with `fit(..., "
                "initial_epoch=...)`.", stacklevel=3)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self._first_epoch is None:
            self._first_epoch = epoch
            self._last_step = epoch * (self._steps or 0)
            self._last_t = float(epoch)
            if epoch == 0 and self._ready:
                self.pruner.update(0.0)  # t = 0: a schedule starting at begin_epoch=0

    def on_train_batch_end(self, batch, logs=None):
        if not self._ready:
            if not self._wrappers_built():
                return
            self._start()
            if self._epoch == 0 and batch == 0:
                self.pruner.update(0.0)  # the t = 0 update, one step late (lazy build)
        if not self._step_updates():
            return
        # `batch` is the last step done (with steps_per_execution > 1 Keras reports every
        # k-th step only): act when a multiple of N was reached since the last call.
        step = self._epoch * self._steps + batch + 1
        n = self.update_every
        previous, self._last_step = self._last_step, step
        if step // n == previous // n:
            return
        t = (step // n) * n / self._steps
        # Reading `self.model` makes the JAX trainer write its state back into the
        # variables mid-epoch (`jax_state_sync`); on TensorFlow it is a plain read.
        self.pruner.model = self.model
        sched = self.pruner.schedule
        if sched.is_update(t):
            self.pruner.update(t)
        else:  # a schedule point between two grid steps (OneShot, Iterative, the ramp's end)
            crossed = [float(k) for k in range(int(math.floor(self._last_t)) + 1,
                                               int(math.floor(t + 1e-9)) + 1)
                       if k > self._last_t + 1e-9 and sched.is_update(k)]
            if crossed:
                self.pruner.update(crossed[-1])
        self._last_t = t

    def on_epoch_end(self, epoch, logs=None):
        if not self._ready:
            self._start()
        if self._step_updates() or not self.pruner.update(epoch + 1):
            self.pruner.rezero()
            self.pruner.measure()  # only with log_information=True
        if logs is not None:
            self._log(logs)

    def _log(self, logs):
        """Totals into the epoch logs; per-layer entries into `model.history` (History
        appends the epoch logs after this callback, so both stay one entry per epoch)."""
        entries = self.pruner.logs()
        history = getattr(self.model, "history", None)
        if self.layer_logs == "epoch" or not isinstance(
                getattr(history, "history", None), dict):
            logs.update(entries)
            return
        layers = {self.pruner.log_name(w) for w in self.pruner.wrappers}
        for key, value in entries.items():
            if "/" in key and key.rsplit("/", 1)[1] in layers:
                history.history.setdefault(key, []).append(value)
            else:
                logs[key] = value

    def on_train_end(self, logs=None):
        if not self._ready:
            return
        self.pruner.rezero()
        final = float(self.pruner.schedule.final_sparsity)
        t_end = (self._last_t if self._step_updates() and self._last_t is not None
                 else float(self._epoch + 1))
        reached = self._best_reachable(t_end)
        if reached < final - 1e-6:
            warnings.warn(
                f"IBPruning: training ended at target sparsity {reached:.4g}, below the "
                f"schedule's final sparsity {final:g}. Fit on with `initial_epoch=` to finish "
                "the schedule.", stacklevel=2)

    def get_config(self):
        config = self.pruner.get_config()
        config["update_every"] = self.update_every
        config["layer_logs"] = self.layer_logs
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_strategy(model):
    """Fails early under a multi-worker `MultiWorkerMirroredStrategy`: Keras 3's `fit`
    cannot run it (verified with TF 2.21 / Keras 3.15, with or without this package)."""
    tf = sys.modules.get("tensorflow")  # never import TensorFlow just for this check
    if keras.backend.backend() != "tensorflow" or tf is None:
        return
    strategy = getattr(model, "distribute_strategy", None) or tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    resolver = getattr(strategy, "cluster_resolver", None)
    jobs = resolver.cluster_spec().as_dict() if resolver else {}
    workers = len(jobs.get("worker", [])) + len(jobs.get("chief", [])) if resolver else 1
    if workers > 1:
        raise RuntimeError(
            "Keras 3's `fit` does not run under MultiWorkerMirroredStrategy with several "
            "workers (keras-team/keras#20585: 'Attempt to convert a value (PerReplica...)'). "
            "Train with a custom loop and `kib.Pruner` instead: see examples/multi_worker.py "
            "and docs/distributed.md. Received: strategy=MultiWorkerMirroredStrategy with "
            f"{workers} workers"
        )
