"""Detection quality on the NAB and SKAB development subsets, run exactly as a user would.

Per file: ``python -m detector train ... --quiet`` then ``python -m detector replay ...``
as subprocesses in a temporary directory (``--jobs`` files at once, longest first); the
outputs are scored with ``training.evaluate`` and printed as markdown tables beside the
published figures of ``../shared/datasets/README.md``, with the wall time. Not a test.

    .venv/bin/python bench/quality.py [--nab DIR] [--skab DIR] [--jobs 2] [--only nab]
        [--train-args="--epochs 10 --hidden 16"] [--config scoring.toml] [--per-file] [--seeds 3]

NAB: train on the probationary rows min(floor(0.15 n), 750) of ``value``, replay the whole
file, NAB scores of ``anomaly_score`` over the corpus (one threshold per profile, NAB's
probation). SKAB (valve1): train on the first 400 rows of the eight sensors, replay, F1 /
FAR / MAR of ``alert`` on the rows after the first 400, pooled over the files.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detector.csvdata import read_csv
from detector.errors import RnnsentryError
from training.evaluate import (
    Labelled,
    Report,
    evaluate,
    label_runs,
    read_label_column,
    read_scores,
    read_windows,
    windows_to_events,
)
from training.nab import PROFILES, nab_file_score, nab_probation_rows

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
    """Train then replay one file through the command line; the first failure is kept."""
    scores = work / job.protocol / job.key  # e.g. nab/realKnownCause/nyc_taxi.csv
    scores.parent.mkdir(parents=True, exist_ok=True)
    model = scores.with_suffix(".onnx")
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
    times = []
    for argv in (train, replay):
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

    print(
        f"detection quality: {len(jobs)} files, {args.jobs} at a time, {os.cpu_count()} CPU(s),"
        f" Python {platform.python_version()}; train flags: project defaults"
        f"{' + ' + args.train_args if args.train_args else ''}; scoring:"
        f" {args.config or 'project defaults'}"
        + (f"; training seeds 0..{args.seeds - 1}" if args.seeds > 1 else "")
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


if __name__ == "__main__":
    sys.exit(main())
