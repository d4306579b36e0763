"""Detection quality on the NAB and SKAB development subsets, run exactly as a user would.

Per file: ``python -m detector train ... --quiet`` then ``python -m detector replay ...``
as subprocesses in a temporary directory (``--jobs`` files at once, longest first); the
outputs are scored with ``training.evaluation.evaluate`` and printed as markdown tables beside the
published figures of ``../shared/datasets/README.md``, with the wall time. Not a test.

    .venv/bin/python bench/quality.py [--nab DIR] [--skab DIR] [--jobs 2] [--only nab]
        [--train-args="--epochs 10 --hidden 16"] [--config scoring.toml] [--per-file] [--seeds 3]
        [--keep DIR] [--models DIR] [--variants variants.toml]

NAB: train on the probationary rows min(floor(0.15 n), 750) of ``value``, replay the whole
file, NAB scores of ``anomaly_score`` over the corpus (one threshold per profile, NAB's
probation). SKAB (valve1): train on the first 400 rows of the eight sensors, replay, F1 /
FAR / MAR of ``alert`` on the rows after the first 400, pooled over the files. Then the
fleet bench (``bench/fleet.py``) under the same settings (``--no-fleet`` leaves it out).

``--models DIR`` replays the models an earlier ``--keep DIR`` kept instead of training them.
``--variants FILE`` judges scoring settings leave-one-out on those models, never training:
every model is replayed in-process (``--jobs`` worker processes) under the baseline (project
defaults or ``--config``) and under each ``[variants.NAME]``, e.g.

    [variants.no_spatial]
    group = "spatial check"  # one setting's variants; each fold picks one of a group
    scoring = { spatial_tolerance = -1.0 }  # over the baseline's [scoring]; also streams = {}

A variant with ``models = "DIR"`` replays the models another ``--keep DIR`` run kept instead
(trained with other ``train`` flags, or by other training code), so a change to training is
judged by the same protocol; its ``scoring`` and ``streams``, if any, apply to them.

Each fold holds one NAB category out and picks, per group, the candidate (the baseline is
one) with the best mean over seeds of: NAB standard on the two other categories (one
threshold optimised over both) + 100 SKAB F1 - 100 max(0, SKAB FAR - 0.10). The held-out
category is scored at those two categories' threshold. A group is kept only if every fold
that picked a variant gains on its held-out category in the mean over seeds.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.config import StreamConfig, build_config, merge, read_toml
from detector.csvdata import read_csv
from detector.errors import ConfigError, RnnsentryError
from detector.model import LoadedModel
from detector.replay import replay_table
from detector.scoring import ScoringConfig
from training.evaluation.evaluate import (
    Labelled,
    PointMetrics,
    Report,
    evaluate,
    label_runs,
    read_label_column,
    read_scores,
    read_windows,
    windows_to_events,
)
from training.evaluation.nab import (
    PROFILES,
    NabResult,
    nab_corpus,
    nab_file_score,
    nab_probation_rows,
)

REPO = Path(__file__).resolve().parents[1]
SKAB_TRAIN_ROWS = 400
TARGET_S = 600.0
# Standard profile on these 30 files, normalised like the whole corpus (dataset README).
PUBLISHED_NAB = tuple(
    (f"{name} (published)", score)
    for name, score in (
        ("windowed Gaussian", 21.9), ("Random Cut Forest", 48.0), ("relative entropy", 50.7),
        ("KNN-CAD", 53.7), ("CAD-OSE", 61.4), ("Numenta HTM", 66.9), ("ARTime", 67.6),
    )
)  # fmt: skip
# (detector, F1, FAR) published on the whole SKAB corpus; the z-score row is valve1's.
PUBLISHED_SKAB = (
    ("LSTM-AE (published)", "0.74", "-"),
    ("MSET (published)", "0.78", "-"),
    ("Conv-AE (published)", "0.78", "13.6 %"),
    ("trivial z-score: any \\|z\\| > 4 vs the first 400 rows (README, valve1)", "0.74", "31.8 %"),
)


@dataclass(frozen=True)
class Job:
    protocol: str  # "nab" or "skab"
    key: str  # NAB windows key, or the SKAB file's name
    data: Path
    rows: int
    train_rows: int
    columns: str | None  # --columns, or None for the CSV reader's default


@dataclass(frozen=True)
class Done:
    job: Job
    scores: Path
    train_s: float
    replay_s: float
    error: str | None = None


def run_job(job: Job, work: Path, args: argparse.Namespace, seed: int) -> Done:
    """Train then replay one file through the command line; the first failure is kept. With
    ``--models``, a model kept there is replayed and nothing is trained."""
    scores = work / job.protocol / job.key  # e.g. nab/realKnownCause/nyc_taxi.csv
    scores.parent.mkdir(parents=True, exist_ok=True)
    model = model_file(work, job)
    kept = model_file(seed_dir(args.models, seed, args.seeds), job) if args.models else None
    if kept is not None and kept.exists():
        model = kept
    columns = ["--columns", job.columns] if job.columns else []
    train = [
        "train",
        "--data",
        str(job.data),
        "--out",
        str(model),
        *columns,
        "--train-rows",
        str(job.train_rows),
        "--quiet",
        *(["--seed", str(seed)] if seed else []),
        *shlex.split(args.train_args),
    ]
    replay = ["replay", "--model", str(model), "--data", str(job.data), "--out", str(scores)]
    if args.config:
        replay += ["--config", str(args.config)]
    steps, times = ([replay], [0.0]) if model == kept else ([train, replay], [])
    for argv in steps:
        began = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "detector", *argv],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
        )
        times.append(time.perf_counter() - began)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            return Done(job, scores, times[0], sum(times[1:]), f"{argv[0]}: {last}")
    return Done(job, scores, times[0], times[1])


def seed_dir(root: Path, seed: int, seeds: int) -> Path:
    """Where ``--keep DIR`` put one seed's files: DIR/seed-N with several seeds, DIR with one
    (where a single seed's DIR/seed-0 exists, that)."""
    nested = root / f"seed-{seed}"
    return nested if seeds > 1 or nested.is_dir() else root


def model_file(root: Path, job: Job) -> Path:
    return (root / job.protocol / job.key).with_suffix(".onnx")  # nab/<category>/<file>.onnx


# Subprocesses get the project's defaults: no RNNSENTRY_* setting of the caller's shell.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("RNNSENTRY_")}


def nab_jobs(root: Path) -> tuple[list[Job], dict[str, list[tuple[float, float]]]]:
    windows = read_windows(root / "combined_windows.json")
    jobs = []
    for path in sorted((root / "data").glob("*/*.csv")):
        key = f"{path.parent.name}/{path.name}"
        if key not in windows:
            raise RnnsentryError(f"{root / 'combined_windows.json'} has no windows for {key}")
        rows = len(read_csv(path, columns=["value"]).rows)
        jobs.append(Job("nab", key, path, rows, nab_probation_rows(rows), "value"))
    return jobs, windows


def skab_jobs(root: Path) -> list[Job]:
    paths = sorted((root / "valve1").glob("*.csv"), key=lambda p: int(p.stem))
    return [
        Job("skab", f"valve1/{p.name}", p, len(read_csv(p).rows), SKAB_TRAIN_ROWS, None)
        for p in paths
    ]


def fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x != x else format(x, spec)  # NaN -> "-"


def nab_tables(
    done: list[Done], files: list[Labelled], report: Report, per_file: bool
) -> list[str]:
    nab = report.nab
    n_windows = sum(len(f.events) for f in files)
    out = [
        f"## NAB: {len(done)} files, {n_windows} windows; train on min(floor(0.15 n), 750) rows"
        " of `value`, replay every row",
        "",
        "| detector | standard | reward low FP | reward low FN |",
        "|---|---|---|---|",
        *(f"| {name} | {score:.1f} | - | - |" for name, score in PUBLISHED_NAB),
        "| **rnnsentry (this run)** | **{:.1f}** | **{:.1f}** | **{:.1f}** |".format(
            *(r.normalised for r in nab.values())
        ),
        "",
        "| profile | score | threshold | raw | null | perfect | TP | FP | FN |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r.profile} | {r.normalised:.1f} | {r.threshold:.6g} | {r.raw:.2f} |"
            f" {r.null:.1f} | {r.perfect:.1f} | {r.tp} | {r.fp} | {r.fn} |"
            for r in nab.values()
        ),
    ]
    # Standard profile per category, at the corpus threshold, normalised like the corpus.
    standard, threshold = PROFILES["standard"], nab["standard"].threshold
    parts = {}
    for f in files:
        probation = nab_probation_rows(len(f.score))
        parts[f.name] = (
            nab_file_score(f.score, f.events, threshold, standard, probation),
            len(f.events),
        )
    out += [
        "",
        "| category (standard, corpus threshold) | files | windows | score | TP | FP | FN |",
        "|---|---|---|---|---|---|---|",
    ]
    for cat in sorted({k.split("/")[0] for k in parts}):
        mine = [v for k, v in parts.items() if k.startswith(cat + "/")]
        w = sum(n for _, n in mine)
        raw = sum(c.raw for c, _ in mine)
        score = 100 * (raw + w * standard.a_fn) / (w * (standard.a_tp + standard.a_fn))
        out.append(
            f"| {cat} | {len(mine)} | {w} | {score:.1f} | {sum(c.tp for c, _ in mine)} |"
            f" {sum(c.fp for c, _ in mine)} | {sum(c.fn for c, _ in mine)} |"
        )
    p, e = report.point, report.event
    out += [
        "",
        f"`alert` on every row: precision {fmt(p.precision)}, recall {fmt(p.recall)}, F1"
        f" {fmt(p.f1)}, FAR {fmt(100 * p.far, '.1f')} %; windows alerted in {e.detected}/"
        f"{e.events}, mean delay {fmt(e.mean_delay_steps, '.0f')} rows",
    ]
    if per_file:
        out += [
            "",
            "| file | rows | windows | TP | FP | FN | raw (standard) | train s | replay s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in done:
            c, w = parts[d.job.key]
            out.append(
                f"| {d.job.key} | {d.job.rows} | {w} | {c.tp} | {c.fp} | {c.fn} |"
                f" {c.raw:.3f} | {d.train_s:.1f} | {d.replay_s:.1f} |"
            )
    return out


def skab_tables(done: list[Done], report: Report, per_file: bool) -> list[str]:
    p, e = report.point, report.event
    out = [
        f"## SKAB valve1: {len(done)} files; train on the first {SKAB_TRAIN_ROWS} rows of the"
        f" eight sensors, `alert` on the {report.rows_evaluated} rows after them, pooled",
        "",
        "| detector | F1 | FAR | MAR |",
        "|---|---|---|---|",
        *(f"| {name} | {f1} | {far} | - |" for name, f1, far in PUBLISHED_SKAB),
        f"| **rnnsentry (this run)** | **{fmt(p.f1)}** | **{fmt(100 * p.far, '.1f')} %** |"
        f" **{fmt(100 * p.mar, '.1f')} %** |",
        "",
        f"precision {fmt(p.precision)}, recall {fmt(p.recall)} (TP {p.tp}, FP {p.fp}, FN {p.fn},"
        f" TN {p.tn}); anomalies alerted in {e.detected}/{e.events}, mean delay"
        f" {fmt(e.mean_delay_steps, '.1f')} rows ({fmt(e.mean_delay_s, '.0f')} s)",
    ]
    if per_file:
        out += ["", "| file | rows | train s | replay s |", "|---|---|---|---|"]
        out += [
            f"| {d.job.key} | {d.job.rows} | {d.train_s:.1f} | {d.replay_s:.1f} |" for d in done
        ]
    return out


def repo_path(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else (REPO / path).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nab",
        default="../shared/datasets/nab-dev",
        metavar="DIR",
        help="NAB subset, relative paths from the repository (%(default)s)",
    )
    parser.add_argument(
        "--skab",
        default="../shared/datasets/skab-dev",
        metavar="DIR",
        help="SKAB subset, relative paths from the repository (%(default)s)",
    )
    parser.add_argument("--only", choices=("nab", "skab"), help="run one protocol only")
    parser.add_argument("--jobs", type=int, default=2, help="files at once (%(default)s)")
    parser.add_argument(
        "--train-args",
        default="",
        metavar='"--epochs 10 ..."',
        help='extra flags for every `train` (write --train-args="...")',
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="scoring configuration for every `replay` ([scoring], [streams])",
    )
    parser.add_argument("--per-file", action="store_true", help="also a table per file")
    parser.add_argument("--keep", metavar="DIR", help="keep models and scores in DIR")
    parser.add_argument(
        "--no-fleet", action="store_true", help="leave out the fleet bench (bench/fleet.py)"
    )
    parser.add_argument(
        "--models",
        metavar="DIR",
        help="reuse the models an earlier --keep DIR kept (seed-N/ per seed with --seeds > 1):"
        " a file whose model is there is not trained",
    )
    parser.add_argument(
        "--variants",
        metavar="FILE.toml",
        help="leave-one-out instead: re-score the --models of every seed in-process under each"
        " [variants.NAME] (group, scoring, streams) and the baseline, and judge each group",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train every file with seeds 0..N-1 and print each seed's figures with their"
        " mean and spread (%(default)s)",
    )
    args = parser.parse_args(argv)
    if args.config:
        args.config = Path(args.config).resolve()
    if args.models:
        args.models = Path(args.models).resolve()
    began = time.perf_counter()
    try:
        jobs: list[Job] = []
        windows: dict[str, list[tuple[float, float]]] = {}
        if args.only != "skab":
            nab, windows = nab_jobs(repo_path(args.nab))
            jobs += nab
        if args.only != "nab":
            jobs += skab_jobs(repo_path(args.skab))
    except RnnsentryError as exc:
        print(f"quality: {exc}", file=sys.stderr)
        return 2
    if args.variants:
        return run_loo(args, jobs, windows)

    print(
        f"detection quality: {len(jobs)} files, {args.jobs} at a time, {os.cpu_count()} CPU(s),"
        f" Python {platform.python_version()}; train flags: project defaults"
        f"{' + ' + args.train_args if args.train_args else ''}; scoring:"
        f" {args.config or 'project defaults'}"
        + (f"; training seeds 0..{args.seeds - 1}" if args.seeds > 1 else "")
        + (f"; models kept in {args.models} reused" if args.models else "")
        + "\n"
    )
    rounds = []
    with tempfile.TemporaryDirectory(prefix="rnnsentry-quality-") as tmp:
        for seed in range(max(args.seeds, 1)):
            work = Path(args.keep or tmp) / (f"seed-{seed}" if args.seeds > 1 else "")
            rounds.append(run_round(jobs, windows, work, args, seed))
    total_s = time.perf_counter() - began
    first = rounds[0]
    lines = list(first.lines)
    if len(rounds) > 1:
        lines += seed_table(rounds)
    if not args.no_fleet:
        base = read_toml(args.config) if args.config else {}
        with tempfile.TemporaryDirectory(prefix="rnnsentry-fleet-") as tmp:
            work = Path(args.keep) / "fleet" if args.keep else Path(tmp)
            seeds = list(range(max(args.seeds, 1)))
            lines += fleet_lines([build_settings(BASELINE, base, {})], seeds, work)
    lines += [
        "## Time",
        "",
        "| part | files | train s (sum) | replay s (sum) |",
        "|---|---|---|---|",
        *(f"| {name} | {n} | {t:.0f} | {r:.0f} |" for name, n, t, r in first.timing),
        "",
        f"**wall time {first.run_s:.0f} s** for one training seed ({args.jobs} files at a time;"
        f" target for all 46 files: under {TARGET_S:.0f} s)"
        + (f"; {len(rounds)} seeds: {total_s:.0f} s" if len(rounds) > 1 else ""),
    ]
    failed = sum(r.failed for r in rounds)
    if failed:
        lines.append(f"\n**INCOMPLETE: {failed} run(s) failed (above); the tables leave them out**")
    print("\n".join(lines))
    return 1 if failed else 0


@dataclass
class Round:
    """One training seed's pass over every file: its tables and headline figures."""

    seed: int
    lines: list[str]
    timing: list[tuple[str, int, float, float]]
    run_s: float
    failed: int
    nab: Report | None = None
    skab: Report | None = None


def run_round(
    jobs: list[Job],
    windows: dict[str, list[tuple[float, float]]],
    work: Path,
    args: argparse.Namespace,
    seed: int,
) -> Round:
    began = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    order = sorted(jobs, key=lambda j: -j.rows)  # longest first: the pool ends together
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        results = {d.job: d for d in pool.map(lambda j: run_job(j, work, args, seed), order)}
    failed = [d for d in results.values() if d.error]
    for d in failed:
        print(f"FAILED seed {seed} {d.job.protocol} {d.job.key}: {d.error}", file=sys.stderr)
    out = Round(seed, [], [], time.perf_counter() - began, len(failed))
    for protocol in ("nab", "skab"):
        done = [results[j] for j in jobs if j.protocol == protocol and not results[j].error]
        if not done:
            continue
        files = []
        for d in done:
            s = read_scores(d.scores)
            if protocol == "nab":
                events = windows_to_events(windows[d.job.key], s.timestamps, str(d.scores))
            else:
                events = label_runs(read_label_column(d.job.data, "anomaly"))
            files.append(Labelled(d.job.key, s.score, s.alert, events, s.timestamps))
        if protocol == "nab":
            out.nab = evaluate(files)
            out.lines += nab_tables(done, files, out.nab, args.per_file)
        else:
            out.skab = evaluate(files, skip_rows=SKAB_TRAIN_ROWS)
            out.lines += skab_tables(done, out.skab, args.per_file)
        out.lines.append("")
        train_s, replay_s = sum(d.train_s for d in done), sum(d.replay_s for d in done)
        out.timing.append((protocol.upper(), len(done), train_s, replay_s))
    return out


def seed_table(rounds: list[Round]) -> list[str]:
    """Every seed's headline figures, then their mean and standard deviation: how much of a
    difference between two runs is the luck of the initial weights."""
    rows = []
    for r in rounds:
        nab = [r.nab.nab[p].normalised for p in PROFILES] if r.nab else [math.nan] * 3
        skab = r.skab.point if r.skab else None
        figures = [math.nan] * 3 if skab is None else [skab.f1, 100 * skab.far, 100 * skab.mar]
        rows.append([*nab, *figures])
    table = np.array(rows, dtype=np.float64)
    spec = (".1f", ".1f", ".1f", ".3f", ".1f", ".1f")
    out = [
        f"## {len(rounds)} training seeds (`--seeds`; the tables above are seed 0's)",
        "",
        "| seed | NAB standard | low FP | low FN | SKAB F1 | FAR % | MAR % |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r.seed} | " + " | ".join(fmt(v, f) for v, f in zip(row, spec, strict=True)) + " |"
            for r, row in zip(rounds, table, strict=True)
        ),
    ]
    mean, sd = table.mean(axis=0), table.std(axis=0, ddof=1)
    cells = [
        f"**{fmt(m, f)} ± {fmt(d, f)}**" if m == m else "-"
        for m, d, f in zip(mean, sd, spec, strict=True)
    ]
    out.append("| **mean ± sd** | " + " | ".join(cells) + " |")
    return [*out, ""]


# ---------------------------------------------------------------------------------------
# Leave-one-out: kept models re-scored in a pool of worker processes under scoring variants.

BASELINE = "baseline"
SKAB_FAR_LIMIT = 0.10  # the objective pays 100 a unit of SKAB false-alarm rate beyond this
VARIANT_KEYS = ("group", "scoring", "streams", "models")


@dataclass(frozen=True)
class Variant:
    """``[variants.NAME]`` of a ``--variants`` file: settings over the baseline's."""

    name: str
    group: str  # the variants of one setting share a group; a fold picks one of a group
    overrides: dict[str, dict[str, Any]]  # "scoring" / "streams" -> key -> value
    models: Path | None = None  # its own kept models (another training), or the baseline's


@dataclass(frozen=True)
class Settings:
    """What one replay is configured with: the baseline's or a variant's."""

    name: str
    scoring: ScoringConfig
    streams: StreamConfig


def read_variants(path: Path) -> list[Variant]:
    """The variants of a TOML file; every problem in one ConfigError."""
    doc = read_toml(path)
    problems = [f"{k}: unknown key (write [variants.NAME])" for k in doc if k != "variants"]
    tables = doc.get("variants", {})
    if not isinstance(tables, dict):
        tables, problems = {}, [*problems, "variants: expected tables [variants.NAME]"]
    out = []
    for name, body in tables.items():
        where = f"variants.{name}"
        if not isinstance(body, dict):
            problems.append(f"{where}: expected a table")
            continue
        problems += [f"{where}.{k}: unknown key" for k in body if k not in VARIANT_KEYS]
        sections = {k: body[k] for k in ("scoring", "streams") if k in body}
        problems += [f"{where}.{k}: expected a table" for k, v in sections.items()
                     if not isinstance(v, dict)]  # fmt: skip
        if not isinstance(body.get("group", ""), str):
            problems.append(f"{where}.group: expected a string")
        models = body.get("models")
        if models is not None and not (isinstance(models, str) and Path(models).is_dir()):
            problems.append(f"{where}.models: expected a folder that a --keep run wrote")
            models = None
        if name == BASELINE:
            problems.append(f"{where}: {BASELINE!r} names the project's settings")
        out.append(Variant(name, str(body.get("group", name)), sections,
                           None if models is None else Path(models)))  # fmt: skip
    if not tables:
        problems.append("no [variants.NAME] table")
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return out


def build_settings(name: str, base: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """``overrides`` over the baseline's document (a --config file's), built and checked as
    ``replay --config`` builds it, so a variant names any field the configuration has."""
    config, problems = build_config(merge(base, overrides))
    if problems:
        raise ConfigError(f"{name}: " + "; ".join(problems))
    return Settings(name, config.scoring, config.streams)


@dataclass(frozen=True)
class Rescored:
    """One kept model replayed under several settings: (anomaly_score, alert) per setting."""

    job: Job
    seed: int
    timestamps: np.ndarray | None
    scores: dict[str, tuple[np.ndarray, np.ndarray]]
    replay_s: dict[str, float]
    error: str | None = None


def as_written(score: np.ndarray) -> np.ndarray:
    """``anomaly_score`` as ``replay --out`` writes it (six decimals) and the bench reads it.

    >>> as_written(np.array([0.12345678, 0.5])).tolist()
    [0.123457, 0.5]
    """
    return np.array([float(f"{x:.6f}") for x in score])


def replay_settings(job: Job, seed: int, model_path: Path, settings: list[Settings]) -> Rescored:
    """Replay one kept model under each of ``settings``; runs in a worker process."""
    scores, times = {}, {}
    try:
        model = LoadedModel.load(model_path)
        table = read_csv(job.data, columns=model.meta.features)
        for s in settings:
            began = time.perf_counter()
            r = replay_table(model, table.values, table.timestamps, s.scoring, s.streams)
            times[s.name] = time.perf_counter() - began
            scores[s.name] = (as_written(r.score), np.asarray(r.alert, np.bool_))
    except RnnsentryError as exc:
        return Rescored(job, seed, None, {}, {}, f"{model_path}: {exc}")
    return Rescored(job, seed, table.timestamps, scores, times)


@dataclass
class Rescoring:
    """Every kept model re-scored under every settings, labelled for evaluation."""

    files: dict[tuple[str, int], dict[str, list[Labelled]]]  # (settings, seed) -> protocol ->
    # files in job order
    replay_s: dict[str, float]  # settings -> replay seconds, summed over files and seeds
    wall_s: float
    models: dict[int, Path]  # seed -> the folder its models were read from


def rescore(
    jobs: list[Job],
    models: Path,
    seeds: list[int],
    settings: list[Settings],
    windows: dict[str, list[tuple[float, float]]],
    workers: int = 2,
) -> Rescoring:
    """Replay the models kept under ``models`` (``--keep``'s layout) for ``seeds``, each file
    under every ``settings``, in ``workers`` processes (longest files first); never trains.
    A missing model or a failed replay raises RnnsentryError."""
    began = time.perf_counter()
    roots = {seed: seed_dir(models, seed, len(seeds)) for seed in seeds}
    tasks = [(job, seed, model_file(roots[seed], job)) for seed in seeds for job in jobs]
    missing = [str(path) for _, _, path in tasks if not path.exists()]
    if missing:
        raise RnnsentryError(f"{len(missing)} model(s) missing, first {missing[0]}")
    tasks.sort(key=lambda t: -t[0].rows)
    done: list[Rescored] = []
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding onnxruntime
    with ProcessPoolExecutor(max_workers=max(workers, 1), mp_context=spawn) as pool:
        futures = [pool.submit(replay_settings, j, s, p, settings) for j, s, p in tasks]
        for future in as_completed(futures):
            done.append(future.result())
            if len(done) % max(len(tasks) // 10, 1) == 0:
                print(f"  re-scored {len(done)}/{len(tasks)} files", file=sys.stderr)
    failed = [r.error for r in done if r.error]
    if failed:
        raise RnnsentryError(f"{len(failed)} replay(s) failed, first {failed[0]}")
    events: dict[str, tuple[tuple[int, int], ...]] = {}
    by_task = {(r.job, r.seed): r for r in done}
    files: dict[tuple[str, int], dict[str, list[Labelled]]] = {}
    for seed in seeds:
        for job in jobs:
            r = by_task[job, seed]
            if job.key not in events:
                events[job.key] = (
                    windows_to_events(windows[job.key], r.timestamps, str(job.data))
                    if job.protocol == "nab"
                    else label_runs(read_label_column(job.data, "anomaly"))
                )
            for s in settings:
                score, alert = r.scores[s.name]
                labelled = Labelled(job.key, score, alert, events[job.key], r.timestamps)
                files.setdefault((s.name, seed), {}).setdefault(job.protocol, []).append(labelled)
    replay_s = {s.name: sum(r.replay_s[s.name] for r in done) for s in settings}
    return Rescoring(files, replay_s, time.perf_counter() - began, roots)


def rescore_each(
    jobs: list[Job],
    roots: dict[str, Path],
    seeds: list[int],
    settings: list[Settings],
    windows: dict[str, list[tuple[float, float]]],
    workers: int = 2,
) -> Rescoring:
    """:func:`rescore` of each settings on its own models (``roots``: settings -> folder),
    the settings that share a folder in one pass; the baseline's folder is what
    ``check_kept_csv`` reads."""
    by_root: dict[Path, list[Settings]] = {}
    for s in settings:
        by_root.setdefault(roots[s.name], []).append(s)
    parts = [rescore(jobs, root, seeds, group, windows, workers) for root, group in by_root.items()]
    out = next(p for p in parts if BASELINE in p.replay_s)
    for p in parts:
        if p is not out:
            out.files.update(p.files)
            out.replay_s.update(p.replay_s)
            out.wall_s += p.wall_s
    return out


def fleet_work(roots: dict[str, Path], baseline: Path) -> dict[str, Path]:
    """Where the fleet bench finds each settings' models: its folder's ``fleet/`` when a
    variant's own --keep run trained the fleet there, else the baseline's (``train`` flags
    do not reach the fleet bench's training)."""
    out = {}
    for name, root in roots.items():
        own = root / "fleet"
        out[name] = own if own.is_dir() and any(own.glob("*.onnx")) else baseline / "fleet"
    return out


def check_kept_csv(rescoring: Rescoring, seed: int) -> str:
    """A line: do the in-process baseline scores equal the CSVs the --keep run wrote?"""
    compared, differ = 0, []
    for protocol, files in rescoring.files[BASELINE, seed].items():
        for f in files:
            path = rescoring.models[seed] / protocol / f.name
            if not path.exists():
                continue
            kept = read_scores(path)
            compared += 1
            if not (
                np.array_equal(kept.score, f.score, equal_nan=True)
                and np.array_equal(kept.alert, f.alert)
            ):
                differ.append(f"{protocol}/{f.name}")
    where = f"seed {seed} in {rescoring.models[seed]}"
    if not compared:
        return f"check: no kept CSV to compare the in-process baseline with ({where})"
    if not differ:
        return (
            f"check: the in-process baseline equals the kept CSVs' anomaly_score and alert on"
            f" {compared}/{compared} files ({where})"
        )
    return (
        f"**WARNING: the in-process baseline differs from the kept CSVs on {len(differ)}/"
        f"{compared} files ({where}; first {differ[0]}): CSVs written with other settings or"
        " another detector version?**"
    )


def nab_subset(files: list[Labelled]) -> NabResult:
    """NAB standard profile over ``files``, one threshold optimised over them all."""
    corpus = [(f.score, f.events, nab_probation_rows(len(f.score))) for f in files]
    return nab_corpus(corpus, PROFILES["standard"])


def nab_at(files: list[Labelled], threshold: float) -> float:
    """NAB standard profile over ``files`` at a given threshold, normalised like a corpus."""
    standard = PROFILES["standard"]
    windows = sum(len(f.events) for f in files)
    raw = sum(
        nab_file_score(f.score, f.events, threshold, standard, nab_probation_rows(len(f.score))).raw
        for f in files
    )
    return 100 * (raw + windows * standard.a_fn) / (windows * (standard.a_tp + standard.a_fn))


def category(f: Labelled) -> str:
    return f.name.split("/")[0]


@dataclass(frozen=True)
class Figures:
    """One settings on one seed's models. Per NAB category c (also the fold holding c out):
    ``own``: c at its own optimised threshold; ``corpus``: c at the threshold of all the
    categories; ``pair``: the other categories, one threshold optimised over them; ``held``:
    c at ``pair``'s threshold, which c took no part in choosing."""

    total: float  # NAB standard over every category
    own: dict[str, float]
    corpus: dict[str, float]
    pair: dict[str, float]
    held: dict[str, float]
    skab: PointMetrics | None

    def objective(self, fold: str) -> float:
        """What a fold chooses on: ``pair`` + 100 SKAB F1 - 100 max(0, FAR - 0.10)."""
        if self.skab is None:
            return self.pair[fold]
        f1 = 0.0 if math.isnan(self.skab.f1) else self.skab.f1
        far = 0.0 if math.isnan(self.skab.far) else self.skab.far
        return self.pair[fold] + 100 * f1 - 100 * max(0.0, far - SKAB_FAR_LIMIT)


def figures(files: dict[str, list[Labelled]]) -> Figures:
    nab, skab = files.get("nab", []), files.get("skab", [])
    cats = sorted({category(f) for f in nab})
    total = nab_subset(nab) if nab else None
    own, corpus, pair, held = {}, {}, {}, {}
    for c in cats:
        mine = [f for f in nab if category(f) == c]
        rest = nab_subset([f for f in nab if category(f) != c])
        own[c] = nab_subset(mine).normalised
        corpus[c] = nab_at(mine, total.threshold) if total else math.nan
        pair[c], held[c] = rest.normalised, nab_at(mine, rest.threshold)
    point = evaluate(skab, skip_rows=SKAB_TRAIN_ROWS).point if skab else None
    return Figures(total.normalised if total else math.nan, own, corpus, pair, held, point)


def mean_sd(values: Any, spec: str = ".1f") -> str:
    """Mean ± sample standard deviation over seeds ("-" for NaN).

    >>> mean_sd([1.0, 2.0, 3.0]), mean_sd([0.5], "+.2f")
    ('2.0 ± 1.0', '+0.50')
    """
    a = np.asarray(values, dtype=np.float64)
    if not a.size or np.isnan(a).any():
        return "-"
    m = format(a.mean(), spec)
    return m if a.size < 2 else f"{m} ± {format(a.std(ddof=1), spec.lstrip('+'))}"


def gains(values: Any) -> str:
    """Seeds with a gain, of all: "4/5"."""
    a = np.asarray(values, dtype=np.float64)
    return "-" if np.isnan(a).any() else f"{int((a > 0).sum())}/{a.size}"


def loo_group(
    group: str, candidates: list[str], figs: dict[str, list[Figures]], folds: list[str]
) -> list[str]:
    """One group's leave-one-out: per fold the pick, its gains, then the verdict."""

    def per_seed(name: str, of: Any) -> np.ndarray:
        return np.array([of(f) for f in figs[name]], dtype=np.float64)

    out = [
        f"### {group}: candidates {', '.join(candidates)}",
        "",
        "Chosen-on objective per fold, mean ± sd over seeds; the pick in bold.",
        "",
        "| held out | " + " | ".join(f"objective: {n}" for n in candidates) + " |",
        "|---|" + "---|" * len(candidates),
    ]
    picks = {}
    for c in folds:
        objective = {n: per_seed(n, lambda f, c=c: f.objective(c)) for n in candidates}
        picks[c] = max(candidates, key=lambda n: (objective[n].mean(), n == BASELINE))
        out.append(
            f"| {c} | "
            + " | ".join(
                f"**{mean_sd(objective[n])}**" if n == picks[c] else mean_sd(objective[n])
                for n in candidates
            )
            + " |"
        )
    out += [
        "",
        "| held out | picked | chosen-on objective gain | held-out NAB: baseline | picked |"
        " gain | seeds gaining | at its own threshold: gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    held_gain = {}
    for c in folds:
        n = picks[c]
        base = per_seed(BASELINE, lambda f, c=c: f.held[c])
        if n == BASELINE:
            out.append(f"| {c} | {BASELINE} | - | {mean_sd(base)} | - | - | - | - |")
            continue
        objective = per_seed(n, lambda f, c=c: f.objective(c)) - per_seed(
            BASELINE, lambda f, c=c: f.objective(c)
        )
        picked = per_seed(n, lambda f, c=c: f.held[c])
        own = per_seed(n, lambda f, c=c: f.own[c]) - per_seed(BASELINE, lambda f, c=c: f.own[c])
        held_gain[c] = picked - base
        out.append(
            f"| {c} | {n} | {mean_sd(objective, '+.1f')} | {mean_sd(base)} | {mean_sd(picked)} |"
            f" {mean_sd(held_gain[c], '+.1f')} | {gains(held_gain[c])} | {mean_sd(own, '+.1f')} |"
        )
    lost = [c for c, g in held_gain.items() if not g.mean() > 0]
    if not held_gain:
        verdict = "**not kept**: the baseline has the best chosen-on objective in every fold"
    elif lost:
        verdict = "**not kept**: no held-out gain when holding out " + ", ".join(
            f"{c} ({picks[c]}, {mean_sd(held_gain[c], '+.1f')})" for c in lost
        )
    else:
        verdict = "**kept**: a held-out gain in every fold that picked a variant: " + ", ".join(
            f"{c} ({picks[c]}, {mean_sd(held_gain[c], '+.1f')})" for c in held_gain
        )
    return [*out, "", f"{group}: {verdict}", ""]


def loo_tables(
    figs: dict[str, list[Figures]], variants: list[Variant], seeds: list[int]
) -> list[str]:
    """The leave-one-out report: how it chooses, each group's folds and verdict, every
    variant's figures (its costs too), and the baseline's per category."""
    base = figs[BASELINE]
    folds = sorted(base[0].own)
    have_skab = base[0].skab is not None
    skab = " + 100 x SKAB F1 - 100 x max(0, SKAB FAR - 0.10)" if have_skab else ""
    out = [
        f"## Leave-one-out over {len(seeds)} training seed(s): {len(variants)} variant(s) in"
        f" {len({v.group for v in variants})} group(s)",
        "",
        f"Each fold holds one NAB category out. A group's candidates (the baseline among them)"
        f" are ranked by the chosen-on objective, NAB standard on the other categories (one"
        f" threshold optimised over them){skab}, mean over seeds; the pick is then scored on"
        f" the held-out category at the chosen-on categories' threshold (and, for reference,"
        f" at its own optimised threshold). NAB scores are normalised per subset. Gains are"
        f" against the baseline, seed by seed: mean ± sd.",
        "",
    ]
    if len(folds) < 2:
        out += ["(leave-one-out needs at least two NAB categories; see the variant table)", ""]
    else:
        for group in dict.fromkeys(v.group for v in variants):
            candidates = [BASELINE, *(v.name for v in variants if v.group == group)]
            out += loo_group(group, candidates, figs, folds)
    return out + variant_table(figs, variants, folds) + baseline_table(figs[BASELINE], folds)


def variant_table(
    figs: dict[str, list[Figures]], variants: list[Variant], folds: list[str]
) -> list[str]:
    base = np.array([f.total for f in figs[BASELINE]])
    head = ["variant", "group", *folds, "NAB all", "gain", "seeds gaining", "SKAB F1", "FAR %"]
    out = [
        "### Every variant (NAB standard, categories at the all-category threshold)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, group in [(BASELINE, "-"), *((v.name, v.group) for v in variants)]:
        f = figs[name]
        total = np.array([x.total for x in f])
        skab = [x.skab for x in f if x.skab is not None]
        cells = "".join(f" {mean_sd([x.corpus[c] for x in f])} |" for c in folds)
        out.append(
            f"| {name} | {group} |{cells} {mean_sd(total)} |"
            f" {'-' if name == BASELINE else mean_sd(total - base, '+.1f')} |"
            f" {'-' if name == BASELINE else gains(total - base)} |"
            f" {mean_sd([p.f1 for p in skab], '.3f') if skab else '-'} |"
            f" {mean_sd([100 * p.far for p in skab]) if skab else '-'} |"
        )
    return [*out, ""]


def baseline_table(base: list[Figures], folds: list[str]) -> list[str]:
    out = ["### Baseline (mean ± sd over seeds)", ""]
    if folds:
        out += [
            "| NAB category (standard) | at the all-category threshold | at its own threshold |"
            " held out: at the other categories' threshold | the other categories, their"
            " threshold |",
            "|---|---|---|---|---|",
        ]
        out += [
            f"| {c} | {mean_sd([f.corpus[c] for f in base])} | {mean_sd([f.own[c] for f in base])}"
            f" | {mean_sd([f.held[c] for f in base])} | {mean_sd([f.pair[c] for f in base])} |"
            for c in folds
        ]
        out += [f"| **all** | **{mean_sd([f.total for f in base])}** | | | |", ""]
    skab = [f.skab for f in base if f.skab is not None]
    if skab:
        out.append(
            f"SKAB valve1 (alert, rows after the first {SKAB_TRAIN_ROWS}): F1"
            f" {mean_sd([p.f1 for p in skab], '.3f')}, FAR {mean_sd([100 * p.far for p in skab])}"
            f" %, precision {mean_sd([p.precision for p in skab], '.3f')}, recall"
            f" {mean_sd([p.recall for p in skab], '.3f')}"
        )
    return [*out, ""]


def fleet_lines(
    settings: list[Settings], seeds: list[int], work: Path | dict[str, Path]
) -> list[str]:
    """The fleet bench (bench/fleet.py) under every settings, each on the models in ``work``
    (one folder, or one per settings): a table per class of the share caught while
    happening, and false alerts per 100k normal samples, mean ± sd over seeds. No setting
    was chosen on it: for a variant, the fleet is data it was not chosen on."""
    from fleet import ANOMALY_KINDS, _cell, _class_figures, fleet_table, run_fleet

    began = time.perf_counter()
    works = work if isinstance(work, dict) else {s.name: work for s in settings}
    for folder in set(works.values()):
        folder.mkdir(parents=True, exist_ok=True)
    results = {s.name: [run_fleet(seed, s.scoring, works[s.name]) for seed in seeds]
               for s in settings}  # fmt: skip
    out = [
        f"## Fleet bench (bench/fleet.py): {len(seeds)} seed(s), one model per seed served to"
        " machines it was not trained on",
        "",
    ]
    if len(settings) == 1:
        out += fleet_table(results[settings[0].name])
    else:
        out += [
            "| settings | " + " | ".join(ANOMALY_KINDS) + " | false alerts / 100k |",
            "|---" * (len(ANOMALY_KINDS) + 2) + "|",
        ]
        for name, rs in results.items():
            caught = [
                _cell([_class_figures(r, kind)[1] for r in rs], ".1f") for kind in ANOMALY_KINDS
            ]
            false = _cell([r.false_per_100k() for r in rs], ".2f")
            out.append(f"| {name} | " + " | ".join(caught) + f" | {false} |")
        out += ["", "caught while happening, % (mean ± sd over seeds)"]
    out += ["", f"fleet bench: {time.perf_counter() - began:.0f} s", ""]
    return out


def run_loo(args: argparse.Namespace, jobs: list[Job], windows: Any) -> int:
    """``--variants``: re-score the models of ``--models`` and print the leave-one-out."""
    seeds = list(range(max(args.seeds, 1)))
    try:
        if not args.models:
            raise ConfigError("--variants re-scores kept models: give --models DIR")
        variants = read_variants(Path(args.variants))
        base = read_toml(args.config) if args.config else {}
        settings = [build_settings(BASELINE, base, {})]
        settings += [build_settings(v.name, base, v.overrides) for v in variants]
        # the models each settings replays: the baseline's, or a variant's own
        roots = {BASELINE: Path(args.models), **{v.name: v.models or Path(args.models)
                                                  for v in variants}}  # fmt: skip
        print(
            f"leave-one-out: {len(jobs)} files x {len(seeds)} seed(s) x {len(settings)} settings"
            f" (baseline: {args.config or 'project defaults'}; variants: {args.variants}),"
            f" models from {args.models}"
            + "".join(f" ({v.name}'s from {v.models})" for v in variants if v.models)
            + f", {args.jobs} process(es), {os.cpu_count()} CPU(s)\n"
        )
        rescoring = rescore_each(jobs, roots, seeds, settings, windows, args.jobs)
    except RnnsentryError as exc:
        print(f"quality: {exc}", file=sys.stderr)
        return 2
    figs = {s.name: [figures(rescoring.files[s.name, seed]) for seed in seeds] for s in settings}
    lines = [check_kept_csv(rescoring, seeds[0]), "", *loo_tables(figs, variants, seeds)]
    if not args.no_fleet:
        lines += fleet_lines(settings, seeds, fleet_work(roots, Path(args.models)))
    per = rescoring.replay_s[BASELINE] / len(seeds)
    lines.append(
        f"**re-scored in {rescoring.wall_s:.0f} s wall** ({args.jobs} process(es)); one settings"
        f" over the {len(jobs)} files of one seed: {per:.0f} s of replay (the sum over files)"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
