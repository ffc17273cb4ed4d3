"""The pruning policy: `Pruner` (usable in any training loop) and the `IBPruning` callback.

At each update the `Pruner` asks the schedule for the target sparsity, collects the
statistics its score needs (one pass over the held-out batch at most), scores every
prunable weight (or unit), splits the target across tensors with the allocation, and
writes new masks into the wrappers (zeroing the pruned weights).
"""

from __future__ import annotations

import time

import keras
import numpy as np
from keras import ops

from keras_ibprune import allocation as allocation_lib
from keras_ibprune import masks as masks_lib
from keras_ibprune import schedules as schedules_lib
from keras_ibprune import scores as scores_lib
from keras_ibprune import stats as stats_lib


class Pruner:
    """Updates the masks of a wrapped model; the engine behind `IBPruning`.

    Use it directly in a custom training loop:

    ```python
    pruner = kib.Pruner(model, kib.PolynomialDecay(0.0, 0.9, 0, 4), score="magnitude")
    pruner.reset()
    for epoch in range(6):
        train_one_epoch(model)
        pruner.update(epoch + 1)          # progress in completed epochs
    ```

    Args:
        model: a model containing `PruneWrapper`s.
        schedule: a `Schedule` (or a float for `ConstantSparsity`, or a tfmot schedule
            with `steps_per_epoch`).
        score: a `Score` or alias (`"magnitude"`, `"random"`, ...).
        allocation: `"uniform"`, `"global"`, `"erk"`, `"ib"` or a callable; None picks the
            score's preferred allocation (`"uniform"` for magnitude/random).
        held_out: `(x, y)` arrays (or `x` alone) for scores that need data.
        held_out_size: maximum number of held-out samples (the first ones are used).
        min_density: per-tensor floor on the fraction of kept weights (or units).
        regrow: allow previously pruned weights to come back (default: monotone).
        steps_per_epoch: needed only for tfmot (step-based) schedules.
        verbose: 1 prints one line per mask update.
    """

    def __init__(
        self,
        model,
        schedule,
        score="magnitude",
        allocation=None,
        held_out=None,
        held_out_size=1024,
        min_density=0.0,
        regrow=False,
        steps_per_epoch=None,
        verbose=0,
    ):
        self.model = model
        self.schedule = schedules_lib.get(schedule, steps_per_epoch=steps_per_epoch)
        self.score = scores_lib.get(score)
        if allocation is None:
            allocation = getattr(self.score, "default_allocation", "uniform")
        self.allocation = allocation
        self._allocate = allocation_lib.get(allocation)
        if not 0.0 <= float(min_density) <= 1.0:
            raise ValueError(
                f"`min_density` must be in [0, 1]. Received: min_density={min_density!r}"
            )
        self.min_density = float(min_density)
        self.held_out = held_out
        self.held_out_size = int(held_out_size)
        self.regrow = bool(regrow)
        self.verbose = verbose
        self.wrappers = []
        self.last_target = 0.0

    # ----------------------------------------------------------------- state
    def reset(self):
        """Finds the wrappers, validates the data and forgets score state."""
        self.wrappers = stats_lib.find_wrappers(self.model)
        if not self.wrappers:
            raise ValueError(
                f"Model '{self.model.name}' contains no PruneWrapper: call `kib.prune(model)` "
                "(or wrap layers with `kib.PruneWrapper`) before training with IBPruning. "
                f"Received: model with layers {[la.name for la in self.model.layers]}"
            )
        for w in self.wrappers:
            if not w.built or not w._masks_built:
                raise ValueError(
                    f"PruneWrapper '{w.name}' is not built: build or call the model once "
                    "before pruning."
                )
        granularities = {w.granularity for w in self.wrappers}
        if len(granularities) > 1:
            raise ValueError(
                "All PruneWrappers of a model must share one granularity. Received: "
                f"{sorted(granularities)}"
            )
        self.granularity = granularities.pop()
        if self.score.needs_data and self.held_out is None:
            raise ValueError(
                f"Score {type(self.score).__name__} needs held-out data: pass "
                "`held_out=(x_val, y_val)`. Received: held_out=None"
            )
        self._data = None
        if self.held_out is not None and (self.score.needs_data or self.score.needs_gradients):
            self._data = stats_lib.as_arrays(self.held_out, self.held_out_size, self.model)
        self.score.reset()
        self.last_target = self.current_sparsity()

    # ---------------------------------------------------------------- update
    def update(self, t, force=False):
        """Recomputes the masks at progress `t` (completed epochs) if the schedule says so.

        Returns:
            True when masks were updated.
        """
        if not self.wrappers:
            self.reset()
        if not (force or self.schedule.is_update(t)):
            return False
        start = time.perf_counter()
        target = float(self.schedule(t))
        self._apply(target)
        self.last_target = target
        if self.verbose:
            print(
                f"IBPruning: progress {t:g} epochs -> sparsity {self.current_sparsity():.4f} "
                f"(target {target:.4f}, score={type(self.score).__name__}, "
                f"allocation={self.allocation}) in {time.perf_counter() - start:.2f}s"
            )
        return True

    def _stats(self):
        needs_act = self.score.needs_data
        needs_grad = self.score.needs_gradients
        loss = getattr(self.model, "loss", None) if needs_grad else None
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        return stats_lib.collect(
            self.model,
            self.wrappers,
            held_out=self._data,
            activations=needs_act,
            gradients=needs_grad,
            loss=loss,
        )

    def _apply(self, target):
        stats = self._stats()
        scored = self.score.score_model(stats, granularity=self.granularity)
        if self.granularity == "channel":
            self._apply_units(target, scored, stats)
            return
        tensors, prev, blocks, owners = [], [], [], []
        for w, layer_scores in zip(self.wrappers, scored):
            for j, s in enumerate(layer_scores):
                s = np.asarray(s, np.float64)
                m = ops.convert_to_numpy(w.masks[j].value)
                if not self.regrow:
                    s = np.where(m > 0, s, -np.inf)
                tensors.append(s)
                prev.append(m)
                blocks.append(w.block_size)
                owners.append(w)
        alloc = self._allocate(tensors, target, min_density=self.min_density)
        new = [
            masks_lib.topk_mask(s, a, None if self.regrow else p, not self.regrow, b)
            for s, a, p, b in zip(tensors, alloc, prev, blocks)
        ]
        k = 0
        for w in self.wrappers:
            n = len(w.masks)
            masks_lib.apply_masks(w, new[k : k + n])
            k += n

    def _apply_units(self, target, scored, stats):
        tensors, prev = [], []
        for w, s in zip(self.wrappers, scored):
            s = np.asarray(s, np.float64).reshape(-1)
            m = ops.convert_to_numpy(w.unit_mask.value)
            if not self.regrow:
                s = np.where(m > 0, s, -np.inf)
            tensors.append(s)
            prev.append(m)
        alloc = self._allocate(tensors, target, min_density=self.min_density)
        for w, s, a, p in zip(self.wrappers, tensors, alloc, prev):
            # Never remove every unit of a layer.
            a = min(a, 1.0 - 1.0 / s.size)
            m = masks_lib.topk_mask(s, a, None if self.regrow else p, not self.regrow)
            w.unit_mask.assign(m)

    def rezero(self):
        """Zeroes pruned weights again (an optimizer with momentum can move them)."""
        for w in self.wrappers:
            masks_lib.rezero(w)

    # ------------------------------------------------------------------ logs
    def current_sparsity(self):
        """Fraction of zero mask entries over all wrappers (units in channel mode)."""
        if not self.wrappers:
            return 0.0
        if getattr(self, "granularity", "weight") == "channel":
            return masks_lib.mask_sparsity(
                [ops.convert_to_numpy(w.unit_mask.value) for w in self.wrappers]
            )
        return masks_lib.mask_sparsity(
            [ops.convert_to_numpy(m.value) for w in self.wrappers for m in w.masks]
        )

    def logs(self):
        """`{"sparsity": overall, "sparsity/<layer>": per layer}` for the epoch logs."""
        out = {"sparsity": self.current_sparsity()}
        for w in self.wrappers:
            ms = [w.unit_mask] if w.granularity == "channel" else w.masks
            out[f"sparsity/{w.layer.name}"] = masks_lib.mask_sparsity(
                [ops.convert_to_numpy(m.value) for m in ms]
            )
        out.update(getattr(self.score, "logs", lambda: {})())
        return out


@keras.saving.register_keras_serializable(package="keras_ibprune")
class IBPruning(keras.callbacks.Callback):
    """Keras callback that prunes the `PruneWrapper`s of the model during `fit`.

    Masks update at epoch ends (`update_every="epoch"`) or every `N` training steps
    (`update_every=N`), following the schedule; the epoch logs get `sparsity` and
    `sparsity/<layer>` (History, CSVLogger and TensorBoard show them). State is reset in
    `on_train_begin`; the masks themselves live in the model, so saving the model mid-way
    and fitting on with `initial_epoch` resumes the schedule where it stopped.

    Args:
        schedule: a `Schedule` (e.g. `PolynomialDecay(0.0, 0.9, 0, 4)`), a float
            (constant sparsity), or a tfmot `PruningSchedule`.
        score: a `Score` instance or alias (`"magnitude"`, `"random"`, ...).
        allocation: how the sparsity is split across layers (`"uniform"`, `"global"`,
            `"erk"`, `"ib"`, a callable); None = the score's default.
        held_out: `(x, y)` held-out data for data-driven scores (optional otherwise).
        held_out_size: cap on held-out samples (the same samples at every update).
        update_every: `"epoch"` or an int number of training steps.
        min_density: per-tensor floor on the kept fraction.
        regrow: allow pruned weights to come back (default False: monotone sparsity).
        verbose: 1 prints one line per update.

    Example:

    ```python
    pruned = kib.prune(model)
    pruned.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.9, begin_epoch=0, end_epoch=4),
                       score="magnitude")
    pruned.fit(x, y, epochs=6, callbacks=[cb])
    ```
    """

    def __init__(
        self,
        schedule,
        score="magnitude",
        allocation=None,
        held_out=None,
        held_out_size=1024,
        update_every="epoch",
        min_density=0.0,
        regrow=False,
        verbose=0,
    ):
        super().__init__()
        if not (
            update_every == "epoch"
            or (isinstance(update_every, int) and not isinstance(update_every, bool)
                and update_every >= 1)
        ):
            raise ValueError(
                "`update_every` must be 'epoch' or a positive int number of steps. "
                f"Received: update_every={update_every!r}"
            )
        self._tfmot = schedules_lib._is_tfmot_schedule(schedule)
        self.schedule = schedule if self._tfmot else schedules_lib.get(schedule)
        self.score = scores_lib.get(score)
        if allocation is not None:
            allocation_lib.get(allocation)  # validate early
        self.allocation = allocation
        self.held_out = held_out
        self.held_out_size = held_out_size
        self.update_every = update_every
        self.min_density = min_density
        self.regrow = regrow
        self.verbose = verbose
        self.pruner = None

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps")
        self._steps = steps
        self.pruner = Pruner(
            self.model,
            self.schedule,
            score=self.score,
            allocation=self.allocation,
            held_out=self.held_out,
            held_out_size=self.held_out_size,
            min_density=self.min_density,
            regrow=self.regrow,
            steps_per_epoch=steps,
            verbose=self.verbose,
        )
        self.pruner.reset()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.update_every == "epoch" or not self._steps:
            return
        step = self._epoch * self._steps + batch + 1
        if step % self.update_every == 0 and batch + 1 < self._steps:
            self.pruner.update(self._epoch + (batch + 1) / self._steps)

    def on_epoch_end(self, epoch, logs=None):
        if not self.pruner.update(epoch + 1):
            self.pruner.rezero()
        if logs is not None:
            logs.update(self.pruner.logs())

    def on_train_end(self, logs=None):
        self.pruner.rezero()

    def get_config(self):
        def ser(obj):
            if isinstance(obj, str) or obj is None:
                return obj
            return keras.saving.serialize_keras_object(obj)

        if self._tfmot:
            raise NotImplementedError("IBPruning with a tfmot schedule is not serializable.")
        return {
            "schedule": ser(self.schedule),
            "score": ser(self.score),
            "allocation": self.allocation if not callable(self.allocation) else None,
            "held_out_size": self.held_out_size,
            "update_every": self.update_every,
            "min_density": self.min_density,
            "regrow": self.regrow,
            "verbose": self.verbose,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = schedules_lib.get(config["schedule"])
        config["score"] = scores_lib.get(config["score"])
        return cls(**config)
