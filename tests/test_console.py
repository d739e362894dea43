"""The console: typed warnings at the user's step line, filters that apply, silence when asked; watch(detectors=...)."""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn

import lstmwatch
from lstmwatch.detectors import Padding
from lstmwatch.events import WARNINGS, Event, LSTMWatchFailure, LSTMWatchWarning, warning_for

F, H = 3, 4
KINDS = {
    "exploding_gradient": "ExplodingGradientWarning",
    "vanishing_gradient": "VanishingGradientWarning",
    "no_gradient": "NoGradientWarning",
    "not_updated": "NotUpdatedWarning",
    "stalled_loss": "StalledLossWarning",
    "diverging_loss": "DivergingLossWarning",
    "nonfinite": "NonFiniteWarning",
    "gate_saturation": "GateSaturationWarning",
    "hidden_saturation": "HiddenSaturationWarning",
    "unnormalized_input": "UnnormalizedInputWarning",
    "padding": "PaddingWarning",
    "overfitting": "OverfittingWarning",
}


class Always:
    """A detector that raises one event of a kind and severity on every record."""

    def __init__(self, kind: str, severity: str = "warning"):
        self.kind, self.severity = kind, severity

    def update(self, record):
        return [Event(record.step, self.kind, self.severity, "lstm", f"{self.kind} measured.", "fix it.")]


class Run:
    """A tiny LSTM trained by SGD on batches whose second half is zero padding (or not)."""

    def __init__(self, padded: bool = True):
        self.lstm = nn.LSTM(F, H, batch_first=True)
        self.opt = torch.optim.SGD(self.lstm.parameters(), lr=0.05)
        self.x = torch.randn(4, 10, F)
        if padded:
            self.x[:, 5:] = 0

    def loss(self) -> torch.Tensor:
        out, _ = self.lstm(self.x)
        loss = out.pow(2).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss


def train(w, run: Run, steps: int) -> None:
    for _ in range(steps):
        w.step(run.loss())


# --- events and their warning classes


def test_one_warning_class_per_kind_exported_by_name():
    assert set(WARNINGS) == set(KINDS)
    for kind, name in KINDS.items():
        cls = getattr(lstmwatch, name)
        assert cls is WARNINGS[kind] and cls.kind == kind
        assert issubclass(cls, LSTMWatchWarning) and issubclass(cls, UserWarning)
        assert cls.__module__ == "lstmwatch" and cls.__doc__
    assert issubclass(LSTMWatchFailure, LSTMWatchWarning) and LSTMWatchFailure not in WARNINGS.values()


@pytest.mark.parametrize(
    "kind",
    sorted(KINDS),
)
def test_warning_class_name_is_the_exported_name(kind):
    # The name is what the printed warning shows, and what people copy into `-W error::lstmwatch.<Name>`.
    cls = WARNINGS[kind]
    assert cls.__name__ == cls.__qualname__ == KINDS[kind]
    assert getattr(lstmwatch, cls.__name__) is cls


def test_warning_for_carries_the_event():
    e = Event(8, "padding", "warning", "enc", "50% of the timesteps are padding.", "pack the batch.")
    w = warning_for(e)
    assert type(w) is lstmwatch.PaddingWarning and w.event is e and str(w) == str(e)
    assert type(warning_for(dataclasses.replace(e, kind="custom"))) is LSTMWatchWarning


def test_event_is_a_frozen_dataclass_with_the_contract_fields():
    # The first six in this order (positional construction); where and values carry structure for programs.
    assert [f.name for f in dataclasses.fields(Event)] == ["step", "kind", "severity", "module", "message", "hint",
                                                           "where", "values"]
    e = Event(8, "stalled_loss", "warning", "", "the loss is flat.", "raise the learning rate.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.step = 9
    assert e == Event(8, "stalled_loss", "warning", "", "the loss is flat.", "raise the learning rate.")
    assert hash(e) == hash(Event(8, "stalled_loss", "warning", "", "the loss is flat.", "raise the learning rate."))
    measured = Event(8, "stalled_loss", "warning", "", "flat.", "raise it.", where="", values={"improvement": 0.01})
    assert hash(measured) == hash(Event(8, "stalled_loss", "warning", "", "flat.", "raise it."))
    assert measured != Event(8, "stalled_loss", "warning", "", "flat.", "raise it.")


def test_event_text():
    run_wide = Event(200, "stalled_loss", "warning", "", "the loss is flat.", "raise the learning rate.")
    assert str(run_wide) == "lstmwatch step 200 · stalled_loss\n  the loss is flat.\n  fix: raise the learning rate."
    one = Event(2, "padding", "warning", "encoder.rnn", "40% padding.", "pack it.")
    assert str(one) == "lstmwatch step 2 · encoder.rnn · padding\n  40% padding.\n  fix: pack it."


# --- warnings at the user's line


def test_warning_points_at_the_users_step_line():
    run = Run()
    w = lstmwatch.watch(run.lstm, log_every=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = run.loss()
            line = inspect.currentframe().f_lineno + 1
            w.step(loss)
    w.close()
    padding = [c for c in caught if issubclass(c.category, LSTMWatchWarning)]
    assert [c.category for c in padding] == [lstmwatch.PaddingWarning]
    assert (padding[0].filename, padding[0].lineno) == (__file__, line)
    assert str(padding[0].message) == str(w.events[0])
    assert padding[0].message.event is w.events[0]


def _step_in_a_helper(w, loss):
    w.step(loss)  # the first frame outside lstmwatch


def test_warning_points_at_the_first_frame_outside_lstmwatch():
    run = Run()
    with lstmwatch.watch(run.lstm, log_every=1, detectors=[Always("stalled_loss")]) as w:
        with pytest.warns(lstmwatch.StalledLossWarning) as caught:
            _step_in_a_helper(w, run.loss())
    line = inspect.getsourcelines(_step_in_a_helper)[1] + 1
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_goes_out_as_its_class(kind):
    run = Run(padded=False)
    severity = "error" if kind == "nonfinite" else "warning"
    with lstmwatch.watch(run.lstm, log_every=1, detectors=[Always(kind, severity)]) as w:
        with pytest.warns(WARNINGS[kind]) as caught:
            w.step(run.loss())
    assert [c.category for c in caught] == [WARNINGS[kind]]
    assert caught[0].filename == __file__


def test_scenario_warnings_point_at_the_caller_of_run():
    import lstmwatch.demo.scenarios as S

    with pytest.warns(lstmwatch.PaddingWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        S.run(S.BY_NAME["padding"], steps=4)
    (c,) = [c for c in caught if c.category is lstmwatch.PaddingWarning]
    assert (c.filename, c.lineno) == (__file__, line)


def test_a_filter_turns_a_warning_into_an_exception_raised_from_step():
    run = Run()
    w = lstmwatch.watch(run.lstm, log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lstmwatch.PaddingWarning)
        w.step(run.loss())
        with pytest.raises(lstmwatch.PaddingWarning) as raised:
            w.step(run.loss())
    w.close()
    assert raised.value.event.kind == "padding"
    assert str(raised.traceback[0].frame.code.path) == __file__


def test_ignoring_the_base_class_silences_lstmwatch_but_keeps_the_events(recwarn):
    run = Run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LSTMWatchWarning)
        with lstmwatch.watch(run.lstm, log_every=1) as w:
            train(w, run, 3)
    assert not [r for r in recwarn if issubclass(r.category, LSTMWatchWarning)]
    assert [e.kind for e in w.events] == ["padding"]


# --- what is printed


def test_console_false_prints_and_warns_nothing(capsys, recwarn):
    run = Run()
    with lstmwatch.watch(run.lstm, log_every=1, console=False) as w:
        train(w, run, 4)
    assert [e.kind for e in w.events] == ["padding"]
    assert capsys.readouterr() == ("", "")
    assert len(recwarn) == 0


def test_a_healthy_run_prints_and_warns_nothing(capsys, recwarn):
    run = Run(padded=False)
    with lstmwatch.watch(run.lstm, log_every=1) as w:
        train(w, run, 8)
    assert [e for e in w.events if e.severity != "info"] == []
    assert capsys.readouterr() == ("", "")
    assert len(recwarn) == 0


def test_info_events_are_neither_warned_nor_printed(capsys, recwarn):
    run = Run(padded=False)
    with lstmwatch.watch(run.lstm, log_every=1, detectors=[Always("no_gradient", "info")]) as w:
        train(w, run, 3)
    assert [e.severity for e in w.events] == ["info"] * 3
    assert capsys.readouterr() == ("", "")
    assert len(recwarn) == 0


def test_a_frozen_lstm_is_an_info_event_only(capsys, recwarn):
    lstm = nn.LSTM(F, H, batch_first=True).requires_grad_(False)
    head = nn.Linear(H, 1)
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with lstmwatch.watch(model, log_every=1) as w:
        for _ in range(4):
            loss = head(lstm(torch.randn(4, 6, F))[0][:, -1]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            w.step(loss)
    assert [(e.kind, e.severity) for e in w.events] == [("no_gradient", "info")]
    assert capsys.readouterr() == ("", "")
    assert len(recwarn) == 0


def test_close_prints_one_line_after_a_run_with_warnings(capsys):
    run = Run()
    with pytest.warns(lstmwatch.PaddingWarning):
        with lstmwatch.watch(run.lstm, log_every=1) as w:
            train(w, run, 3)
            assert capsys.readouterr() == ("", "")  # nothing printed while training
    assert capsys.readouterr() == (
        "",
        "lstmwatch: 1 warning(s) this run (padding); print(watcher.summary()) for the diagnosis\n",
    )
    w.close()
    assert capsys.readouterr() == ("", "")  # closing twice prints nothing more


# --- watch(detectors=...): replace, tune, omit


def test_a_detector_list_replaces_the_defaults():
    run = Run()
    mine = [Padding(patience=3)]
    with lstmwatch.watch(run.lstm, log_every=1, console=False, detectors=mine) as w:
        train(w, run, 5)
    assert list(w.detectors) == mine
    assert [(e.kind, e.step) for e in w.events] == [("padding", 3)]


def test_an_empty_detector_list_watches_without_findings():
    run = Run()
    with lstmwatch.watch(run.lstm, log_every=1, console=False, detectors=[]) as w:
        train(w, run, 3)
    assert len(w.records) == 3 and list(w.events) == []


def test_a_dict_tunes_and_omits_default_detectors(recwarn):
    run = Run()
    with lstmwatch.watch(run.lstm, log_every=1, detectors={"padding": False}) as w:
        train(w, run, 4)
    assert "padding" not in {d.kind for d in w.detectors} and list(w.events) == []
    assert len(recwarn) == 0
    run = Run()
    with lstmwatch.watch(
        run.lstm, log_every=1, console=False, detectors={"padding": {"patience": 4}, "stalled_loss": {"patience": 500}}
    ) as w:
        train(w, run, 6)
    assert [(e.kind, e.step) for e in w.events] == [("padding", 4)]
    assert {d.kind: d for d in w.detectors}["stalled_loss"].patience == 500
    assert len(w.detectors) == len(lstmwatch.detectors.DEFAULTS)


def test_an_unknown_kind_fails_at_watch_time_without_hooks_left():
    lstm = nn.LSTM(F, H)
    with pytest.raises(ValueError, match="paddding"):
        lstmwatch.watch(lstm, detectors={"paddding": False})
    assert not lstm._forward_hooks
    with lstmwatch.watch(lstm, console=False) as w:  # the model can still be watched
        assert w.modules == ["lstm"]
