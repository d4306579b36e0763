"""A one-line progress bar per training epoch on stderr, with no dependency.

On a terminal the line is redrawn in place with a carriage return as batches finish;
anywhere else (a pipe, a log file, CI) only the finished epoch's line is written, once,
so logs hold one plain line per epoch.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO

BAR_WIDTH = 10
REDRAW_INTERVAL_S = 0.1  # a terminal redraw at most this often


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[####......]``: ``fraction`` of ``width`` cells filled, clamped to [0, 1].

    >>> bar(0.52)
    '[#####.....]'
    >>> bar(2.0, width=4)
    '[####]'
    """
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _loss(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def epoch_line(
    epoch: int, epochs: int, fraction: float, train_loss: float | None, val_loss: float | None
) -> str:
    """The bar's text; a loss not known yet (or NaN) shows as ``-``.

    >>> epoch_line(3, 30, 0.52, 1.234, None)
    'epoch   3/30 [#####.....]  52% train 1.2340 val -'
    """
    percent = int(100 * min(max(fraction, 0.0), 1.0))
    return (
        f"epoch {epoch:>3}/{epochs} {bar(fraction)} {percent:>3}%"
        f" train {_loss(train_loss)} val {_loss(val_loss)}"
    )


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class EpochProgress:
    """Draws :func:`epoch_line` for each epoch of a run of ``epochs`` epochs.

    ``update`` redraws the running line (terminals only, throttled); ``finish`` writes
    the epoch's final line with the learning rate, gradient norm, time and a ``*``
    when the epoch is the best so far.
    """

    def __init__(
        self,
        epochs: int,
        stream: TextIO | None = None,
        redraw_interval_s: float = REDRAW_INTERVAL_S,
    ) -> None:
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stderr
        self.live = is_terminal(self.stream)
        self.redraw_interval_s = redraw_interval_s
        self._drawn = 0  # length of the line on screen, to blank a longer old one
        self._last_draw = -math.inf

    def update(self, epoch: int, fraction: float, train_loss: float | None) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last_draw < self.redraw_interval_s:
            return
        self._last_draw = now
        self._draw(epoch_line(epoch, self.epochs, fraction, train_loss, None), end="")

    def finish(
        self,
        epoch: int,
        train_loss: float,
        val_loss: float,
        *,
        lr: float,
        grad_norm: float,
        seconds: float,
        best: bool,
    ) -> None:
        text = (
            epoch_line(epoch, self.epochs, 1.0, train_loss, val_loss)
            + f" lr {lr:.2e} grad {grad_norm:.2f} {seconds:.1f}s"
            + (" *" if best else "")
        )
        self._draw(text, end="\n")
        self._last_draw = -math.inf

    def _draw(self, text: str, end: str) -> None:
        if self.live:
            pad = " " * max(0, self._drawn - len(text))
            self.stream.write("\r" + text + pad + end)
            self._drawn = 0 if end else len(text)
        else:
            self.stream.write(text + end)
        self.stream.flush()
