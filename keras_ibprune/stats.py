"""Statistics for scores: what the held-out batch says about every wrapped layer.

`StatisticsPass` is built once per `Pruner` and reused at every update. On the
TensorFlow backend each batch runs inside one `tf.function` (traced once): the forward
pass with every `PruneWrapper` recording `(input, pre-activation, output)`, the
log-likelihood of a label sampled from the model's own prediction, its gradient with
respect to every layer's pre-activation, and the per-layer sufficient statistics. Only
those statistics leave the function (``O(Σ d_in² + d_in·units)`` numbers per layer); they
are summed over batches on the device and converted to numpy once. On JAX the gradients
come from `jax.value_and_grad` with respect to zero probes added to every pre-activation
(eager); other backends run the forward statistics eagerly and skip the Fisher ones (a
warning says so).

Per Dense / Conv1D / Conv2D layer (inputs ``x`` are the im2col rows feeding one output
position, in the kernel's ``(kh, kw, c_in)`` layout; ``g = ∂ log p(ŷ|x) / ∂z`` with
``ŷ ~ p(·|x)``, the model's predictive distribution; ``P`` output positions):

- ``x2``: ``E[x_i²]`` (Wanda's input energy) and ``gram``: ``H = E[x xᵀ]``, over a fixed,
  stratified subset of at most `max_rows` rows (all of them for Dense layers when
  `max_rows` ≥ the number of samples); windows are gathered only at those positions;
- ``fisher``: ``F_j = Σ_p E[g_pj²]``, the Fisher information of the prediction about
  unit ``j`` (summed over the positions that share its weights);
- ``fisher_x2``: ``D_ij = Σ_p E[g_pj² x_pi²]``, the exact diagonal Fisher of weight ``w_ij``.

Every layer also gets ``z2 = E[z_j²]`` and, when asked, ``t_mean`` (per-sample output
averaged over positions, for information estimates) and sampled pre-activation / output
rows. `capture` (full activations, eager) and `weight_gradients` serve custom scores.
"""

from __future__ import annotations

import dataclasses
import warnings

import keras
import numpy as np
from keras import ops

from keras_ibprune import heldout as heldout_lib
from keras_ibprune import likelihood as likelihood_lib

STATISTICS = ("x2", "gram", "fisher", "fisher_x2", "t_mean", "rows")


@dataclasses.dataclass
class LayerStats:
    """What a `Score` sees of one wrapped layer.

    Attributes:
        wrapper: the `PruneWrapper`.
        weights: numpy copies of the prunable weights (unmasked).
        masks: numpy copies of the current masks.
        index: position of the wrapper in the model's wrapper list.
        labels: held-out labels `(n,)` int or `(n, k)` float, or None.
        summary: dict of the statistics named in `STATISTICS` plus `kind` (`"dense"`,
            `"conv"` or `"other"`), `positions` and `z2`; empty without held-out data.
        inputs, preacts, outputs: full activations (only for scores that ask for them).
        grads: loss gradients w.r.t. each prunable weight (gradient scores only).
        extra: free room for custom scores.
    """

    wrapper: object
    weights: list
    masks: list
    index: int = 0
    labels: np.ndarray | None = None
    summary: dict = dataclasses.field(default_factory=dict)
    inputs: np.ndarray | None = None
    preacts: np.ndarray | None = None
    outputs: np.ndarray | None = None
    grads: list | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def find_wrappers(model):
    """All `PruneWrapper`s in `model` (nested models and subclassed attributes included)."""
    from keras_ibprune import _keras_compat
    from keras_ibprune.wrapper import PruneWrapper

    seen, out = set(), []
    for layer in _keras_compat.all_layers(model):
        if isinstance(layer, PruneWrapper) and id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def _np(x):
    return None if x is None else np.asarray(ops.convert_to_numpy(x))


def _tensors(x):
    """A batch (one array, or a dict / list of arrays) as backend tensors."""
    if isinstance(x, dict):
        return {k: ops.convert_to_tensor(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [ops.convert_to_tensor(v) for v in x]
    return ops.convert_to_tensor(x)


def layer_kind(layer):
    """`"dense"`, `"conv"` (channels_last Conv1D/2D, groups 1) or `"other"`."""
    L = keras.layers
    if isinstance(layer, L.Dense):
        return "dense"
    skip = (L.Conv1DTranspose, L.Conv2DTranspose, L.DepthwiseConv1D, L.DepthwiseConv2D,
            L.SeparableConv1D, L.SeparableConv2D)
    if isinstance(layer, (L.Conv1D, L.Conv2D)) and not isinstance(layer, skip):
        if getattr(layer, "data_format", "channels_last") == "channels_last" and getattr(
            layer, "groups", 1
        ) == 1 and layer.padding != "causal":
            return "conv"
    return "other"


# --------------------------------------------------------------- per-layer math
def _sampled_inputs(x, layer, kind, idx, positions, out_hw):
    """Input rows `(b * k, d_in)` feeding the sampled output positions `idx` `(b, k)`.

    Dense: the input vectors. Conv: the receptive-field windows in the kernel's
    `(kh, kw, c_in)` layout (zero padding as the layer pads), gathered directly at the
    sampled positions (no full im2col).
    """
    b = ops.shape(x)[0]
    if idx is None:
        idx = ops.broadcast_to(ops.arange(positions, dtype="int32")[None], (b, positions))
    if kind == "dense":
        return _gather(ops.reshape(x, (b, positions, x.shape[-1])), idx)
    if layer.rank == 1:
        x = ops.expand_dims(x, 1)
        k, s, d = (1, layer.kernel_size[0]), (1, layer.strides[0]), (1, layer.dilation_rate[0])
    else:
        k, s, d = tuple(layer.kernel_size), tuple(layer.strides), tuple(layer.dilation_rate)
    size_in, c = tuple(x.shape[1:3]), x.shape[3]
    pads = []
    for n_in, kk, ss, dd, n_out in zip(size_in, k, s, d, out_hw):
        total = max((n_out - 1) * ss + (kk - 1) * dd + 1 - n_in, 0)
        total = total if layer.padding == "same" else 0
        pads.append((total // 2, total - total // 2))
    x = ops.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    hp, wp = x.shape[1], x.shape[2]
    oh, ow = idx // out_hw[1], idx % out_hw[1]  # (b, k)
    du = np.repeat(np.arange(k[0]) * d[0], k[1])  # window offsets, (kh*kw,), row-major
    dv = np.tile(np.arange(k[1]) * d[1], k[0])
    rows = oh[..., None] * s[0] + ops.convert_to_tensor(du, "int32")
    cols = ow[..., None] * s[1] + ops.convert_to_tensor(dv, "int32")
    flat = ops.reshape(rows * wp + cols, (b, -1))  # (b, k * kh * kw)
    win = ops.take_along_axis(ops.reshape(x, (b, hp * wp, c)), ops.expand_dims(flat, -1),
                              axis=1)
    return ops.reshape(win, (-1, k[0] * k[1] * c))


def _sample_positions(b, positions, k):
    """A fixed stratified subset of `k` of `positions` output positions per sample."""
    if k >= positions:
        return None
    j = ops.arange(k, dtype="int32") * (positions // k)
    shift = (ops.arange(b, dtype="int32") * 7919) % max(positions // k, 1)
    return (j[None, :] + shift[:, None]) % positions


def _gather(a, idx):
    """`a[b, idx[b, j]]` for `a` of shape `(b, P, d)` -> `(b * k, d)`."""
    if idx is None:
        return ops.reshape(a, (-1, ops.shape(a)[-1]))
    g = ops.take_along_axis(a, ops.expand_dims(idx, -1), axis=1)
    return ops.reshape(g, (-1, ops.shape(a)[-1]))


def _layer_stats(wrapper, kind, recs, grads, needs, rows_per_sample, max_gram_dim):
    """Sums over this batch for one wrapper (every call of a reused layer counts)."""
    out = {}
    first = True
    for (x, z, t), g in zip(recs, grads):
        b = ops.shape(z)[0]
        units = z.shape[-1]
        positions = int(np.prod(z.shape[1:-1]))  # static: the model's spatial shape
        z3 = ops.reshape(z, (b, positions, units))
        t3 = ops.reshape(t, (b, positions, units))
        idx = _sample_positions(b, positions, rows_per_sample)
        part = {"z2": ops.sum(ops.square(z3), axis=(0, 1)),
                "rows_all": ops.cast(b * positions, "float32")}
        if first and "t_mean" in needs:
            part["t_mean"] = ops.mean(t3, axis=1)
        if first and "rows" in needs:
            part["z_rows"], part["t_rows"] = _gather(z3, idx), _gather(t3, idx)
        g3 = None
        if g is not None:
            g3 = ops.reshape(g, (b, positions, units))
            part["fisher"] = ops.sum(ops.square(g3), axis=(0, 1))
        if kind != "other" and x is not None and needs & {"x2", "gram", "fisher_x2"}:
            out_hw = tuple(z.shape[1:3]) if kind == "conv" and len(z.shape) == 4 else (
                1, positions)
            xs = _sampled_inputs(x, wrapper.layer, kind, idx, positions, out_hw)
            part["x2"] = ops.sum(ops.square(xs), axis=0)
            part["rows_sampled"] = ops.cast(ops.shape(xs)[0], "float32")
            if "gram" in needs and xs.shape[-1] <= max_gram_dim:
                part["gram"] = ops.matmul(ops.transpose(xs), xs)
            if "fisher_x2" in needs and g3 is not None:
                part["rows_fisher"] = part["rows_sampled"]
                gs = _gather(g3, idx)
                part["fisher_x2"] = ops.matmul(ops.transpose(ops.square(xs)), ops.square(gs))
        for k, v in part.items():
            out[k] = v if k not in out or k in ("t_mean", "z_rows", "t_rows") else out[k] + v
        out.setdefault("positions", ops.convert_to_tensor(positions, "int32"))
        first = False
    return out


# ------------------------------------------------------------------- the pass
class StatisticsPass:
    """Computes the statistics of every wrapper over held-out data; built once.

    Args:
        model: the wrapped model.
        wrappers: its `PruneWrapper`s.
        needs: statistics to compute (names from `STATISTICS`).
        output: for multi-output models, the output (index or name) whose prediction the
            Fisher information is about.
        fisher: `"model"` (labels sampled from the model's prediction: the Fisher
            information) or `"empirical"` (the held-out labels).
        max_rows: rows (samples × sampled positions) per conv layer for `gram`,
            `fisher_x2` and `rows`.
        fisher_samples: held-out samples (the first ones, whole batches) whose gradients
            give the Fisher statistics; None = all. The forward statistics always use all.
        max_gram_dim: layers with more inputs get no `gram` (memory `d_in²`); scores then
            fall back to the diagonal `x2`.
        batch_size: samples per traced call.
        seed: seed of the label sampling.
    """

    def __init__(self, model, wrappers, needs, output=None, fisher="model", max_rows=4096,
                 fisher_samples=None, max_gram_dim=4096, batch_size=256, seed=0):
        unknown = set(needs) - set(STATISTICS)
        if unknown:
            raise ValueError(f"Unknown statistics. Expected names from {STATISTICS}. "
                             f"Received: {sorted(unknown)}")
        if fisher not in ("model", "empirical"):
            raise ValueError("`fisher` must be 'model' or 'empirical'. Received: "
                             f"fisher={fisher!r}")
        self.model, self.wrappers, self.needs = model, list(wrappers), set(needs)
        self.output = likelihood_lib.resolve_output(model, output)
        self.fisher, self.seed = fisher, int(seed)
        self.max_rows, self.batch_size = int(max_rows), int(batch_size)
        self.fisher_samples = None if fisher_samples is None else int(fisher_samples)
        self.max_gram_dim = int(max_gram_dim)
        self.kinds = [layer_kind(w.layer) for w in self.wrappers]
        self.gradients = bool(self.needs & {"fisher", "fisher_x2"})
        if self.gradients and keras.backend.backend() not in ("tensorflow", "jax"):
            warnings.warn(
                "The Fisher statistics need the TensorFlow or JAX backend; on the "
                f"{keras.backend.backend()!r} backend they are skipped and the 'ib' score falls "
                "back to the label-free OBS saliency ½ w² / [H⁻¹]_ii (score='obs' also uses "
                "it, with allocation='erk').",
                stacklevel=3,
            )
            self.gradients = False
        self._fns, self._lik = {}, None

    def _batch(self, x, u, target, lik, rows_per_sample, with_grad):
        recs = {id(w): [] for w in self.wrappers}
        try:
            for w in self.wrappers:
                w._capture = recs[id(w)]
            grads = self._forward_backward(x, u, target, lik, recs, with_grad)
        finally:
            for w in self.wrappers:
                w._capture = None
        out = []
        for w, kind in zip(self.wrappers, self.kinds):
            gs = grads.get(id(w)) or [None] * len(recs[id(w)])
            out.append(_layer_stats(w, kind, recs[id(w)], gs, self.needs, rows_per_sample,
                                    self.max_gram_dim))
        return out

    def _forward_backward(self, x, u, target, lik, recs, with_grad):
        if not with_grad:
            self.model(x, training=False)
            return {}
        if keras.backend.backend() == "jax":
            return self._forward_backward_jax(x, u, target, lik, recs)
        import tensorflow as tf  # lazily: gradients w.r.t. intermediate activations

        with tf.GradientTape() as tape:
            out = likelihood_lib.output_of(self.model(x, training=False), self.output)
            ll = likelihood_lib.log_likelihood(out, lik, u, target)
        flat = [(id(w), r[1]) for w in self.wrappers for r in recs[id(w)]]
        g = tape.gradient(ll, [z for _, z in flat],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = {}
        for (key, _), gi in zip(flat, g):
            grads.setdefault(key, []).append(gi)
        return grads

    def _forward_backward_jax(self, x, u, target, lik, recs):
        """JAX: the gradient w.r.t. zero probes added to every pre-activation."""
        import jax  # lazily: only on the JAX backend

        for w in self.wrappers:  # shapes of every call's pre-activation
            w._capture = []
        self.model(x, training=False)
        shapes = {id(w): [tuple(r[1].shape) for r in w._capture] for w in self.wrappers}

        def probed_log_likelihood(probes):
            for w in self.wrappers:
                w._capture, w._probes = [], probes[str(id(w))]
            out = likelihood_lib.output_of(self.model(x, training=False), self.output)
            records = {str(id(w)): list(w._capture) for w in self.wrappers}
            return likelihood_lib.log_likelihood(out, lik, u, target), records

        zeros = {str(k): [jax.numpy.zeros(sh, "float32") for sh in v]
                 for k, v in shapes.items()}
        try:
            (_, records), grads = jax.value_and_grad(probed_log_likelihood, has_aux=True)(zeros)
        finally:
            for w in self.wrappers:
                w._probes = None
        for w in self.wrappers:
            recs[id(w)][:] = records[str(id(w))]
        return {id(w): grads[str(id(w))] for w in self.wrappers}

    def _compiled(self, lik, rows_per_sample, has_target, with_grad):
        key = (lik, rows_per_sample, has_target, with_grad)
        if key not in self._fns:
            def fn(x, u, target):
                return self._batch(x, u, target if has_target else None, lik, rows_per_sample,
                                   with_grad)

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                fn = tf.function(fn, reduce_retracing=True, autograph=False)
            self._fns[key] = fn
        return self._fns[key]

    def __call__(self, x, y):
        """Returns one dict of numpy statistics per wrapper (see the module doc)."""
        from keras_ibprune.estimators import label_kind

        n = heldout_lib.num_samples(x)
        kind = "classes" if y is None else label_kind(y)[0]
        if self._lik is None:  # how outputs define p(y|x): probed once per pass
            out = self.model(heldout_lib.slice_inputs(x, slice(0, min(n, 8))), training=False)
            probe = _np(likelihood_lib.output_of(out, self.output))
            self._lik = (likelihood_lib.likelihood_kind(probe, kind),
                         int(np.prod(probe.shape[1:])))
        lik, width = self._lik
        target = None
        if self.fisher == "empirical":
            if y is None:
                raise ValueError("fisher='empirical' needs held-out labels. Received: y=None")
            target = label_kind(y)[1] if kind == "classes" else np.asarray(y, np.float32)
        rng = np.random.default_rng(self.seed)
        u = (rng.normal(size=(n, width)) if lik == "gaussian" else rng.random(n)).astype(
            "float32")
        rows_per_sample = max(1, -(-self.max_rows // max(n, 1)))
        n_fisher = n if self.fisher_samples is None else min(n, self.fisher_samples)
        step = -(-n // -(-n // self.batch_size))  # equal batches: no retrace for a remainder
        totals, fisher_seen = None, 0
        for i in range(0, n, step):
            sl = slice(i, i + step)
            with_grad = self.gradients and i < n_fisher
            xb = heldout_lib.slice_inputs(x, sl)
            fisher_seen += heldout_lib.num_samples(xb) if with_grad else 0
            fn = self._compiled(lik, rows_per_sample, target is not None, with_grad)
            tb = None if target is None else ops.convert_to_tensor(target[sl])
            parts = fn(_tensors(xb), ops.convert_to_tensor(u[sl]), tb)
            if totals is None:
                totals = [{k: [v] if k in ("t_mean", "z_rows", "t_rows") else v
                           for k, v in p.items()} for p in parts]
                continue
            for tot, p in zip(totals, parts):
                for k, v in p.items():
                    if k in ("t_mean", "z_rows", "t_rows"):
                        tot[k].append(v)
                    elif k != "positions":
                        tot[k] = tot[k] + v if k in tot else v
        return [self._finish(w, kind_, tot, n, fisher_seen) for w, kind_, tot in
                zip(self.wrappers, self.kinds, totals or [{}] * len(self.wrappers))]

    def _finish(self, w, kind, tot, n, n_fisher):
        s = {"kind": kind}
        if not tot:
            return s
        positions = int(_np(tot["positions"])) if "positions" in tot else 1
        s["positions"] = positions
        rows_all = float(_np(tot["rows_all"]))
        s["z2"] = _np(tot["z2"]).astype(np.float64) / rows_all
        if not np.all(np.isfinite(s["z2"])):  # a NaN/inf anywhere reaches the sum
            raise ValueError(
                f"Layer '{w.layer.name}' produced NaN or inf pre-activations on the held-out "
                "data (the model may have diverged; lower the learning rate). Received: "
                f"E[z²] = {s['z2'][~np.isfinite(s['z2'])][:3].tolist()}..."
            )
        for k in ("t_mean", "z_rows", "t_rows"):
            if k in tot:
                s[k] = np.concatenate([_np(v) for v in tot[k]]).astype(np.float64)
        if "fisher" in tot:
            s["fisher"] = _np(tot["fisher"]).astype(np.float64) / max(n_fisher, 1)
        if "x2" in tot:
            kshape = tuple(w.prunable_weights[0].shape)
            m = float(_np(tot["rows_sampled"]))
            s["x2"] = (_np(tot["x2"]).astype(np.float64) / m).reshape(kshape[:-1])
            if "gram" in tot:
                s["gram"] = _np(tot["gram"]).astype(np.float64) / m
            if "fisher_x2" in tot:
                mf = float(_np(tot["rows_fisher"]))
                s["fisher_x2"] = _np(tot["fisher_x2"]).astype(np.float64) / mf * positions
        return s


# ------------------------------------------------------ full activations, gradients
def capture(model, x, wrappers, batch_size=256):
    """Runs `model` on `x` once (eagerly) and returns, per wrapper, `(inputs, preacts,
    outputs)` numpy arrays; reused layers contribute every call (concatenated)."""
    parts = {id(w): [] for w in wrappers}
    try:
        for i in range(0, heldout_lib.num_samples(x), batch_size):
            recs = {id(w): [] for w in wrappers}
            for w in wrappers:
                w._capture = recs[id(w)]
            model(heldout_lib.slice_inputs(x, slice(i, i + batch_size)), training=False)
            for w in wrappers:
                parts[id(w)].extend(tuple(_np(p) for p in r) for r in recs[id(w)])
    finally:
        for w in wrappers:
            w._capture = None
    out = []
    for w in wrappers:
        rec = parts[id(w)]
        out.append(tuple(np.concatenate(col, axis=0) for col in zip(*rec)) if rec
                   else (None, None, None))
    return out


def weight_gradients(model, x, y, wrappers, loss, batch_size=256):
    """Mean over batches of d loss / d w for each prunable weight (TensorFlow backend)."""
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "Gradient-based scores currently need the TensorFlow backend. Received: "
            f"backend={keras.backend.backend()!r}"
        )
    import tensorflow as tf  # lazily: only for gradient scores on the TF backend

    if loss is None:
        raise ValueError(
            "Gradient-based scores need a compiled model (a loss). Received: loss=None"
        )
    if y is None:
        raise ValueError("Gradient-based scores need held-out labels. Received: y=None")
    variables = [v for w in wrappers for v in w.prunable_weights]
    total = [np.zeros(tuple(v.shape), np.float64) for v in variables]
    n = heldout_lib.num_samples(x)
    for i in range(0, n, batch_size):
        xb, yb = heldout_lib.slice_inputs(x, slice(i, i + batch_size)), y[i : i + batch_size]
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=False))
        for j, gj in enumerate(tape.gradient(value, variables)):
            if gj is not None:
                total[j] += np.asarray(gj) * (len(yb) / n)
    out, k = [], 0
    for w in wrappers:
        out.append(total[k : k + len(w.prunable_weights)])
        k += len(w.prunable_weights)
    return out


def blas_threads(n=1):
    """Context limiting BLAS threads (threadpoolctl, a scikit-learn dependency) to `n`.

    The statistics end in many small factorizations; with TensorFlow's thread pool busy
    on the same cores, multi-threaded BLAS is several times slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")
