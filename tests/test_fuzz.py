"""A seeded fuzz of the legal ways to use an LSTM, watched against unwatched.

Each case draws an nn.LSTM / nn.GRU / nn.LSTMCell configuration (layers 1-3, bidirectional, batch_first,
proj_size, bias, dropout), its inputs (padded, packed sorted or not, unbatched, an initial state as a tuple or
a list), a call pattern (plain, a subclass returning only the output, a user's hook returning out[0],
torch.utils.checkpoint in both modes), an empty batch now and then, step() with and without a loss and a
validation loss sometimes; then trains the model unwatched and watched (log_every 1-5) for a few steps.

Every case must run without an exception, end with bit-identical parameters, produce records, and switch
nothing off (no LSTMWatchFailure). The failing cases are grouped by what failed and where, all listed at once.

LSTMWATCH_FUZZ_CASES (default 40) sets the number of cases, LSTMWATCH_FUZZ_SEED (default 0) the seed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import traceback
import warnings
from collections import defaultdict

import torch
from field_models import SEED, assert_params_equal, mean_loss
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

import lstmwatch

CASES = int(os.environ.get("LSTMWATCH_FUZZ_CASES", "40"))
FUZZ_SEED = int(os.environ.get("LSTMWATCH_FUZZ_SEED", "0"))


@dataclasses.dataclass(frozen=True)
class Case:
    n: int
    kind: str  # LSTM, GRU, LSTMCell
    f: int
    hidden: int
    layers: int
    bidirectional: bool
    batch_first: bool
    proj: int
    bias: bool
    dropout: float
    inp: str  # padded, packed_sorted, packed_unsorted, unbatched
    hx: str  # none, tuple, list (LSTM, LSTMCell), tensor (GRU)
    call: str  # plain, output_only, user_hook, ckpt, ckpt_reentrant
    t: int
    b: int
    log_every: int
    empty: tuple[int, ...]  # steps (1-based) whose batch is empty
    steps: tuple[str, ...]  # per step: loss, none, val_float, val_tensor

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


def draw(rng: random.Random, n: int) -> Case:
    kind = rng.choice(["LSTM", "LSTM", "GRU", "LSTMCell"])
    hidden = rng.randint(2, 8)
    cell = kind == "LSTMCell"
    layers = 1 if cell else rng.randint(1, 3)
    inp = rng.choice(["padded", "unbatched"] if cell else ["padded", "packed_sorted", "packed_unsorted", "unbatched"])
    hx = rng.choice(["none", "tensor"] if kind == "GRU" else ["none", "tuple", "list"])
    calls = ["plain", "ckpt", "ckpt_reentrant"] + ([] if cell else ["output_only", "user_hook"])
    n_steps = rng.randint(3, 7)
    empty = (rng.randint(1, n_steps),) if inp == "padded" and rng.random() < 0.25 else ()
    return Case(
        n=n, kind=kind, f=rng.randint(1, 4), hidden=hidden, layers=layers,
        bidirectional=not cell and rng.random() < 0.4, batch_first=not cell and rng.random() < 0.5,
        proj=rng.randint(1, hidden - 1) if kind == "LSTM" and rng.random() < 0.3 else 0,
        bias=rng.random() < 0.8, dropout=0.3 if layers > 1 and rng.random() < 0.3 else 0.0,
        inp=inp, hx=hx, call=rng.choice(calls), t=rng.randint(1, 6), b=rng.randint(1, 5),
        log_every=rng.randint(1, 5), empty=empty,
        steps=tuple(rng.choice(["loss", "loss", "loss", "none", "val_float", "val_tensor"]) for _ in range(n_steps)),
    )


class OutputOnlyLSTM(nn.LSTM):
    def forward(self, input, hx=None):  # noqa: A002
        return super().forward(input, hx)[0]


class OutputOnlyGRU(nn.GRU):
    def forward(self, input, hx=None):  # noqa: A002
        return super().forward(input, hx)[0]


def _out0(module, args, out):
    return out[0]


class Net(nn.Module):
    """A linear layer (so the recurrent input requires grad), the drawn module, a linear head."""

    def __init__(self, c: Case):
        super().__init__()
        self.c = c
        self.pre = nn.Linear(c.f, c.f)
        if c.kind == "LSTMCell":
            self.rnn: nn.Module = nn.LSTMCell(c.f, c.hidden, bias=c.bias)
            width = c.hidden
        else:
            plain, output_only = (nn.LSTM, OutputOnlyLSTM) if c.kind == "LSTM" else (nn.GRU, OutputOnlyGRU)
            kw = dict(num_layers=c.layers, bidirectional=c.bidirectional, batch_first=c.batch_first, bias=c.bias,
                      dropout=c.dropout)
            if c.kind == "LSTM":
                kw["proj_size"] = c.proj
            self.rnn = (output_only if c.call == "output_only" else plain)(c.f, c.hidden, **kw)
            if c.call == "user_hook":
                self.rnn.register_forward_hook(_out0)
            width = (c.proj or c.hidden) * (2 if c.bidirectional else 1)
        self.head = nn.Linear(width, 1)

    def forward(self, batch):
        x, lengths, state = batch
        x = self.pre(x)
        if self.c.call.startswith("ckpt"):
            y = checkpoint(self.run, x, lengths, *state, use_reentrant=self.c.call == "ckpt_reentrant")
        else:
            y = self.run(x, lengths, *state)
        return mean_loss(self.head(y))

    def run(self, x, lengths, *state):
        """The recurrent part: features (N, width) of every valid step."""
        c = self.c
        if c.kind == "LSTMCell":
            h = cc = None
            if state:
                h, cc = state
            outs = []
            for t in range(x.shape[0]):
                if h is None:
                    h, cc = self.rnn(x[t])
                else:
                    h, cc = self.rnn(x[t], [h, cc] if c.hx == "list" else (h, cc))
                outs.append(h)
            return torch.stack(outs).flatten(0, -2)
        hx = None
        if state:
            hx = state[0] if c.kind == "GRU" else (list(state) if c.hx == "list" else tuple(state))
        inp = x
        if c.inp.startswith("packed"):
            inp = pack_padded_sequence(x, lengths, batch_first=c.batch_first, enforce_sorted=c.inp == "packed_sorted")
        res = self.rnn(inp) if hx is None else self.rnn(inp, hx)
        out = res if c.call in ("output_only", "user_hook") else res[0]
        if isinstance(out, PackedSequence):
            out, _ = pad_packed_sequence(out, batch_first=True)
        elif c.inp != "unbatched" and not c.batch_first:
            out = out.transpose(0, 1)
        return out.flatten(0, -2)


def make_data(c: Case):
    """One (x, lengths, state) per step, from the case's own generator."""
    g = torch.Generator().manual_seed(SEED + c.n)
    data = []
    d = 2 if c.bidirectional else 1
    for s in range(1, len(c.steps) + 1):
        b = 0 if s in c.empty else c.b
        unbatched = c.inp == "unbatched"
        if c.kind == "LSTMCell" or unbatched or not c.batch_first:
            shape = (c.t, c.f) if unbatched else (c.t, b, c.f)
        else:
            shape = (b, c.t, c.f)
        x = torch.randn(*shape, generator=g)
        lengths = torch.randint(1, c.t + 1, (b,), generator=g)
        if c.inp == "packed_sorted":
            lengths = lengths.sort(descending=True).values
        if c.inp.startswith("packed"):  # zero past each length, as a padded batch is
            steps = torch.arange(c.t)
            mask = steps[None, :] < lengths[:, None]  # (B, T)
            x = x * (mask if c.batch_first else mask.t())[..., None]
        lead = () if unbatched else (b,)
        if c.hx == "none":
            state: tuple = ()
        elif c.kind == "LSTMCell":
            state = (0.5 * torch.randn(*lead, c.hidden, generator=g), 0.5 * torch.randn(*lead, c.hidden, generator=g))
        elif c.kind == "GRU":
            state = (0.5 * torch.randn(c.layers * d, *lead, c.hidden, generator=g),)
        else:
            state = (0.5 * torch.randn(c.layers * d, *lead, c.proj or c.hidden, generator=g),
                     0.5 * torch.randn(c.layers * d, *lead, c.hidden, generator=g))
        data.append((x, lengths, state))
    return data


def train(model, data, c: Case, watcher=None):
    torch.manual_seed(SEED + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s, batch in enumerate(data, 1):
        loss = model(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if watcher is None:
            continue
        how = c.steps[s - 1]
        if how == "loss":
            watcher.step(loss)
        elif how == "none":
            watcher.step()
        elif how == "val_float":
            watcher.step(loss, val_loss=float(loss) + 0.1)
        else:
            watcher.step(loss, val_loss=loss.detach() + 0.1)


def _where(exc: BaseException) -> str:
    """The last lstmwatch frame of a traceback ('probes/rnn.py:_on_forward'), or the last frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if f"{os.sep}lstmwatch{os.sep}" in f.filename]
    f = (ours or frames)[-1]
    path = f.filename.split(f"{os.sep}lstmwatch{os.sep}")[-1] if ours else os.path.basename(f.filename)
    return f"{path}:{f.name}"


def _short(msg: str) -> str:
    msg = msg.strip().splitlines()[0] if msg.strip() else ""
    return re.sub(r"\d+", "N", msg)[:110]


def run_case(c: Case) -> list[str]:
    """The failure classes of one case ([] when it passes)."""
    data = make_data(c)
    torch.manual_seed(SEED)
    plain = Net(c)
    torch.manual_seed(SEED)
    model = Net(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own (oneDNN and proj_size, checkpoint) are not the point
        train(plain, data, c)
    problems = []
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        try:
            w = lstmwatch.watch(model, log_every=c.log_every)
            try:
                train(model, data, c, watcher=w)
            finally:
                w.close()
        except Exception as exc:  # noqa: BLE001 - classified below
            return [f"raised {type(exc).__name__} at {_where(exc)}: {_short(str(exc))}"]
    try:
        assert_params_equal(plain, model)
    except AssertionError as exc:
        problems.append(f"parameters differ: {_short(str(exc))}")
    for x in log:
        if issubclass(x.category, lstmwatch.LSTMWatchFailure):
            problems.append(f"LSTMWatchFailure: {_short(str(x.message))}")
    if not w.records:
        problems.append("no record")
    return sorted(set(problems))


def test_fuzz_watched_equals_unwatched():
    rng = random.Random(FUZZ_SEED)
    classes: dict[str, list[Case]] = defaultdict(list)
    failed = 0
    for n in range(CASES):
        c = draw(rng, n)
        problems = run_case(c)
        failed += bool(problems)
        for p in problems:
            classes[p].append(c)
    report = [f"{failed}/{CASES} cases failed (LSTMWATCH_FUZZ_SEED={FUZZ_SEED}); failure classes:"]
    for p, cases in sorted(classes.items(), key=lambda kv: -len(kv[1])):
        report.append(f"  {len(cases):3d}x {p}")
        for c in cases[:2]:
            report.append(f"        e.g. {c}")
    assert not classes, "\n".join(report)
