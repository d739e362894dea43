"""Training programs as people write them, small enough to run in seconds on one CPU thread.

Each recipe follows the habits of a widely used kind of public program (its architecture, optimizer, loop and
hyperparameters), on data generated here with enough structure to be learnt. Every recipe is a function
`recipe(seed, **watch_kwargs) -> Watcher` that builds its data and model, trains under `lstmwatch.watch`
with `watcher.step(loss)` once per optimizer step, and returns the closed watcher.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from torch.utils.data import DataLoader, TensorDataset

import lstmwatch

# --------------------------------------------------------------------------------------------- data


_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a child", "the teacher", "our neighbour",
             "the farmer", "a student"]
_VERBS = ["sees", "likes", "carries", "finds", "watches", "follows", "paints", "feeds", "calls", "keeps"]
_OBJECTS = ["the ball", "a red apple", "the small boat", "a letter", "the green door", "her book", "the horse",
            "a bright lamp", "the river", "his coat"]
_PLACES = ["in the garden", "near the house", "at the market", "on the hill", "by the sea", "under the tree"]
_TIMES = ["today", "every morning", "at night", "again", "slowly", "before noon"]


def sentences(n: int, rng: random.Random) -> list[str]:
    """Sentences of a small grammar: subject verb object, an optional place, an optional time, a full stop."""
    out = []
    for _ in range(n):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.6:
            words.append(rng.choice(_PLACES))
        if rng.random() < 0.4:
            words.append(rng.choice(_TIMES))
        out.append(" ".join(words) + " .")
    return out


class Dictionary:
    def __init__(self) -> None:
        self.word2idx: dict[str, int] = {}
        self.idx2word: list[str] = []

    def add(self, word: str) -> int:
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]


def tokenize(lines: list[str], d: Dictionary) -> Tensor:
    """Word ids of every line, each line closed by <eos>, as one long 1-d tensor."""
    ids = [d.add(w) for line in lines for w in line.split() + ["<eos>"]]
    return torch.tensor(ids, dtype=torch.long)


def batchify(data: Tensor, bsz: int) -> Tensor:
    """(tokens,) -> (tokens // bsz, bsz): each column an independent stream, as the LM examples lay text out."""
    n = data.size(0) // bsz
    return data[: n * bsz].view(bsz, -1).t().contiguous()


def price_series(n: int, gen: torch.Generator, start: float = 120.0) -> Tensor:
    """A daily closing price: a geometric random walk with drift and a yearly swing, around 50-300."""
    t = torch.arange(n, dtype=torch.float64)
    r = 0.0004 + 0.012 * torch.randn(n, generator=gen, dtype=torch.float64)
    p = start * torch.exp(torch.cumsum(r, 0)) * (1 + 0.08 * torch.sin(2 * math.pi * t / 250))
    return p.float()


def windows(series: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Sliding windows of `width` days -> the next day: x (N, width, 1), y (N, 1)."""
    x = series.unfold(0, width + 1, 1)
    return x[:, :width, None].contiguous(), x[:, width:].contiguous()


# ------------------------------------------------------------------- 1. word-level language model (LM example)


class RNNModel(nn.Module):
    """Embedding -> dropout -> multi-layer LSTM -> dropout -> decoder, decoder weight tied to the embedding."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2, tie: bool = True):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie:
            self.decoder.weight = self.encoder.weight
        self.nlayers, self.nhid = nlayers, nhid
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, inp: Tensor, hidden: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        emb = self.drop(self.encoder(inp))
        out, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(out)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz: int) -> tuple[Tensor, Tensor]:
        w = next(self.parameters())
        return w.new_zeros(self.nlayers, bsz, self.nhid), w.new_zeros(self.nlayers, bsz, self.nhid)


def repackage_hidden(h):
    """Cut the graph between batches: the state carries over, its history does not."""
    return h.detach() if isinstance(h, Tensor) else tuple(repackage_hidden(v) for v in h)


def word_lm(seed: int, *, optimizer: str = "manual_sgd", lr: float = 20.0, epochs: int = 3, **kw: Any):
    """Tied 2-layer LSTM LM, bptt 35, batch 20, clip 0.25, manual SGD at lr 20, lr /= 4 when validation stalls.

    optimizer="adam": the same loop with the hand-written update replaced by torch.optim.Adam at the same lr.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    d = Dictionary()
    train = batchify(tokenize(sentences(2600, rng), d), 20)
    valid = batchify(tokenize(sentences(300, rng), d), 10)
    ntokens, bptt, clip = len(d.idx2word), 35, 0.25
    model = RNNModel(ntokens, 64, 64, 2, dropout=0.2)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam" else None

    def get_batch(src: Tensor, i: int) -> tuple[Tensor, Tensor]:
        n = min(bptt, len(src) - 1 - i)
        return src[i:i + n], src[i + 1:i + 1 + n].reshape(-1)

    def evaluate(src: Tensor) -> float:
        model.eval()
        total, hidden = 0.0, model.init_hidden(src.size(1))
        with torch.no_grad():
            for i in range(0, src.size(0) - 1, bptt):
                x, y = get_batch(src, i)
                out, hidden = model(x, hidden)
                total += len(x) * crit(out, y).item()
                hidden = repackage_hidden(hidden)
        return total / (len(src) - 1)

    best_val = None
    with lstmwatch.watch(model, **kw) as watcher:
        for _epoch in range(epochs):
            model.train()
            hidden = model.init_hidden(20)
            starts = list(range(0, train.size(0) - 1, bptt))
            for j, i in enumerate(starts):
                x, y = get_batch(train, i)
                hidden = repackage_hidden(hidden)
                model.zero_grad()
                out, hidden = model(x, hidden)
                loss = crit(out, y)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), clip)
                if opt is not None:
                    opt.step()
                else:
                    for p in model.parameters():
                        p.data.add_(p.grad, alpha=-lr)
                val = None
                if j == len(starts) - 1:  # validation at the end of every epoch, lr annealed when it does not improve
                    val = evaluate(valid)
                    if best_val is None or val < best_val:
                        best_val = val
                    else:
                        lr /= 4.0
                        for g in opt.param_groups if opt is not None else []:
                            g["lr"] = lr
                    model.train()
                watcher.step(loss.item(), val_loss=val)
    return watcher


# --------------------------------------------------------- 2. time-sequence prediction (LSTMCell by hand, LBFGS)


class Sequence(nn.Module):
    """Two LSTMCells stepped by hand over the wave, then a linear read-out; `future` steps fed its own output."""

    def __init__(self, hidden: int = 51):
        super().__init__()
        self.hidden = hidden
        self.lstm1 = nn.LSTMCell(1, hidden)
        self.lstm2 = nn.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)

    def forward(self, inp: Tensor, future: int = 0) -> Tensor:
        outputs = []
        h_t = c_t = h_t2 = c_t2 = torch.zeros(inp.size(0), self.hidden, dtype=inp.dtype)
        output = None
        for input_t in inp.split(1, dim=1):
            h_t, c_t = self.lstm1(input_t, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        for _ in range(future):
            h_t, c_t = self.lstm1(output, (h_t, c_t))
            h_t2, c_t2 = self.lstm2(h_t, (h_t2, c_t2))
            output = self.linear(h_t2)
            outputs.append(output)
        return torch.cat(outputs, dim=1)


def sine_waves(seed: int, n: int = 24, length: int = 160, period: float = 20.0) -> Tensor:
    """Sines shifted by a random integer offset each, float64 (the example generates and saves them in double)."""
    g = torch.Generator().manual_seed(seed + 7)
    x = torch.arange(length, dtype=torch.float64)[None] + torch.randint(int(-4 * period), int(4 * period), (n, 1),
                                                                        generator=g)
    return torch.sin(x / period)


def time_sequence(seed: int, *, optimizer: str = "lbfgs", lr: float = 0.8, steps: int = 8, **kw: Any):
    """float64 model, full batch, LBFGS(lr 0.8) with a closure; watcher.step once per opt.step(closure)."""
    torch.manual_seed(seed)
    data = sine_waves(seed)
    inp, target = data[3:, :-1], data[3:, 1:]
    test_in, test_target = data[:3, :-1], data[:3, 1:]
    seq = Sequence().double()
    crit = nn.MSELoss()
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(seq.parameters(), lr=lr, max_iter=8)
    else:
        opt = torch.optim.SGD(seq.parameters(), lr=lr)
    with lstmwatch.watch(seq, **kw) as watcher:
        for _i in range(steps):
            def closure():
                opt.zero_grad()
                loss = crit(seq(inp), target)
                loss.backward()
                return loss
            loss = opt.step(closure)
            with torch.no_grad():
                test_loss = crit(seq(test_in, future=0), test_target).item()
            watcher.step(loss, val_loss=test_loss if optimizer == "lbfgs" else None)
    return watcher


# -------------------------------------------------------- 3. name classification: padded batches, packed or not


_LANG_SYLLABLES = [
    ["ka", "to", "mi", "ra", "shi", "yo", "na", "ko", "ri", "ta"],  # a Japanese-like alphabet of syllables
    ["ov", "sky", "ich", "en", "ko", "vs", "ana", "ski", "mir", "lov"],
    ["son", "er", "ton", "ley", "man", "ell", "ing", "ham", "ford", "wood"],
    ["ez", "ar", "ita", "ero", "ia", "ando", "osa", "el", "ino", "ura"],
]


def names(n: int, rng: random.Random) -> tuple[list[Tensor], Tensor]:
    """Names built from each language's syllables: character ids (1..26, 0 is padding) and the language."""
    xs, ys = [], []
    for _ in range(n):
        lang = rng.randrange(len(_LANG_SYLLABLES))
        k = rng.randint(1, 5)
        word = "".join(rng.choice(_LANG_SYLLABLES[lang]) for _ in range(k))[:14]
        xs.append(torch.tensor([ord(c) - 96 for c in word], dtype=torch.long))
        ys.append(lang)
    return xs, torch.tensor(ys)


class NameClassifier(nn.Module):
    def __init__(self, packed: bool, vocab: int = 27, emb: int = 32, hidden: int = 64, n_classes: int = 4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, n_classes)
        self.packed = packed

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        emb = self.embedding(x)
        if self.packed:
            _, (h, _) = self.lstm(pack_padded_sequence(emb, lengths, batch_first=True))
            return self.fc(h[-1])
        out, _ = self.lstm(emb)  # the padded tensor itself: the last step is padding for every shorter name
        return self.fc(out[:, -1, :])


def name_classifier(seed: int, *, packed: bool = True, epochs: int = 4, **kw: Any):
    """pad_sequence + (sorted) pack_padded_sequence, LSTM read at h_n, Adam 1e-3, batch 32 from a DataLoader."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    xs, ys = names(1600, rng)

    def collate(batch):
        batch = sorted(batch, key=lambda b: len(b[0]), reverse=True)
        seqs = [b[0] for b in batch]
        lengths = torch.tensor([len(s) for s in seqs])
        return pad_sequence(seqs, batch_first=True), lengths, torch.stack([b[1] for b in batch])

    loader = DataLoader(list(zip(xs, ys)), batch_size=32, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    model = NameClassifier(packed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    with lstmwatch.watch(model, **kw) as watcher:
        for _epoch in range(epochs):
            for x, lengths, y in loader:
                opt.zero_grad()
                loss = crit(model(x, lengths), y)
                loss.backward()
                opt.step()
                watcher.step(loss)
    return watcher


# ------------------------------------------------------------ 4. seq2seq with teacher forcing (sequence-first)

PAD, SOS, EOS = 0, 1, 2


class Encoder(nn.Module):
    def __init__(self, vocab: int, emb: int, hid: int, layers: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hid, layers, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        _, (hidden, cell) = self.rnn(self.dropout(self.embedding(src)))
        return hidden, cell


class Decoder(nn.Module):
    def __init__(self, vocab: int, emb: int, hid: int, layers: int, dropout: float):
        super().__init__()
        self.output_dim = vocab
        self.embedding = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hid, layers, dropout=dropout)
        self.fc_out = nn.Linear(hid, vocab)
        self.dropout = nn.Dropout(dropout)

    def forward(self, inp: Tensor, hidden: Tensor, cell: Tensor):
        emb = self.dropout(self.embedding(inp.unsqueeze(0)))
        out, (hidden, cell) = self.rnn(emb, (hidden, cell))
        return self.fc_out(out.squeeze(0)), hidden, cell


class Seq2Seq(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, rng: random.Random):
        super().__init__()
        self.encoder, self.decoder, self.rng = encoder, decoder, rng

    def forward(self, src: Tensor, trg: Tensor, teacher_forcing_ratio: float = 0.5) -> Tensor:
        trg_len, batch = trg.shape
        outputs = torch.zeros(trg_len, batch, self.decoder.output_dim)
        hidden, cell = self.encoder(src)
        inp = trg[0, :]
        for t in range(1, trg_len):
            output, hidden, cell = self.decoder(inp, hidden, cell)
            outputs[t] = output
            teacher_force = self.rng.random() < teacher_forcing_ratio
            inp = trg[t] if teacher_force else output.argmax(1)
        return outputs


def reversal_pairs(n: int, rng: random.Random, vocab: int) -> tuple[Tensor, Tensor]:
    """Source: <sos> tokens <eos> <pad>...; target: the tokens reversed, (T, n) sequence-first."""
    src, trg = [], []
    for _ in range(n):
        k = rng.randint(3, 5)
        toks = [rng.randrange(3, vocab) for _ in range(k)]
        src.append(torch.tensor([SOS] + toks + [EOS]))
        trg.append(torch.tensor([SOS] + toks[::-1] + [EOS]))
    return pad_sequence(src, padding_value=PAD), pad_sequence(trg, padding_value=PAD)


def seq2seq(seed: int, *, epochs: int = 10, **kw: Any):
    """2-layer LSTM encoder and decoder, uniform(-0.08, 0.08) init, Adam, ignore_index=<pad>, clip 1, TF ratio 0.5."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab = 11
    src, trg = reversal_pairs(1280, rng, vocab)
    vsrc, vtrg = reversal_pairs(256, rng, vocab)
    model = Seq2Seq(Encoder(vocab, 32, 64, 2, 0.2), Decoder(vocab, 32, 64, 2, 0.2), rng)
    for p in model.parameters():
        nn.init.uniform_(p.data, -0.08, 0.08)
    opt = torch.optim.Adam(model.parameters())
    crit = nn.CrossEntropyLoss(ignore_index=PAD)
    with lstmwatch.watch(model, **kw) as watcher:
        for _epoch in range(epochs):
            model.train()
            perm = torch.randperm(src.size(1))
            for b in range(0, src.size(1), 64):
                idx = perm[b:b + 64]
                s, t = src[:, idx], trg[:, idx]
                opt.zero_grad()
                out = model(s, t)
                loss = crit(out[1:].reshape(-1, vocab), t[1:].reshape(-1))
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                watcher.step(loss.item())
            # the per-epoch evaluation (no teacher forcing), printed by the program, not passed on
            model.eval()
            with torch.no_grad():
                out = model(vsrc, vtrg, 0)
                crit(out[1:].reshape(-1, vocab), vtrg[1:].reshape(-1))
    return watcher


# -------------------------------------------------- 5. char-RNN generation: batch of one, one character per call


class CharRNN(nn.Module):
    def __init__(self, n_chars: int, hidden: int, n_layers: int = 1):
        super().__init__()
        self.hidden_size, self.n_layers = hidden, n_layers
        self.encoder = nn.Embedding(n_chars, hidden)
        self.lstm = nn.LSTM(hidden, hidden, n_layers)
        self.decoder = nn.Linear(hidden, n_chars)

    def forward(self, inp: Tensor, hidden):
        out, hidden = self.lstm(self.encoder(inp.view(1, -1)).view(1, 1, -1), hidden)
        return self.decoder(out.view(1, -1)), hidden

    def init_hidden(self):
        return (torch.zeros(self.n_layers, 1, self.hidden_size), torch.zeros(self.n_layers, 1, self.hidden_size))


def char_rnn(seed: int, *, steps: int = 250, chunk_len: int = 40, lr: float = 0.005, **kw: Any):
    """Random chunks of the text, a fresh hidden state per chunk, the model called once per character,
    loss summed over the chunk, Adam 0.005; the printed loss is the sum over the chunk length."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    text = " ".join(sentences(800, rng))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    model = CharRNN(len(chars), 64)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    crit = nn.CrossEntropyLoss()
    with lstmwatch.watch(model, **kw) as watcher:
        for _ in range(steps):
            start = rng.randrange(0, len(ids) - chunk_len - 1)
            chunk = ids[start:start + chunk_len + 1]
            inp, target = chunk[:-1], chunk[1:]
            hidden = model.init_hidden()
            model.zero_grad()
            loss = 0
            for c in range(chunk_len):
                output, hidden = model(inp[c], hidden)
                loss = loss + crit(output, target[c].view(1))
            loss.backward()
            opt.step()
            watcher.step(loss.item() / chunk_len)
    return watcher


# ------------------------------------------------- 6. sentiment LSTM ported from a Keras example (pre-padding)


_POS = ["great", "wonderful", "loved", "brilliant", "superb", "moving", "funny", "best"]
_NEG = ["awful", "boring", "hated", "terrible", "worst", "dull", "waste", "poor"]


def reviews(n: int, rng: random.Random, vocab: int, maxlen: int) -> tuple[Tensor, Tensor]:
    """Reviews of neutral words with a few sentiment words; ids padded and truncated at the front to maxlen."""
    words = {w: i + 3 for i, w in enumerate(_POS + _NEG)}  # 0 pad, 1 start, 2 out-of-vocabulary
    first_neutral = 3 + len(words)
    xs, ys = torch.zeros(n, maxlen, dtype=torch.long), torch.zeros(n)
    for k in range(n):
        label = rng.random() < 0.5
        length = rng.randint(8, 50)
        seq = [1] + [rng.randrange(first_neutral, vocab) for _ in range(length)]
        for _ in range(rng.randint(2, 5)):
            src = _POS if (label if rng.random() < 0.9 else not label) else _NEG
            seq[rng.randrange(1, len(seq))] = words[rng.choice(src)]
        seq = seq[-maxlen:]  # truncating="pre"
        xs[k, maxlen - len(seq):] = torch.tensor(seq)  # padding="pre"
        ys[k] = float(label)
    return xs, ys


class SentimentLSTM(nn.Module):
    def __init__(self, vocab: int, emb: int = 32, hidden: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(x))
        return torch.sigmoid(self.fc(self.dropout(out[:, -1]))).squeeze(1)


def keras_sentiment(seed: int, *, epochs: int = 4, lr: float = 1e-3, **kw: Any):
    """Embedding -> LSTM -> dropout 0.2 -> Dense(1, sigmoid), binary cross-entropy, Adam 1e-3, batch 32, maxlen 40;
    validation loss per epoch (Keras' validation_data)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vocab, maxlen = 400, 40
    x, y = reviews(2400, rng, vocab, maxlen)
    vx, vy = reviews(400, rng, vocab, maxlen)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = SentimentLSTM(vocab)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    crit = nn.BCELoss()
    with lstmwatch.watch(model, **kw) as watcher:
        for _epoch in range(epochs):
            model.train()
            batches = list(loader)
            for j, (xb, yb) in enumerate(batches):
                opt.zero_grad()
                loss = crit(model(xb), yb)
                loss.backward()
                opt.step()
                val = None
                if j == len(batches) - 1:
                    model.eval()
                    with torch.no_grad():
                        val = crit(model(vx), vy).item()
                    model.train()
                watcher.step(loss, val_loss=val)
    return watcher


# ------------------------------------------------------------- 7. stock-price forecasting from a course notebook


class StockLSTM(nn.Module):
    def __init__(self, hidden: int = 50, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, layers, batch_first=True, dropout=dropout)
        self.fc = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def stock_forecast(seed: int, *, scale: bool = True, epochs: int = 8, fault: str = "", **kw: Any):
    """Close prices, MinMax-scaled to [0, 1] with the training part's min and max, 60-day windows -> next day,
    2-layer LSTM(50) with dropout 0.2, Adam 1e-3, MSE, batch 32, shuffled.

    scale=False: the raw prices (the scaler forgotten). fault="zero_grad_between": optimizer.zero_grad() placed
    between backward() and step(). fault="detached": the loss rebuilt from numpy predictions as a new leaf tensor.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 3)
    prices = price_series(1000, g)
    split = 800
    train_p = prices[:split]
    if scale:
        lo, hi = train_p.min(), train_p.max()
        prices = (prices - lo) / (hi - lo)
    x, y = windows(prices[:split], 60)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = StockLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.MSELoss()
    with lstmwatch.watch(model, **kw) as watcher:
        for _epoch in range(epochs):
            for xb, yb in loader:
                if fault == "detached":
                    opt.zero_grad()
                    pred = model(xb).detach().numpy()
                    loss = torch.tensor(((pred - yb.numpy()) ** 2).mean(), requires_grad=True)
                    loss.backward()
                    opt.step()
                elif fault == "zero_grad_between":
                    out = model(xb)
                    loss = crit(out, yb)
                    loss.backward()
                    opt.zero_grad()
                    opt.step()
                else:
                    opt.zero_grad()
                    loss = crit(model(xb), yb)
                    loss.backward()
                    opt.step()
                watcher.step(loss)
    return watcher


def full_batch_detached(seed: int, *, steps: int = 200, **kw: Any):
    """The whole (scaled) training set as one batch every step, the loss computed in numpy from detached
    predictions and wrapped as a new tensor with requires_grad=True: backward reaches nothing."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 3)
    prices = price_series(400, g)
    prices = (prices - prices.min()) / (prices.max() - prices.min())
    x, y = windows(prices, 30)
    model = StockLSTM(hidden=32, layers=1, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with lstmwatch.watch(model, **kw) as watcher:
        for _ in range(steps):
            opt.zero_grad()
            model.eval()  # the numpy round trip is what evaluation code does; here it became the training loss
            pred = model(x).detach().numpy()
            loss = torch.tensor(((pred - y.numpy()) ** 2).mean(), requires_grad=True)
            loss.backward()
            opt.step()
            watcher.step(loss)
    return watcher


# ------------------------------------------------- 8. a stacked LSTM whose label is set at the first step


def event_at_start(seed: int, *, steps: int = 200, T: int = 200, layers: int = 4, cue_at_end: float = 0.0,
                   **kw: Any):
    """Sensor windows of 200 steps whose class is set by a pulse at the first step, then noise; a 4-layer LSTM
    read at the last step, Adam 1e-3, batch 32. cue_at_end: a faint hint of the class also at the last step,
    so the loss moves a little while what the first step holds is never learnt."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 5)
    model = nn.Module()
    model.lstm = nn.LSTM(3, 32, layers, batch_first=True)
    model.fc = nn.Linear(32, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    with lstmwatch.watch(model, **kw) as watcher:
        for _ in range(steps):
            x = 0.5 * torch.randn(32, T, 3, generator=g)
            y = torch.randint(0, 2, (32,), generator=g)
            x[:, 0, 0] = 2.0 * (2 * y.float() - 1)
            x[:, -1, 1] += cue_at_end * (2 * y.float() - 1)
            opt.zero_grad()
            out, _ = model.lstm(x)
            loss = crit(model.fc(out[:, -1]), y)
            loss.backward()
            opt.step()
            watcher.step(loss)
    return watcher


# ------------------------------------------- 9. the loss divided by the dataset size on top of the mean reduction


def double_averaged(seed: int, *, steps: int = 1000, **kw: Any):
    """A one-layer LSTM forecaster trained with SGD(lr 0.01) on a loss already averaged by MSELoss and divided
    again by the number of training windows (a running-loss normalisation moved into the loss): gradients
    ~1000x too small for the whole run."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 3)
    prices = price_series(1100, g)
    prices = (prices - prices.min()) / (prices.max() - prices.min())
    x, y = windows(prices, 20)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model = StockLSTM(hidden=16, layers=1, dropout=0.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.MSELoss()
    n = len(loader.dataset)
    done = 0
    with lstmwatch.watch(model, **kw) as watcher:
        while done < steps:
            for xb, yb in loader:
                opt.zero_grad()
                loss = crit(model(xb), yb) / n
                loss.backward()
                opt.step()
                watcher.step(loss)
                done += 1
                if done == steps:
                    break
    return watcher
