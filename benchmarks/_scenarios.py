"""The training scenarios of ``benchmarks/detection.py`` (issue 11): small models, synthetic data, CPU-sized.

Each scenario builds, for one seed, a model, its optimizer, a batch for every step, the loss, a fixed
evaluation set and (optionally) a learning-rate schedule. ``twin=True`` builds the *healthy twin* of a
diverging scenario: the same model, data and seed with the one thing that makes it diverge removed (a safe
learning rate, no poisoned batch, no learning-rate ramp). Everything is drawn from generators seeded by the
seed, so every configuration of one seed sees the same initial weights and the same batches.

Diverging scenarios (the unclipped, untracked run really blows up):

* ``rnn``: a vanilla tanh RNN whose recurrent matrix has spectral radius 2, SGD at 0.2, 20 time steps;
* ``deep-mlp``: a 16-layer plain ReLU MLP (no residuals, He init), SGD with momentum at a learning rate of 1.0;
* ``transformer``: a 1-layer, width-32 pre-LN transformer, Adam at a learning rate of 1.0, no warm-up;
* ``poison``: a healthy MLP run with one batch whose inputs are scaled by 1e6 (step 150);
* ``lr-ramp``: an MLP whose learning rate grows exponentially (x1.04 per step);
* ``lsq-edge``: full-batch least squares with a learning rate 1% above the stability limit 2/lambda_max:
  the error along the top eigenvector grows by 1.02x a step, smoothly, without a single spike.

Held-out diverging scenarios (``held_out=True``; issue 19): the same two kinds of failure, a run too hot from
its first step and a smooth geometric blow-up, on other models, optimizers and margins, and a poisoned batch of
another size at another step, so that a policy tuned on the six above is checked on runs it was not tuned on:

* ``rnn-r1.5``, ``rnn-r3``: torch's tanh ``RNN`` (another task), recurrent spectral radius 1.5 (SGD at 0.3) and 3
  (SGD at 0.1): too hot from the first step;
* ``gru-hot``, ``lstm-hot``: a GRU at SGD 0.7, an LSTM at SGD 1.0: too hot from the first step, the gates keep the
  norms modest until the read-out blows up;
* ``gru-ramp``: a GRU whose learning rate grows x1.05 a step from 0.01 to a plateau of 0.8 (the twin stops at 0.1);
* ``transformer-sgd``: a 2-layer transformer with plain SGD at 2.0 (``transformer``'s Adam run is beyond clipping);
* ``lsq-1.05``: least squares 5% past the stability limit, a faster geometric blow-up than ``lsq-edge``'s;
* ``lsq-momentum``: least squares with heavy-ball momentum 0.9, 2% past its limit ``2 (1 + 0.9) / lambda_max``;
* ``lsq-ramp``: least squares whose learning rate grows x1.01 a step from half the limit to 1.1 x the limit: the
  blow-up starts mid-run, after a healthy phase;
* ``poison-1e3``: a 4-layer, width-32 MLP with one batch scaled by 1e3 at step 60.

Held-out *too hot to learn* scenarios (``group="hot"``; issue 25), added before the overshoot indicator was
written or tuned and kept out of its tuning: each trains from its first step at a learning rate well above its
stability edge, on an architecture and optimizer the scenarios above do not pair, with a healthy twin at a safe
learning rate. Unclipped they blow up; under a clip most stay finite and stop learning, the runs a rollback on
divergence alone never rescues:

* ``lstm-adam``: an LSTM with Adam at 1.0 (twin 3e-3);
* ``gru-momentum``: a GRU with SGD and momentum 0.9 at 0.5 (twin 0.02);
* ``conv-hot``: a two-layer 1-D convolutional net over the sequences, SGD with momentum 0.9 at 2.0 (twin 0.01);
* ``mlp-rmsprop``: a 4-layer MLP classifier with RMSprop at 0.1 (twin 1e-3);
* ``rnn-adamw``: torch's tanh RNN with AdamW at 0.4 (twin 2e-3);
* ``transformer-momentum``: a 1-layer transformer with SGD and momentum 0.9 at 1.0 (twin 0.05).

The learning rates were raised (before any indicator existed) until the unclipped run of seeds 0-3 blew up by
the benchmarks' rule; with Adam, AdamW and RMSprop that happens at the first or second update, whose size the
optimizer fixes at about the learning rate whatever the gradient: no gradient signal can come before it there.

Stable but noisy scenarios (must never be called diverged):

* ``tiny-noisy``: batches of 4 with 30% of the labels replaced by random ones;
* ``heavy-tail``: Student-t inputs with 1.5 degrees of freedom (infinite variance), Adam;
* ``lr-switch``: the learning rate is multiplied by 3 and the batch size divided by 4 at step 150;
* ``data-switch``: at step 150 the inputs move to another distribution (shifted, 3x wider, new labels).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SCENARIOS", "Scenario", "Setup"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Setup:
    """One run's ingredients; ``batch(step)`` must be called once per step, in order."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[int], Batch]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eval_set: Batch  # held out, from the distribution of the last steps: the final loss
    lr_at: Callable[[int], float] | None = None
    initial_set: Batch | None = None  # held out, from the first steps' distribution (None: eval_set): L0


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    diverging: bool
    steps: int
    make: Callable[[int, bool], Setup]  # (seed, twin) -> Setup
    twin: str = ""  # what the healthy twin changes ("" for stable scenarios: no twin)
    held_out: bool = False  # not used to design clip="auto": the check that it generalises
    group: str = ""  # "hot": issue 25's held-out too-hot-to-learn runs, reported apart (held_out is True too)


# -- models -------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``depth`` linear layers of ``width`` with ReLU in between, no residuals, He (Kaiming-normal) init."""

    def __init__(self, inputs: int, width: int, depth: int, outputs: int) -> None:
        super().__init__()
        sizes = [inputs] + [width] * (depth - 1) + [outputs]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        for layer in self.layers:  # the signal keeps its scale through every layer: the deep net trains at all
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class TanhRNN(nn.Module):
    """``h_t = tanh(W_h h_{t-1} + W_x x_t)``, W_h rescaled to spectral radius ``radius``; linear read-out."""

    def __init__(self, inputs: int, hidden: int, radius: float, generator: torch.Generator) -> None:
        super().__init__()
        self.W_x = nn.Linear(inputs, hidden)
        self.W_h = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, 1)
        with torch.no_grad():
            weight = torch.randn(hidden, hidden, generator=generator)
            self.W_h.weight.copy_(weight * radius / torch.linalg.eigvals(weight).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[0], self.W_h.in_features)
        inputs = self.W_x(x)  # all time steps at once: only the recurrence stays in the loop
        for t in range(x.shape[1]):
            h = torch.tanh(self.W_h(h) + inputs[:, t])
        return self.readout(h).squeeze(-1)


class Block(nn.Module):
    """A pre-LN transformer block: causal multi-head self-attention, then a 2x MLP, each residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return h + self.mlp(self.norm2(h))


class TinyTransformer(nn.Module):
    """A causal next-token model: embeddings, ``layers`` pre-LN blocks of width ``width``, a linear head.

    No final LayerNorm (as in some small models), so nothing bounds the residual stream the head reads.
    """

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens) + self.position[: tokens.shape[1]]))


class Recurrent(nn.Module):
    """torch's own ``RNN`` (tanh), ``GRU`` or ``LSTM`` and a linear read-out of the last hidden state.

    ``radius``: the recurrent matrix rescaled to that spectral radius (RNN only; None: torch's init).
    """

    def __init__(self, cell: str, inputs: int, hidden: int, radius: float | None = None) -> None:
        super().__init__()
        self.cell = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](inputs, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, 1)
        if radius is not None:
            with torch.no_grad():
                weight = self.cell.weight_hh_l0
                weight.mul_(radius / torch.linalg.eigvals(weight).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.cell(x)[0][:, -1]).squeeze(-1)


# -- data -----------------------------------------------------------------------------------------------


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + salt)


class Teacher:
    """Labels from a fixed random two-layer network: a learnable classification task."""

    def __init__(self, inputs: int, classes: int, generator: torch.Generator) -> None:
        self.w1 = torch.randn(inputs, 64, generator=generator) / math.sqrt(inputs)
        self.w2 = torch.randn(64, classes, generator=generator) / 8.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ self.w1) @ self.w2).argmax(-1)


def _noisy(labels: torch.Tensor, rate: float, classes: int, generator: torch.Generator) -> torch.Tensor:
    if rate <= 0:
        return labels
    flip = torch.rand(labels.shape, generator=generator) < rate
    return torch.where(flip, torch.randint(0, classes, labels.shape, generator=generator), labels)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.reshape(target.shape), target)


INPUTS, CLASSES = 16, 8


def _classification(
    seed: int,
    *,
    depth: int,
    width: int,
    lr: float | Callable[[int], float],
    batch: int | Callable[[int], int] = 32,
    optimizer: str = "sgd",
    label_noise: float = 0.0,
    inputs: Callable[[int, int, torch.Generator], torch.Tensor] | None = None,
    teacher_at: Callable[[int], int] | None = None,
    poison_step: int | None = None,
    poison_scale: float = 1e6,
) -> Setup:
    """An MLP classifier on teacher labels; every knob a scenario turns is an argument."""
    data = _generator(seed, 11)
    teachers = [Teacher(INPUTS, CLASSES, data), Teacher(INPUTS, CLASSES, data)]
    draw = inputs or (lambda step, n, g: torch.randn(n, INPUTS, generator=g))
    teacher_at = teacher_at or (lambda step: 0)
    batch_at = batch if callable(batch) else (lambda step: batch)
    torch.manual_seed(seed)
    model = MLP(INPUTS, width, depth, CLASSES)
    first_lr = lr(0) if callable(lr) else lr
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=first_lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=first_lr, momentum=0.9)

    def make_batch(step: int) -> Batch:
        x = draw(step, batch_at(step), data)
        y = _noisy(teachers[teacher_at(step)](x), label_noise, CLASSES, data)
        if step == poison_step:
            x = x * poison_scale
        return x, y

    def held_out(step: int) -> Batch:
        generator = _generator(seed, 97)
        x = draw(step, 512, generator)
        return x, _noisy(teachers[teacher_at(step)](x), label_noise, CLASSES, generator)

    schedule = lr if callable(lr) else None
    return Setup(model, opt, make_batch, _cross_entropy, held_out(10**9), schedule, held_out(0))


# -- diverging scenarios ------------------------------------------------------------------------------------


RNN_HIDDEN, RNN_STEPS, RNN_INPUTS = 32, 20, 4


def _rnn(seed: int, twin: bool) -> Setup:
    weights = _generator(seed, 1)
    torch.manual_seed(seed)
    model = TanhRNN(RNN_INPUTS, RNN_HIDDEN, radius=2.0, generator=weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.03 if twin else 0.2)
    data = _generator(seed, 2)

    def make_batch(step: int, generator: torch.Generator = data, n: int = 16) -> Batch:
        x = torch.randn(n, RNN_STEPS, RNN_INPUTS, generator=generator)
        return x, x[:, -1, 0] + 0.5 * x[:, -2, 1]

    return Setup(model, opt, make_batch, _mse, make_batch(0, _generator(seed, 3), 256))


def _deep_mlp(seed: int, twin: bool) -> Setup:
    return _classification(seed, depth=16, width=32, lr=0.02 if twin else 1.0)


VOCAB, CONTEXT = 16, 16


def _markov(seed: int) -> tuple[Callable[[int], Batch], Batch]:
    """Sequences of a sparse random Markov chain (each token has two likely successors): learnable."""
    data = _generator(seed, 4)
    logits = torch.full((VOCAB, VOCAB), -4.0)
    successors = torch.randint(0, VOCAB, (VOCAB, 2), generator=data)
    logits.scatter_(1, successors, 2.0)
    transition = logits.softmax(-1)

    def sequences(n: int, generator: torch.Generator) -> Batch:
        tokens = [torch.randint(0, VOCAB, (n,), generator=generator)]
        for _ in range(CONTEXT):
            tokens.append(torch.multinomial(transition[tokens[-1]], 1, generator=generator).squeeze(-1))
        seq = torch.stack(tokens, 1)
        return seq[:, :-1], seq[:, 1:]

    return (lambda step: sequences(16, data)), sequences(256, _generator(seed, 5))


def _transformer(seed: int, twin: bool) -> Setup:
    batch, eval_set = _markov(seed)
    torch.manual_seed(seed)
    model = TinyTransformer(VOCAB, width=32, layers=1, heads=4, context=CONTEXT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3 if twin else 1.0)
    return Setup(model, opt, batch, _cross_entropy, eval_set)


def _poison(seed: int, twin: bool) -> Setup:
    return _classification(seed, depth=3, width=64, lr=0.02, poison_step=None if twin else 150)


def _lr_ramp(seed: int, twin: bool) -> Setup:
    base = 0.005
    return _classification(
        seed, depth=4, width=64, lr=(lambda step: base) if twin else (lambda step: base * 1.04**step)
    )


LSQ_FEATURES, LSQ_SAMPLES = 16, 128


def _least_squares(
    seed: int, lr_factor: float, momentum: float = 0.0, ramp: Callable[[int], float] | None = None
) -> Setup:
    """Full-batch least squares at ``lr_factor`` times the stability limit of (heavy-ball) gradient descent.

    The limit is ``2 (1 + momentum) / lambda_max``: past it, the error along the top eigenvector grows
    geometrically, smoothly, flipping sign each step.
    """
    data = _generator(seed, 6)
    scales = torch.logspace(0, 0.7, LSQ_FEATURES)  # feature scales 1 to 5: a spread spectrum

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, LSQ_FEATURES, generator=generator) * scales

    w_true = torch.randn(LSQ_FEATURES, generator=data)
    x = draw(LSQ_SAMPLES, data)
    y = x @ w_true + 0.1 * torch.randn(LSQ_SAMPLES, generator=data)
    lambda_max = torch.linalg.eigvalsh(2.0 * x.T @ x / LSQ_SAMPLES).max().item()  # Hessian of the mean squared error
    torch.manual_seed(seed)
    model = nn.Linear(LSQ_FEATURES, 1, bias=False)
    lr = lr_factor * 2.0 * (1.0 + momentum) / lambda_max  # in this order: lsq-edge's lr to the bit
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    held_out = _generator(seed, 7)
    x_eval = draw(512, held_out)
    y_eval = x_eval @ w_true + 0.1 * torch.randn(512, generator=held_out)
    lr_at = None if ramp is None else (lambda step: lr * ramp(step))
    return Setup(model, opt, lambda step: (x, y), _mse, (x_eval, y_eval), lr_at)


def _lsq_edge(seed: int, twin: bool) -> Setup:
    return _least_squares(seed, 0.5 if twin else 1.01)


# -- held-out diverging scenarios -----------------------------------------------------------------------------
# The same failures on other models, optimizers, margins and steps, each with its healthy twin: the check that
# clip="auto" generalises beyond the six scenarios above.


def _sequences(seed: int) -> tuple[Callable[[int], Batch], Batch]:
    """A recurrent regression task: half the sum of the first input over the last three steps, minus a lag."""

    def make_batch(generator: torch.Generator, n: int) -> Batch:
        x = torch.randn(n, RNN_STEPS, RNN_INPUTS, generator=generator)
        return x, x[:, -3:, 0].sum(1) / 2 - 0.5 * x[:, -4, 2]

    data = _generator(seed, 21)
    return (lambda step: make_batch(data, 16)), make_batch(_generator(seed, 22), 256)


def _recurrent(cell: str, lr: float, twin_lr: float, radius: float | None = None, peak: float | None = None,
               twin_peak: float | None = None) -> Callable[[int, bool], Setup]:  # fmt: skip
    """torch's RNN, GRU or LSTM with plain SGD; with ``peak``, the lr grows x1.05 a step from ``lr`` to it."""

    def make(seed: int, twin: bool) -> Setup:
        torch.manual_seed(seed)
        model = Recurrent(cell, RNN_INPUTS, RNN_HIDDEN, radius)
        batch, eval_set = _sequences(seed)
        first, top = (twin_lr, twin_peak) if twin else (lr, peak)
        lr_at = None if top is None else (lambda step: min(top, first * 1.05**step))
        return Setup(model, torch.optim.SGD(model.parameters(), lr=first), batch, _mse, eval_set, lr_at)

    return make


def _transformer_sgd(seed: int, twin: bool) -> Setup:
    """A 2-layer transformer on ``transformer``'s task, plain SGD."""
    batch, eval_set = _markov(seed)
    torch.manual_seed(seed)
    model = TinyTransformer(VOCAB, width=32, layers=2, heads=4, context=CONTEXT)
    return Setup(model, torch.optim.SGD(model.parameters(), lr=0.3 if twin else 2.0), batch, _cross_entropy, eval_set)


def _lsq(lr_factor: float, momentum: float = 0.0, ramp: bool = False) -> Callable[[int, bool], Setup]:
    """Least squares at ``lr_factor`` x the limit (twin: half the limit); ``ramp``: from half the limit x1.01 a
    step up to ``lr_factor`` x it, so that the blow-up starts mid-run, after a healthy phase."""

    def make(seed: int, twin: bool) -> Setup:
        if twin:
            return _least_squares(seed, 0.5, momentum)
        if not ramp:
            return _least_squares(seed, lr_factor, momentum)
        return _least_squares(seed, 0.5, momentum, ramp=lambda step: min(2 * lr_factor, 1.01**step))

    return make


def _poison_early(seed: int, twin: bool) -> Setup:
    return _classification(seed, depth=4, width=32, lr=0.05, poison_step=None if twin else 60, poison_scale=1e3)


def _held_out(key: str, title: str, make: Callable[[int, bool], Setup], twin: str, steps: int = 200) -> Scenario:
    return Scenario(key, title, True, steps, make, twin, held_out=True)


# -- held-out too-hot-to-learn scenarios (issue 25) -------------------------------------------------------------
# Written before the overshoot indicator was tuned; never used to tune it.


def _make_optimizer(kind: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = model.parameters()
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


def _hot_recurrent(cell: str, optimizer: str, lr: float, twin_lr: float) -> Callable[[int, bool], Setup]:
    def make(seed: int, twin: bool) -> Setup:
        torch.manual_seed(seed)
        model = Recurrent(cell, RNN_INPUTS, RNN_HIDDEN)
        batch, eval_set = _sequences(seed)
        return Setup(model, _make_optimizer(optimizer, model, twin_lr if twin else lr), batch, _mse, eval_set)

    return make


class Conv(nn.Module):
    """Two 1-D convolutions (kernel 3, ReLU) over the time steps, mean-pooled, then a linear read-out."""

    def __init__(self, inputs: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(inputs, width, 3, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.readout = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x.transpose(1, 2)))))
        return self.readout(h.mean(-1)).squeeze(-1)


def _conv_hot(seed: int, twin: bool) -> Setup:
    torch.manual_seed(seed)
    model = Conv(RNN_INPUTS, RNN_HIDDEN)
    batch, eval_set = _sequences(seed)
    return Setup(model, _make_optimizer("momentum", model, 0.01 if twin else 2.0), batch, _mse, eval_set)


def _mlp_rmsprop(seed: int, twin: bool) -> Setup:
    setup = _classification(seed, depth=4, width=64, lr=1e-3)
    setup.optimizer = _make_optimizer("rmsprop", setup.model, 1e-3 if twin else 0.1)
    return setup


def _transformer_momentum(seed: int, twin: bool) -> Setup:
    batch, eval_set = _markov(seed)
    torch.manual_seed(seed)
    model = TinyTransformer(VOCAB, width=32, layers=1, heads=4, context=CONTEXT)
    return Setup(model, _make_optimizer("momentum", model, 0.05 if twin else 1.0), batch, _cross_entropy, eval_set)


def _hot(key: str, title: str, make: Callable[[int, bool], Setup], twin: str) -> Scenario:
    return Scenario(key, title, True, 200, make, twin, held_out=True, group="hot")


# -- stable scenarios -----------------------------------------------------------------------------------------


def _tiny_noisy(seed: int, twin: bool) -> Setup:
    return _classification(seed, depth=3, width=64, lr=0.02, batch=4, label_noise=0.3)


def _heavy_tail(seed: int, twin: bool) -> Setup:
    student = torch.distributions.StudentT(torch.tensor(1.5))

    def draw(step: int, n: int, generator: torch.Generator) -> torch.Tensor:
        # StudentT.sample takes no generator: build it from a normal and a chi-square drawn from ours.
        normal = torch.randn(n, INPUTS, generator=generator)
        gamma = torch._standard_gamma(torch.full((n, INPUTS), student.df.item() / 2), generator=generator)
        return normal / torch.sqrt(gamma * 2 / student.df)

    return _classification(seed, depth=3, width=64, lr=1e-3, optimizer="adam", inputs=draw)


def _lr_switch(seed: int, twin: bool) -> Setup:
    return _classification(
        seed,
        depth=3,
        width=64,
        lr=lambda step: 0.01 if step < 150 else 0.03,
        batch=lambda step: 32 if step < 150 else 8,
    )


def _data_switch(seed: int, twin: bool) -> Setup:
    def draw(step: int, n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(n, INPUTS, generator=generator)
        return x if step < 150 else 3.0 * x + 1.0

    return _classification(seed, depth=3, width=64, lr=0.01, inputs=draw, teacher_at=lambda step: int(step >= 150))


SCENARIOS: dict[str, Scenario] = {
    s.key: s
    for s in (
        Scenario("rnn", "vanilla tanh RNN, spectral radius 2, SGD", True, 200, _rnn, "lr 0.2 -> 0.03"),
        Scenario("deep-mlp", "16-layer plain ReLU MLP, SGD lr 1.0", True, 200, _deep_mlp, "lr 1.0 -> 0.02"),
        Scenario("transformer", "1-layer transformer, Adam lr 1.0", True, 200, _transformer, "lr 1.0 -> 1e-3"),
        Scenario("poison", "one batch x1e6 at step 150 (MLP, SGD)", True, 250, _poison, "no poisoned batch"),
        Scenario("lr-ramp", "learning rate x1.04 per step (MLP, SGD)", True, 250, _lr_ramp, "constant lr"),
        Scenario("lsq-edge", "least squares, lr = 1.01 x 2/lambda_max", True, 250, _lsq_edge, "lr = 1/lambda_max"),
        # held out (issue 19): the same failures elsewhere
        _held_out("rnn-r1.5", "torch RNN (tanh), radius 1.5, SGD lr 0.3", _recurrent("rnn", 0.3, 0.05, 1.5), "lr 0.05"),
        _held_out("rnn-r3", "torch RNN (tanh), radius 3, SGD lr 0.1", _recurrent("rnn", 0.1, 0.01, 3.0), "lr 0.01"),
        _held_out("gru-hot", "GRU, SGD lr 0.7", _recurrent("gru", 0.7, 0.1), "lr 0.1"),
        _held_out("lstm-hot", "LSTM, SGD lr 1.0", _recurrent("lstm", 1.0, 0.1), "lr 0.1"),
        _held_out(
            "gru-ramp",
            "GRU, lr x1.05 a step up to 0.8",
            _recurrent("gru", 0.01, 0.01, peak=0.8, twin_peak=0.1),
            "peak 0.1",
        ),
        _held_out("transformer-sgd", "2-layer transformer, SGD lr 2", _transformer_sgd, "lr 0.3"),
        _held_out("lsq-1.05", "least squares, lr = 1.05 x 2/lambda_max", _lsq(1.05), "lr = limit / 2", steps=250),
        _held_out(
            "lsq-momentum",
            "least squares, momentum 0.9, lr 1.02 x limit",
            _lsq(1.02, momentum=0.9),
            "lr = limit / 2",
            steps=250,
        ),
        _held_out(
            "lsq-ramp",
            "least squares, lr x1.01 a step to 1.1 x limit",
            _lsq(1.1, ramp=True),
            "lr = limit / 2",
            steps=250,
        ),
        _held_out("poison-1e3", "one batch x1e3 at step 60 (4-layer MLP)", _poison_early, "no poison", steps=250),
        # held out (issue 25): too hot to learn, written before the overshoot indicator was tuned
        _hot("lstm-adam", "LSTM, Adam lr 1.0", _hot_recurrent("lstm", "adam", 1.0, 3e-3), "lr 3e-3"),
        _hot("gru-momentum", "GRU, SGD momentum 0.9 lr 0.5", _hot_recurrent("gru", "momentum", 0.5, 0.02), "lr 0.02"),
        _hot("conv-hot", "1-D conv net, SGD momentum 0.9 lr 2.0", _conv_hot, "lr 0.01"),
        _hot("mlp-rmsprop", "4-layer MLP, RMSprop lr 0.1", _mlp_rmsprop, "lr 1e-3"),
        _hot("rnn-adamw", "torch RNN (tanh), AdamW lr 0.4", _hot_recurrent("rnn", "adamw", 0.4, 2e-3), "lr 2e-3"),
        _hot("transformer-momentum", "1-layer transformer, SGD momentum 0.9 lr 1", _transformer_momentum, "lr 0.05"),
        Scenario("tiny-noisy", "batch 4, 30% label noise (MLP, SGD)", False, 300, _tiny_noisy),
        Scenario("heavy-tail", "Student-t(1.5) inputs (MLP, Adam)", False, 300, _heavy_tail),
        Scenario("lr-switch", "lr x3 and batch /4 at step 150", False, 300, _lr_switch),
        Scenario("data-switch", "input shift, 3x scale, new labels at 150", False, 300, _data_switch),
    )
}
