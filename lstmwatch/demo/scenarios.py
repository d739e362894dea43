"""Small seeded LSTM training runs, healthy and with one planted fault each, for the demo and the zoo.

Each run trains on CPU in seconds. `expected` lists the kinds of which at least one must be raised;
a healthy run (expected empty) must raise no warning at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from ..watch import Watcher

__all__ = ["Scenario", "SCENARIOS", "DEMO", "run"]


class Net(nn.Module):
    """An LSTM and a linear head, read at the last step (or at every step for seq-to-seq)."""

    def __init__(self, n_in: int, hidden: int, n_out: int, layers: int = 1, every_step: bool = False,
                 bidirectional: bool = False, dropout: float = 0.0, vocab: int = 0, packed: bool = False,
                 detach: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, n_in, padding_idx=0) if vocab else None
        self.lstm = nn.LSTM(n_in, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                            dropout=dropout)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), n_out)
        self.every_step, self.packed, self.detach = every_step, packed, detach

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        if self.packed:
            if lengths is None:
                raise ValueError("a packed Net needs the lengths of the sequences")
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            feat = torch.cat([h[-2], h[-1]], 1) if self.lstm.bidirectional else h[-1]
            return self.head(feat.detach() if self.detach else feat)
        out, _ = self.lstm(x)
        if self.detach:
            out = out.detach()
        return self.head(out if self.every_step else out[:, -1])


# --- tasks: each returns a batch function step -> (x, y, lengths or None)

Batch = tuple[Tensor, Tensor, Tensor | None]
Task = Callable[[int], Batch]

def sine_task(batch: int, T: int, scale: float = 1.0, shift: float = 0.0, gen: torch.Generator | None = None) -> Task:
    """Forecast the next value of noisy sines of random frequency and phase."""
    def make(step: int) -> Batch:
        f = torch.rand(batch, 1, generator=gen) * 0.3 + 0.05
        p = torch.rand(batch, 1, generator=gen) * 6.28
        t = torch.arange(T + 1).float()
        s = torch.sin(f * t + p) + 0.05 * torch.randn(batch, T + 1, generator=gen)
        x = s[:, :T, None] * scale + shift
        return x, s[:, T:T + 1], None
    return make


def memory_task(batch: int, T: int, n_in: int = 4, gen: torch.Generator | None = None,
                lag_from_end: int | None = None) -> Task:
    """Classify by the sign of the first feature at an early step (needs memory across T)."""
    def make(step: int) -> Batch:
        x = torch.randn(batch, T, n_in, generator=gen)
        k = 0 if lag_from_end is None else T - lag_from_end
        y = (x[:, k, 0] > 0).long()
        return x, y, None
    return make


def varlen_task(batch: int, T: int, n_in: int = 4, gen: torch.Generator | None = None) -> Task:
    """Sequences of lengths T/4..T, zero-padded at the end; the label is the sign of the sum of feature 0."""
    def make(step: int) -> Batch:
        lengths = torch.randint(T // 4, T + 1, (batch,), generator=gen)
        x = torch.randn(batch, T, n_in, generator=gen)
        x = x * (torch.arange(T)[None, :, None] < lengths[:, None, None])
        y = (x[:, :, 0].sum(1) > 0).long()
        return x, y, lengths
    return make


def token_task(batch: int, T: int, vocab: int, gen: torch.Generator | None = None) -> Task:
    """Token sequences; the label is whether token 1 occurs."""
    def make(step: int) -> Batch:
        x = torch.randint(2, vocab, (batch, T), generator=gen)
        has = torch.rand(batch, generator=gen) < 0.5
        pos = torch.randint(0, T, (batch,), generator=gen)
        x[has, pos[has]] = 1
        return x, has.long(), None
    return make


@dataclass(frozen=True)
class Setup:
    """Everything one run needs."""

    model: nn.Module
    opt: torch.optim.Optimizer
    data: Task
    loss: Callable[[Tensor, Tensor], Tensor]
    sched: Any = None
    clip: float | None = None
    amp: bool = False
    accumulate: int = 1
    val: Callable[[], tuple] | None = None  # -> (x, y, lengths) of a fixed validation set
    val_every: int = 0
    nan_at: int = 0  # put a NaN into the input batch from this step on
    lengths_in_model: bool = False
    targets_in_model: bool = False  # training calls model(x, y) (teacher forcing); evaluation calls model(x)


@dataclass(frozen=True)
class Scenario:
    """A named, seeded training run and the kinds lstmwatch should raise on it."""

    name: str
    title: str
    expected: tuple[str, ...]
    steps: int
    make: Callable[[torch.Generator], Setup] = field(repr=False)
    article: bool = False  # a failure the article names


def _mse(p, y):
    return nn.functional.mse_loss(p, y)


def _ce(p, y):
    return nn.functional.cross_entropy(p, y)


def _forecast(g, *, scale=1.0, shift=0.0, lr=3e-3, opt="adam", layers=1, hidden=32, **kw) -> Setup:
    m = Net(1, hidden, 1, layers=layers)
    o = torch.optim.Adam(m.parameters(), lr) if opt == "adam" else torch.optim.SGD(m.parameters(), lr)
    return Setup(m, o, sine_task(32, 30, scale, shift, g), _mse, **kw)


def _healthy_forecast(g):
    return _forecast(g)


def _healthy_classify(g):
    m = Net(4, 32, 2)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), memory_task(32, 20, gen=g, lag_from_end=5), _ce)


def _healthy_packed_bi(g):
    m = Net(4, 24, 2, layers=2, bidirectional=True, packed=True)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), varlen_task(32, 24, gen=g), _ce, lengths_in_model=True)


def _healthy_dropout(g):
    m = Net(1, 32, 1, layers=2, dropout=0.3)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), sine_task(32, 30, gen=g), _mse)


def _healthy_clip(g):
    m = Net(1, 32, 1)
    return Setup(m, torch.optim.SGD(m.parameters(), 0.3, momentum=0.9), sine_task(32, 30, gen=g), _mse, clip=1.0)


def _healthy_sched(g):
    m = Net(4, 32, 2)
    o = torch.optim.Adam(m.parameters(), 1e-2)
    return Setup(m, o, memory_task(32, 20, gen=g, lag_from_end=5), _ce,
                 sched=torch.optim.lr_scheduler.StepLR(o, step_size=60, gamma=0.3))


def _fixed(make, n_batches=1):
    batches = [make(i) for i in range(n_batches)]
    return lambda: batches[0]


def _healthy_val(g):
    m = Net(1, 32, 1)
    data = sine_task(32, 30, gen=g)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), data, _mse, val=_fixed(sine_task(128, 30, gen=g)),
                 val_every=20)


def _healthy_amp(g):
    m = Net(1, 32, 1)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), sine_task(32, 30, gen=g), _mse, amp=True)


def _healthy_tokens(g):
    m = Net(16, 32, 2, vocab=50)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), token_task(32, 20, 50, g), _ce)


def _unnormalized(g):
    return _forecast(g, scale=300.0, shift=1000.0)


def _lr_high(g):
    return _forecast(g, lr=2.0, opt="sgd")


def _lr_low(g):
    return _forecast(g, lr=1e-6, opt="sgd")


def _padding(g):
    m = Net(4, 32, 2)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), varlen_task(32, 40, gen=g), _ce)


def _vanishing(g):
    m = Net(4, 16, 2, layers=6)
    return Setup(m, torch.optim.Adam(m.parameters(), 1e-3), memory_task(16, 200, gen=g), _ce)


def _nan_input(g):
    return _forecast(g, nan_at=15)


def _no_gradient(g):
    m = Net(1, 32, 1, detach=True)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), sine_task(32, 30, gen=g), _mse)


def _not_updated(g):
    m = Net(1, 32, 1)
    return Setup(m, torch.optim.Adam(m.head.parameters(), 3e-3), sine_task(32, 30, gen=g), _mse)


def _exploding(g):
    m = Net(4, 32, 2)
    with torch.no_grad():
        # Recurrent gain far above 1: gradients grow back through time.
        m.lstm.get_parameter("weight_hh_l0").normal_(0, 1.2)
        m.lstm.get_parameter("bias_hh_l0")[32:64].fill_(6.0)  # forget gate held open, so the growth is not damped
    return Setup(m, torch.optim.SGD(m.parameters(), 0.05), memory_task(32, 60, gen=g), _ce)


def _gate_saturation(g):
    m = Net(4, 32, 2)
    with torch.no_grad():
        m.lstm.get_parameter("bias_ih_l0")[:32].fill_(-12.0)  # input gate shut from initialization
    return Setup(m, torch.optim.Adam(m.parameters(), 1e-3), memory_task(32, 20, gen=g, lag_from_end=5), _ce)


def _hidden_saturation(g):
    m = Net(4, 32, 2)
    with torch.no_grad():
        # Input and forget gates held open: the cell only accumulates,
        m.lstm.get_parameter("bias_ih_l0")[:64].fill_(6.0)
        m.lstm.get_parameter("bias_ih_l0")[64:96].fill_(3.0)  # and always adds the same sign, so tanh(c) is pinned
    return Setup(m, torch.optim.Adam(m.parameters(), 1e-3), memory_task(32, 20, gen=g, lag_from_end=5), _ce)


def _overfit(g):
    m = Net(4, 96, 2)
    train = _fixed(memory_task(16, 20, gen=g, lag_from_end=5))
    val = _fixed(memory_task(256, 20, gen=g, lag_from_end=5))
    return Setup(m, torch.optim.Adam(m.parameters(), 1e-2), lambda step: train(), _ce, val=val, val_every=5)


# --- the architectures people build around nn.LSTM


class Seq2Seq(nn.Module):
    """An nn.LSTM encoder and an nn.LSTMCell decoder stepped by hand, forecasting `horizon` values.

    model(x, y) decodes with teacher forcing (the true previous value is the next input); model(x) decodes
    greedily, feeding back its own predictions (the evaluation, under torch.no_grad()). detach_state: the
    encoder's final state handed to the decoder detached, so the encoder gets no gradient (the fault).
    """

    def __init__(self, hidden: int = 32, horizon: int = 5, detach_state: bool = False):
        super().__init__()
        self.encoder = nn.LSTM(1, hidden, batch_first=True)
        self.decoder = nn.LSTMCell(1, hidden)
        self.head = nn.Linear(hidden, 1)
        self.horizon, self.detach_state = horizon, detach_state

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        _, (h, c) = self.encoder(x)
        h, c = h[-1], c[-1]
        if self.detach_state:
            h, c = h.detach(), c.detach()
        inp = x[:, -1]
        outs = []
        for t in range(self.horizon):
            h, c = self.decoder(inp, (h, c))
            out = self.head(h)
            outs.append(out)
            inp = y[:, t] if y is not None else out
        return torch.stack(outs, 1)


def multistep_task(batch: int, T: int, horizon: int, scale: float = 1.0, shift: float = 0.0,
                   gen: torch.Generator | None = None) -> Task:
    """Noisy sines of random frequency and phase: T values in, the next `horizon` values out, (B, horizon, 1)."""
    def make(step: int) -> Batch:
        f = torch.rand(batch, 1, generator=gen) * 0.3 + 0.05
        p = torch.rand(batch, 1, generator=gen) * 6.28
        t = torch.arange(T + horizon).float()
        s = (torch.sin(f * t + p) + 0.05 * torch.randn(batch, T + horizon, generator=gen))[..., None] * scale + shift
        return s[:, :T], s[:, T:], None
    return make


class AttnNet(nn.Module):
    """An LSTM whose outputs are pooled by additive attention over time, then a linear head."""

    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.lstm = nn.LSTM(n_in, hidden, batch_first=True)
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        a = torch.softmax(self.score(out), dim=1)  # (B, T, 1)
        return self.head((a * out).sum(1))


class CheckpointedNet(Net):
    """Net whose LSTM runs under torch.utils.checkpoint (activations recomputed in backward)."""

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        out, _ = checkpoint(self.lstm, x, use_reentrant=False)
        return self.head(out[:, -1])


class GRUNet(nn.Module):
    """An nn.GRU and a linear head read at the last step."""

    def __init__(self, n_in: int, hidden: int, n_out: int, layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(n_in, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def _seq2seq(g, *, scale=1.0, shift=0.0, lr=3e-3, detach_state=False) -> Setup:
    m = Seq2Seq(detach_state=detach_state)
    return Setup(m, torch.optim.Adam(m.parameters(), lr), multistep_task(32, 30, 5, scale, shift, g), _mse,
                 val=_fixed(multistep_task(128, 30, 5, scale, shift, g)), val_every=25, targets_in_model=True)


def _healthy_seq2seq(g):
    return _seq2seq(g)


def _seq2seq_detached(g):
    return _seq2seq(g, detach_state=True)


def _healthy_attention(g):
    m = AttnNet(4, 32, 2)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), memory_task(32, 40, gen=g), _ce)


def _checkpointed(g, *, scale=1.0, shift=0.0) -> Setup:
    m = CheckpointedNet(1, 32, 1, layers=4)
    return Setup(m, torch.optim.Adam(m.parameters(), 3e-3), sine_task(32, 30, scale, shift, g), _mse)


def _healthy_checkpointed(g):
    return _checkpointed(g)


def _checkpointed_unnormalized(g):
    return _checkpointed(g, scale=300.0, shift=1000.0)


def _gru(g, *, lr=3e-3, opt="adam", scale=1.0, shift=0.0) -> Setup:
    m = GRUNet(1, 32, 1)
    o = torch.optim.Adam(m.parameters(), lr) if opt == "adam" else torch.optim.SGD(m.parameters(), lr)
    return Setup(m, o, sine_task(32, 30, scale, shift, g), _mse)


def _healthy_gru(g):
    return _gru(g)


def _gru_lr_high(g):
    return _gru(g, lr=2.0, opt="sgd")


def _gru_unnormalized(g):
    return _gru(g, scale=300.0, shift=1000.0)


SCENARIOS: list[Scenario] = [
    Scenario("healthy_forecast", "healthy: sine forecasting, normalized inputs, Adam 3e-3", (), 300, _healthy_forecast),
    Scenario("healthy_classify", "healthy: sequence classification", (), 300, _healthy_classify),
    Scenario("healthy_packed_bidir", "healthy: packed variable-length batches, 2-layer bidirectional", (), 200,
             _healthy_packed_bi),
    Scenario("healthy_dropout", "healthy: 2 layers with dropout 0.3 between them", (), 200, _healthy_dropout),
    Scenario("healthy_clipping", "healthy: SGD with momentum and gradient clipping", (), 300, _healthy_clip),
    Scenario("healthy_schedule", "healthy: a step learning-rate schedule", (), 300, _healthy_sched),
    Scenario("healthy_validation", "healthy: validation losses that generalize", (), 300, _healthy_val),
    Scenario("healthy_amp", "healthy: bf16 autocast with a GradScaler", (), 200, _healthy_amp),
    Scenario("healthy_tokens", "healthy: token sequences through an embedding", (), 300, _healthy_tokens),
    Scenario("unnormalized_input", "inputs not normalized (raw values around 1000)", ("unnormalized_input",), 300,
             _unnormalized, article=True),
    Scenario("lr_too_high", "learning rate too high (SGD lr=2)", ("diverging_loss", "exploding_gradient"), 300,
             _lr_high, article=True),
    Scenario("lr_too_low", "learning rate too low (SGD lr=1e-6)", ("stalled_loss",), 300, _lr_low, article=True),
    Scenario("padding", "zero-padded batches fed unpacked, read at the last step", ("padding",), 300, _padding,
             article=True),
    Scenario("deep_long", "6 stacked layers on 200-step sequences", ("vanishing_gradient",), 200, _vanishing,
             article=True),
    Scenario("nan_input", "a NaN in the input data from step 15", ("nonfinite",), 300, _nan_input),
    Scenario("no_gradient", "the LSTM's output detached from the loss", ("no_gradient",), 300, _no_gradient),
    Scenario("not_updated", "the LSTM's parameters left out of the optimizer", ("not_updated",), 300, _not_updated),
    Scenario("exploding", "recurrent weights initialized far too large", ("exploding_gradient",), 300, _exploding),
    Scenario("gate_saturation", "input gate bias initialized to -12", ("gate_saturation",), 300, _gate_saturation),
    Scenario("hidden_saturation", "gate biases initialized so the cell state runs away", ("hidden_saturation",), 300,
             _hidden_saturation),
    Scenario("overfitting", "a large model on 16 training sequences", ("overfitting",), 300, _overfit),
    # The architectures people build around nn.LSTM.
    Scenario("healthy_seq2seq", "healthy: LSTM encoder, LSTMCell decoder with teacher forcing, greedy evaluation",
             (), 300, _healthy_seq2seq),
    Scenario("healthy_attention", "healthy: attention over the LSTM's outputs, 40-step memory", (), 300,
             _healthy_attention),
    Scenario("healthy_checkpointed", "healthy: 4-layer LSTM under torch.utils.checkpoint", (), 300,
             _healthy_checkpointed),
    Scenario("healthy_gru", "healthy: nn.GRU sine forecasting", (), 300, _healthy_gru),
    Scenario("seq2seq_detached", "seq2seq: the encoder's state handed to the decoder detached", ("no_gradient",), 300,
             _seq2seq_detached),
    Scenario("checkpointed_unnormalized", "checkpointed 4-layer LSTM on raw values around 1000",
             ("unnormalized_input",), 300, _checkpointed_unnormalized),
    Scenario("gru_lr_too_high", "GRU with SGD lr=2", ("diverging_loss", "exploding_gradient"), 300, _gru_lr_high),
    Scenario("gru_unnormalized", "GRU on raw values around 1000", ("unnormalized_input",), 300, _gru_unnormalized),
]
BY_NAME = {s.name: s for s in SCENARIOS}
DEMO: list[Scenario] = [BY_NAME[n] for n in ("healthy_forecast", "unnormalized_input", "lr_too_high", "lr_too_low",
                                              "padding", "deep_long")]


def run(sc: Scenario, *, steps: int | None = None, seed: int = 0, progress: Callable[[int, int], None] | None = None,
        **watch_kwargs: Any) -> Watcher:
    """Train a scenario under lstmwatch.watch(**watch_kwargs); returns the closed Watcher."""
    from ..watch import watch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    s = sc.make(g)
    total = steps or sc.steps
    scaler = torch.amp.GradScaler("cpu") if s.amp else None
    watcher = watch(s.model, scaler=scaler, **watch_kwargs)
    try:
        for step in range(1, total + 1):
            for _ in range(s.accumulate):
                x, y, lengths = s.data(step)
                if s.nan_at and step >= s.nan_at:
                    x = x.clone()
                    x[0, 0, 0] = math.nan
                args = (x, lengths) if s.lengths_in_model else (x, y) if s.targets_in_model else (x,)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.amp):
                    loss = s.loss(s.model(*args).float(), y)
                (scaler.scale(loss) if scaler else loss / s.accumulate).backward()
            if scaler:
                scaler.unscale_(s.opt)
            if s.clip:
                nn.utils.clip_grad_norm_(s.model.parameters(), s.clip)
            (scaler.step(s.opt) if scaler else s.opt.step())
            if scaler:
                scaler.update()
            s.opt.zero_grad()
            if s.sched is not None:
                s.sched.step()
            val_loss = None
            if s.val is not None and step % s.val_every == 0:
                with torch.no_grad():
                    vx, vy, vl = s.val()
                    val_loss = s.loss(s.model(*((vx, vl) if s.lengths_in_model else (vx,))), vy).item()
            watcher.step(loss.detach(), val_loss=val_loss)
            if progress is not None:
                progress(step, total)
    finally:
        watcher.close()
    return watcher
