"""The model artifact: one ONNX file whose graph is ONE recurrent step.

Inputs ``x`` [B, F] (raw units) and the state tensors (``h``, LSTM adds ``c``,
each [L, B, H]); outputs ``mean``, ``log_var`` [B, F] (normalised units) and
``h_out`` (``c_out``). One JSON document under :data:`METADATA_KEY` in
``metadata_props`` describes it; :func:`read_artifact` refuses any file whose
metadata is missing, of another format version, or inconsistent with its graph.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from detector.errors import ModelFileError
from detector.scoring.calibration import RAW_SCORES, Calibration, RelationsPrior
from detector.scoring.surprise import MAX_ERROR_LAG

METADATA_KEY: Final = "rnnsentry"
FORMAT_VERSION: Final = 1
CELLS: Final = ("gru", "lstm", "rnn")
# What the prediction's skip path adds the network's change to: the input itself ("input",
# files before the level), or an exponentially smoothed level of the inputs kept as the
# state LEVEL_STATE ("level", :mod:`training.trainer.model`).
SKIPS: Final = ("input", "level")
LEVEL_STATE: Final = "level"
INPUT_NAME: Final = "x"
OUTPUT_NAMES: Final = ("mean", "log_var")


def state_names(cell: str, skip: str = "input") -> tuple[str, ...]:
    """Names of the state inputs in graph order: the cell's, then the smoothed level where
    the prediction's skip takes it; each output is the name + ``_out``.

    >>> state_names("lstm"), state_names("gru", "level")
    (('h', 'c'), ('h', 'level'))
    """
    cells = ("h", "c") if cell == "lstm" else ("h",)
    return (*cells, LEVEL_STATE) if skip == "level" else cells


def state_shape(name: str, layers: int, hidden_size: int, n_features: int) -> tuple[int, int]:
    """A state's shape less its batch axis (the graph's [first, B, last]): a recurrent
    state [layers, hidden_size], the level [1, features].

    >>> state_shape("h", 2, 32, 4), state_shape(LEVEL_STATE, 2, 32, 4)
    ((2, 32), (1, 4))
    """
    return (1, n_features) if name == LEVEL_STATE else (layers, hidden_size)


@dataclass(frozen=True)
class Normalisation:
    """x_norm = (x - centre) / scale, per feature, fitted on training data."""

    centre: list[float]
    scale: list[float]


@dataclass(frozen=True)
class ModelMeta:
    """Everything the daemon needs to know about a model, stored in the file."""

    format_version: int
    name: str
    cell: str
    layers: int
    hidden_size: int
    features: list[str]
    normalisation: Normalisation
    sample_interval_s: float | None
    calibration: Calibration
    training: dict[str, Any]  # provenance: data_fingerprint, rows, seed, val_loss, date, options
    graph_sha256: str
    parity_max_abs_diff: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    skip: str = "input"  # one of SKIPS; files before the level say nothing: "input"

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def state_names(self) -> tuple[str, ...]:
        return state_names(self.cell, self.skip)

    def state_shape(self, name: str) -> tuple[int, int]:
        """:func:`state_shape` of this model's state ``name``."""
        return state_shape(name, self.layers, self.hidden_size, self.n_features)

    @property
    def fingerprint(self) -> str:
        """Short content fingerprint (first 16 hex digits of the graph's SHA-256)."""
        return self.graph_sha256[:16]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)


def meta_from_dict(doc: dict[str, Any]) -> ModelMeta:
    """Build and check :class:`ModelMeta`; every problem names its field."""
    if not isinstance(doc, dict):
        raise ModelFileError("metadata is not a JSON object")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"unknown metadata format_version {version!r} (this rnnsentry reads {FORMAT_VERSION})"
        )
    try:
        norm = Normalisation(**doc["normalisation"])
        cal_doc = doc["calibration"]
        relations = cal_doc.get("relations") if isinstance(cal_doc, dict) else None
        if relations is not None:
            if not isinstance(relations, dict):
                raise ModelFileError("metadata field calibration.relations has the wrong type")
            relations = RelationsPrior(**relations)
        cal = Calibration(**{**cal_doc, "relations": relations})
        known = {k: doc[k] for k in ModelMeta.__dataclass_fields__ if k in doc}
        known.update(normalisation=norm, calibration=cal)
        meta = ModelMeta(**known)
    except KeyError as exc:
        raise ModelFileError(f"metadata lacks field {exc.args[0]!r}") from None
    except TypeError as exc:
        raise ModelFileError(f"metadata has a malformed section: {exc}") from None
    _check_meta(meta)
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(meta: ModelMeta) -> None:
    """Every field the daemon relies on has the JSON type it expects; names the field."""
    norm, cal = meta.normalisation, meta.calibration
    checks: list[tuple[str, bool]] = [
        ("name", isinstance(meta.name, str)),
        ("cell", isinstance(meta.cell, str)),
        ("layers", _is_int(meta.layers)),
        ("hidden_size", _is_int(meta.hidden_size)),
        ("features", isinstance(meta.features, list)
         and all(isinstance(f, str) for f in meta.features)),
        # null inside these lists is how JSON writes NaN: reported as non-finite below
        ("normalisation.centre", isinstance(norm.centre, list)
         and all(v is None or _is_num(v) for v in norm.centre)),
        ("normalisation.scale", isinstance(norm.scale, list)
         and all(v is None or _is_num(v) for v in norm.scale)),
        ("sample_interval_s", meta.sample_interval_s is None or _is_num(meta.sample_interval_s)),
        ("calibration.n", _is_int(cal.n)),
        ("calibration.mean", _is_num(cal.mean)),
        ("calibration.std", _is_num(cal.std)),
        ("calibration.quantiles", isinstance(cal.quantiles, dict)),
        ("calibration.window", _is_int(cal.window)),
        ("calibration.window_mean", _is_num(cal.window_mean)),
        ("calibration.window_std", _is_num(cal.window_std)),
        ("calibration.threshold", _is_num(cal.threshold)),
        ("calibration.raw_score", isinstance(cal.raw_score, str)),
        ("calibration.level_std", _is_num(cal.level_std)),
        ("calibration.level_streams", _is_int(cal.level_streams)),
        ("training", isinstance(meta.training, dict)),
        ("graph_sha256", isinstance(meta.graph_sha256, str)),
        ("skip", isinstance(meta.skip, str)),
    ]  # fmt: skip
    for name, ok in checks:
        if not ok:
            raise ModelFileError(f"metadata field {name} has the wrong type")


def _check_meta(meta: ModelMeta) -> None:
    _check_types(meta)
    if meta.cell not in CELLS:
        raise ModelFileError(f"metadata cell {meta.cell!r} is not one of {', '.join(CELLS)}")
    if meta.layers < 1 or meta.hidden_size < 1:
        raise ModelFileError("metadata layers and hidden_size must be positive")
    if meta.skip not in SKIPS:
        raise ModelFileError(f"metadata skip {meta.skip!r} is not one of {', '.join(SKIPS)}")
    n = len(meta.features)
    if n < 1 or len(set(meta.features)) != n:
        raise ModelFileError("metadata features must be a non-empty list of distinct names")
    if len(meta.normalisation.centre) != n or len(meta.normalisation.scale) != n:
        raise ModelFileError(f"metadata normalisation does not have {n} values per feature")
    values = [*meta.normalisation.centre, *meta.normalisation.scale]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ModelFileError("metadata normalisation holds a non-finite value")
    if min(meta.normalisation.scale) <= 0:  # all finite numbers by now
        raise ModelFileError("metadata normalisation scale must be positive")
    cal = meta.calibration
    if not (math.isfinite(cal.window_mean) and cal.window_std > 0 and cal.window >= 1):
        raise ModelFileError("metadata calibration window statistics are invalid")
    if not (math.isfinite(cal.level_std) and cal.level_std >= 0):
        raise ModelFileError("metadata calibration.level_std must be a finite number, at least 0")
    if cal.level_streams < 0:
        raise ModelFileError("metadata calibration.level_streams must not be negative")
    if cal.relations is not None:
        _check_relations(cal.relations, n)
    if (cal.tail_rate is None) != (cal.tail_excess is None):
        raise ModelFileError("metadata calibration has one of tail_rate and tail_excess")
    for name, tail in (("tail_rate", cal.tail_rate), ("tail_excess", cal.tail_excess)):
        if tail is None:
            continue
        if not (_numbers(tail, n) and min(tail) > 0) or (name == "tail_rate" and max(tail) > 1.0):
            raise ModelFileError(
                f"metadata calibration.{name} must hold {n} finite positive numbers"
                + (" of at most 1" if name == "tail_rate" else "")
            )
    if cal.error_lag is not None and not (
        _numbers(cal.error_lag, n) and max(abs(v) for v in cal.error_lag) <= MAX_ERROR_LAG
    ):
        raise ModelFileError(
            f"metadata calibration.error_lag must hold {n} numbers within ±{MAX_ERROR_LAG}"
        )
    if cal.settle_steps is not None and not (_is_int(cal.settle_steps) and cal.settle_steps >= 0):
        raise ModelFileError("metadata calibration.settle_steps must be a count of steps")
    if cal.raw_score not in RAW_SCORES:
        raise ModelFileError(
            f"metadata calibration.raw_score {cal.raw_score!r} is not one of"
            f" {', '.join(RAW_SCORES)}"
        )


# --- reading the file without the `onnx` package (the daemon does not need it) ---


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ModelFileError("not an ONNX file (truncated or corrupt protobuf)")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """Top-level protobuf fields as (number, wire type, value); corrupt input raises."""
    out: list[tuple[int, int, bytes | int]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ModelFileError("not an ONNX file (truncated or corrupt protobuf)")
            out.append((number, wire, buf[pos : pos + size]))
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ModelFileError("not an ONNX file (corrupt protobuf)")
    return out


_GRAPH_FIELD: Final = 7  # ModelProto.graph
_METADATA_FIELD: Final = 14  # ModelProto.metadata_props


def split_model_bytes(data: bytes) -> tuple[bytes, dict[str, str]]:
    """Return the serialised graph and the metadata_props of an ONNX model file."""
    graph: bytes | None = None
    props: dict[str, str] = {}
    for number, wire, value in _fields(data):
        if number == _GRAPH_FIELD and wire == 2:
            assert isinstance(value, bytes)
            graph = value
        elif number == _METADATA_FIELD and wire == 2:
            assert isinstance(value, bytes)
            entry = {n: v for n, w, v in _fields(value) if w == 2}
            try:
                key = bytes(entry.get(1, b"")).decode()
                props[key] = bytes(entry.get(2, b"")).decode()
            except UnicodeDecodeError:
                raise ModelFileError("metadata_props is not UTF-8") from None
    if graph is None:
        raise ModelFileError("not an ONNX model file (no graph)")
    return graph, props


def graph_sha256(graph_bytes: bytes) -> str:
    return hashlib.sha256(graph_bytes).hexdigest()


def read_artifact(path: str | Path) -> tuple[bytes, ModelMeta]:
    """Read a model file: its bytes and checked metadata (graph I/O is checked at load)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from None
    return data, parse_artifact(data, str(path))


def parse_artifact(data: bytes, where: str = "model") -> ModelMeta:
    try:
        graph, props = split_model_bytes(data)
    except ModelFileError as exc:
        raise ModelFileError(f"{where}: {exc}") from None
    if METADATA_KEY not in props:
        raise ModelFileError(
            f"{where}: no rnnsentry metadata (metadata_props key {METADATA_KEY!r} is missing);"
            " train it with `rnnsentry train`"
        )
    try:
        doc = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{where}: rnnsentry metadata is not valid JSON ({exc})") from None
    try:
        meta = meta_from_dict(doc)
    except ModelFileError as exc:
        raise ModelFileError(f"{where}: {exc}") from None
    actual = graph_sha256(graph)
    if actual != meta.graph_sha256:
        raise ModelFileError(
            f"{where}: graph fingerprint {actual[:16]} does not match the metadata's"
            f" {meta.graph_sha256[:16]} (the graph was changed after export)"
        )
    return meta


def expected_io(meta: ModelMeta) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The graph's inputs and outputs as the metadata implies: name -> shape ('B' dynamic)."""
    f = meta.n_features
    inputs: dict[str, list[Any]] = {INPUT_NAME: ["B", f]}
    outputs: dict[str, list[Any]] = {name: ["B", f] for name in OUTPUT_NAMES}
    for name in meta.state_names:
        first, last = meta.state_shape(name)
        inputs[name] = [first, "B", last]
        outputs[name + "_out"] = [first, "B", last]
    return inputs, outputs


def _numbers(values: Any, count: int) -> bool:
    """A list of ``count`` finite numbers."""
    return (isinstance(values, list) and len(values) == count
            and all(_is_num(v) and math.isfinite(v) for v in values))  # fmt: skip


def _check_relations(rel: RelationsPrior, n: int) -> None:
    cov = rel.covariance
    if not (isinstance(cov, list) and len(cov) in (n, 2 * n)
            and all(_numbers(row, len(cov)) for row in cov)):  # fmt: skip
        raise ModelFileError(
            f"metadata calibration.relations.covariance must be {2 * n} x {2 * n} numbers"
            f" (the values and their averages; {n} x {n}: the values alone)"
        )
    if not all(cov[i][i] >= 0 for i in range(len(cov))):
        raise ModelFileError("metadata calibration.relations.covariance has a negative variance")
    if not (_numbers(rel.average_var, n) and min(rel.average_var) >= 0):
        raise ModelFileError(f"metadata calibration.relations.average_var must be {n} numbers >= 0")
    if not (_is_int(rel.window) and rel.window >= 1 and _is_int(rel.steps) and rel.steps >= 1):
        raise ModelFileError("metadata calibration.relations.window and steps must be positive")
