"""The pruning engine: `Pruner`, usable in any training loop (and behind `IBPruning`).

At each update the `Pruner` asks the schedule for the target sparsity, computes the
statistics its score needs (one compiled pass over the held-out batch at most), scores
every prunable weight (or unit), splits the target across tensors with the allocation,
chooses exact top-k masks, lets the score re-fit the surviving weights, and writes masks
and weights into the wrappers (pruned weights exactly zero). All state that decides the
next masks lives in the model (masks, weights), so a restored model resumes exactly.
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat
from keras_ibprune import allocation as allocation_lib
from keras_ibprune import channels as channels_lib
from keras_ibprune import gates as gates_lib
from keras_ibprune import masks as masks_lib
from keras_ibprune import schedules as schedules_lib
from keras_ibprune import scores as scores_lib
from keras_ibprune import stats as stats_lib
from keras_ibprune import stream as stream_lib

KEEP_CONNECTED = ("outputs", "all", False)


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
        model: a model containing `PruneWrapper`s (None: set `pruner.model` before
            `reset()`; the arguments are validated now).
        schedule: a `Schedule` (or a float for `ConstantSparsity`, a config dict, or a
            tfmot schedule with `steps_per_epoch`).
        score: a `Score`, alias, class name or config (`"ib"`, `"obs"`, `"magnitude"`,
            `"activation"`, `"gradient"`, `"taylor"`, `"random"`, `"gaussian_obd"`, ...).
            None (default) = `"ib"` when `held_out` is given, else `"magnitude"` (with a
            warning: the information score needs held-out data).
        allocation: `"uniform"`, `"global"`, `"erk"`, `"global_erk_floor"` or a callable;
            None picks the score's preferred one (`"global"` for `"ib"`, `"erk"` for
            `"obs"`/activation/gradient/taylor, `"uniform"` for magnitude/random).
        held_out: `(x, y)` arrays, `(x, None)` / `x` (label-free: the dense model's own
            predictions at `reset()` become the labels), a `tf.data.Dataset`, a Python
            generator, or a dataset function `fn(input_context) -> tf.data.Dataset` (as
            for `strategy.distribute_datasets_from_function`: each worker reads only its
            shard; needs `held_out_size=None`). Take it from validation data, never from
            the test set.
        held_out_size: maximum number of held-out samples (the first ones, the same at every
            update; an infinite dataset is capped), read into memory once. None: all of a
            finite `held_out` (arrays, `tf.data.Dataset` or a callable returning an
            iterator), streamed batch by batch at every update (memory bounded by the batch
            and the statistics; per-sample statistics cover the first
            `stream.SAMPLE_CAP` samples).
        min_density: per-tensor floor on the fraction of kept weights (or units).
        regrow: allow previously pruned weights to come back (default: monotone).
        steps_per_epoch: needed only for tfmot (step-based) schedules.
        verbose: 1 prints one line per mask update.
        output: for multi-output models, the index or name of the output whose prediction
            the information score preserves (layers that do not feed it cost no information
            and go first: `exclude` them to keep them).
        exclude: names of wrapped layers to leave dense (not counted in the budget).
        keep_connected: `"outputs"` (default): every unit of the model's output layer keeps
            at least one weight; `"all"`: every unit of every layer; False: no constraint.
        target: channel granularity only: the schedule's sparsity is the fraction of
            `"units"` (default), `"flops"` or `"params"` removed (see `channels`).
        min_width: channel granularity: minimum units every layer keeps (default 1).
        round_to: channel granularity: keep a multiple of this many units per layer.
        log_information: let the score log its information quantities (``I_TY/<layer>``,
            ``I_XT/<layer>``) at every update and on `measure()`.
        strategy: shard the held-out statistics over a `tf.distribute.Strategy` (every
            replica computes its slice, the sums are all-reduced, every worker derives the
            same masks); None computes them all in this process. With a dataset function
            as `held_out`, every worker also reads only its shard. See
            docs/distributed.md.

    Attributes:
        optimizer: the optimizer whose per-weight state (momentum, velocities) of pruned
            weights is zeroed at each update and `rezero()`; None (default) = the model's
            compiled optimizer. Set it in a custom loop.
    """

    def __init__(self, model, schedule, score=None, allocation=None, held_out=None,
                 held_out_size=1024, min_density=0.0, regrow=False, steps_per_epoch=None,
                 verbose=0, output=None, exclude=None, keep_connected="outputs",
                 target="units", min_width=1, round_to=None, log_information=False,
                 strategy=None, _stacklevel=2):
        self.model = model
        self.target = channels_lib.check_target(target)
        self.min_width, self.round_to = min_width, round_to
        self._schedule_arg = schedule
        if schedules_lib._is_tfmot_schedule(schedule) and not steps_per_epoch:
            self.schedule = None  # resolved in `reset()` once steps per epoch are known
        else:
            self.schedule = schedules_lib.get(schedule, steps_per_epoch=steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self._score_arg = score
        if score is None:
            if held_out is None:
                warnings.warn(
                    "IBPruning/Pruner: the default information score needs held-out data; "
                    "without `held_out=(x_val, y_val)` magnitude scores are used.",
                    stacklevel=_stacklevel,
                )
                score = "magnitude"
            else:
                score = "ib"
        self.score = scores_lib.get(score)
        self._allocation_arg = allocation
        self.allocation = (allocation if allocation is not None
                           else getattr(self.score, "default_allocation", "uniform"))
        self._allocate = allocation_lib.get(self.allocation)
        if keep_connected not in KEEP_CONNECTED + (None,):
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
        self.held_out, self.held_out_size = held_out, stream_lib.check_size(held_out_size)
        self.strategy = strategy
        self.regrow = bool(regrow)
        self.verbose = verbose
        self.log_information = bool(log_information)
        self.wrappers = []
        self.optimizer = None  # custom loops: set it, so pruned weights' state is zeroed too
        self.last_target = 0.0
        self._applied = None
        self.last_update_seconds = 0.0
        self._channels = None
        self._pass = None
        self._starved_warned = False

    # ----------------------------------------------------------------- config
    def get_config(self):
        """The constructor arguments (without model and data) as plain Python values."""
        def ser(obj):
            return obj if obj is None or isinstance(obj, str) else (
                keras.saving.serialize_keras_object(obj))

        if schedules_lib._is_tfmot_schedule(self._schedule_arg):
            raise NotImplementedError("A Pruner with a tfmot schedule is not serializable.")
        return {
            "schedule": ser(self.schedule),
            "score": ser(self.score) if self._score_arg is not None else None,
            "allocation": None if callable(self._allocation_arg) else self._allocation_arg,
            "held_out_size": self.held_out_size, "min_density": self.min_density,
            "regrow": self.regrow, "verbose": self.verbose, "output": self.output,
            "exclude": self.exclude or None, "keep_connected": self.keep_connected,
            "target": self.target, "min_width": self.min_width, "round_to": self.round_to,
            "log_information": self.log_information,
        }

    # ----------------------------------------------------------------- state
    def reset(self, steps_per_epoch=None):
        """Finds the wrappers, validates the data and prepares the statistics pass."""
        if steps_per_epoch is not None:
            self.steps_per_epoch = steps_per_epoch
        if self.schedule is None or isinstance(self.schedule, schedules_lib._TfmotSchedule):
            self.schedule = schedules_lib.get(self._schedule_arg, self.steps_per_epoch)
        self.wrappers = stats_lib.find_wrappers(self.model)
        self._starved_warned = False
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
            # Units: the user's allocation, else uniform (weight allocations do not apply).
            unit_alloc = self._allocation_arg if self._allocation_arg is not None else (
                getattr(self.score, "default_allocation", "uniform")
                if not getattr(self.score, "normalize_units", True) else "uniform")
            self._channels = channels_lib.ChannelPolicy(
                self.model, self.wrappers, target=self.target, allocation=unit_alloc,
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
        if self.held_out is not None and self.score.needs_data:
            self._data = stream_lib.load(self.held_out, self.held_out_size, self.model,
                                         self.output, self.score, self.strategy)
        needs = self.score.required_statistics(self.granularity, self.log_information)
        self._pass = stream_lib.statistics_pass(self.model, self.wrappers, self.score, needs,
                                                self._data, self.output, self.strategy,
                                                self.held_out_size)
        self._outputs = self._output_wrappers()
        caps = {w.pattern for w in self.wrappers if getattr(w, "pattern", None)}
        final = float(self.schedule.final_sparsity)
        for n, m in sorted(caps):
            if final > 1.0 - n / m + 1e-9:
                warnings.warn(
                    f"Pruner: pattern {n}:{m} removes at most {1 - n / m:.0%} of a layer; the "
                    f"schedule ends at {final:.0%}, so layers with that pattern stop at "
                    f"{1 - n / m:.0%}. Use a schedule ending at {1 - n / m:g} for exact N:M.",
                    stacklevel=3)
        self.score.reset()
        self.last_target = self.current_sparsity()
        self._applied = None  # (target, sparsity) of the last update: see `update`

    def _output_wrappers(self):
        """Ids of wrappers whose outputs are model outputs (last wrapper as fallback)."""
        ids = {id(_keras_compat.producing_layer(t))
               for t in getattr(self.model, "outputs", None) or []}
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
        target = float(self.schedule(t))
        if target <= 0.0 and not force and self.current_sparsity() == 0.0:
            return False  # nothing to remove yet (e.g. t = begin with initial sparsity 0)
        if not force and self._unchanged(target):
            return False
        start = time.perf_counter()
        with stats_lib.blas_threads(1):  # small matrices: one BLAS thread beside TF's pool
            self._apply(target)
        self.last_target = target
        if not self.regrow and self.granularity == "weight":
            self._applied = (target, self.current_sparsity())
        self.last_update_seconds = time.perf_counter() - start
        if self.verbose:
            print(
                f"IBPruning: progress {t:g} epochs -> sparsity {self.current_sparsity():.4f} "
                f"(target {target:.4f}, score={type(self.score).__name__}, "
                f"allocation={self.allocation}) in {self.last_update_seconds:.2f}s"
            )
        return True

    def _unchanged(self, target):
        """True when an update could not change the masks: the same target as the last one,
        no regrowth (pruned weights stay pruned, so the same count keeps the same set) and
        the masks as that update left them. Skipping it saves the statistics pass and the
        mask writes at every epoch of a constant sparsity."""
        applied = getattr(self, "_applied", None)
        return (applied is not None and not self.regrow and self.granularity == "weight"
                and applied[0] == target and self.current_sparsity() == applied[1])

    def collect(self):
        """One `stats.LayerStats` per wrapper, with what the score needs."""
        x, y = self._data if self._data is not None else (None, None)
        summaries = self._pass(x, y) if self._pass is not None else [{}] * len(self.wrappers)
        acts = (stats_lib.capture(self.model, x, self.wrappers)
                if self.score.needs_activations and x is not None
                else [(None,) * 3] * len(self.wrappers))
        grads = None
        if self.score.needs_gradients and x is not None:
            loss = getattr(self.model, "loss", None)
            loss = keras.losses.get(loss) if isinstance(loss, str) else loss
            grads = stats_lib.weight_gradients(self.model, x, y, self.wrappers, loss)
        return [
            stats_lib.LayerStats(
                wrapper=w, index=i,
                weights=[ops.convert_to_numpy(v.value) for v in w.prunable_weights],
                masks=[ops.convert_to_numpy(m.value) for m in w.masks],
                labels=None if y is None else np.asarray(y)[: summaries[i].get("samples")],
                summary=summaries[i],
                inputs=acts[i][0], preacts=acts[i][1], outputs=acts[i][2],
                grads=None if grads is None else grads[i], extra={"name": self.log_name(w)})
            for i, w in enumerate(self.wrappers)
        ]

    def measure(self, stats=None):
        """Refreshes the score's information logs (`log_information`) without changing masks."""
        if self._data is None or not self.log_information:
            return
        with stats_lib.blas_threads(1):
            for s in stats if stats is not None else self.collect():
                self.score.measure(s)

    def _protected(self, w, s):
        """Boolean keep-mask: the best live weight of every protected output unit (or None)."""
        if not self.keep_connected or s.ndim < 2:
            return None
        if self.keep_connected == "outputs" and id(w) not in self._outputs:
            return None
        m2 = s.reshape(-1, s.shape[-1])
        best = np.argmax(m2, axis=0)
        cols = np.arange(m2.shape[1])
        live = m2[best, cols] > -np.inf
        keep = np.zeros(m2.shape, dtype=bool)
        keep[best[live], cols[live]] = True
        return keep.reshape(s.shape)

    def _apply(self, target):
        stats = self.collect()
        self.measure(stats)
        scored = self.score.score_model(stats, granularity=self.granularity)
        if self.granularity == "channel":
            self._channels.update(target, {w.name: sc for w, sc in zip(self.wrappers, scored)},
                                  normalize=getattr(self.score, "normalize_units", True))
            return
        tensors, prev, blocks, owners, keeps, patterns = [], [], [], [], [], []
        for w, st, layer_scores in zip(self.wrappers, stats, scored):
            for j, s in enumerate(layer_scores):
                s = np.asarray(s, np.float64)
                s = np.where(np.isnan(s), -np.inf, s)  # no NaN ever reaches a mask
                if not self.regrow:
                    s = np.where(st.masks[j] > 0, s, -np.inf)
                tensors.append(s)
                keeps.append(self._protected(w, s) if j == 0 else None)
                prev.append(st.masks[j])
                blocks.append(w.block_size)
                patterns.append(getattr(w, "pattern", None))
                owners.append(w)
        live = [i for i, w in enumerate(owners) if not self._is_excluded(w)]
        alloc = [0.0] * len(tensors)
        for i in [i for i in live if patterns[i] is not None]:
            alloc[i] = target  # N:M layers: the schedule's level, capped by the pattern
        live = [i for i in live if patterns[i] is None]
        # The allocation sees protected weights as the most important (they stay).
        ranked = [t if k is None else np.where(k, 1e300, t) for t, k in zip(tensors, keeps)]
        if live:
            for i, a in zip(live, self._allocate([ranked[i] for i in live], target,
                                                 min_density=self.min_density)):
                alloc[i] = a
            self._warn_starved([tensors[i].shape for i in live], [alloc[i] for i in live],
                               [owners[i].layer.name for i in live], target)
        new = [masks_lib.topk_mask(s, a, None if self.regrow else p, not self.regrow, b,
                                   keep=kp, pattern=pt)
               for s, a, p, b, kp, pt in zip(tensors, alloc, prev, blocks, keeps, patterns)]
        k = 0
        for w, st in zip(self.wrappers, stats):
            n = len(w.masks)
            layer_masks = new[k : k + n]
            k += n
            changed = any(np.any(m != p) for m, p in zip(layer_masks, st.masks))
            weights = self.score.reconstruct(st, layer_masks) if changed else None
            masks_lib.apply_masks(w, layer_masks, weights=weights, optimizer=self._optimizer())

    def _warn_starved(self, shapes, sparsities, names, target):
        weak = sorted({names[i] for i in allocation_lib.starved(shapes, sparsities, target)})
        if weak and not self._starved_warned:
            self._starved_warned = True
            warnings.warn(
                f"Pruner: at sparsity {target:.3g} the {self.allocation!r} allocation leaves "
                f"{len(weak)} layer(s) with fewer kept weights than output units: "
                f"{', '.join(weak[:8])}{', ...' if len(weak) > 8 else ''}. A layer that every "
                "path to the output crosses is then nearly disconnected (the usual cause of "
                "a pruned model at chance accuracy). Give every layer a floor: "
                "allocation='global_erk_floor' (or 'erk', 'uniform'), or min_density.",
                stacklevel=4)

    def _is_excluded(self, w):
        return w.layer.name in self.exclude or w.name in self.exclude

    def _optimizer(self):
        return self.optimizer or getattr(self.model, "optimizer", None)

    def rezero(self):
        """Zeroes pruned weights and their optimizer state (momentum, velocity) again."""
        for w in self.wrappers:
            masks_lib.rezero(w, self._optimizer())

    # ------------------------------------------------------------------ logs
    def current_sparsity(self):
        """Fraction of zero mask entries over all wrappers (units in channel mode)."""
        if not self.wrappers:
            return 0.0
        if getattr(self, "granularity", "weight") == "channel":
            return masks_lib.mask_sparsity(
                [ops.convert_to_numpy(w.unit_mask.value) for w in self.wrappers])
        return masks_lib.mask_sparsity(
            [ops.convert_to_numpy(m.value) for w in self.wrappers for m in w.masks])

    def log_name(self, w):
        """The layer's name in logs: the inner layer's, or the wrapper's where several
        wrapped layers share a name (e.g. keras_hub repeats names across blocks)."""
        names = [v.layer.name for v in self.wrappers]
        return w.layer.name if names.count(w.layer.name) == 1 else w.name

    def logs(self):
        """`{"sparsity": overall, "sparsity/<layer>": per layer}` plus the score's logs."""
        out = {"sparsity": self.current_sparsity()}
        for w in self.wrappers:
            ms = [w.unit_mask] if w.granularity == "channel" else w.masks
            out[f"sparsity/{self.log_name(w)}"] = masks_lib.mask_sparsity(
                [ops.convert_to_numpy(m.value) for m in ms])
        if self._channels is not None and self.target != "units":
            out[f"{self.target}_removed"] = self._channels.removed()
        out.update(self.score.logs())
        out.update(gates_lib.logs(self.wrappers, self.log_name))  # VIB gates, if any
        return out
