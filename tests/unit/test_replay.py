"""detector.replay through the engine: the samples' own times reach the scorer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from detector.engine import StreamConfig
from detector.model import LoadedModel
from detector.replay import replay_table
from detector.scoring import ONSET_RED, ONSET_YELLOW, ScoringConfig, log_score
from training.synth import generate_fleet

FIVE_MINUTES = 300.0
DAY_ROWS = 288  # a day of five-minute samples


def test_a_spike_at_the_same_time_each_day_is_an_onset_on_the_first_day_only(
    tiny_model: Path,
) -> None:
    model = LoadedModel.load(tiny_model)
    values = generate_fleet(1, 900, features=model.meta.features, seed=3).values[0]
    # the third spike at another time of day; the first comes well after the tiny model's
    # own early onsets (on this series, before row 300), so no onset's hold covers it
    spikes = [400, 400 + DAY_ROWS, 400 + DAY_ROWS + 160]
    for row in spikes:
        values[row] = model.centre + 40.0 / model.inv_scale
    times = 1_700_000_000.0 + FIVE_MINUTES * np.arange(len(values))
    onset = float(log_score(np.array([ONSET_RED]))[0])
    held = float(log_score(np.array([ONSET_YELLOW]))[0])
    streams = StreamConfig(max_gap_s=3600.0)  # the tiny model's interval is a second
    plain = replay_table(model, values, times, ScoringConfig(routine_period_s=0.0), streams)
    assert all(plain.score[row] >= onset for row in spikes)  # each spike is an onset
    routine = replay_table(model, values, times, ScoringConfig(), streams)
    assert routine.score[spikes[0]] == pytest.approx(plain.score[spikes[0]])
    assert routine.score[spikes[1]] == pytest.approx(held)  # a day later: the routine
    assert routine.score[spikes[2]] == pytest.approx(plain.score[spikes[2]])
    # only anomaly_score changes: the alerts are the same
    np.testing.assert_array_equal(routine.alert, plain.alert)
    # without times, the rows are a sample interval apart: the tiny model's is not 5 minutes
    assert model.meta.sample_interval_s != FIVE_MINUTES
    untimed = replay_table(model, values, None, ScoringConfig(), streams)
    assert untimed.score[spikes[1]] >= onset
