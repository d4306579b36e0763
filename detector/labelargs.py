"""Where labelled windows come from: the options ``replay --plot`` and ``plot`` share.

Plain argparse, importing nothing of the project's, so the command line and the plot
module (in ``training.evaluation``) both use it without importing each other.
"""

from __future__ import annotations

import argparse


def add_label_arguments(p: argparse.ArgumentParser, when: str = "") -> None:
    """--windows/--key and --labels/--label-col; ``when`` prefixes each help text.

    >>> p = argparse.ArgumentParser()
    >>> add_label_arguments(p)
    >>> p.parse_args(["--labels", "l.csv"]).label_col
    'anomaly'
    """
    labels = p.add_mutually_exclusive_group()
    labels.add_argument(
        "--windows",
        metavar="WINDOWS.json",
        help=f"{when}NAB-style JSON of file key -> [start, end] timestamps to shade",
    )
    labels.add_argument(
        "--labels",
        metavar="L.csv",
        help=f"{when}CSV with a 0/1 label column, same rows (a scores file will do)",
    )
    p.add_argument("--key", metavar="K", help=f"{when}windows key (default: the file's stem)")
    p.add_argument("--label-col", default="anomaly", metavar="C",
                   help=f"{when}label column of --labels (%(default)s)")  # fmt: skip
