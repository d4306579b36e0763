"""The recurrent forecaster: normalised x_t in, a Gaussian over x_{t+1} out.

Read top-down: the log-variance clamp, the smoothed level, the Gaussian head (with a linear
skip from the level, or from x_t), the recurrent stack (torch's fused GRU/LSTM/RNN, batch
first), then the model. States are tuples in ``ModelMeta.state_names`` order: the cell's,
each [L, B, H], then the level [1, B, F];
:mod:`training.trainer.export` writes the same equations as one ONNX step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from detector.artifact import CELLS, SKIPS, state_names, state_shape

log = logging.getLogger(__name__)

State = tuple[torch.Tensor, ...]  # (h,) or (h, c), each (L, B, H)

# log_var is squashed smoothly into [LOG_VAR_MIN, LOG_VAR_MAX]: sigma between ~0.007 and
# ~20 scales, so a constant column cannot drive the likelihood to infinity.
LOG_VAR_MIN = -10.0
LOG_VAR_MAX = 6.0
LOG_VAR_MID = 0.5 * (LOG_VAR_MAX + LOG_VAR_MIN)
LOG_VAR_HALF_RANGE = 0.5 * (LOG_VAR_MAX - LOG_VAR_MIN)


def soft_clamp_log_var(raw: torch.Tensor) -> torch.Tensor:
    """mid + half * tanh((raw - mid) / half): smooth, monotone, inside the range.

    The export writes the same operations in the same order (Sub, Div, Tanh, Mul, Add).

    >>> soft_clamp_log_var(torch.tensor([-1e6, 1e6])).tolist()
    [-10.0, 6.0]
    """
    return LOG_VAR_MID + LOG_VAR_HALF_RANGE * torch.tanh((raw - LOG_VAR_MID) / LOG_VAR_HALF_RANGE)


# The level's gain starts here (sigmoid of the logit, 0.95): close to persistence, where a
# model without the level starts.
LEVEL_LOGIT_INIT = 3.0
# The gain stays below 1 by this much, so (1 - gain)^k has a finite logarithm.
LEVEL_GAIN_MARGIN = 1e-6
LEVEL_CHUNK = 64  # steps smoothed at once: a [F, C, C] weight each


def level_gain(logit: torch.Tensor) -> torch.Tensor:
    """The level's gain per feature, in (0, 1 - LEVEL_GAIN_MARGIN]."""
    return torch.sigmoid(logit).clamp_max(1.0 - LEVEL_GAIN_MARGIN)


def smooth(x: torch.Tensor, level: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Each feature's exponentially smoothed level after each step, l_t = l_(t-1) +
    gain (x_t - l_(t-1)), for x (B, T, F) from the levels ``level`` (B, F) before it:
    (B, T, F). Written in closed form a chunk of steps at a time, l_t = (1 - g)^(t+1) l_(-1)
    + sum_j g (1 - g)^(t-j) x_j, so training backpropagates through a few products, not a
    loop over steps.

    >>> smooth(torch.tensor([[[2.0], [2.0]]]), torch.zeros(1, 1), torch.tensor([0.5]))
    tensor([[[1.0000],
             [1.5000]]])
    """
    decay = torch.log1p(-gain)  # (F,) log(1 - g)
    out = []
    for start in range(0, x.shape[1], LEVEL_CHUNK):
        part = x[:, start : start + LEVEL_CHUNK]  # (B, C, F)
        t = torch.arange(part.shape[1], dtype=x.dtype, device=x.device)
        gap = t[:, None] - t[None, :]  # (C, C): steps from j to t
        weight = gain[:, None, None] * torch.exp(decay[:, None, None] * gap.clamp_min(0.0))
        weight = weight * (gap >= 0)  # (F, C, C): only the steps so far
        carried = torch.exp(decay[None, :] * (t[:, None] + 1.0))  # (C, F): (1 - g)^(t+1)
        levels = torch.einsum("ftj,bjf->btf", weight, part) + carried * level[:, None, :]
        out.append(levels)
        level = levels[:, -1]
    if len(out) == 1:  # one chunk: as it is, no copy
        return out[0]
    return torch.cat(out, dim=1) if out else x[:, :0]


class GaussianHead(nn.Module):
    """mean = skip(s_t) + W_m h_t; log_var = clamp(W_v h_t): a Gaussian over x_{t+1}, s_t
    the input or its smoothed level.

    The linear skip starts as the identity, so an untrained model predicts persistence
    (nearly, from a level) and the recurrent part learns the change; sensor levels never
    have to squeeze through the tanh state. A level smoothed at a gain learnt per feature
    (``level_logit``) is what a noisy sensor's next value is best predicted from, where
    the input itself would carry its noise into the prediction (exponential smoothing, as in
    Smyl's ES-RNN).
    """

    def __init__(self, hidden_size: int, n_features: int, level: bool = True) -> None:
        super().__init__()
        self.n_features = n_features
        self.proj = nn.Linear(hidden_size, 2 * n_features)
        self.skip = nn.Linear(n_features, n_features, bias=False)
        with torch.no_grad():
            self.skip.weight.copy_(torch.eye(n_features))
        self.level_logit = (
            nn.Parameter(torch.full((n_features,), LEVEL_LOGIT_INIT)) if level else None
        )

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.proj(h)  # (..., 2F)
        change, raw_log_var = out.split(self.n_features, dim=-1)  # (..., F) each
        return self.skip(x) + change, soft_clamp_log_var(raw_log_var)


def make_stack(
    cell: str, n_features: int, hidden_size: int, layers: int, dropout: float
) -> nn.Module:
    """torch's fused recurrent stack, batch first; dropout acts between layers only."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r} (use one of {', '.join(CELLS)})")
    kwargs = {
        "input_size": n_features,
        "hidden_size": hidden_size,
        "num_layers": layers,
        "batch_first": True,
        # torch warns when dropout is set on a single layer, where it does nothing.
        "dropout": dropout if layers > 1 else 0.0,
    }
    if cell == "gru":
        return nn.GRU(**kwargs)
    if cell == "lstm":
        return nn.LSTM(**kwargs)
    return nn.RNN(nonlinearity="tanh", **kwargs)


class RecurrentForecaster(nn.Module):
    """Predicts (mean, log_var) of the next normalised step from the steps so far."""

    def __init__(
        self,
        n_features: int,
        cell: str = "gru",
        layers: int = 1,
        hidden_size: int = 32,
        dropout: float = 0.0,
        skip: str = "level",
    ) -> None:
        super().__init__()
        if n_features < 1 or layers < 1 or hidden_size < 1:
            raise ValueError("n_features, layers and hidden_size must be positive")
        if skip not in SKIPS:
            raise ValueError(f"unknown skip {skip!r} (use one of {', '.join(SKIPS)})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_features = n_features
        self.cell = cell
        self.layers = layers
        self.hidden_size = hidden_size
        self.skip = skip
        self.rnn = make_stack(cell, n_features, hidden_size, layers, dropout)
        self.head = GaussianHead(hidden_size, n_features, level=skip == "level")

    @property
    def state_names(self) -> tuple[str, ...]:
        return state_names(self.cell, self.skip)

    def zero_state(self, batch: int) -> State:
        """All-zero state, the state of a stream that has seen nothing yet (its level at
        the training data's centre)."""
        weight = self.head.proj.weight
        shapes = (state_shape(name, self.layers, self.hidden_size, self.n_features)
                  for name in self.state_names)  # fmt: skip
        return tuple(weight.new_zeros((first, batch, last)) for first, last in shapes)

    def forward(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Run over a window: x (B, T, F) normalised -> mean, log_var (B, T, F), new state."""
        if state is None:
            state = self.zero_state(x.shape[0])
        if self.cell == "lstm":
            out, (h, c) = self.rnn(x, state[:2])  # (B, T, H); (L, B, H) each
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])  # (B, T, H); (L, B, H)
            new_state = (h,)
        skipped = x
        if self.head.level_logit is not None:
            skipped = smooth(x, state[-1][0], level_gain(self.head.level_logit))  # (B, T, F)
            new_state = (*new_state, skipped[:, -1][None])  # (1, B, F)
        mean, log_var = self.head(out, skipped)  # (B, T, F) each
        return mean, log_var, new_state

    def step(
        self, x: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """One step of B streams, what the exported graph computes: x (B, F) normalised."""
        mean, log_var, new_state = self(x[:, None, :], state)  # (B, 1, F) each
        return mean[:, 0], log_var[:, 0], new_state  # (B, F) each


def detach_state(state: State) -> State:
    """Cut the graph at a window boundary (truncated BPTT) but keep the values."""
    return tuple(s.detach() for s in state)
