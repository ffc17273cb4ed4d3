"""Variational information bottleneck gates (Dai et al., 2018, "VIBNet").

With ``kib.prune(model, granularity="channel", gates="vib")`` every channel wrapper holds
one multiplicative gate per output unit, ``z_j = μ_j + σ_j ε_j``: ``ε ~ N(0, 1)`` is
drawn per sample and unit in training (shared over spatial positions of a conv output)
and ``z = μ`` in inference and `predict`, so a trained model is deterministic. The
wrapper adds, through Keras' `add_loss`,

    γ · Σ_j m_j log(1 + μ_j² / σ_j²)

(``m`` the unit mask): an upper bound, in nats, on the information the layer passes on
(the KL term of the variational bound), weighted by γ. ``α_j = μ_j²/σ_j²`` is the
unit's signal-to-noise ratio: a unit the loss does not need is driven to ``α → 0``, and
``IBPruning(score="vib")`` removes units in increasing order of α (one ranking across
layers, since α is an SNR, with the usual units/FLOPs/params targets).

Where the gate sits (chosen so it folds exactly into the layer's own kernel and bias, and
exported models carry no gate op): on the layer's output, after the activation, when the
activation commutes with positive scaling (linear, ReLU, leaky ReLU: ``μ·f(a) = f(μ·a)``,
with μ kept ≥ 0 by a non-negativity constraint; the next layer absorbs signs); on the
pre-activation ``f(z ⊙ (Wx + b))`` for other activations (tanh, sigmoid, GELU, ...).
Either way `strip_pruning` / `shrink` multiply μ into the unit's kernel column and bias.

The gate variables (``gate_mu``, ``gate_log_sigma2``, the scalar ``gate_gamma``) and
the noise seed are weights of the `PruneWrapper`, so `model.save` mid-training and
`load_model` restore them without custom objects; γ is a variable, so `set_gate_gamma` takes
effect at the next step without recompiling.

Coupled units share one gate: producers whose outputs meet channel by channel (the
branches of a residual `Add`) use the gate of the first of them (`gate_shared_with` in the
others' config names it), so the KL term counts each coupled unit once and α is the unit's
single SNR. Each member keeps its own noise seed, started in the owner's state; as every
member draws once per forward pass, the seeds stay in step and the group draws the same ε.
Sharing is re-established from the configs when Keras rebuilds the graph (`load_model`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_ibprune import _keras_compat

GATES = (None, "vib")
DEFAULT_GAMMA = 1e-4
DEFAULT_LOG_SIGMA2 = -6.0
_LOG_SIGMA2_RANGE = (-20.0, 10.0)


def check_gates(gates, granularity, layer=None):
    """Validates the `gates` argument of `prune` / `PruneWrapper`; returns it."""
    if gates not in GATES:
        raise ValueError(f"`gates` must be None or 'vib'. Received: gates={gates!r}")
    if gates is not None and granularity != "channel":
        raise ValueError(
            "gates='vib' gates output units and needs granularity='channel'. Received: "
            f"granularity={granularity!r}" + ("" if layer is None else f" for layer {layer.name!r}")
        )
    return gates


def check_gamma(gamma, arg="gamma"):
    """A non-negative float γ (None = the default)."""
    if gamma is None:
        return DEFAULT_GAMMA
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = -1.0
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{arg}` must be a non-negative float. Received: {arg}={gamma!r}")
    return value


def commutes_with_scaling(activation):
    """Whether `f(c·a) = c·f(a)` for c > 0 (linear, ReLU, leaky ReLU), probed numerically."""
    if activation is None:
        return True
    a = np.linspace(-8.0, 8.0, 33, dtype="float32")
    try:
        f1 = ops.convert_to_numpy(activation(ops.convert_to_tensor(3.0 * a)))
        f2 = 3.0 * ops.convert_to_numpy(activation(ops.convert_to_tensor(a)))
    except Exception:  # noqa: BLE001 - an activation that cannot take a vector: be safe
        return False
    return bool(np.allclose(f1, f2, rtol=1e-5, atol=1e-5))


class VIBGate:
    """The gate variables of one `PruneWrapper` (created by the wrapper's build).

    Attributes:
        mu: `(units,)` gate means μ (trainable, ≥ 0, initialized to 1).
        log_sigma2: `(units,)` log noise variances (trainable).
        gamma: scalar γ (non-trainable variable).
        pre: True when the gate multiplies the owner's pre-activation (activations that
            do not commute with scaling), False when it multiplies the layer output. Each
            wrapper sharing the gate places it for its own activation (`gate_pre`).
    """

    def __init__(self, wrapper, units, gamma, log_sigma2_init):
        self.mu = wrapper.add_weight(
            name="gate_mu",
            shape=(units,),
            initializer="ones",
            constraint=keras.constraints.NonNeg(),
            trainable=True,
            dtype="float32",
        )
        self.log_sigma2 = wrapper.add_weight(
            name="gate_log_sigma2",
            shape=(units,),
            initializer=keras.initializers.Constant(float(log_sigma2_init)),
            trainable=True,
            dtype="float32",
        )
        self.gamma = wrapper.add_weight(
            name="gate_gamma",
            shape=(),
            initializer=keras.initializers.Constant(float(gamma)),
            trainable=False,
            dtype="float32",
        )
        for name in ("mu", "log_sigma2", "gamma"):
            _keras_compat.track_for_checkpoint(wrapper, f"gate_{name}", getattr(self, name))
        self.seed = keras.random.SeedGenerator(name="gate_seed")
        wrapper.gate_seed = self.seed  # tracked by the wrapper: saved, updated in training
        self.pre = not commutes_with_scaling(getattr(wrapper.layer, "activation", None))

    def _log_sigma2(self):
        return ops.clip(self.log_sigma2, *_LOG_SIGMA2_RANGE)

    def sample(self, x, training, seed=None):
        """The gate for output `x` (channels last): `μ + σ ε` in training, else `μ`.

        `seed`: the calling wrapper's seed generator (default: the owner's). Wrappers
        sharing this gate keep generators in the same state, so they draw the same ε.
        """
        mu = ops.cast(self.mu, x.dtype)
        if not training:
            return mu
        rank = len(x.shape)
        shape = (ops.shape(x)[0],) + (1,) * (rank - 2) + (int(self.mu.shape[0]),)
        eps = keras.random.normal(shape, seed=seed or self.seed, dtype=x.dtype)
        sigma = ops.cast(ops.exp(0.5 * self._log_sigma2()), x.dtype)
        return mu + sigma * eps

    def kl(self, unit_mask=None):
        """`γ Σ_j m_j log(1 + μ_j²/σ_j²)` as a scalar tensor."""
        per = ops.log1p(ops.square(self.mu) * ops.exp(-self._log_sigma2()))
        if unit_mask is not None:
            per = per * ops.cast(unit_mask, per.dtype)
        return self.gamma * ops.sum(per)

    def alpha(self):
        """`α = μ²/σ²` per unit (numpy, float64)."""
        mu = ops.convert_to_numpy(self.mu.value).astype(np.float64)
        s = np.clip(ops.convert_to_numpy(self.log_sigma2.value), *_LOG_SIGMA2_RANGE)
        return mu**2 * np.exp(-s.astype(np.float64))

    def mean(self):
        """μ (numpy): the deterministic gate, folded into the weights on export."""
        return ops.convert_to_numpy(self.mu.value)


# ------------------------------------------------------------ coupled units: one gate
def plan_sharing(model, gated):
    """`{member layer name: owner layer name}`: coupled producers that share one gate.

    Gated layers (names in `gated`) whose output channels meet channel by channel (a
    residual `Add`: `channel_groups` maps every unit of each to the same group channel)
    share the gate of the first of them in graph order. Groups with offsets or partial
    maps (a Concatenate feeding an Add) keep a gate per layer.
    """
    from keras_ibprune.groups import channel_groups

    out = {}
    for group in channel_groups(model):
        names = [n for n in group.members if n in gated]
        same = [n for n in names if np.array_equal(group.members[n], np.arange(group.size))]
        for name in same[1:]:
            out[name] = same[0]
    return out


def link(member, owner):
    """Makes `member` use `owner`'s gate (and start its noise seed where the owner's is)."""
    if owner.gate is None or owner.gate.mu.shape != (member.unit_mask.shape[0],):
        raise ValueError(
            f"Layer {member.name!r} shares the VIB gate of {owner.name!r}, which has no gate "
            f"over {member.unit_mask.shape[0]} units. Received: gate_shared_with="
            f"{member.gate_shared_with!r}"
        )
    member.gate = owner.gate
    member.gate_seed.state.assign(owner.gate_seed.state.value)


def link_in_graph(wrapper, tensors):
    """Links the shared gates `wrapper` takes part in, searching the graph around `tensors`.

    Called on symbolic calls (Functional construction, `load_model`): a member finds its
    owner, an owner its members already wired, by layer name.
    """
    wrappers = [
        op
        for op in _keras_compat.connected_operations(tensors)
        if getattr(op, "gates", None) is not None and op is not wrapper
    ]
    if wrapper.gate_shared_with:
        owners = [w for w in wrappers if w.name == wrapper.gate_shared_with and w.gate]
        if owners:
            link(wrapper, owners[0])
    elif wrapper.gate is not None:
        for w in wrappers:
            if w.gate_shared_with == wrapper.name and w.gate is None and w.built:
                link(w, wrapper)


def link_model(model):
    """Links every `gate_shared_with` wrapper of `model` to its owner, by name."""
    from keras_ibprune.stats import find_wrappers

    wrappers = find_wrappers(model)
    by_name = {w.name: w for w in wrappers}
    for w in wrappers:
        if w.gate_shared_with and w.gate is None:
            if w.gate_shared_with not in by_name:
                raise ValueError(
                    f"Layer {w.name!r} shares the VIB gate of a layer the model does not "
                    f"have. Received: gate_shared_with={w.gate_shared_with!r}"
                )
            link(w, by_name[w.gate_shared_with])


def unique(wrappers):
    """`(wrapper, gate)` pairs, one per gate: members of a shared gate count once."""
    seen, out = set(), []
    for w in wrappers:
        gate = getattr(w, "gate", None)
        if gate is not None and id(gate) not in seen:
            seen.add(id(gate))
            out.append((w, gate))
    return out


# ------------------------------------------------------------------ model-level helpers
def gated_wrappers(model):
    """The `PruneWrapper`s of `model` (or the wrapper itself) that hold VIB gates."""
    from keras_ibprune.stats import find_wrappers
    from keras_ibprune.wrapper import PruneWrapper

    found = [model] if isinstance(model, PruneWrapper) else find_wrappers(model)
    return [w for w in found if getattr(w, "gate", None) is not None]


def set_gate_gamma(model, gamma, layers=None):
    """Sets γ of the VIB gates of `model` (all gated layers, or those named in `layers`).

    γ is a variable: the change applies at the next training step, no recompile needed.

    Args:
        model: a model (or a `PruneWrapper`) pruned with `gates="vib"`.
        gamma: a non-negative float, or a dict `{layer name: γ}`.
        layers: optional names (inner layer or wrapper names) to restrict a float γ to.

    Raises:
        ValueError: no gated layer, an unknown name or a bad γ.
    """
    wrappers = gated_wrappers(model)
    if not wrappers:
        raise ValueError(
            "The model has no VIB gates: prune it with `kib.prune(model, "
            "granularity='channel', gates='vib')`. Received: "
            f"model={getattr(model, 'name', model)!r}"
        )
    if isinstance(gamma, dict):
        values = {k: check_gamma(v) for k, v in gamma.items()}
    else:
        value = check_gamma(gamma)
        names = layers if layers is not None else [w.name for w in wrappers]
        values = {n: value for n in ([names] if isinstance(names, str) else names)}
    known = {w.name for w in wrappers} | {w.layer.name for w in wrappers}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"No gated layer named {unknown}. Gated layers: "
            f"{sorted(w.layer.name for w in wrappers)}. Received: gamma={gamma!r}, "
            f"layers={layers!r}"
        )
    for w in wrappers:
        for key in (w.name, w.layer.name):
            if key in values:
                w.gate.gamma.assign(values[key])
                for v in wrappers:  # the configs follow the (possibly shared) variable
                    if v.gate is w.gate:
                        v.gate_gamma = values[key]


def logs(wrappers, name_of=None):
    """Per-layer mean `α`, mean `log α` and kept units, and the model's KL bound.

    Returns a dict: ``vib/kl`` (Σ over gated layers of Σ_j m_j log(1 + α_j), nats, not
    weighted by γ), ``vib/kl_loss`` (weighted by each layer's γ: what the loss adds),
    ``vib/alpha/<layer>``, ``vib/log_alpha/<layer>`` (over the layer's kept units) and
    ``vib/units/<layer>`` (units kept by the mask). Empty if no wrapper is gated.
    """
    out = {}
    kl = kl_loss = 0.0
    owners = {id(w) for w, _ in unique(wrappers)}
    for w in wrappers:
        gate = getattr(w, "gate", None)
        if gate is None:
            continue
        name = name_of(w) if name_of is not None else w.layer.name
        a = gate.alpha()
        keep = ops.convert_to_numpy(w.unit_mask.value) > 0.5
        live = a[keep] if keep.any() else a
        per = np.log1p(a) * keep
        if id(w) in owners:  # a shared gate's bound counts once
            kl += float(per.sum())
            kl_loss += float(per.sum()) * float(ops.convert_to_numpy(gate.gamma.value))
        out[f"vib/alpha/{name}"] = float(np.mean(live))
        out[f"vib/log_alpha/{name}"] = float(np.mean(np.log(np.maximum(live, 1e-30))))
        out[f"vib/units/{name}"] = float(keep.sum())
    if out:
        out["vib/kl"] = kl
        out["vib/kl_loss"] = kl_loss
    return out
