"""The pruning policy: `Pruner` (usable in any training loop) and the `IBPruning` callback.

At each update the `Pruner` asks the schedule for the target sparsity, collects the
statistics its score needs (one pass over the held-out batch at most), scores every
prunable weight (or unit), splits the target across tensors with the allocation, and
writes new masks into the wrappers (zeroing the pruned weights).
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_ibprune import allocation as allocation_lib
from keras_ibprune import channels as channels_lib
from keras_ibprune import heldout as heldout_lib
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
        score: a `Score` or alias (`"ib"`, `"magnitude"`, `"activation"`, `"gradient"`,
            `"taylor"`, `"random"`). None (default) = `"ib"` when `held_out` is given, else
            `"magnitude"` (with a warning: IB scores need held-out data).
        allocation: `"uniform"`, `"global"`, `"erk"`, `"ib"` or a callable; None picks the
            score's preferred allocation (`"ib"` for the IB score, `"erk"` for activation /
            gradient / taylor, `"uniform"` for magnitude/random).
        held_out: `(x, y)` arrays, `(x, None)` / `x` (label-free: the dense model's own
            predictions at `reset()` become the labels), a `tf.data.Dataset` or a Python
            generator, for scores that need data.
        held_out_size: maximum number of held-out samples (the first ones are used, the
            same at every update; an infinite dataset is capped).
        min_density: per-tensor floor on the fraction of kept weights (or units).
        regrow: allow previously pruned weights to come back (default: monotone).
        steps_per_epoch: needed only for tfmot (step-based) schedules.
        verbose: 1 prints one line per mask update.
        output: for multi-output models, the index or name of the output whose label
            information the IB score preserves.
        exclude: names of wrapped layers to leave dense (not counted in the budget).
        keep_connected: `"outputs"` (default): every unit of the model's output layer keeps
            at least one weight; `"all"`: every unit of every layer; False: no constraint.
        target: channel granularity only: the schedule's sparsity is the fraction of
            `"units"` (default), `"flops"` or `"params"` removed (see `channels`).
        min_width: channel granularity: minimum units every layer keeps (default 1).
        round_to: channel granularity: keep a multiple of this many units per layer.
    """

    def __init__(
        self,
        model,
        schedule,
        score=None,
        allocation=None,
        held_out=None,
        held_out_size=1024,
        min_density=0.0,
        regrow=False,
        steps_per_epoch=None,
        verbose=0,
        output=None,
        exclude=None,
        keep_connected="outputs",
        target="units",
        min_width=1,
        round_to=None,
    ):
        self.model = model
        self.target = channels_lib.check_target(target)
        self.min_width, self.round_to = min_width, round_to
        self.schedule = schedules_lib.get(schedule, steps_per_epoch=steps_per_epoch)
        if score is None:
            if held_out is None:
                warnings.warn(
                    "IBPruning/Pruner: the default information-bottleneck score needs "
                    "held-out data; without `held_out=(x_val, y_val)` magnitude scores are "
                    "used.",
                    stacklevel=2,
                )
                score = "magnitude"
            else:
                score = "ib"
        self.score = scores_lib.get(score)
        self._user_allocation = allocation
        if allocation is None:
            allocation = getattr(self.score, "default_allocation", "uniform")
        self.allocation = allocation
        self._allocate = allocation_lib.get(allocation)
        if keep_connected not in ("outputs", "all", False, None):
            raise ValueError("`keep_connected` must be 'outputs', 'all' or False. Received: "
                             f"keep_connected={keep_connected!r}")
        self.keep_connected = keep_connected or False
        self.output = output
        self.exclude = list(exclude or [])
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
        self.last_update_seconds = 0.0
        self._channels = None

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
        self._channels = None
        if self.granularity == "channel":
            self._channels = channels_lib.ChannelPolicy(
                self.model, self.wrappers, target=self.target, allocation=self.allocation,
                min_width=self.min_width, round_to=self.round_to, regrow=self.regrow,
                frozen={w.name for w in self.wrappers if self._is_excluded(w)})
        elif self.target != "units":
            raise ValueError(
                f"target={self.target!r} needs granularity='channel' wrappers (kib.prune(model, "
                "granularity='channel')). Received: weight-granularity wrappers"
            )
        if self.score.needs_data and self.held_out is None:
            raise ValueError(
                f"Score {type(self.score).__name__} needs held-out data: pass "
                "`held_out=(x_val, y_val)`. Received: held_out=None"
            )
        names = {w.layer.name for w in self.wrappers} | {w.name for w in self.wrappers}
        unknown = [e for e in self.exclude if e not in names]
        if unknown:
            raise ValueError(f"`exclude` names no wrapped layer of model '{self.model.name}'. "
                             f"Received: exclude={unknown}, wrapped layers: {sorted(names)}")
        self._data = None
        if self.held_out is not None and (self.score.needs_data or self.score.needs_gradients):
            x, y = heldout_lib.held_out_arrays(
                self.held_out, self.held_out_size, self.model, output=self.output
            )
            if y is None and self.score.needs_labels:
                y = self._teacher_labels(x)
                # Teacher labels: rare predicted classes are fine, a single one is not.
                heldout_lib.check_labels(y, min_count=1)
            elif y is not None and self.score.needs_labels:
                heldout_lib.check_labels(y)
            self._data = (x, y)
        self._outputs = self._output_wrappers()
        self.score.reset()
        self.last_target = self.current_sparsity()

    def _teacher_labels(self, x):
        """Label-free mode: the current (dense) model's predictions, captured once."""
        pred = self.model.predict(x, batch_size=256, verbose=0)
        if isinstance(pred, dict):
            pred = pred[self.output] if self.output is not None else next(iter(pred.values()))
        elif isinstance(pred, (list, tuple)):
            pred = pred[int(self.output or 0)]
        pred = np.asarray(pred).reshape(len(x), -1)
        if pred.shape[1] > 1:
            return np.argmax(pred, axis=1).astype(np.int64)
        return pred.astype(np.float64)

    def _output_wrappers(self):
        """Ids of wrappers whose outputs are model outputs (last wrapper as fallback)."""
        ids = set()
        for t in getattr(self.model, "outputs", None) or []:
            op = getattr(getattr(t, "_keras_history", None), "operation", None)
            if op is not None:
                ids.add(id(op))
        found = {id(w) for w in self.wrappers if id(w) in ids}
        return found or ({id(self.wrappers[-1])} if self.wrappers else set())

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
        with stats_lib.blas_threads(1):  # small matrices: one BLAS thread beside TF's pool
            self._apply(target)
        self.last_target = target
        self.last_update_seconds = time.perf_counter() - start
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
        summaries = getattr(self.score, "needs_summaries", False)
        return stats_lib.collect(
            self.model,
            self.wrappers,
            held_out=self._data,
            activations=needs_act and not summaries,
            gradients=needs_grad,
            loss=loss,
            summaries=summaries,
            max_rows=getattr(self.score, "max_rows", 8192),
            seed=getattr(self.score, "seed", 0),
        )

    def measure(self):
        """Refreshes the score's information logs without changing masks (IB scores)."""
        if self._data is None or not hasattr(self.score, "measure"):
            return
        with stats_lib.blas_threads(1):
            for s in self._stats():
                self.score.measure(s)

    def _protect(self, w, s):
        """Top score (1e300, finite) on the best live weight of every protected unit."""
        if not self.keep_connected or s.ndim < 2:
            return s
        if self.keep_connected == "outputs" and id(w) not in self._outputs:
            return s
        m2 = s.reshape(-1, s.shape[-1]).copy()
        best = np.argmax(m2, axis=0)
        cols = np.arange(m2.shape[1])
        live = np.isfinite(m2[best, cols])
        m2[best[live], cols[live]] = 1e300
        return m2.reshape(s.shape)

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
                s = np.where(np.isnan(s), -np.inf, s)  # no NaN ever reaches a mask
                m = ops.convert_to_numpy(w.masks[j].value)
                if not self.regrow:
                    s = np.where(m > 0, s, -np.inf)
                tensors.append(self._protect(w, s) if j == 0 else s)
                prev.append(m)
                blocks.append(w.block_size)
                owners.append(w)
        excluded = [self._is_excluded(w) for w in owners]
        live = [i for i, e in enumerate(excluded) if not e]
        alloc_live = self._allocate([tensors[i] for i in live], target,
                                    min_density=self.min_density)
        alloc = [0.0] * len(tensors)
        for i, a in zip(live, alloc_live):
            alloc[i] = a
        new = [
            masks_lib.topk_mask(s, a, None if self.regrow else p, not self.regrow, b)
            for s, a, p, b in zip(tensors, alloc, prev, blocks)
        ]
        k = 0
        for w in self.wrappers:
            n = len(w.masks)
            masks_lib.apply_masks(w, new[k : k + n])
            k += n

    def _is_excluded(self, w):
        return w.layer.name in self.exclude or w.name in self.exclude

    def _apply_units(self, target, scored, stats):
        """Channel mode: coupled groups, unit/FLOP/param targets (`channels.ChannelPolicy`)."""
        self._channels.update(target, {w.name: sc for w, sc in zip(self.wrappers, scored)})

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
        if self._channels is not None and self.target != "units":
            out[f"{self.target}_removed"] = self._channels.removed()
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
        score: a `Score` instance or alias (`"ib"`, `"magnitude"`, `"activation"`,
            `"gradient"`, `"taylor"`, `"random"`). None (default): the information-
            bottleneck score `"ib"` when `held_out` is given, else `"magnitude"` (warns).
        allocation: how the sparsity is split across layers (`"uniform"`, `"global"`,
            `"erk"`, `"ib"`, a callable); None = the score's default (`"ib"` for IB).
        held_out: held-out data for data-driven scores: `(x, y)` arrays (int / one-hot
            classes or float regression targets), `(x, None)` for label-free mode (the
            dense model's predictions at `on_train_begin` become the labels), a
            `tf.data.Dataset` or a Python generator.
        held_out_size: cap on held-out samples (the same samples at every update).
        update_every: `"epoch"` or an int number of training steps.
        min_density: per-tensor floor on the kept fraction.
        regrow: allow pruned weights to come back (default False: monotone sparsity).
        verbose: 1 prints one line per update.
        output: multi-output models: index or name of the output to keep informative.
        exclude: names of wrapped layers to keep dense.
        keep_connected: `"outputs"` (default), `"all"` or False; see `Pruner`.
        target: with `granularity="channel"` wrappers, what the sparsity counts: `"units"`,
            `"flops"` (0.75 -> 4x fewer FLOPs) or `"params"`.
        min_width: channel mode: minimum units each layer keeps.
        round_to: channel mode: keep a multiple of this many units per layer.

    With an IB score the epoch logs also get `I_TY/<layer>` and `I_XT/<layer>` (nats),
    which `kib.plot_information_plane(history)` draws.

    Example:

    ```python
    pruned = kib.prune(model)
    pruned.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.9, begin_epoch=0, end_epoch=4),
                       score="magnitude")
    pruned.fit(x, y, epochs=6, callbacks=[cb])
    ```

    IB default on held-out data:

    ```python
    cb = kib.IBPruning(kib.PolynomialDecay(0.0, 0.95, 0, 4), held_out=(x_val, y_val))
    history = pruned.fit(x, y, epochs=6, callbacks=[cb])
    kib.plot_information_plane(history)
    ```
    """

    def __init__(
        self,
        schedule,
        score=None,
        allocation=None,
        held_out=None,
        held_out_size=1024,
        update_every="epoch",
        min_density=0.0,
        regrow=False,
        verbose=0,
        output=None,
        exclude=None,
        keep_connected="outputs",
        target="units",
        min_width=1,
        round_to=None,
    ):
        super().__init__()
        self.target = channels_lib.check_target(target)
        self.min_width, self.round_to = min_width, round_to
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
        self.score = None if score is None else scores_lib.get(score)
        if allocation is not None:
            allocation_lib.get(allocation)  # validate early
        if not (isinstance(held_out_size, int) and held_out_size >= 2):
            raise ValueError("`held_out_size` must be an int >= 2. Received: "
                             f"held_out_size={held_out_size!r}")
        self.output = output
        self.exclude = exclude
        self.keep_connected = keep_connected
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
            output=self.output,
            exclude=self.exclude,
            keep_connected=self.keep_connected,
            target=self.target,
            min_width=self.min_width,
            round_to=self.round_to,
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
            self.pruner.measure()  # information-plane logs every epoch
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
            "output": self.output,
            "exclude": self.exclude,
            "keep_connected": self.keep_connected,
            "target": self.target,
            "min_width": self.min_width,
            "round_to": self.round_to,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schedule"] = schedules_lib.get(config["schedule"])
        if config.get("score") is not None:
            config["score"] = scores_lib.get(config["score"])
        return cls(**config)
