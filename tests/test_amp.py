"""Mixed precision: gradients are judged unscaled, with the GradScaler passed or found in the training loop."""

import pytest
import torch
from torch import nn

import lstmwatch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _norms(pass_scaler: bool, use_scaler: bool) -> list[float]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), 1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=use_scaler)
    w = lstmwatch.watch(model, log_every=1, console=False, scaler=scaler if pass_scaler else None)
    norms = []
    for _ in range(4):
        x = torch.randn(4, 5, 2)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_scaler):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        norms.append(w.step(loss).stats["grad_norm"])
    assert ((w.clock.scaler or w.clock.found) is scaler) == use_scaler
    w.close()
    return norms


@pytest.mark.parametrize("pass_scaler", [True, False])
def test_grad_norms_are_unscaled(pass_scaler):
    scaled = _norms(pass_scaler, use_scaler=True)
    # The same run's gradients in bf16 autocast are within a few percent of the fp32 ones, not 65536x.
    plain = _norms(pass_scaler=False, use_scaler=False)
    for a, b in zip(scaled, plain):
        assert a == pytest.approx(b, rel=0.1)


class Trainer:
    """A trainer class holding its GradScaler, as training libraries and users' own trainers do: the scaler
    is never a variable of the frames that call watcher.step()."""

    def __init__(self, model: nn.Module, init_scale: float = 2.0**16, enabled: bool = True, gain: float = 1.0):
        self.model, self.gain = model, gain
        self.opt = torch.optim.SGD(model.parameters(), 1e-2)
        self.precision = type("Plugin", (), {})()  # a plugin object between the trainer and its scaler
        self.precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled)

    def fit(self, watcher, steps: int, seed: int = 0) -> list[float | None]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(steps):
            out.append(self._step(watcher, torch.randn(4, 5, 2, generator=g)))
        return out

    def _step(self, watcher, x) -> float | None:
        scaler = self.precision.scaler
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = self.model(x).float().pow(2).mean() * self.gain
        scaler.scale(loss).backward()
        scaler.step(self.opt)
        scaler.update()
        self.opt.zero_grad()
        rec = watcher.step(loss)
        return rec.stats.get("grad_norm") if rec is not None else None


def test_a_scaler_held_by_a_trainer_object_is_found_and_gradients_are_unscaled():
    runs = []
    for enabled in (True, False):  # the same run with the scaler off: gradients as they are
        torch.manual_seed(0)
        trainer = Trainer(Net(), enabled=enabled)
        with lstmwatch.watch(trainer.model, log_every=1, console=False) as w:
            runs.append(trainer.fit(w, 4))
            assert (w.clock.found is trainer.precision.scaler) == enabled
    scaled, plain = runs
    for a, b in zip(scaled, plain):
        assert a == pytest.approx(b, rel=0.1)  # not 65536 times larger


def test_a_scaler_overflowing_on_its_first_steps_is_not_a_fault(recwarn):
    # fp16 scalers start high and overflow for their first steps, skipping them: the scaler's business, not a
    # NaN/Inf in the model. Its Infs are never a `nonfinite` event, and those steps' norms are unknown (NaN).
    torch.manual_seed(0)
    trainer = Trainer(Net(), init_scale=2.0**127, gain=8.0)  # the scaled loss is Inf until the scale backs off
    with lstmwatch.watch(trainer.model, log_every=1) as w:
        trainer.fit(w, 40)
        overflowed = [r.step for r in w.records if r.stats.get("grad_norm") is None
                      or r.stats["grad_norm"] != r.stats["grad_norm"]]
    assert trainer.precision.scaler.get_scale() < 2.0**127  # it did overflow and back off
    assert overflowed, "the scaler never overflowed: the test proves nothing"
    assert not [e for e in w.events if e.kind == "nonfinite"]
    assert not [x for x in recwarn.list if issubclass(x.category, lstmwatch.LSTMWatchWarning)]


def test_gradscaler_scale_is_restored_when_the_last_watcher_closes():
    original = torch.amp.GradScaler.__dict__["scale"]
    a = lstmwatch.watch(Net(), console=False)
    b = lstmwatch.watch(Net(), console=False)
    assert torch.amp.GradScaler.__dict__["scale"] is not original
    a.close()
    assert torch.amp.GradScaler.__dict__["scale"] is not original  # b still follows
    b.close()
    assert torch.amp.GradScaler.__dict__["scale"] is original
    given = lstmwatch.watch(Net(), console=False, scaler=torch.amp.GradScaler("cpu"))
    assert torch.amp.GradScaler.__dict__["scale"] is original  # a scaler passed in: nothing to look for
    given.close()


def _real_norm(module: nn.Module) -> float:
    return torch.stack([p.grad.norm() for p in module.parameters()]).norm().item()


def test_a_scaler_of_another_model_leaves_this_ones_gradients_alone():
    # Two models in one process (a GAN's networks, a teacher and a student): A under autocast and a GradScaler,
    # B in plain fp32. A's scaler divides A's gradients, never B's, and B's gradients stay NaN-watched.
    torch.manual_seed(0)
    a, b = Net(), Net()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), 1e-2), torch.optim.SGD(b.parameters(), 1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    wa = lstmwatch.watch(a, log_every=1, console=False, name="a")
    wb = lstmwatch.watch(b, log_every=1, console=False, name="b")
    try:
        for step in range(1, 5):
            x, y = torch.randn(4, 5, 2), torch.randn(4, 1)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                la = (a(x).float() - y).pow(2).mean()
            scaler.scale(la).backward()
            real_a = _real_norm(a.lstm) / scaler.get_scale()
            scaler.step(opt_a)
            scaler.update()
            opt_a.zero_grad()
            ra = wa.step(la)
            lb = (b(x) - y).pow(2).mean()
            if step == 3:  # a NaN in B's gradient: named where it appears, at this step
                lb.register_hook(lambda g: g * float("nan"))
            lb.backward()
            real_b = _real_norm(b.lstm)
            opt_b.step()
            opt_b.zero_grad()
            rb = wb.step(lb)
            if step < 3:
                assert rb.stats["lstm/grad_norm"] == pytest.approx(real_b, rel=1e-5)
                assert ra.stats["lstm/grad_norm"] == pytest.approx(real_a, rel=1e-3)
        assert wb.clock.found is None and wa.clock.found is scaler
        first = [e for e in wb.events if e.kind == "nonfinite"]
        assert first and first[0].step == 3 and "gradient" in first[0].message
    finally:
        wa.close()
        wb.close()


def test_the_gradient_through_time_is_unscaled():
    # dL/dh_t comes from hooks on the LSTM's outputs, which see the scaled gradient: divided like the weights'.
    def curves(enabled: bool):
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), 1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=enabled)
        with lstmwatch.watch(model, console=False) as w:
            loss = model(torch.randn(4, 6, 2)).pow(2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            rec = w.step(loss)
        return rec
    plain, scaled = curves(False), curves(True)
    assert plain.curves and set(plain.curves) == set(scaled.curves)
    for k, c in plain.curves.items():
        assert scaled.curves[k] == pytest.approx(c, rel=1e-5), k
    assert scaled.stats["lstm/gtt/gain"] == pytest.approx(plain.stats["lstm/gtt/gain"], rel=1e-5)


def test_gradscaler_scale_is_restored_after_watchers_dropped_without_close():
    import gc

    original = torch.amp.GradScaler.__dict__["scale"]
    w = lstmwatch.watch(Net(), console=False)
    assert torch.amp.GradScaler.__dict__["scale"] is not original
    del w
    gc.collect()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones((), requires_grad=True))  # the next scale() finds no watcher: torch's method is back
    assert torch.amp.GradScaler.__dict__["scale"] is original
