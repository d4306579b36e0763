"""training.trainer.progress: redrawn in place on a terminal, one plain line per epoch elsewhere."""

from __future__ import annotations

import io
import math

from training.trainer.progress import EpochProgress, epoch_line


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def finish(progress: EpochProgress, epoch: int, best: bool = False) -> None:
    progress.finish(epoch, 1.5, 1.25, lr=1e-3, grad_norm=0.5, seconds=2.0, best=best)


def test_a_terminal_gets_the_bar_redrawn_in_place_then_one_line() -> None:
    screen = FakeTerminal()
    progress = EpochProgress(30, screen, redraw_interval_s=0.0)
    for i in range(1, 5):
        progress.update(3, i / 4, 2.0 - i / 10)
    finish(progress, 3, best=True)
    text = screen.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("*\n")
    frames = text.split("\r")[1:]
    assert frames[1].startswith("epoch   3/30 [#####.....]  50% train 1.8000 val -")
    assert frames[-1].startswith("epoch   3/30 [##########] 100% train 1.5000 val 1.2500")
    assert "lr 1.00e-03 grad 0.50 2.0s" in frames[-1]


def test_a_shorter_line_blanks_the_rest_of_a_longer_one() -> None:
    screen = FakeTerminal()
    progress = EpochProgress(30, screen, redraw_interval_s=0.0)
    progress.update(1, 0.5, 123456.0)  # a long loss
    progress.update(1, 0.6, 1.0)
    first, second = screen.getvalue().split("\r")[1:]
    assert len(second) == len(first)


def test_redraws_are_throttled() -> None:
    screen = FakeTerminal()
    progress = EpochProgress(2, screen, redraw_interval_s=3600.0)
    for i in range(100):
        progress.update(1, i / 100, 1.0)
    assert screen.getvalue().count("\r") == 1


def test_a_pipe_or_file_gets_one_plain_line_per_epoch() -> None:
    log = io.StringIO()
    progress = EpochProgress(2, log, redraw_interval_s=0.0)
    for epoch in (1, 2):
        for i in range(10):
            progress.update(epoch, i / 10, 1.0)
        finish(progress, epoch, best=epoch == 1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2
    assert lines[0].startswith("epoch   1/2 [##########] 100%") and lines[0].endswith(" *")
    assert not lines[1].endswith("*")


def test_unknown_losses_show_as_a_dash() -> None:
    assert epoch_line(1, 9, 0.0, math.nan, None).endswith("train - val -")
