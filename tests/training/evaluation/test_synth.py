"""training.evaluation.synth: deterministic pumps, anomalies exactly where labelled, CSV files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from detector.csvdata import infer_interval, read_csv
from training.evaluation.synth import (
    ANOMALY_KINDS,
    add_synth_arguments,
    generate_fleet,
    inject,
    noise_sd,
    run_synth,
)


def test_normal_values_depend_only_on_seed_pump_and_absolute_step() -> None:
    short = generate_fleet(3, 500, seed=4)
    long = generate_fleet(3, 1800, seed=4)
    later = generate_fleet(3, 800, seed=4, start_step=1000)
    assert np.array_equal(short.values, long.values[:, :500])
    assert np.array_equal(later.values, long.values[:, 1000:])  # continues in phase
    assert not np.allclose(generate_fleet(3, 500, seed=5).values, short.values)
    assert short.values.shape == (3, 500, 4) and np.isfinite(short.values).all()
    assert not short.labels.any() and short.anomalies == []


def test_sensors_are_correlated_like_pumps() -> None:
    v = generate_fleet(1, 2400, seed=0).values[0]
    flow, pressure, temperature = v[:, 0], v[:, 1], v[:, 2]
    assert np.corrcoef(flow, pressure)[0, 1] > 0.95
    # Temperature lags the load: it correlates better with flow from some steps before.
    lagged = [np.corrcoef(flow[: len(flow) - k], temperature[k:])[0, 1] for k in (0, 20)]
    assert lagged[1] > lagged[0]
    day = np.fft.rfft(flow - flow.mean())
    assert np.argmax(np.abs(day)) == 2400 // 240  # the daily cycle of period_steps


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_kind_changes_the_data_only_where_labelled(kind: str) -> None:
    normal = generate_fleet(4, 600, seed=3)
    fleet = generate_fleet(4, 600, seed=3, anomalies=4, kinds=(kind,), min_start=100)
    assert [a.kind for a in fleet.anomalies] == [kind] * 4
    changed = (fleet.values != normal.values).any(axis=2)  # [S, T]
    assert not (changed & ~fleet.labels).any()
    for a in fleet.anomalies:
        assert a.start >= 100 and fleet.labels[a.stream, a.start : a.end].all()
        f = a.features[0]
        diff = np.abs(
            fleet.values[a.stream, a.start : a.end, f] - normal.values[a.stream, a.start : a.end, f]
        )
        sd = noise_sd(normal.values[a.stream, :, f])
        if kind in ("spike", "dip", "level_shift"):
            assert diff.min() >= 5 * sd
        elif kind in ("drift", "noise_burst"):
            assert diff.max() >= 4 * sd
        elif kind == "stuck":
            assert np.ptp(fleet.values[a.stream, a.start : a.end, f]) == 0 and a.end - a.start >= 30
        else:
            assert diff[0] == 0 and diff.max() > 0


def test_anomalies_spread_over_the_fleet_with_gaps() -> None:
    fleet = generate_fleet(5, 1000, seed=1, anomalies=14, min_start=50, min_gap=30)
    assert len(fleet.anomalies) == 14
    assert sorted({a.kind for a in fleet.anomalies}) == sorted(ANOMALY_KINDS)  # kinds in turn
    assert sorted(np.bincount([a.stream for a in fleet.anomalies])) == [2, 3, 3, 3, 3]
    for s in range(5):
        spans = sorted((a.start, a.end) for a in fleet.anomalies if a.stream == s)
        assert all(b[0] - a[1] >= 30 for a, b in zip(spans, spans[1:], strict=False))
    assert fleet.labels.sum() == sum(a.end - a.start for a in fleet.anomalies)
    again = generate_fleet(5, 1000, seed=1, anomalies=14, min_start=50, min_gap=30)
    assert again.anomalies == fleet.anomalies and np.array_equal(again.values, fleet.values)


def test_inject_copies_and_checks_its_arguments() -> None:
    values = generate_fleet(1, 100, seed=0).values[0]
    rng = np.random.default_rng(0)
    out = inject(values, "spike", 10, 12, (1,), rng)
    assert out is not values and np.array_equal(values, generate_fleet(1, 100, seed=0).values[0])
    with pytest.raises(ValueError):
        inject(values, "meteor", 10, 12, (1,), rng)
    with pytest.raises(ValueError):
        inject(values, "spike", 90, 120, (1,), rng)
    with pytest.raises(ValueError):
        generate_fleet(1, 40, anomalies=5, min_gap=30)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    return parser.parse_args(list(argv))


def test_synth_command_writes_readable_csv(tmp_path: Path) -> None:
    one = tmp_path / "fleet.csv"
    assert (
        run_synth(
            _args(
                "--out",
                str(one),
                "--streams",
                "2",
                "--steps",
                "90",
                "--anomalies",
                "2",
                "--interval-s",
                "0.5",
                "--seed",
                "3",
            )
        )
        == 0
    )
    table = read_csv(one)
    assert table.header == [
        "timestamp",
        "stream",
        "flow",
        "pressure",
        "temperature",
        "vibration",
        "anomaly",
    ]
    assert table.value_columns == ["flow", "pressure", "temperature", "vibration"]
    assert len(table.rows) == 180 and infer_interval(table.timestamps[:90]) == 0.5
    assert table.rows[0][0] == "2024-01-01T00:00:00.000Z"
    fleet = generate_fleet(2, 90, seed=3, anomalies=2, interval_s=0.5)
    np.testing.assert_allclose(table.values[:90], fleet.values[0], rtol=1e-6)
    assert [int(v) for v in table.column("anomaly")[:90]] == fleet.labels[0].astype(int).tolist()

    folder = tmp_path / "fleet"
    assert (
        run_synth(
            _args(
                "--out",
                str(folder),
                "--streams",
                "3",
                "--steps",
                "60",
                "--features",
                "a,b",
                "--anomalies",
                "3",
            )
        )
        == 0
    )
    assert sorted(p.name for p in folder.iterdir()) == [
        "anomalies.json",
        "pump-000.csv",
        "pump-001.csv",
        "pump-002.csv",
    ]
    table = read_csv(folder / "pump-001.csv")
    assert table.header == ["timestamp", "a", "b", "anomaly"] and len(table.rows) == 60
    assert len(json.loads((folder / "anomalies.json").read_text())) == 3
