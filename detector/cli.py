"""The ``rnnsentry`` command line: run, replay, inspect here; train, synth, evaluate, demo and
plot from the ``training`` package.

Those commands are named in one table (:data:`_TRAINING_COMMANDS`) and their modules are
imported by name only when chosen, so the daemon's commands never load torch or matplotlib
and no module here imports ``training``; ``replay --plot`` reaches the plot command's module
through the same table. Any :class:`RnnsentryError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from detector import __version__
from detector.errors import ConfigError, RnnsentryError
from detector.labelargs import add_label_arguments
from detector.logs import configure

if TYPE_CHECKING:
    from detector.scoring import Calibration, RelationsPrior, ScoringConfig

log = logging.getLogger("rnnsentry")

# Commands of the training package: name -> (module, add-arguments fn, run fn, help).
_TRAINING_COMMANDS = {
    "train": ("training.trainer.cli", "add_train_arguments", "run_train",
              "fit a recurrent model on CSV data and export it to ONNX"),
    "synth": ("training.evaluation.synth", "add_synth_arguments", "run_synth",
              "write a synthetic sensor fleet with labelled anomalies to CSV"),
    "evaluate": ("training.evaluation.evaluate", "add_evaluate_arguments", "run_evaluate",
                 "score replay output against labels (point-wise, event and NAB scores)"),
    "demo": ("training.demo.scenario", "add_demo_arguments", "run_demo",
             "train, start a broker and the daemon, replay a fleet with anomalies"),
    "plot": ("training.evaluation.plot", "add_plot_arguments", "run_plot",
             "draw replay output: features, anomaly score and threshold, alerts, labelled windows"),
}  # fmt: skip


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="configuration file")
    p.add_argument("--broker", metavar="mqtt://HOST:PORT", help="broker URL (mqtts:// for TLS)")
    p.add_argument("--model", metavar="MODEL.onnx", help="model file (replaces [[models]])")
    p.add_argument("--topic", metavar="TEMPLATE", action="append",
                   help="input topic template, e.g. 'sensors/{stream}' (repeatable)")  # fmt: skip
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="Prometheus port")
    p.add_argument("--instance", metavar="NAME", help="instance name (status topic, client id)")
    p.add_argument("--check-config", action="store_true",
                   help="print every configuration problem and exit (1 if any)")  # fmt: skip


def _add_replay(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL.onnx")
    p.add_argument("--data", required=True, metavar="FILE.csv")
    p.add_argument("--out", required=True, metavar="SCORES.csv")
    p.add_argument("--timestamp-col", metavar="C", help="timestamp column (default: detected)")
    p.add_argument("--config", metavar="FILE.toml", help="take [scoring] and [streams] from here")
    p.add_argument(
        "--plot",
        metavar="P.png",
        help="also draw the output (see rnnsentry plot; needs matplotlib)",
    )
    add_label_arguments(p, "with --plot: ")


def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="show the alert thresholds of this file's [scoring], as run applies them"
        " (default: the defaults)",
    )
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")


def _training_module(command: str) -> Any:
    """The module of one of the training package's commands, imported now."""
    return importlib.import_module(_TRAINING_COMMANDS[command][0])


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; a training command's own arguments are loaded only when it is chosen."""
    parser = argparse.ArgumentParser(
        prog="rnnsentry",
        description="Streaming sensor-anomaly detection with recurrent networks over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"rnnsentry {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, add, _, help_text) in _TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(_training_module(name), add)(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    local = (
        ("run", _add_run, "run the daemon: MQTT in, alerts and metrics out"),
        ("replay", _add_replay, "score a CSV file row by row through the daemon's scoring path"),
        ("inspect", _add_inspect, "show a model file's metadata, graph and parity figure"),
    )
    for name, add_fn, help_text in local:
        add_fn(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    before = argparse.ArgumentParser(add_help=False)  # the options that go before the command
    before.add_argument("--log-level")
    rest = before.parse_known_args(args_list)[1]
    command = next((a for a in rest if not a.startswith("-")), None)
    args = build_parser(command).parse_args(args_list)
    # The daemon and the demo say what they do; one-shot commands speak only when it matters.
    default_level = "INFO" if args.command in ("run", "demo") else "WARNING"
    configure(args.log_level or os.environ.get("RNNSENTRY_LOG_LEVEL") or default_level)
    try:
        if args.command in _TRAINING_COMMANDS:
            run = _TRAINING_COMMANDS[args.command][2]
            return int(getattr(_training_module(args.command), run)(args))
        return {"run": cmd_run, "replay": cmd_replay, "inspect": cmd_inspect}[args.command](args)
    except RnnsentryError as exc:
        print(f"rnnsentry: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    if args.broker:
        flags["mqtt"] = {"broker": args.broker}
    if args.metrics_port is not None:
        flags["metrics"] = {"port": args.metrics_port}
    if args.instance:
        flags["daemon"] = {"instance": args.instance}
    if args.model:
        model: dict[str, Any] = {"path": args.model}
        if args.topic:
            model["topics"] = args.topic
        flags["models"] = [model]
    return flags


def cmd_run(args: argparse.Namespace) -> int:
    from detector.config import load_config, merge, read_toml
    from detector.daemon import Daemon, preflight
    from detector.notify import Notifier

    flags = _run_flags(args)
    if args.log_level:  # the flag wins over the file and the environment, in every process
        flags.setdefault("daemon", {})["log_level"] = args.log_level
    if args.topic and not args.model:
        # --topic alone retargets the single model of the config file.
        doc = read_toml(args.config) if args.config else {}
        models = doc.get("models") or []
        if len(models) != 1:
            raise ConfigError("--topic without --model needs exactly one [[models]] in the config")
        flags["models"] = [merge(models[0], {"topics": args.topic})]
    config, problems = load_config(args.config, flags=flags)
    if args.check_config:
        if not config.models:
            problems.append("models: no model configured (give --model or [[models]])")
        elif not problems:  # what start would meet: files, secrets, the port
            problems.extend(preflight(config))
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    if problems:
        raise ConfigError("; ".join(problems))
    configure(config.daemon.log_level, config.daemon.log_format)
    problems = preflight(config)  # before anything starts: one line, exit 2
    if problems:
        raise ConfigError("; ".join(problems))
    daemon = Daemon(config, notifier=Notifier())  # systemd's $NOTIFY_SOCKET, if it set one
    stop = threading.Event()
    signals = {"count": 0}

    def on_stop(signum: int, frame: FrameType | None) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            os._exit(1)  # a second signal: leave at once
        log.info("signal %d: stopping", signum)
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    daemon.start()
    try:
        while not (stop.wait(0.5) or daemon.failed.is_set()):
            pass
    finally:
        daemon.stop()
    if daemon.failure:
        log.error("stopped because %s", daemon.failure)
        return 1
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from detector.config import load_config
    from detector.model import LoadedModel
    from detector.replay import replay_csv

    config, problems = load_config(args.config, environ={})
    if problems:
        raise ConfigError("; ".join(problems))
    labelled = args.windows or args.labels or args.key
    if labelled and not args.plot:
        raise ConfigError("--windows, --labels and --key go with --plot")
    if args.plot:
        plot = _training_module("plot")  # only now: replay alone never loads the plot module
        plot.require_matplotlib("--plot")
        labels = plot.load_labels(windows=args.windows, key=args.key, labels=args.labels,
                                  label_col=args.label_col, stem=Path(args.data).stem)  # fmt: skip
    model = LoadedModel.load(args.model)
    result = replay_csv(
        model, args.data, args.out, config.scoring, config.streams, args.timestamp_col
    )
    print(
        f"replayed {len(result.raw)} rows of {args.data} -> {args.out}:"
        f" {result.raised} alert(s) raised, {int(result.alert.sum())} row(s) in alert,"
        f" {result.skipped} row(s) with missing values skipped"
    )
    if args.plot:
        drawn = plot.plot_with_labels(args.out, args.plot, labels, threshold=config.scoring)
        print(plot.summary(drawn, args.out))
    return 0


def alert_rule_text(scoring: ScoringConfig) -> str:
    r"""The alert rule the daemon applies, in words, from its thresholds.

    >>> from detector.scoring import ScoringConfig
    >>> rule = ScoringConfig(threshold=0.99999999, clear_threshold=0.99, clear_steps=20)
    >>> print(alert_rule_text(rule).replace("; ", "\n"))
    raise at likelihood >= 0.99999999 (tail 1e-08, alert_score 0.5) of the alert's average
    clear below 0.99 for 20 steps
    """
    import numpy as np

    from detector.scoring import log_score

    tail = 1.0 - scoring.threshold
    alert_score = float(log_score(np.array([tail]))[0])
    return (
        f"raise at likelihood >= {scoring.threshold:.12g} (tail {tail:.3g}, alert_score"
        f" {alert_score:.3g}) of the alert's average; clear below"
        f" {scoring.clear_threshold:.12g} for {scoring.clear_steps} steps"
    )


def tail_text(features: list[str], rate: list[float] | None, excess: list[float] | None) -> str:
    """What the per-step check's tail starts from, per feature.

    >>> tail_text(["a", "b"], [0.0027, 0.05], [0.92, 210.0])
    'held-out errors beyond 3 sd, share and mean excess: a 0.27 % 0.92, b 5 % 210'
    >>> tail_text(["a"], None, None)
    "a Gaussian's (a file from before the model measured it)"
    """
    if rate is None or excess is None:
        return "a Gaussian's (a file from before the model measured it)"
    parts = [f"{name} {100 * r:.2g} % {b:.3g}"
             for name, r, b in zip(features, rate, excess, strict=True)]  # fmt: skip
    return "held-out errors beyond 3 sd, share and mean excess: " + ", ".join(parts)


def skip_text(skip: str, features: list[str], gains: Any) -> str:
    """What each prediction starts from, for ``inspect``: the last input, or each sensor's
    smoothed level with the gain the training learnt for it (``training.level_gain``).

    >>> skip_text("level", ["a", "b"], [0.5, 0.934])
    "each sensor's smoothed level (state 'level'), gain a 0.5, b 0.93"
    >>> skip_text("input", ["a"], None)
    'the last input (a file from before the smoothed level)'
    """
    if skip != "level":
        return "the last input (a file from before the smoothed level)"
    text = "each sensor's smoothed level (state 'level')"
    if not (isinstance(gains, list) and len(gains) == len(features)):
        return text
    pairs = zip(features, gains, strict=True)
    return text + ", gain " + ", ".join(f"{n} {float(g):.2g}" for n, g in pairs)


def lag_text(features: list[str], lag: list[float] | None) -> str:
    """What the surprise takes out of each error: the model's lag-one autocorrelation.

    >>> lag_text(["a", "b"], [-0.312, 0.04])
    'each error less what the last one foretells: a -0.31, b 0.04'
    >>> lag_text(["a"], None)
    'none: the errors as they come (a file from before the model measured it)'
    """
    if lag is None or not any(lag):
        return "none: the errors as they come (a file from before the model measured it)"
    parts = [f"{name} {r:.2g}" for name, r in zip(features, lag, strict=True)]
    return "each error less what the last one foretells: " + ", ".join(parts)


def warmup_text(scoring: ScoringConfig, cal: Calibration) -> str:
    """The warm-up the daemon applies to a new stream, and where it comes from.

    >>> from detector.scoring import Calibration, ScoringConfig
    >>> cal = Calibration(100, 1.0, 1.0, {}, 20, 1.0, 0.5, 0.9999, settle_steps=140)
    >>> warmup_text(ScoringConfig(), cal)
    '140 steps: the network settles from a cold start in 140'
    >>> warmup_text(ScoringConfig(warmup_steps=5), cal)
    '5 steps: [scoring] warmup_steps (the network settles in 140)'
    """
    from detector.scoring.scorer import warmup_steps

    steps = warmup_steps(scoring, cal)
    settle = cal.settle_steps
    if scoring.warmup_steps >= 0:
        said = "not measured" if settle is None else f"settles in {settle}"
        return f"{steps} steps: [scoring] warmup_steps (the network {said})"
    if settle is None:
        return f"{steps} steps: the least warm-up (a file from before the model measured it)"
    if steps > settle:
        return f"{steps} steps: the least warm-up (the network settles in {settle})"
    return f"{steps} steps: the network settles from a cold start in {settle}"


def relations_text(prior: RelationsPrior | None, enabled: bool, weight: float | None = None) -> str:
    """Whether the daemon watches each sensor against the others for this model, and why;
    with ``weight``, how many of a stream's own samples the model's relations count as.

    >>> from detector.scoring import RelationsPrior
    >>> relations_text(None, True)
    'off: the model file has none (one sensor, or a file from before it)'
    >>> old = RelationsPrior([[1.0, 0.0], [0.0, 1.0]], 50, [0.3, 0.2], 900)
    >>> for part in relations_text(old, True, 5.0).split("; "):
    ...     print(part)
    on: 2 sensors against the others (a file from before their averages joined)
    covariance and 50-step average spreads from 900 held-out steps
    they count as 5 of a stream's own samples, which take over from there
    """
    if prior is None:
        return "off: the model file has none (one sensor, or a file from before it)"
    if not enabled:
        return "off: relations_check = false"
    f = len(prior.average_var)
    against = (
        f"against the others' values and {prior.window}-step averages"
        if len(prior.covariance) == 2 * f
        else "against the others (a file from before their averages joined)"
    )
    counted = (
        ""
        if weight is None
        else f"; they count as {weight:g} of a stream's own samples, which take over from there"
    )
    return (
        f"on: {f} sensors {against}; covariance and {prior.window}-step average spreads"
        f" from {prior.steps} held-out steps{counted}"
    )


def step_counts_text(tail_steps: float, scale_steps: float) -> str:
    """How many of a stream's own steps the per-step check's tail and error scale take the
    model's as (the scorer's own counts), appended to ``tail_text``.

    >>> step_counts_text(6400.0, 2.0).split(", ")[-1]
    "the model's error scale as 2"
    """
    return (
        f"; it counts as {tail_steps:.0f} of a stream's own steps (at least one"
        f" Gaussian exceedance's worth), the model's error scale as {scale_steps:.0f}"
    )


def pooled_text(features: list[str], pooled: Any) -> str:
    """Each feature's mean excess as the daemon starts a stream's step check from it, pooled
    across the model's sensors where they are alike (``surprise.pooled_excess``), appended
    to ``tail_text``; nothing for one sensor or a file without a tail.

    >>> pooled_text(["a", "b"], [0.934, 0.934])
    '; its mean excess pooled across the sensors: a 0.934, b 0.934'
    >>> pooled_text(["a"], [0.92]), pooled_text(["a", "b"], None)
    ('', '')
    """
    if pooled is None or len(features) < 2:
        return ""
    parts = [f"{name} {float(b):.3g}" for name, b in zip(features, pooled, strict=True)]
    return "; its mean excess pooled across the sensors: " + ", ".join(parts)


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from detector.config import load_config
    from detector.model import LoadedModel
    from detector.scoring import Scorer

    config, problems = load_config(args.config)  # file, then environment, as run reads it
    if problems:
        raise ConfigError("; ".join(problems))
    scoring = config.scoring
    source = f"[scoring] of {args.config}" if args.config else "the defaults"
    model = LoadedModel.load(args.model)
    meta = model.meta
    if args.json:
        doc = asdict(meta)
        doc["fingerprint"] = meta.fingerprint
        doc["graph"] = {
            "inputs": {i.name: i.shape for i in model.session.get_inputs()},
            "outputs": {o.name: o.shape for o in model.session.get_outputs()},
        }
        doc["alerts"] = {  # what the daemon applies; calibration.threshold it does not
            "threshold": scoring.threshold,
            "clear_threshold": scoring.clear_threshold,
            "clear_steps": scoring.clear_steps,
            "source": source,
        }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    cal = meta.calibration
    scorer = Scorer(scoring, cal)  # the counts it takes the model's priors as
    relations_weight = None if scorer.relations is None else scorer.relations.prior_steps
    rows = [
        ("model", meta.name),
        ("file", args.model),
        ("fingerprint", meta.fingerprint),
        ("cell", f"{meta.cell}, {meta.layers} layer(s), hidden {meta.hidden_size}"),
        ("predicts from", skip_text(meta.skip, meta.features, meta.training.get("level_gain"))),
        ("features", ", ".join(meta.features)),
        ("sample interval", f"{meta.sample_interval_s} s" if meta.sample_interval_s else "-"),
        ("parity (max abs diff)", f"{meta.parity_max_abs_diff:.2e}"
         if meta.parity_max_abs_diff is not None else "-"),
        ("alerts", f"{alert_rule_text(scoring)} ({source})"),
        ("calibration", f"raw score mean {cal.mean:.3f} sd {cal.std:.3f} over {cal.n} steps;"
         f" p99 {cal.quantiles.get('0.99', float('nan')):.3f}; {cal.window}-step average"
         f" mean {cal.window_mean:.3f} sd {cal.window_std:.3f}"),
        ("calibration suggestion", f"likelihood {cal.threshold:.12g}, stored at training;"
         " not applied (alerts use the rule above)"),
        ("relations check", relations_text(cal.relations, scoring.relations_check,
                                           relations_weight)),
        ("step check's tail", tail_text(meta.features, cal.tail_rate, cal.tail_excess)
         + step_counts_text(scorer.step.tail_steps, scorer.step.prior_steps)
         + pooled_text(meta.features, None if scorer.step.prior is None
                       else scorer.step.prior[1])),
        ("errors' lag", lag_text(meta.features, cal.error_lag)),
        ("warm-up", warmup_text(scoring, cal)),
    ]  # fmt: skip
    quiet = meta.training.get("held_out_quiet")
    if quiet:  # (a list of feature names, written by train)
        rows.append(("held-out rows", "quieter than the training rows in "
                     f"{', '.join(map(str, quiet))}: routine events they never show may alert"
                     " in a stream's first days"))  # fmt: skip
    for key in ("rows", "val_loss", "seed", "date", "data_fingerprint"):
        if key in meta.training:
            rows.append((f"training {key}", str(meta.training[key])))
    for i in model.session.get_inputs():
        rows.append((f"input {i.name}", str(i.shape)))
    for o in model.session.get_outputs():
        rows.append((f"output {o.name}", str(o.shape)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
