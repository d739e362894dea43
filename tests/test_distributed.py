"""DDP with the gloo backend, 2 processes on 127.0.0.1: rank 0 combines every rank's statistics and alone
reports; a fault in rank 1's data is reported by rank 0, naming rank 1; a rank that stops calling step()
costs rank 0 a bounded wait, never a hang."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from two_ranks import run_two_ranks

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict[int, dict]:
    return run_two_ranks(HERE / "ddp_worker.py", tmp_path_factory.mktemp("ddp"), 240,
                         {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])})


def test_rank0_record_combines_both_ranks_batches(job):
    got = job[0]["equal"]
    st = got["stats"]
    assert got["header_world"] == 2
    # Means over the sampled rows: equal to the two ranks' batches computed together.
    assert st["lstm/l0/input/mean"] == pytest.approx(got["ref_input_mean"], rel=1e-5)
    assert st["lstm/l0/forget/sat_right"] == pytest.approx(got["ref_forget_sat_right"], abs=1e-9)
    assert st["lstm/l0/h/absmean"] == pytest.approx(got["ref_h_absmean"], rel=1e-5)
    assert st["loss"] == pytest.approx(got["ref_loss_mean_over_ranks"], rel=1e-5)
    # Gradient norms: each rank's own batch, root mean square over ranks.
    assert st["lstm/grad_norm"] == pytest.approx(got["ref_grad_norm_rms"], rel=1e-5)
    # Rank 1 keeps its own record and writes nothing; rank 0 writes the run log.
    assert job[0]["equal"]["log_files"] and not job[1]["equal"]["log_files"]
    assert job[1]["equal"]["stats"]["lstm/l0/input/mean"] != pytest.approx(st["lstm/l0/input/mean"], rel=1e-9)


def test_a_fault_in_rank1s_data_is_reported_by_rank0_alone_naming_rank1(job):
    r0, r1 = job[0]["fault"], job[1]["fault"]
    unnorm = [e for e in r0["events"] if e["kind"] == "unnormalized_input"]
    assert unnorm, r0["events"]
    assert "rank 1 of 2" in unnorm[0]["message"] and unnorm[0]["values"]["rank"] == 1.0
    assert any("UnnormalizedInputWarning" in w for w in r0["warnings"])
    assert r1["warnings"] == [] and r1["events"] == []
    # The whole job's diagnosis: rank 1's data is the root; nothing it causes on the shared weights is blamed
    # on the learning rate.
    (root, rank, effects), *others = r0["diagnosis"]
    assert (root, rank) == ("unnormalized_input", 1.0), r0["diagnosis"]
    assert not [k for k, _, _ in others if k in ("exploding_gradient", "diverging_loss", "stalled_loss")]


def test_a_nan_in_rank1s_batch_is_named_there_not_in_rank0s_gradients(job):
    # The all-reduce makes rank 0's gradients NaN at the same step: only the whole job's record, at the next
    # logging step (no record brought forward by one rank), can tell that rank 1's input came first.
    r0, r1 = job[0]["nan"], job[1]["nan"]
    (e,) = [e for e in r0["events"] if e["kind"] == "nonfinite"]
    assert "input batch" in e["message"] and "at step 7" in e["message"] and "(on rank 1 of 2)" in e["message"], e
    assert e["values"]["rank"] == 1.0
    assert r0["diagnosis"][0][:2] == ["nonfinite", 1.0]
    assert r0["records"] == r1["records"] == [1, 2, 4, 8, 10]
    assert r1["events"] == []


def test_a_rank_that_stops_calling_step_costs_a_bounded_wait(job):
    r0 = job[0]["stop"]
    assert r0["steps"] == 20 and r0["records"][-1] == 20
    said = [w for w in r0["warnings"] if "rank 1 did not hand over" in w]
    assert len(said) == 1, r0["warnings"]  # said once; later steps don't wait for a silent rank


def test_fsdp2_is_refused_at_watch_time_naming_the_module(job):
    for r in range(2):
        got = job[r]["fsdp2"]
        assert got["refused"].startswith("lstmwatch cannot watch lstm: its parameters are sharded across ranks")
        assert got["trained"]


def test_a_statistic_nan_on_one_rank_is_nan_for_the_job_whatever_the_order():
    from lstmwatch.distributed import combine

    for parts in ([(0, {"m/data/absmax": math.nan}, {}), (1, {"m/data/absmax": 2.0}, {})],
                  [(0, {"m/data/absmax": 2.0}, {}), (1, {"m/data/absmax": math.nan}, {})]):
        values, _, source = combine(parts)
        nan_rank = next(r for r, v, _ in parts if math.isnan(v["m/data/absmax"]))
        assert math.isnan(values["m/data/absmax"]) and source == {"m/data/absmax": nan_rank}


def test_combine_key_by_key_and_name_the_rank_a_fault_came_from():
    from lstmwatch.distributed import combine, name_ranks
    from lstmwatch.events import Event

    parts = [
        (0, {"m/l0/forget/sat_right": 0.1, "m/grad_norm": 3.0, "m/data/absmax": 2.0, "m/nonfinite/data": 9.0,
             "loss": 1.0}, {"m/gtt": [1.0, 3.0]}),
        (1, {"m/l0/forget/sat_right": 0.9, "m/grad_norm": 4.0, "m/data/absmax": 200.0, "m/nonfinite/data": 7.0,
             "loss": 1.2}, {"m/gtt": [1.0, 4.0]}),
        (2, {"m/l0/forget/sat_right": 0.11, "m/grad_norm": 0.0, "m/data/absmax": 2.5, "loss": 1.1},
         {"m/gtt": [1.0, 0.0]}),
    ]
    values, curves, source = combine(parts)
    assert values["m/l0/forget/sat_right"] == pytest.approx((0.1 + 0.9 + 0.11) / 3)
    assert values["m/grad_norm"] == pytest.approx(((9 + 16 + 0) / 3) ** 0.5)  # root mean square over ranks
    assert values["m/data/absmax"] == 200.0 and source["m/data/absmax"] == 1
    assert values["m/nonfinite/data"] == 7.0 and source["m/nonfinite/data"] == 1  # rank 2 never went non-finite
    assert values["loss"] == pytest.approx(1.1)
    assert source["m/l0/forget/sat_right"] == 1  # three ranks: the one far from the others is named
    assert curves["m/gtt"] == pytest.approx([1.0, ((9 + 16) / 3) ** 0.5])
    events = [Event(7, "nonfinite", "error", "m", "NaN in the input", "check the data", "data"),
              Event(7, "gate_saturation", "warning", "m", "forget gate saturated", "fix", "l0/forget"),
              Event(7, "stalled_loss", "warning", "", "loss flat", "raise the learning rate")]
    named = name_ranks(events, source, 3)
    assert named[0].message.endswith("(on rank 1 of 3)") and named[0].values["rank"] == 1.0
    assert named[1].message.endswith("(on rank 1 of 3)")
    assert named[2] == events[2]  # run-wide: no rank to name
    assert combine(parts[:1]) == (parts[0][1], parts[0][2], {})  # one process: as it was


def test_without_the_store_rank0_reports_its_own_and_the_others_nothing(monkeypatch):
    import warnings

    import lstmwatch
    from lstmwatch import distributed

    def no_store():
        raise AttributeError("_get_default_store")

    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world", lambda r=rank: (r, 2))
        monkeypatch.setattr(distributed, "_store", no_store)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ranks = distributed.Ranks()
        assert any("cannot be reached" in str(c.message) for c in caught)
        assert issubclass(caught[0].category, lstmwatch.LSTMWatchFailure)
        got = ranks.gather(1, {"loss": 1.0}, {})
        assert got == ([(0, {"loss": 1.0}, {})] if rank == 0 else None)


def test_a_misspelt_sink_option_fails_on_every_rank(monkeypatch, tmp_path):
    # Rank 0 alone makes the sinks (a W&B run often exists there alone); a typo must not fail on rank 0 only,
    # leaving the other ranks to wait for it in the next collective.
    import lstmwatch

    monkeypatch.setattr(sys.modules["lstmwatch.watch"], "world", lambda: (1, 2))
    model = torch.nn.LSTM(2, 3)
    with pytest.raises(TypeError, match="log_dri"):
        lstmwatch.watch(model, log_dri=str(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        lstmwatch.watch(model, log_dir=str(tmp_path), log_path=str(tmp_path / "x.jsonl"))
    w = lstmwatch.watch(model, log_dir=str(tmp_path), wandb=True)  # no W&B run on this rank: not its business
    assert w.sinks == [] and not list(tmp_path.iterdir())
    w.close()
