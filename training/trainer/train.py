"""Truncated-BPTT training of a :class:`RecurrentForecaster` on many streams.

``train(streams, options)`` fills gaps (NaN: forward fill within a stream, back fill
of a leading gap, an all-NaN column is a DataError naming it; see
:mod:`training.trainer.data`), holds out the last ``val_fraction`` of every stream for
validation, fits the normalisation on the rest, cuts each stream into a few long
consecutive lanes (each starts cold, its first ``burn_in`` steps unscored), batches
lanes side by side, and trains with the hidden state carried (detached) from one
window to the next, as streaming inference carries it. Learning rate: cosine from
``lr`` down to ``lr * LR_FINAL_FRACTION``; sgd uses momentum 0.9. What is validated,
kept and exported is an exponential average of the weights over about the last epoch's
optimiser steps (:class:`WeightAverage`), not the last step's: the step's weights wander
around the minimum by as much as the gradient noise pushes them, and on small data an epoch
is only a few dozen steps. Early stopping on the validation loss restores the best epoch's
averaged weights. A fixed ``seed`` repeats a CPU
run bit for bit. Training uses ``threads`` torch threads (1 by default: the default
model is too small to gain from more) and restores torch's setting afterwards.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from detector.artifact import CELLS, SKIPS, Normalisation
from detector.errors import ConfigError, DataError, RnnsentryError
from training.trainer.data import fill_missing, fit_normalisation, normalise, split_rows
from training.trainer.model import RecurrentForecaster, State, detach_state
from training.trainer.progress import EpochProgress

log = logging.getLogger(__name__)

OPTIMISERS = ("adam", "rmsprop", "sgd")
LR_FINAL_FRACTION = 0.1  # the cosine schedule ends at lr * this
MIN_LANE_WINDOWS = 4  # a lane (one row of a batch) spans at least this many windows
MIN_UPDATES_PER_EPOCH = 50  # small data: fewer lanes per batch, not fewer optimiser steps
LOG_2PI = math.log(2.0 * math.pi)


class TrainingError(RnnsentryError):
    """Training could not produce a usable model (the loss diverged)."""


@dataclass(frozen=True)
class TrainOptions:
    """Every training option; the defaults train 100k steps x 8 features in well under 2 min."""

    cell: str = "lstm"  # lstm | gru | rnn (tanh)
    skip: str = "level"  # what the prediction adds the network's change to: a smoothed
    # level of the inputs, or the last input ("input", as before the level)
    layers: int = 1
    hidden_size: int = 32
    dropout: float = 0.0  # between stacked layers only
    window: int = 64  # steps per truncated-BPTT window
    stride: int | None = None  # steps between window starts; None: equal to window
    burn_in: int = 8  # first steps of each lane/stream not scored (state still cold)
    batch_size: int = 32  # lanes (stream segments) side by side; fewer for small data
    epochs: int = 30
    patience: int = 5  # epochs without a better validation loss before stopping; 0: never
    lr: float = 3e-3
    optimiser: str = "adam"  # adam | rmsprop | sgd
    clip: float = 1.0  # gradient-norm clip; 0 disables
    val_fraction: float = 0.2  # last fraction of every stream held out (time-ordered)
    seed: int = 0
    # torch intra-op threads while training (0: torch's default, one per core). The
    # default model's matrices are small: one thread is as fast, and on a busy machine
    # competing threads spin and slow an epoch down many times over.
    threads: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.cell not in CELLS:
            problems.append(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.skip not in SKIPS:
            problems.append(f"skip must be one of {', '.join(SKIPS)}, not {self.skip!r}")
        if self.optimiser not in OPTIMISERS:
            problems.append(f"optimiser must be one of {', '.join(OPTIMISERS)}")
        for name in ("layers", "hidden_size", "window", "batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.stride is not None and self.stride < 1:
            problems.append("stride must be at least 1")
        if self.burn_in < 0 or self.patience < 0 or self.threads < 0:
            problems.append("burn_in, patience and threads must not be negative")
        if not 0.0 <= self.dropout < 1.0:
            problems.append("dropout must be in [0, 1)")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append("val_fraction must be in [0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.clip < 0:
            problems.append("lr must be positive and clip must not be negative")
        if problems:
            raise ConfigError("training options: " + "; ".join(problems))

    @property
    def step_stride(self) -> int:
        return self.stride if self.stride is not None else self.window


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean Gaussian NLL per feature and scored step
    val_loss: float  # NaN without a validation split
    lr: float
    grad_norm_max: float  # largest gradient norm before clipping
    seconds: float  # the whole epoch, validation included
    val_seconds: float = 0.0  # of which validation
    windows: int = 0  # truncated-BPTT windows (lane x window) trained on


@dataclass
class TrainResult:
    model: RecurrentForecaster  # eval mode, the best epoch's weights
    normalisation: Normalisation
    history: list[EpochStats]
    best_epoch: int  # 1-based
    best_loss: float  # validation loss of best_epoch (training loss without validation)
    options: TrainOptions
    train_streams: list[np.ndarray]  # raw units, gaps filled
    val_streams: list[np.ndarray]  # raw units, gaps filled; empty without validation
    seconds: float
    stopped_early: bool = False
    extra: dict[str, int] = field(default_factory=dict)  # batch_lanes, lane_steps, lanes

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def speed(history: Sequence[EpochStats]) -> dict[str, float | None]:
    """Mean seconds per epoch (and of validation), windows per epoch and per second.

    A window is one lane's ``window`` steps; each optimiser step trains a batch of them.
    Windows per second count training time only (validation excluded).
    """
    if not history:
        return {"epoch_s_mean": None, "val_s_mean": None, "windows_per_epoch": None,
                "windows_per_s": None}  # fmt: skip
    n = len(history)
    train_s = sum(h.seconds - h.val_seconds for h in history)
    windows = sum(h.windows for h in history)
    return {
        "epoch_s_mean": sum(h.seconds for h in history) / n,
        "val_s_mean": sum(h.val_seconds for h in history) / n,
        "windows_per_epoch": windows / n,
        "windows_per_s": windows / train_s if train_s > 0 else None,
    }


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (0: leave as is), then restore."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- batches: streams cut into lanes, lanes side by side, windows along time ---


def batch_shape(total_steps: int, options: TrainOptions) -> tuple[int, int]:
    """(lanes per batch, steps per lane) for ``total_steps`` training steps.

    Up to ``batch_size`` lanes side by side, fewer when the data is small, so that an
    epoch still makes about MIN_UPDATES_PER_EPOCH optimiser steps; each lane spans at
    least MIN_LANE_WINDOWS windows.
    >>> batch_shape(80_000, TrainOptions())
    (25, 3200)
    >>> batch_shape(7_680, TrainOptions())
    (2, 3840)
    """
    window = options.window
    lanes = max(1, min(options.batch_size, total_steps // (window * MIN_UPDATES_PER_EPOCH)))
    per_lane = math.ceil(total_steps / (lanes * window))
    return lanes, window * max(MIN_LANE_WINDOWS, per_lane)


def make_lanes(parts: Sequence[np.ndarray], length: int) -> list[np.ndarray]:
    """Cut each stream into consecutive lanes of ``length`` inputs (+1 row: the target).

    A short remainder joins the lane before it, so lanes hold length..1.5*length inputs.
    >>> [len(lane) for lane in make_lanes([np.zeros((25, 1))], 10)]
    [11, 15]
    """
    lanes = []
    for part in parts:
        n_inputs = len(part) - 1
        starts = list(range(0, max(n_inputs, 0), length))
        if len(starts) > 1 and n_inputs - starts[-1] < length // 2:
            starts.pop()
        for i, a in enumerate(starts):
            b = starts[i + 1] if i + 1 < len(starts) else n_inputs
            lanes.append(part[a : b + 1])
    return lanes


def pack(lanes: Sequence[np.ndarray], burn_in: int) -> tuple[torch.Tensor, ...]:
    """Pad lanes to one batch: inputs x, targets y (B, T, F) and the scored-step mask (B, T)."""
    steps = max(len(lane) - 1 for lane in lanes)
    n_features = lanes[0].shape[1]
    x = np.zeros((len(lanes), steps, n_features), np.float32)  # (B, T, F)
    y = np.zeros_like(x)  # (B, T, F)
    mask = np.zeros((len(lanes), steps), np.float32)  # (B, T)
    for i, lane in enumerate(lanes):
        n = len(lane) - 1
        x[i, :n] = lane[:-1]
        y[i, :n] = lane[1:]
        mask[i, burn_in:n] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(mask)


def gaussian_nll(mean: torch.Tensor, log_var: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-step NLL averaged over features: (B, T, F) -> (B, T)."""
    err2 = (y - mean) ** 2 * torch.exp(-log_var)  # (B, T, F)
    return 0.5 * (LOG_2PI + log_var + err2).mean(dim=-1)  # (B, T)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


@dataclass
class Window:
    """One truncated-BPTT window of a batch: its outputs and the states around it."""

    start: int
    stop: int
    mean: torch.Tensor  # (B, W, F)
    log_var: torch.Tensor  # (B, W, F)
    state_in: State  # the (detached) state the window started from
    state_out: State  # the (detached) state carried to the next window


def iter_windows(
    model: RecurrentForecaster,
    x: torch.Tensor,
    window: int,
    stride: int,
    state: State | None = None,
) -> Iterator[Window]:
    """Run ``x`` (B, T, F) window by window, carrying the detached state across windows.

    The carried state is the state after the first ``stride`` steps of a window, so
    overlapping windows (stride < window) and gaps (stride > window) stay in step.
    """
    steps = x.shape[1]
    state = model.zero_state(x.shape[0]) if state is None else state
    for start in range(0, steps, stride):
        stop = min(start + window, steps)
        split = min(start + stride, stop)
        mean, log_var, carry = model(x[:, start:split], state)  # (B, split-start, F)
        if split < stop:  # overlapping windows: finish this one from the carried state
            mean2, log_var2, _ = model(x[:, split:stop], carry)
            mean, log_var = torch.cat([mean, mean2], 1), torch.cat([log_var, log_var2], 1)
        elif start + stride > stop and stop < steps:  # a gap between windows: advance only
            with torch.no_grad():
                _, _, carry = model(x[:, stop : start + stride], carry)
        carry = detach_state(carry)
        yield Window(start, stop, mean, log_var, state, carry)
        state = carry


def clip_gradients(parameters: Sequence[nn.Parameter], clip: float) -> float:
    """Scale gradients to norm <= clip (clip > 0); return the norm before clipping."""
    with_grad = [p for p in parameters if p.grad is not None]
    if not with_grad:
        return 0.0
    if clip > 0:
        return float(nn.utils.clip_grad_norm_(with_grad, clip))
    norms = [p.grad.norm() for p in with_grad if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def make_optimiser(model: nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    params = model.parameters()
    if options.optimiser == "adam":
        return torch.optim.Adam(params, lr=options.lr)
    if options.optimiser == "rmsprop":
        return torch.optim.RMSprop(params, lr=options.lr)
    return torch.optim.SGD(params, lr=options.lr, momentum=0.9)


def optimise_step(
    model: nn.Module, optimiser: torch.optim.Optimizer, loss: torch.Tensor, clip: float
) -> float:
    """Backward, clip, step; returns the gradient norm before clipping."""
    optimiser.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)  # Tensor.backward is untyped in torch's stubs
    norm = clip_gradients(list(model.parameters()), clip)
    optimiser.step()
    return norm


@torch.no_grad()
def evaluate(model: RecurrentForecaster, parts: Sequence[np.ndarray], burn_in: int) -> float:
    """Mean NLL over the scored steps of whole streams run from a zero state (eval mode)."""
    lanes = [p for p in parts if len(p) > burn_in + 1]
    if not lanes:
        return math.nan
    was_training = model.training
    model.eval()
    x, y, mask = pack(lanes, burn_in)
    mean, log_var, _ = model(x)  # (B, T, F) each
    model.train(was_training)
    return float(masked_mean(gaussian_nll(mean, log_var, y), mask))


ProgressCallback = Callable[[float, float], None]  # (fraction of the epoch done, loss so far)


class WeightAverage:
    """An exponential average of a model's weights over its last ``horizon`` optimiser
    steps (Polyak averaging): a plain mean while fewer steps have been taken, so the
    untrained start is soon forgotten.

    >>> net = nn.Linear(1, 1, bias=False)
    >>> average = WeightAverage(net, horizon=2)
    >>> for w in (1.0, 3.0, 5.0):
    ...     _ = net.weight.data.fill_(w)
    ...     average.update(net)
    >>> average.model.weight.item()
    3.5
    """

    def __init__(self, model: nn.Module, horizon: int) -> None:
        self.model = copy.deepcopy(model)
        self.horizon = max(1, horizon)
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Take in the weights ``model`` has after an optimiser step."""
        self.steps += 1
        alpha = 1.0 / min(self.steps, self.horizon)
        for mine, theirs in zip(self.model.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs, alpha)


def run_epoch(
    model: RecurrentForecaster,
    optimiser: torch.optim.Optimizer,
    lanes: Sequence[np.ndarray],
    batch_lanes: int,
    options: TrainOptions,
    rng: np.random.Generator,
    on_progress: ProgressCallback | None = None,
    average: WeightAverage | None = None,
) -> tuple[float, float, int]:
    """One pass over every lane in shuffled batches; ``average`` takes in every step.

    Returns (mean training loss, max grad norm, windows trained on: lanes x windows).
    """
    model.train()
    order = rng.permutation(len(lanes))
    firsts = range(0, len(order), batch_lanes)
    total = weight = grad_max = 0.0
    windows = 0
    for done, first in enumerate(firsts):
        batch = [lanes[i] for i in order[first : first + batch_lanes]]
        x, y, mask = pack(batch, options.burn_in)  # (B, T, F), (B, T, F), (B, T)
        n_windows = len(range(0, x.shape[1], options.step_stride))
        for k, win in enumerate(iter_windows(model, x, options.window, options.step_stride)):
            m = mask[:, win.start : win.stop]  # (B, W)
            scored = float(m.sum())
            if scored > 0:
                nll = gaussian_nll(win.mean, win.log_var, y[:, win.start : win.stop])  # (B, W)
                loss = masked_mean(nll, m)
                if not torch.isfinite(loss):
                    raise TrainingError("the training loss is not finite; try a lower --lr")
                grad_max = max(grad_max, optimise_step(model, optimiser, loss, options.clip))
                if average is not None:
                    average.update(model)
                total += float(loss.detach()) * scored
                weight += scored
                windows += int((m.sum(dim=1) > 0).sum())
            if on_progress is not None:
                fraction = (done + (k + 1) / n_windows) / len(firsts)
                on_progress(fraction, total / weight if weight else math.nan)
    return total / max(weight, 1.0), grad_max, windows


def prepare(
    streams: Sequence[np.ndarray],
    options: TrainOptions,
    features: Sequence[str] | None,
    stream_names: Sequence[str] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fill gaps and split each stream into (training part, validation part), raw units."""
    if not streams:
        raise DataError("no training data: the list of streams is empty")
    n_features = None
    train_parts, val_parts = [], []
    need = options.window + 1
    for i, stream in enumerate(streams):
        where = stream_names[i] if stream_names is not None else f"stream {i}"
        values = np.asarray(stream, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] < 1:
            raise DataError(f"{where}: expected a [rows, features] array, got {values.shape}")
        if n_features is not None and values.shape[1] != n_features:
            raise DataError(f"{where} has {values.shape[1]} features, the first has {n_features}")
        n_features = values.shape[1]
        n_train = split_rows(len(values), options.val_fraction)
        if n_train < need:
            least = next(n for n in itertools.count(need) if split_rows(n, options.val_fraction)
                         >= need)  # fmt: skip
            raise DataError(
                f"{where} has {len(values)} rows to train on: too few for one training window"
                f" of {options.window} steps after holding out {options.val_fraction:.0%} for"
                f" validation; it needs at least {least} rows, or a shorter --window"
            )
        values = fill_missing(values, features, where=where)
        train_parts.append(values[:n_train])
        if n_train < len(values):
            val_parts.append(values[n_train:])
    if features is not None and len(features) != n_features:
        raise DataError(f"{len(features)} feature names for {n_features} columns")
    return train_parts, val_parts


def train(
    streams: Sequence[np.ndarray],
    options: TrainOptions | None = None,
    *,
    features: Sequence[str] | None = None,
    stream_names: Sequence[str] | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Fit a forecaster on ``streams`` (each [T, F] raw units); see the module docstring."""
    options = options or TrainOptions()
    began = time.perf_counter()
    train_raw, val_raw = prepare(streams, options, features, stream_names)
    norm = fit_normalisation(train_raw)
    train_z = [normalise(p, norm).astype(np.float32) for p in train_raw]
    val_z = [normalise(p, norm).astype(np.float32) for p in val_raw]
    batch, length = batch_shape(sum(len(p) - 1 for p in train_z), options)
    lanes = make_lanes(train_z, length)
    rng = np.random.default_rng(options.seed)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]), torch_threads(options.threads):
        torch.manual_seed(options.seed)
        torch.use_deterministic_algorithms(True)
        try:
            model = RecurrentForecaster(
                train_raw[0].shape[1],
                options.cell,
                options.layers,
                options.hidden_size,
                options.dropout,
                options.skip,
            )
            progress = None if quiet else EpochProgress(options.epochs)
            history, best_epoch, best_loss, stopped = _fit(
                model, lanes, batch, val_z, options, rng, progress
            )
        finally:
            torch.use_deterministic_algorithms(deterministic)
    model.eval()
    return TrainResult(
        model,
        norm,
        history,
        best_epoch,
        best_loss,
        options,
        train_raw,
        val_raw,
        time.perf_counter() - began,
        stopped,
        extra={"batch_lanes": batch, "lane_steps": length, "lanes": len(lanes)},
    )


def _fit(
    model: RecurrentForecaster,
    lanes: list[np.ndarray],
    batch: int,
    val_z: list[np.ndarray],
    options: TrainOptions,
    rng: np.random.Generator,
    progress: EpochProgress | None,
) -> tuple[list[EpochStats], int, float, bool]:
    """The epoch loop: train, validate, schedule, keep the best weights, stop early."""
    optimiser = make_optimiser(model, options)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=options.epochs, eta_min=options.lr * LR_FINAL_FRACTION
    )
    history: list[EpochStats] = []
    best_loss, best_epoch, best_weights, waited = math.inf, 0, None, 0
    length = max(len(lane) - 1 for lane in lanes)
    per_epoch = math.ceil(len(lanes) / batch) * math.ceil(length / options.step_stride)
    average = WeightAverage(model, per_epoch)  # what is validated, kept and exported
    for epoch in range(1, options.epochs + 1):
        began = time.perf_counter()
        lr = optimiser.param_groups[0]["lr"]
        on_progress = None if progress is None else partial(progress.update, epoch)
        train_loss, grad_max, windows = run_epoch(
            model, optimiser, lanes, batch, options, rng, on_progress, average
        )
        val_began = time.perf_counter()
        val_loss = evaluate(average.model, val_z, options.burn_in) if val_z else math.nan
        ended = time.perf_counter()
        schedule.step()
        stats = EpochStats(
            epoch, train_loss, val_loss, lr, grad_max, ended - began, ended - val_began, windows
        )
        history.append(stats)
        watched = train_loss if math.isnan(val_loss) else val_loss
        improved = watched < best_loss
        if improved:
            best_loss, best_epoch, waited = watched, epoch, 0
            best_weights = copy.deepcopy(average.model.state_dict())
        else:
            waited += 1
        if progress is not None:
            progress.finish(
                epoch,
                train_loss,
                val_loss,
                lr=lr,
                grad_norm=grad_max,
                seconds=stats.seconds,
                best=improved,
            )
        if options.patience and waited >= options.patience:
            log.debug("early stop after epoch %d; best epoch %d", epoch, best_epoch)
            break
    if best_weights is None:
        raise TrainingError("no epoch produced a finite loss")
    model.load_state_dict(best_weights)
    return history, best_epoch, best_loss, len(history) < options.epochs
