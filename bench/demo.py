"""The demo's detection over several seeds, in-process: `rnnsentry demo`'s model, fleet and
judging, without the broker or the wall clock.

Per seed it trains the demo's model (or reuses it from ``--work``), replays the demo's live
fleet through one ``Engine`` (every pump one sample a step, the values rounded as the demo
publishes them) and judges the alerts as the demo does: caught (raised inside the anomaly),
late (within the grace after it), missed, and false alerts, at the default settings, as the
demo scores. An anomaly that starts inside a stream's warm-up cannot be caught there;
``--after-warmup`` places the anomalies after each model's own warm-up instead of after the
demo's fixed lead (a different draw of them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detector.artifact import ModelMeta  # noqa: E402
from detector.engine import Engine  # noqa: E402
from detector.model import LoadedModel  # noqa: E402
from detector.scoring import ScoringConfig  # noqa: E402
from detector.scoring.scorer import warmup_steps  # noqa: E402
from training.demo.scenario import (  # noqa: E402
    LEAD_STEPS,
    MARGIN_STEPS,
    _Seen,
    judge,
    live_fleet,
    train_demo_model,
)

VERDICTS = ("caught", "late", "MISSED")


def demo_model(seed: int, streams: int, rate: float, work: Path) -> Path:
    """The seed's demo model, trained once into ``work``."""
    path = work / f"demo-{streams}x{rate:g}-seed{seed}.onnx"
    if not path.exists():
        train_demo_model(seed, streams, 1.0 / rate, path)
    return path


def run_seed(
    seed: int, streams: int, duration_s: float, rate: float, work: Path, after_warmup: bool
) -> tuple[list[tuple[str, str]], int]:
    """One seed: each anomaly's (kind, verdict), and the false alerts."""
    path = demo_model(seed, streams, rate, work)
    model = LoadedModel.load(path)
    meta: ModelMeta = model.meta
    scoring = ScoringConfig()
    lead = warmup_steps(scoring, meta.calibration) if after_warmup else LEAD_STEPS
    live = live_fleet(seed, streams, duration_s, rate, lead)
    engine = Engine(model, scoring)
    names = [f"pump-{i + 1:02d}" for i in range(streams)]
    interval = 1.0 / rate
    values = np.round(live.values, 4)  # as the demo publishes them
    raised = []
    for t in range(values.shape[1]):
        ts = t * interval
        result = engine.process(names, np.full(streams, ts), values[:, t], now=ts)
        raised += [_Seen(names[e.index], "raised", ts, t, 1.0, "") for e in result.events
                   if e.event == "raised"]  # fmt: skip
    verdicts, false_alerts = judge(live.anomalies, raised)
    return [(v.kind, v.verdict) for v in verdicts], false_alerts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (%(default)s)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds (%(default)s)")
    parser.add_argument("--streams", type=int, default=20, help="pumps (%(default)s)")
    parser.add_argument("--rate", type=float, default=10.0, help="samples/s a pump (%(default)s)")
    parser.add_argument(
        "--after-warmup",
        action="store_true",
        help="the anomalies after each model's own warm-up, not the demo's lead",
    )
    parser.add_argument("--work", metavar="DIR", help="keep the models here and reuse them")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.duration <= 0 or args.rate <= 0 or args.streams < 1:
        parser.error("--seeds, --duration, --rate and --streams must be positive")
    began = time.perf_counter()
    per_seed = []
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with contextlib.ExitStack() as stack:
        if args.work:
            work = Path(args.work)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rnnsentry-demo-")))
        for seed in range(args.seeds):
            outcomes, false_alerts = run_seed(seed, args.streams, args.duration, args.rate,
                                              work, args.after_warmup)  # fmt: skip
            counts = collections.Counter(verdict for _, verdict in outcomes)
            per_seed.append((seed, counts, false_alerts))
            for kind, verdict in outcomes:
                by_kind[kind][verdict] += 1
    where = ("after each model's warm-up" if args.after_warmup
             else f"after {LEAD_STEPS + MARGIN_STEPS} steps")  # fmt: skip
    print(
        f"demo, in-process: {args.streams} pumps, {args.duration:g} s at {args.rate:g} Hz,"
        f" default settings, the anomalies {where}; seeds 0..{args.seeds - 1}\n"
    )
    print("| seed | caught | late | missed | false alerts |")
    print("|---|---|---|---|---|")
    for seed, counts, false_alerts in per_seed:
        print(f"| {seed} | {' | '.join(str(counts[v]) for v in VERDICTS)} | {false_alerts} |")
    total = sum((c for _, c, _ in per_seed), collections.Counter())
    print(f"| all | {' | '.join(f'**{total[v]}**' for v in VERDICTS)} |"
          f" **{sum(f for _, _, f in per_seed)}** |\n")  # fmt: skip
    print("| class | caught | late | missed |")
    print("|---|---|---|---|")
    for kind in sorted(by_kind):
        print(f"| {kind} | {' | '.join(str(by_kind[kind][v]) for v in VERDICTS)} |")
    print(f"\n**wall time {time.perf_counter() - began:.0f} s**")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
