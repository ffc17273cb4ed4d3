"""`IBPruning`: the Keras callback that runs a `Pruner` inside `model.fit`.

The callback owns only *when* to update (epoch ends or every N steps) and what to log;
everything else — validation, statistics, scores, allocation, masks — is the `Pruner`'s,
and its constructor arguments are accepted here unchanged.
"""

from __future__ import annotations

import keras

from keras_ibprune.pruner import Pruner


@keras.saving.register_keras_serializable(package="keras_ibprune")
class IBPruning(keras.callbacks.Callback):
    """Keras callback that prunes the `PruneWrapper`s of the model during `fit`.

    Masks update at epoch ends (`update_every="epoch"`) or every `N` training steps
    (`update_every=N`), following the schedule. The epoch logs get `sparsity` (the fraction
    of zeros over the *pruned* tensors, as scheduled) and per-layer `sparsity/<layer>`; the
    per-layer entries and the information logs reach History, CSVLogger and TensorBoard
    but not the progress bar. The masks live in the model, so saving mid-way (or
    `BackupAndRestore`) and fitting on with `initial_epoch` resumes the schedule exactly.

    Args:
        schedule: a `Schedule` (e.g. `PolynomialDecay(0.0, 0.9, 0, 4)`), a float
            (constant sparsity), or a tfmot `PruningSchedule`.
        update_every: `"epoch"` or an int number of training steps.
        log_information: also log ``I_TY/<layer>`` and ``I_XT/<layer>`` (nats) every epoch
            for `kib.plot_information_plane(history)`; costs one statistics pass on epochs
            without a mask update.
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
                 **pruner_kwargs):
        super().__init__()
        if not (update_every == "epoch" or (isinstance(update_every, int)
                                            and not isinstance(update_every, bool)
                                            and update_every >= 1)):
            raise ValueError(
                "`update_every` must be 'epoch' or a positive int number of steps. "
                f"Received: update_every={update_every!r}"
            )
        self.update_every = update_every
        self.pruner = Pruner(None, schedule, log_information=log_information, _stacklevel=3,
                             **pruner_kwargs)  # validates every argument now
        self._steps = None
        self._epoch = 0

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
        self._steps = (self.params or {}).get("steps")
        self.pruner.model = self.model
        self.pruner.reset(steps_per_epoch=self._steps)
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
            self.pruner.measure()  # only with log_information=True
        if logs is not None:
            logs.update(self.pruner.logs())

    def on_train_end(self, logs=None):
        self.pruner.rezero()

    def get_config(self):
        config = self.pruner.get_config()
        config["update_every"] = self.update_every
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)
