"""PyTorch Lightning: `Trainer(callbacks=[LSTMWatch()])` watches the LightningModule's LSTMs for each fit.

Imported only as `lstmwatch.lightning`, never by `import lstmwatch`: Lightning stays an optional dependency.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor

from .events import LSTMWatchFailure
from .sinks import make_sinks
from .watch import Watcher, watch


def _import_lightning() -> Any:
    """`lightning.pytorch`, else `pytorch_lightning`, else an ImportError that says how to install it."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.split(".")[0]):
                raise  # installed but broken: its own error says more than ours would
    raise ImportError("lstmwatch.lightning needs PyTorch Lightning: pip install 'lstmwatch[lightning]'")


# Typed Any: mypy then needs neither Lightning installed nor its (large) types to check this file.
pl: Any = _import_lightning()


def _option_names() -> set[str]:
    """The options `watch()` takes: its own keywords and those of the sinks it makes."""
    params = {**inspect.signature(watch).parameters, **inspect.signature(make_sinks).parameters}
    return {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} - {"model"}


def _is(obj: Any, *class_names: str) -> bool:
    # By name: `lightning.pytorch` and `pytorch_lightning` ship the same classes, and either may have made it.
    return any(c.__name__ in class_names for c in type(obj).__mro__)


def logger_options(trainer: Any) -> dict[str, Any]:
    """`watch()` options that stream into the trainer's loggers: the first W&B run and TensorBoard writer."""
    options: dict[str, Any] = {}
    for logger in trainer.loggers:
        option = "wandb" if _is(logger, "WandbLogger") else "tensorboard" if _is(logger, "TensorBoardLogger") else None
        if option is None or option in options:
            continue
        experiment = logger.experiment
        # Lightning logs from rank 0 only; other ranks get a stand-in that swallows every call.
        if not _is(experiment, "_DummyExperiment", "DummyExperiment"):
            options[option] = experiment
    return options


def _scalar(value: Any) -> Tensor | float | None:
    """A scalar loss from a training step's output (a dict with "loss", or a tensor), detached; else None."""
    if isinstance(value, dict):
        value = value.get("loss")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            return None  # not a loss: passing it would make step() raise a TypeError mid-training
        # At least float32: the batches of an accumulated step are summed, and a bf16 sum rounds.
        return value.detach().reshape(()).to(torch.promote_types(value.dtype, torch.float32))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class LSTMWatch(pl.Callback):
    """Watches the LightningModule's LSTMs during fit; `LSTMWatch(**options)` passes options to `lstmwatch.watch`.

    `watcher.step()` runs once per optimizer step (not per batch: with `accumulate_grad_batches` the weights move
    only every few batches), with the mean unscaled training loss of that step's batches. The validation metric
    `val_metric` logged by the module goes with the next step; one left after the last step is dropped. A model
    without an LSTM raises lstmwatch's ValueError at fit start. The watcher of the latest fit is `self.watcher`.
    """

    def __init__(self, *, val_metric: str | None = "val_loss", **watch_options: Any) -> None:
        unknown = sorted(set(watch_options) - _option_names())
        if unknown:  # at construction, not at fit start minutes later
            raise TypeError(f"LSTMWatch got unknown option(s) {', '.join(unknown)}; lstmwatch.watch() takes: "
                            f"{', '.join(sorted(_option_names()))}")
        self.val_metric = val_metric
        self.options = watch_options
        self.watcher: Watcher | None = None
        self._val_missing = False  # said once per fit
        self._reset(0)

    def _reset(self, global_step: int) -> None:
        """Start a new optimizer step: nothing summed, no validation pending."""
        self._stepped_at = global_step  # trainer.global_step when step() was last called
        self._loss_sum: Tensor | float | None = None  # the unscaled losses of the batches since, on the device
        self._batches = 0
        self._val_loss: Tensor | None = None  # the latest validation, for the next step()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Watch the module: once per fit, after `configure_model` built it and the strategy placed it."""
        options = {**logger_options(trainer), **self.options}  # the user's options win
        self._close()
        self.watcher = watch(pl_module, **options)  # "16-mixed": lstmwatch finds the precision plugin's GradScaler
        self._val_missing = False
        self._reset(trainer.global_step)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Count optimizer steps from here: a checkpoint's global_step is restored after `on_fit_start`."""
        self._stepped_at = trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Add the batch's loss; call `watcher.step` when an optimizer step happened since the last call."""
        if self.watcher is None or self.watcher.closed:
            return
        loss = _scalar(outputs)
        if loss is not None:
            if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
                loss = loss * trainer.accumulate_grad_batches  # Lightning divided it by that for backward
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
            self._batches += 1
        if trainer.global_step == self._stepped_at:
            return  # gradients accumulate: the weights have not moved yet
        mean = None if self._loss_sum is None else self._loss_sum / self._batches
        val_loss = self._val_loss
        self._reset(trainer.global_step)
        self.watcher.step(mean, val_loss=val_loss)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Keep the logged validation metric for the next step (not the sanity check's)."""
        if self.watcher is None or self.watcher.closed or trainer.sanity_checking or self.val_metric is None:
            return
        value = trainer.callback_metrics.get(self.val_metric)
        if isinstance(value, Tensor) and value.numel() == 1:
            self._val_loss = value.detach().clone()  # Lightning may update its tensor in place later
        elif not self._val_missing:
            self._val_missing = True
            logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
            warnings.warn(f"lstmwatch: validation logged no scalar {self.val_metric!r} (logged: {logged}), so the "
                          "overfitting detector gets no validation loss: log it with self.log("
                          f"{self.val_metric!r}, loss), or pass LSTMWatch(val_metric=<the name you log>) or "
                          "val_metric=None", LSTMWatchFailure, stacklevel=2)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close at the end of fit, before the loggers finalize (TensorBoardLogger closes its writer then)."""
        if stage == "fit":  # also a fit whose training loop was skipped (max_epochs already reached)
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Close on a failed or interrupted fit: no hook of lstmwatch stays on the model."""
        self._close()

    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
        self._reset(self._stepped_at)
