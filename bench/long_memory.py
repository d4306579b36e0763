"""Long memory: where a plain tanh RNN's gradients vanish and the gated cells still learn.

Task ("hold"): each window starts with a value v ~ N(0, 1) on channel 0, flagged by a
marker on channel 1; every later step brings a N(0, 1) distractor on channel 0. At every
step the model's Gaussian for channel 0 must recall v, so at step ``lag`` the answer
depends only on the input ``lag`` steps back. Training scores every step (distances 1 to
``lag``); validation scores step ``lag`` alone, on held-out windows. The best predictor
that ignores the past is N(0, 1): its NLL, the no-memory baseline, is 0.5 (ln 2pi + 1).

The model is training's RecurrentForecaster (2 features, one layer, equal hidden size
for every cell), trained with training.trainer.train's Gaussian NLL, clipping and Adam on
fresh random windows. The gradient column is the mean over held-out windows of
|d loss_lag / d x_0|: the gradient reaching the window's first input, the one that holds
the answer. Prints a markdown table. About 2-4 minutes on 2 cores.

    .venv/bin/python bench/long_memory.py [--lags 10,50,200] [--hidden 32] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

from training.trainer.model import RecurrentForecaster
from training.trainer.train import LR_FINAL_FRACTION, gaussian_nll, optimise_step, torch_threads

BASELINE_NLL = 0.5 * (math.log(2 * math.pi) + 1.0)  # N(0, 1) scored against N(0, 1) draws
SIGN_ONLY_R2 = 2.0 / math.pi  # recalling sign(v) alone: mean sign(v) * E|v|, R^2 = (E|v|)^2
# Optimiser steps per lag: fewer for long windows (each costs more), within ~5 minutes.
UPDATES = {10: 1000, 50: 1500, 200: 2000}
BATCH = 64
VAL_WINDOWS = 1024
LR = 3e-3
CLIP = 1.0


def windows(n: int, lag: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n windows of lag + 1 steps: x (n, lag + 1, 2) and the value to recall v (n,)."""
    x = torch.zeros(n, lag + 1, 2)  # (B, T, 2)
    x[:, :, 0] = torch.randn(n, lag + 1, generator=generator)
    x[:, 0, 1] = 1.0  # the marker: "remember this one"
    return x, x[:, 0, 0].clone()


def recall_nll(model: RecurrentForecaster, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """NLL of v under the channel-0 Gaussian at every step: (B, T)."""
    mean, log_var, _ = model(x)  # (B, T, 2) each
    target = v[:, None, None].expand(-1, x.shape[1], 1)  # (B, T, 1)
    return gaussian_nll(mean[..., :1], log_var[..., :1], target)


def first_step_gradient(model: RecurrentForecaster, x: torch.Tensor, v: torch.Tensor) -> float:
    """Mean over windows of |d NLL at the last step / d x at step 0|."""
    model.eval()
    x = x.clone().requires_grad_(True)
    loss = recall_nll(model, x, v)[:, -1].sum()  # per window: sum, not mean
    (grad,) = torch.autograd.grad(loss, x)  # (B, T, 2)
    return float(grad[:, 0].norm(dim=1).mean())


@dataclass
class Cell:
    cell: str
    lag: int
    val_nll: float
    r2: float
    grad_init: float
    grad_trained: float
    updates: int
    seconds: float


@torch.no_grad()
def validate(model: RecurrentForecaster, x: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """(NLL at step lag, R^2 of the recalled mean) on held-out windows."""
    model.eval()
    mean, _, _ = model(x)
    error = v - mean[:, -1, 0]
    r2 = 1.0 - float((error**2).mean() / v.var())
    return float(recall_nll(model, x, v)[:, -1].mean()), r2


def run(cell: str, lag: int, hidden: int, updates: int, seed: int) -> Cell:
    began = time.perf_counter()
    torch.manual_seed(seed)
    model = RecurrentForecaster(2, cell, layers=1, hidden_size=hidden)
    data = torch.Generator().manual_seed(seed + 1)
    x_val, v_val = windows(VAL_WINDOWS, lag, torch.Generator().manual_seed(seed + 2))
    grad_init = first_step_gradient(model, x_val, v_val)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=updates, eta_min=LR * LR_FINAL_FRACTION
    )
    for _ in range(updates):
        model.train()
        x, v = windows(BATCH, lag, data)
        loss = recall_nll(model, x, v)[:, 1:].mean()  # every distance from 1 to lag
        optimise_step(model, optimiser, loss, CLIP)
        schedule.step()
    val_nll, r2 = validate(model, x_val, v_val)
    grad_trained = first_step_gradient(model, x_val, v_val)
    return Cell(
        cell, lag, val_nll, r2, grad_init, grad_trained, updates, time.perf_counter() - began
    )


def verdict(r2: float) -> str:
    """How much of v the model recalls at step lag.

    >>> verdict(0.99), verdict(0.5), verdict(0.01)
    ('yes', 'partly', 'no')
    """
    return "yes" if r2 >= 0.9 else "partly" if r2 >= 0.2 else "no"


def table(results: list[Cell]) -> str:
    head = (
        "| cell | lag | val NLL at lag | no-memory NLL | R² of recall | remembers |"
        " ‖∂L/∂x₀‖ untrained | ‖∂L/∂x₀‖ trained | updates | s |\n"
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r.cell} | {r.lag} | {r.val_nll:.3f} | {BASELINE_NLL:.3f} | {r.r2:.3f} |"
        f" {verdict(r.r2)} | {r.grad_init:.1e} | {r.grad_trained:.1e} | {r.updates} |"
        f" {r.seconds:.0f} |"
        for r in results
    ]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lags", default="10,50,200", help="comma-separated (%(default)s)")
    parser.add_argument("--cells", default="rnn,gru,lstm", help="(%(default)s)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden size (%(default)s)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply the optimiser steps (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    args = parser.parse_args(argv)
    lags = [int(a) for a in args.lags.split(",")]
    cells = args.cells.split(",")
    if min(lags) < 1 or args.hidden < 1 or args.scale <= 0:
        parser.error("lags and --hidden must be positive, --scale above 0")

    scale: float = args.scale

    def updates(lag: int) -> int:
        """The steps of the nearest lag in UPDATES, times --scale."""
        base = UPDATES[min(UPDATES, key=lambda k: abs(k - lag))]
        return max(1, round(base * scale))

    sizes = {c: sum(p.numel() for p in RecurrentForecaster(2, c, 1, args.hidden).parameters())
             for c in cells}  # fmt: skip
    print(
        f"long memory: recall a value seen `lag` steps back among N(0,1) distractors;"
        f" hidden {args.hidden}, one layer (parameters: "
        + ", ".join(f"{c} {n:,}" for c, n in sizes.items())
        + f"); Adam lr {LR:g} cosine, clip {CLIP:g}, batch {BATCH} fresh windows per step;"
        f" validation on {VAL_WINDOWS} held-out windows at step lag. Optimiser steps per lag: "
        + ", ".join(f"{lag}: {updates(lag)}" for lag in lags)
        + " (fewer for long lags, whose windows cost more).\n",
        flush=True,
    )
    results = []
    began = time.perf_counter()
    with torch_threads(1):  # small matrices: one thread is faster than two competing
        for lag in lags:
            for cell in cells:
                result = run(cell, lag, args.hidden, updates(lag), args.seed)
                results.append(result)
                print(
                    f"  {cell:>4} lag {lag:>3}: NLL {result.val_nll:.3f}, R² {result.r2:.3f}"
                    f" ({result.seconds:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    print(table(results))
    print(
        f"\nNo-memory NLL {BASELINE_NLL:.3f} = predicting N(0, 1) without the past; lower is"
        " better. R² 1 = perfect recall; R² 0 = none; R² ≈ 2/π ="
        f" {SIGN_ONLY_R2:.2f} is what recalling only the sign of v gives (a saturated tanh"
        " unit can latch one bit while passing almost no gradient). ‖∂L/∂x₀‖: gradient of"
        " the step-lag loss reaching the window's first input, before and after training."
        f" Total {time.perf_counter() - began:.0f} s."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
