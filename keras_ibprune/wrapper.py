"""`PruneWrapper`: a Keras layer wrapper that holds pruning masks.

The wrapper keeps one non-trainable mask per prunable weight of the inner layer
(``granularity="weight"``) or one mask over the layer's output units/filters
(``granularity="channel"``). The forward pass runs the inner layer with each prunable
weight ``w`` replaced by ``w * mask`` (through ``keras.StatelessScope``, so any layer,
on any backend, sees masked weights and gradients of pruned weights are exactly zero).
Channel masks multiply the layer's output after bias and activation.

There is no step counter and no assert in ``call``: the masks are state, the policy that
changes them lives in the `IBPruning` callback / `Pruner`.
"""

from __future__ import annotations

import inspect

import keras
from keras import ops

from keras_ibprune import _keras_compat, baking, patterns, quantize, registry
from keras_ibprune import gates as gates_lib

GRANULARITIES = ("weight", "channel")


def _single_shape_build(layer):
    """Whether `layer.build` takes (at most) one required shape argument."""
    try:
        params = inspect.signature(layer.build).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return True
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) <= 1


@keras.saving.register_keras_serializable(package="keras_ibprune")
class PruneWrapper(keras.layers.Wrapper):
    """Wraps a Keras layer and masks its prunable weights (or output units).

    Args:
        layer: the layer to prune (Dense, Conv*, DepthwiseConv*, SeparableConv*,
            EinsumDense, Embedding, MultiHeadAttention, SimpleRNN/LSTM/GRU, RNN over their
            cells, or a custom layer defining `get_prunable_weights()`). Every call form of
            the layer works on the wrapper (keywords, several inputs, `training`, masks).
        granularity: `"weight"` (unstructured masks, one per prunable weight) or
            `"channel"` (one mask over output units/filters, for `shrink`).
        block_size: optional `(rows, cols)` block for weight masks: weights are kept or
            removed in blocks of the kernel viewed as a 2-D matrix
            `(prod(shape[:-1]), shape[-1])` = `(inputs, units)`. TFLite executes Dense
            kernels sparse with `(4, 1)` (float) or `(16, 1)` (int8) blocks (4 / 16
            consecutive inputs of one unit); other layouts are stored sparse only.
        pattern: optional N:M sparsity, `"2:4"` or `(2, 4)`: of every M consecutive
            inputs of a unit (rows of the `(inputs, units)` matrix) at most M − N are
            removed, so at the schedule's end (sparsity `1 − N/M`) each group keeps exactly
            N — the layout sparse tensor cores (2:4) and some NPUs run. The score chooses
            which N survive in each group. A last, shorter group keeps `min(size, N)`.
        gates: channel granularity only: `"vib"` gives every output unit a variational
            information bottleneck gate (`keras_ibprune.gates`), trained by `fit` through
            a KL term in `add_loss`; None (default): no gate.
        gate_gamma: γ, the weight of this layer's KL term (default 1e-4).
        gate_log_sigma2: initial log noise variance of the gates (default -6).
        gate_shared_with: name of the wrapper whose gate this one uses (coupled units,
            e.g. the branches of a residual `Add`; set by `kib.prune`): no gate variables
            of its own and no KL term (the owner counts the units once).
        fake_quant: compute with int8 fake-quantized masked weights and outputs, as TFLite's
            int8 export will (`keras_ibprune.quantize`; set by `kib.quantize_aware`).
        **kwargs: base layer keyword arguments (`name`, ...).

    Example:

    ```python
    fc = kib.PruneWrapper(keras.layers.Dense(10))
    y = fc(np.ones((2, 4)))            # identical to the plain layer while masks are 1
    fc.masks[0].shape                  # (4, 10)
    ```
    """

    def __init__(
        self,
        layer,
        granularity="weight",
        block_size=None,
        pattern=None,
        gates=None,
        gate_gamma=None,
        gate_log_sigma2=None,
        gate_shared_with=None,
        fake_quant=False,
        **kwargs,
    ):
        if isinstance(layer, PruneWrapper):
            raise ValueError(
                "The layer is already a PruneWrapper; wrapping it twice is not allowed. "
                f"Received: layer={layer.name!r} (PruneWrapper around {layer.layer.name!r})"
            )
        if not isinstance(layer, keras.layers.Layer):
            raise ValueError(
                f"PruneWrapper expects a keras.layers.Layer. Received: layer={layer!r}"
            )
        if isinstance(layer, keras.Model):
            raise ValueError(
                "PruneWrapper wraps a single layer, not a model: use `kib.prune(model)`. "
                f"Received: layer={layer.name!r} of type {type(layer).__name__}"
            )
        if not registry.is_prunable(layer):
            raise ValueError(registry.unsupported_message(layer))
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"`granularity` must be one of {GRANULARITIES}. Received: granularity="
                f"{granularity!r}"
            )
        if granularity == "channel" and not registry.supports_channels(layer):
            raise ValueError(
                f"granularity='channel' needs a channels_last Dense/Conv-style layer. Received: "
                f"layer={layer.name!r} of type {type(layer).__name__}"
            )
        kwargs.setdefault("name", f"prune_{layer.name}")
        super().__init__(layer, **kwargs)
        self.granularity = granularity
        self.block_size, self.pattern = patterns.check_layout(
            layer, granularity, block_size, pattern
        )
        self.gates = gates_lib.check_gates(gates, granularity, layer)
        self.gate_gamma = gates_lib.check_gamma(gate_gamma, "gate_gamma")
        self.gate_log_sigma2 = float(
            gates_lib.DEFAULT_LOG_SIGMA2 if gate_log_sigma2 is None else gate_log_sigma2
        )
        if gate_shared_with is not None and (
            self.gates is None or not isinstance(gate_shared_with, str)
        ):
            raise ValueError(
                "`gate_shared_with` names the wrapper whose VIB gate to share: a layer name, "
                f"with gates='vib'. Received: gate_shared_with={gate_shared_with!r}, "
                f"gates={gates!r}"
            )
        self.gate_shared_with = gate_shared_with
        self.gate_pre = False  # the gate scales the pre-activation (set at build)
        self.gate = None  # gates_lib.VIBGate once built (gates="vib"), or the owner's
        self.fake_quant, self.quant_range = bool(fake_quant), None  # see keras_ibprune.quantize
        self.masks = []
        self.unit_mask = None
        self._masks_built = False
        self._capture = None  # set by keras_ibprune.stats while capturing activations
        self._probes = None  # stats: zeros added to the pre-activation (gradients on JAX)
        self.supports_masking = getattr(layer, "supports_masking", False)
        _keras_compat.copy_call_signature(self, layer)

    def __setattr__(self, name, value):
        if name in ("_capture", "_probes"):
            # A plain sink list set by keras_ibprune.stats: keep it untracked (Keras would
            # copy a list into a TrackedList and the caller would never see the records).
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ build
    def build(self, input_shape=None, **shapes):
        # Keras passes the first input's shape; a parent layer may call
        # `build(query_shape=..., value_shape=...)` as it would on the inner layer.
        if not self.layer.built:
            if shapes:
                self.layer.build(*(() if input_shape is None else (input_shape,)), **shapes)
            elif input_shape is not None and _single_shape_build(self.layer):
                self.layer.build(input_shape)
            # Otherwise (several inputs) the inner layer builds on the first call.
        if self.layer.built:
            self._build_masks(input_shape)
        self.built = True

    def _build_masks(self, input_shape=None):
        if self._masks_built:
            return
        self.masks = []
        for i, w in enumerate(self.prunable_weights):
            mask = self.add_weight(
                name=f"{w.name}_mask",
                shape=tuple(w.shape),
                initializer="ones",
                trainable=False,
                dtype="float32",
            )
            self.masks.append(mask)
            _keras_compat.track_for_checkpoint(self, f"mask_{i}", mask)
        if self.granularity == "channel":
            units = self._num_units(input_shape)
            self.unit_mask = self.add_weight(
                name="unit_mask",
                shape=(units,),
                initializer="ones",
                trainable=False,
                dtype="float32",
            )
            # Each layer places the gate for its own activation (after it, or before it).
            self.gate_pre = self.gates == "vib" and not gates_lib.commutes_with_scaling(
                getattr(self.layer, "activation", None)
            )
            if self.gates == "vib" and self.gate_shared_with:  # the owner's gate: see link
                self.gate_seed = keras.random.SeedGenerator(name="gate_seed")
            elif self.gates == "vib":
                self.gate = gates_lib.VIBGate(self, units, self.gate_gamma, self.gate_log_sigma2)
        if self.fake_quant:
            quantize.build_range(self)
        self._masks_built = True

    def _num_units(self, input_shape):
        layer = self.layer
        for attr in ("units", "filters"):
            if getattr(layer, attr, None):
                return int(getattr(layer, attr))
        # Depthwise convolutions: channels_in * depth_multiplier.
        kernel = layer.kernel
        return int(kernel.shape[-2] * kernel.shape[-1])

    @property
    def prunable_weights(self):
        """The inner layer's variables that the masks apply to."""
        if not self.layer.built:
            return []
        return registry.get_prunable_weights(self.layer)

    # ------------------------------------------------------------------- call
    def __call__(self, *args, **kwargs):
        outputs = super().__call__(*args, **kwargs)
        if self.gates is not None and (self.gate_shared_with or self.gate is not None):
            if any(_keras_compat.producing_layer(t) is self for t in keras.tree.flatten(outputs)):
                # Wiring a graph (Functional construction, load_model): shared gates
                # are re-linked from the configs' names.
                gates_lib.link_in_graph(self, outputs)
        return outputs

    def call(self, *args, **kwargs):
        # Keras binds the arguments with the inner layer's signature (see
        # `_keras_compat.copy_call_signature`): positional, keyword, several inputs, and
        # `training` / masks exactly when the inner layer takes them.
        if not self._masks_built:
            # Layers whose build needs several inputs (MultiHeadAttention) build on
            # their first (symbolic) call; masks follow.
            self.layer(*args, **kwargs)
            with _keras_compat.tracking_unlocked(self):
                self._build_masks()
        capture = self._capture
        probe = None if capture is None or not self._probes else self._probes[len(capture)]
        if self.fake_quant and args:
            args = (quantize.quantize_input(self, args[0]), *args[1:])
        want_preact = capture is not None or quantize.needs_preact(self)
        if self.granularity == "weight" and any(True for _ in self.masks):
            outputs, preact = self._masked_call(args, kwargs, want_preact, probe)
        elif self.gate is not None:
            outputs, preact = self._gated_call(args, kwargs, probe)
        elif self.gate_shared_with and not _keras_compat.in_symbolic_scope():
            raise ValueError(
                f"Layer {self.name!r} shares the VIB gate of {self.gate_shared_with!r} but is "
                "not linked to it: call it inside its model or run "
                "`keras_ibprune.gates.link_model(model)`. Received: gate_shared_with="
                f"{self.gate_shared_with!r}"
            )
        else:
            outputs, preact = self._inner_call(args, kwargs, capture is not None, probe)
        if self.unit_mask is not None:
            m = ops.cast(self.unit_mask, outputs.dtype)
            outputs = outputs * m
        if self.fake_quant:
            outputs = quantize.quantize_output(self, outputs, preact)
        if capture is not None:
            capture.append((self._first_input(args, kwargs), preact, outputs))
        return outputs

    def _first_input(self, args, kwargs):
        """The inner layer's first call argument, passed by position or by keyword."""
        if args:
            return args[0]
        names = _keras_compat.call_parameter_names(self.layer)
        return kwargs.get(names[0]) if names else None

    def _inner_call(self, args, kwargs, want_preact, probe=None):
        act = getattr(self.layer, "activation", None)
        if not want_preact or act is None or isinstance(self.layer, keras.layers.RNN):
            out = self.layer(*args, **kwargs)
            out = out if probe is None else out + probe
            return out, out
        # Capture mode (eager only): run without the activation to record pre-activations.
        self.layer.activation = keras.activations.linear
        try:
            z = self.layer(*args, **kwargs)
        finally:
            self.layer.activation = act
        z = z if probe is None else z + probe
        return act(z), z

    def _gated_call(self, args, kwargs, probe=None):
        """VIB gates: `f(a) ⊙ z` (activations commuting with scaling) or `f(a ⊙ z)`."""
        gate = self.gate
        training = kwargs.get("training") if "training" in kwargs else None
        if training is None:
            training = _keras_compat.call_training(self)
        if self.gate_pre:
            _, preact = self._inner_call(args, kwargs, True, probe)
            preact = preact * gate.sample(preact, bool(training), self.gate_seed)
            outputs = self.layer.activation(preact)
        else:
            outputs = self._inner_call(args, kwargs, False, probe)[0]
            outputs = outputs * gate.sample(outputs, bool(training), self.gate_seed)
            preact = outputs
        if not self.gate_shared_with and not _keras_compat.in_symbolic_scope():
            self.add_loss(gate.kl(self.unit_mask))  # shared units: counted by the owner
        return outputs, preact

    def _masked_call(self, args, kwargs, want_preact, probe=None):
        mapping = [
            (w, quantize.masked_value(self, w, ops.multiply(w.value, ops.cast(m.value, w.dtype))))
            for w, m in zip(self.prunable_weights, self.masks)
        ]
        outer = _keras_compat.get_stateless_scope()
        with keras.StatelessScope(mapping) as scope:
            if outer is not None:
                # Keep the enclosing stateless values (JAX training, symbolic builds).
                for key, value in outer.state_mapping.items():
                    scope.state_mapping.setdefault(key, value)
            initial = dict(scope.state_mapping)
            outputs, preact = self._inner_call(args, kwargs, want_preact, probe)
        # Propagate updates made by the inner layer (seed generators, stateful RNNs).
        masked_ids = {id(w) for w, _ in mapping}
        for v in self.layer.variables:
            if id(v) in masked_ids:
                continue
            new = scope.get_current_value(v)
            if new is None or new is initial.get(id(v)):
                continue
            if outer is not None:
                outer.add_update((v, new))
            else:
                v.assign(new)
        return outputs, preact

    # ------------------------------------------------------------- utilities
    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    def masked_weights(self):
        """Returns numpy copies of the prunable weights with masks applied."""
        return [
            ops.convert_to_numpy(w.value) * ops.convert_to_numpy(m.value)
            for w, m in zip(self.prunable_weights, self.masks)
        ]

    def baked_weights(self, units=True):
        """Numpy values of the inner layer's weights with the masks multiplied in.

        The one mask-baking path (`strip_pruning`, `shrink`); see `keras_ibprune.baking`.

        Args:
            units: also bake the unit mask (needs an activation that is 0 at 0).
        """
        return baking.baked_weights(self, units)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "granularity": self.granularity,
                "block_size": list(self.block_size) if self.block_size else None,
                "pattern": None if self.pattern is None else "{}:{}".format(*self.pattern),
            }
        )
        if self.fake_quant:
            config["fake_quant"] = True
        if self.gates is not None:
            config.update(
                {
                    "gates": self.gates,
                    "gate_gamma": self.gate_gamma,
                    "gate_log_sigma2": self.gate_log_sigma2,
                }
            )
            if self.gate_shared_with:
                config["gate_shared_with"] = self.gate_shared_with
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)  # the base class pops "layer"; leave the caller's dict intact
        if config.get("block_size") is not None:
            config["block_size"] = tuple(config["block_size"])
        return super().from_config(config, custom_objects=custom_objects)
