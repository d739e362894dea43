"""The Lightning callback under real Trainers: one step per optimizer step, the losses, the loggers, the lifecycle."""

from __future__ import annotations

import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lstmwatch

pl = pytest.importorskip("lightning.pytorch")
from lstmwatch.lightning import LSTMWatch, logger_options  # noqa: E402
from lstmwatch.sinks import TensorBoardSink  # noqa: E402

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated"),  # Lightning 2.6 on torch 2.13
]


class Net(pl.LightningModule):
    """nn.LSTM(4, 8) and a head; keeps every training loss it returned and every validation loss it logged."""

    def __init__(self, val_name: str = "val_loss", lstm: bool = True, fail_at: int | None = None):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True) if lstm else nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.val_name, self.fail_at = val_name, fail_at
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def forward(self, x):
        h = self.lstm(x)[0] if isinstance(self.lstm, nn.LSTM) else self.lstm(x)
        return self.head(h[:, -1])

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("the user's bug")
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log(self.val_name, loss)
        if not self.trainer.sanity_checking:
            self.val_losses.append(loss.item())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def loader(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(n)
    return DataLoader(TensorDataset(torch.randn(n, 6, 4, generator=g), torch.randn(n, 1, generator=g)), batch)


def fit(tmp_path, model=None, callback=None, val: bool = False, n: int = 16, **trainer_args):
    """Fit `model` (a Net) on `n` sequences in batches of 4 under LSTMWatch(log_every=1, console=False); returns
    (trainer, model, callback)."""
    model = model or Net()
    callback = callback or LSTMWatch(log_every=1, console=False)
    args = dict(accelerator="cpu", devices=1, max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, logger=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer = pl.Trainer(callbacks=[callback], **{**args, **trainer_args})
    trainer.fit(model, loader(n), loader(8) if val else None)
    return trainer, model, callback


def hooks(module: nn.Module) -> int:
    """Hooks left on the module and its parameters."""
    tables = [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks]
    tables += [p._post_accumulate_grad_hooks or {} for p in module.parameters()]
    return sum(len(t) for t in tables) + sum(len(p._backward_hooks or {}) for p in module.parameters())


class PerBatch(LSTMWatch):
    """What a naive callback does: step() on every batch, also between the batches of an accumulated step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.watcher.step(outputs["loss"])


def test_one_step_per_optimizer_step_under_accumulation(tmp_path):
    # 16 batches an epoch, 4 per optimizer step: 4 steps an epoch, 16 in all, from 64 batches.
    trainer, model, cb = fit(tmp_path, n=64, max_epochs=4, accumulate_grad_batches=4)
    w = cb.watcher
    assert trainer.global_step == w.step_count == len(w.records) == 16
    assert "not_updated" not in {e.kind for e in w.events}
    # The loss of a step: the mean of its 4 batches' losses, unscaled (Lightning divides them by 4 for backward).
    per_step = [sum(model.losses[i:i + 4]) / 4 for i in range(0, 64, 4)]
    assert [r.loss for r in w.records] == pytest.approx(per_step, rel=1e-6)
    # The control: stepping per batch reads the batches between optimizer steps as weights that never change.
    _, _, naive = fit(tmp_path, callback=PerBatch(log_every=1, console=False), max_epochs=1,
                      accumulate_grad_batches=4)
    assert "not_updated" in {e.kind for e in naive.watcher.events}


def test_the_loss_in_records_is_the_training_loss(tmp_path):
    trainer, model, cb = fit(tmp_path, max_epochs=4)
    assert trainer.global_step == cb.watcher.step_count == 16
    assert [r.loss for r in cb.watcher.records] == model.losses  # float32 values, exactly


def test_val_loss_reaches_records(tmp_path):
    model = Net(val_name="val/loss")
    cb = LSTMWatch(val_metric="val/loss", console=False)  # log_every=50: validations force their own records
    fit(tmp_path, model, cb, val=True, max_epochs=3, limit_val_batches=1, num_sanity_val_steps=1)
    # Validations after steps 4, 8, 12 (not the sanity check's): each goes with the next step; the last is dropped.
    assert len(model.val_losses) == 3
    with_val = [r for r in cb.watcher.records if r.val_loss is not None]
    assert [r.step for r in with_val] == [5, 9]
    assert [r.val_loss for r in with_val] == model.val_losses[:2]


def test_a_metric_that_is_not_logged_is_said_once(tmp_path):
    with pytest.warns(lstmwatch.LSTMWatchFailure, match="no scalar 'val_loss'.*val/loss") as caught:
        _, _, cb = fit(tmp_path, Net(val_name="val/loss"), LSTMWatch(console=False), val=True, max_epochs=2)
    assert len([w for w in caught if w.category is lstmwatch.LSTMWatchFailure]) == 1  # two validations, said once
    assert all(r.val_loss is None for r in cb.watcher.records)


def test_bf16_mixed_trains_and_records(tmp_path):
    trainer, model, cb = fit(tmp_path, precision="bf16-mixed", max_epochs=2)
    w = cb.watcher
    assert trainer.global_step == w.step_count == len(w.records) == 8
    assert all(math.isfinite(r.loss) for r in w.records) and [r.loss for r in w.records] == model.losses
    stats = w.latest.stats
    assert 0 < stats["lstm/l0/forget/mean"] < 1 and stats["lstm/grad_norm"] > 0
    assert not {"nonfinite", "not_updated", "no_gradient"} & {e.kind for e in w.events}


class HalfHead(Net):
    """The head under float16 autocast, the LSTM in float32 (oneDNN has no float16 LSTM): its gradients are scaled."""

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            h = self.lstm(x.float())[0]
        return self.head(h[:, -1])


def test_16_mixed_gradients_are_judged_unscaled(tmp_path):
    # "16-mixed" as Lightning runs it on a GPU: a GradScaler in the precision plugin, which lstmwatch finds itself.
    from lightning.pytorch.plugins import MixedPrecision

    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler('cpu') needs torch 2.3")
    plain = fit(tmp_path, HalfHead())[2].watcher
    torch.manual_seed(0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    mixed = fit(tmp_path, HalfHead(), plugins=[plugin])[2].watcher
    assert plugin.scaler.get_scale() > 1000 and mixed.step_count == 4
    assert [r.stats["grad_norm"] for r in mixed.records] == pytest.approx(
        [r.stats["grad_norm"] for r in plain.records], rel=0.01)


def test_tensorboard_and_wandb_loggers_get_the_scalars(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_wandb import Offline

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    wb = pl.loggers.WandbLogger(offline=True, save_dir=str(tmp_path), project="lstmwatch-test",
                                settings=wandb.Settings(console="off"))
    try:
        _, _, cb = fit(tmp_path, logger=[tb, wb], max_epochs=2)
    finally:
        wb.experiment.finish()
    w = cb.watcher
    steps = [r.step for r in w.records]
    assert steps == list(range(1, 9))

    acc = EventAccumulator(tb.log_dir)
    acc.Reload()
    scalars = acc.Scalars("lstmwatch/loss")
    assert [s.step for s in scalars] == steps
    assert [s.value for s in scalars] == pytest.approx([r.loss for r in w.records], rel=1e-6)
    assert "lstmwatch/lstm/l0/forget/sat_right" in acc.Tags()["scalars"]

    rows = [r for r in Offline(tmp_path).rows if "lstmwatch/step" in r]
    assert [r["lstmwatch/step"] for r in rows] == steps
    assert [r["lstmwatch/loss"] for r in rows] == [r.loss for r in w.records]


def test_the_users_options_win_and_unknown_ones_are_refused(tmp_path):
    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    _, _, cb = fit(tmp_path, callback=LSTMWatch(console=False, tensorboard=False), logger=tb, max_steps=2)
    assert cb.watcher.sinks == []
    _, _, cb = fit(tmp_path, callback=LSTMWatch(console=False), logger=tb, max_steps=2)
    assert [type(s) for s in cb.watcher.sinks] == [TensorBoardSink]
    with pytest.raises(TypeError, match="lgo_every.*log_every"):
        LSTMWatch(lgo_every=5)


def test_other_ranks_leave_the_loggers_alone(tmp_path, monkeypatch):
    # Lightning logs from rank 0: other ranks' loggers hand out a stand-in that swallows every call. Their watchers
    # still measure (lstmwatch combines the ranks), but write to no logger.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb")
    trainer = types.SimpleNamespace(loggers=[tb, pl.loggers.CSVLogger(tmp_path)])
    assert logger_options(trainer) == {"tensorboard": tb.experiment}
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert logger_options(trainer) == {}


def test_hooks_are_removed_after_fit_and_after_a_failure(tmp_path):
    model = Net()
    before = hooks(model.lstm)
    _, _, cb = fit(tmp_path, model, max_epochs=1)
    assert cb.watcher.closed and hooks(model.lstm) == before == 0
    model = Net(fail_at=2)
    with pytest.raises(RuntimeError, match="the user's bug"):
        fit(tmp_path, model, cb)
    assert cb.watcher.closed and cb.watcher.step_count == 2 and hooks(model.lstm) == 0


def test_fit_twice_and_fast_dev_run(tmp_path):
    model, cb = Net(), LSTMWatch(log_every=1, console=False)
    trainer, _, _ = fit(tmp_path, model, cb, max_epochs=1)
    first = cb.watcher
    fit(tmp_path, model, cb, val=True, fast_dev_run=True)  # one batch of each, loggers off
    assert cb.watcher is not first and first.closed and first.step_count == 4
    assert cb.watcher.closed and cb.watcher.step_count == 1 and len(cb.watcher.records) == 1
    trainer.fit(model, loader())  # the same trainer again: max_epochs is reached, the training loop is skipped
    assert cb.watcher.closed and cb.watcher.step_count == 0 and hooks(model.lstm) == 0
    trainer.fit_loop.max_epochs = 2  # and once more, with an epoch to go
    trainer.fit(model, loader())
    assert cb.watcher.step_count == 4 and trainer.global_step == 8 and hooks(model.lstm) == 0


def test_a_model_without_lstm_is_refused_at_fit_start(tmp_path):
    model = Net(lstm=False)
    with pytest.raises(ValueError, match="no nn.LSTM.*found in Net"):
        fit(tmp_path, model)
    assert model.losses == []  # refused before the first batch


def test_lightning_stays_optional():
    code = """
import importlib.util, sys
import lstmwatch
assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules
sys.modules["lightning"] = None  # as if not installed
if importlib.util.find_spec("pytorch_lightning"):  # only the older package: the callback is one of its callbacks
    import lstmwatch.lightning, pytorch_lightning
    assert issubclass(lstmwatch.lightning.LSTMWatch, pytorch_lightning.Callback)
    del sys.modules["lstmwatch.lightning"]
sys.modules["pytorch_lightning"] = None  # neither
try:
    import lstmwatch.lightning
except ImportError as exc:
    assert "pip install 'lstmwatch[lightning]'" in str(exc), exc
else:
    raise AssertionError("no ImportError")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ddp_on_cpu_rank0_reports_for_both_ranks(tmp_path):
    # strategy="ddp" with 2 CPU processes: Lightning's launcher runs the script again for rank 1. Rank 1's data
    # alone is unnormalized: rank 0 reports it, naming rank 1, and rank 1 reports nothing.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "lightning_ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("MASTER_PORT", None)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 8 and r0["pid"] != r1["pid"]
    unnorm = [e for e in r0["events"] if e["kind"] == "unnormalized_input"]
    assert unnorm and "(on rank 1 of 2)" in unnorm[0]["message"], r0["events"]
    assert r1["warnings"] == [] and r1["events"] == []
