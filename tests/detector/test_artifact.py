"""detector.artifact: the metadata contract of a model file, read without `onnx`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from detector.artifact import (
    FORMAT_VERSION,
    METADATA_KEY,
    ModelMeta,
    Normalisation,
    expected_io,
    graph_sha256,
    meta_from_dict,
    parse_artifact,
    read_artifact,
    split_model_bytes,
)
from detector.errors import ModelFileError
from detector.scoring.calibration import Calibration

FEATURES = ["flow", "pressure"]


def tiny_model(node_name: str = "step") -> onnx.ModelProto:
    """A one-node graph; what it computes does not matter to the metadata checks."""
    node = helper.make_node("Identity", ["x"], ["mean"], name=node_name)
    graph = helper.make_graph(
        [node],
        "rnn_step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", len(FEATURES)])],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["B", len(FEATURES)])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def meta_doc(model: onnx.ModelProto) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "name": "pumps",
        "cell": "gru",
        "layers": 2,
        "hidden_size": 16,
        "features": list(FEATURES),
        "normalisation": {"centre": [1.0, 2.0], "scale": [0.5, 4.0]},
        "sample_interval_s": 10.0,
        "calibration": {
            "n": 1000,
            "mean": 1.2,
            "std": 0.3,
            "quantiles": {"0.5": 1.1, "0.99": 2.0},
            "window": 10,
            "window_mean": 1.2,
            "window_std": 0.1,
            "threshold": 0.9999,
        },
        "training": {"seed": 1, "rows": 500},
        "graph_sha256": graph_sha256(model.graph.SerializeToString()),
    }


def file_bytes(model: onnx.ModelProto, metadata: str | None, **extra_props: str) -> bytes:
    model = copy.deepcopy(model)
    props = dict(extra_props)
    if metadata is not None:
        props[METADATA_KEY] = metadata
    helper.set_model_props(model, props)
    return model.SerializeToString()


def good_file() -> tuple[onnx.ModelProto, dict[str, Any], bytes]:
    model = tiny_model()
    doc = meta_doc(model)
    return model, doc, file_bytes(model, json.dumps(doc), producer_note="hello")


def rejection(data: bytes, where: str = "model") -> str:
    with pytest.raises(ModelFileError) as info:
        parse_artifact(data, where)
    message = str(info.value)
    assert message.startswith(f"{where}: ")
    return message


# --- the happy path ---


def test_parse_artifact_accepts_a_consistent_file() -> None:
    model, doc, data = good_file()
    meta = parse_artifact(data)
    assert meta.name == "pumps" and meta.cell == "gru"
    assert (meta.layers, meta.hidden_size, meta.n_features) == (2, 16, 2)
    assert meta.features == FEATURES
    assert meta.normalisation == Normalisation(centre=[1.0, 2.0], scale=[0.5, 4.0])
    assert isinstance(meta.calibration, Calibration)
    assert meta.calibration.window_std == 0.1
    assert meta.graph_sha256 == doc["graph_sha256"]
    assert meta.fingerprint == doc["graph_sha256"][:16] and len(meta.fingerprint) == 16
    assert meta.parity_max_abs_diff is None and meta.extra == {}


def test_split_model_bytes_returns_exactly_the_graph_and_props() -> None:
    model, doc, data = good_file()
    graph, props = split_model_bytes(data)
    assert graph == model.graph.SerializeToString()
    assert props == {METADATA_KEY: json.dumps(doc), "producer_note": "hello"}


def test_split_model_bytes_decodes_non_ascii_props() -> None:
    data = file_bytes(tiny_model(), None, note="Druck \u00fcber 5 bar")
    assert split_model_bytes(data)[1] == {"note": "Druck \u00fcber 5 bar"}


def test_read_artifact_reads_a_file(tmp_path: Path) -> None:
    _, _, data = good_file()
    path = tmp_path / "pumps.onnx"
    path.write_bytes(data)
    raw, meta = read_artifact(path)
    assert raw == data and meta.name == "pumps"


def test_read_artifact_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="cannot read model file"):
        read_artifact(tmp_path / "absent.onnx")


def test_read_artifact_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(file_bytes(tiny_model(), None))
    with pytest.raises(ModelFileError) as info:
        read_artifact(path)
    assert str(info.value).startswith(f"{path}: ")


def test_meta_json_round_trips() -> None:
    _, _, data = good_file()
    meta = parse_artifact(data)
    assert meta_from_dict(json.loads(meta.to_json())) == meta


def test_onnx_itself_reads_the_metadata_we_wrote() -> None:
    _, doc, data = good_file()
    loaded = onnx.load_from_string(data)
    props = {p.key: p.value for p in loaded.metadata_props}
    assert json.loads(props[METADATA_KEY]) == doc


# --- refusals ---


def test_missing_metadata_key() -> None:
    message = rejection(file_bytes(tiny_model(), None, other="x"))
    assert METADATA_KEY in message and "missing" in message


def test_invalid_json() -> None:
    message = rejection(file_bytes(tiny_model(), '{"format_version": 1,'))
    assert "not valid JSON" in message


def test_metadata_that_is_not_an_object() -> None:
    assert "not a JSON object" in rejection(file_bytes(tiny_model(), "[1, 2]"))


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(version: object) -> None:
    model = tiny_model()
    doc = meta_doc(model)
    doc["format_version"] = version
    message = rejection(file_bytes(model, json.dumps(doc)))
    assert "format_version" in message and repr(version) in message


@pytest.mark.parametrize(
    "field", ["name", "cell", "layers", "hidden_size", "features", "normalisation",
              "calibration", "training", "graph_sha256", "sample_interval_s"],
)  # fmt: skip
def test_missing_field_is_named(field: str) -> None:
    model = tiny_model()
    doc = meta_doc(model)
    del doc[field]
    assert field in rejection(file_bytes(model, json.dumps(doc)))


@pytest.mark.parametrize(("section", "field"), [("calibration", "window_std"),
                                                 ("normalisation", "scale")])  # fmt: skip
def test_missing_field_inside_a_section_is_named(section: str, field: str) -> None:
    model = tiny_model()
    doc = meta_doc(model)
    del doc[section][field]
    assert field in rejection(file_bytes(model, json.dumps(doc)))


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"normalisation": {"centre": [1.0], "scale": [0.5, 4.0]}}, "normalisation"),
        ({"normalisation": {"centre": [1.0, 2.0], "scale": [0.5, 4.0, 1.0]}}, "normalisation"),
        ({"normalisation": {"centre": [1.0, 2.0], "scale": [0.5, 0.0]}}, "scale"),
        ({"normalisation": {"centre": [1.0, None], "scale": [0.5, 1.0]}}, "non-finite"),
        ({"cell": "transformer"}, "cell"),
        ({"layers": 0}, "layers"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"features": []}, "features"),
        ({"features": ["flow", "flow"]}, "features"),
        ({"calibration_window_std": 0.0}, "calibration"),
        ({"calibration_window": 0}, "calibration"),
    ],
)
def test_inconsistent_metadata_is_refused(change: dict[str, Any], words: str) -> None:
    model = tiny_model()
    doc = meta_doc(model)
    for key, value in change.items():
        if key.startswith("calibration_"):
            doc["calibration"][key.removeprefix("calibration_")] = value
        else:
            doc[key] = value
    assert words in rejection(file_bytes(model, json.dumps(doc)))


@pytest.mark.parametrize(
    "change",
    [
        {"layers": "2"},
        {"hidden_size": None},
        {"features": None},
        {"normalisation": {"centre": 1.0, "scale": [0.5, 4.0]}},
        {"normalisation": [1.0, 2.0]},
    ],
)
def test_wrongly_typed_metadata_is_a_model_file_error(change: dict[str, Any]) -> None:
    # BUG (all but the last): _check_meta compares and measures fields without checking
    # their types, so a TypeError escapes instead of a ModelFileError.
    model = tiny_model()
    doc = meta_doc(model)
    doc.update(change)
    rejection(file_bytes(model, json.dumps(doc)))


def test_tampered_graph_fails_the_fingerprint() -> None:
    original = tiny_model()
    doc = meta_doc(original)  # fingerprint of the original graph
    tampered = tiny_model(node_name="step_changed")
    message = rejection(file_bytes(tampered, json.dumps(doc)), "pumps.onnx")
    assert "fingerprint" in message
    assert graph_sha256(tampered.graph.SerializeToString())[:16] in message
    assert doc["graph_sha256"][:16] in message


def test_graph_sha256_is_the_hex_sha256() -> None:
    assert graph_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_truncated_file(cut: int) -> None:
    _, _, data = good_file()
    message = rejection(data[:-cut])
    assert "truncated" in message or "corrupt" in message


def test_a_file_cut_before_the_graph_has_no_graph() -> None:
    _, _, data = good_file()
    assert "no graph" in rejection(data[:2])


@pytest.mark.parametrize(
    "data", [b"", b"\xff" * 64, b"PK\x03\x04 this is a zip", b"\x0b\x0c", b"\x3a\xff\xff\xff"]
)
def test_garbage_bytes(data: bytes) -> None:
    message = rejection(data)
    assert "ONNX" in message or "protobuf" in message


def test_props_that_are_not_utf8() -> None:
    # Hand-made: graph field (7) with an empty graph, then a metadata_props entry (14)
    # whose key is the single byte 0xff.
    entry = b"\x0a\x01\xff\x12\x01x"  # key: field 1 (len 1) 0xff; value: field 2 (len 1) 'x'
    data = b"\x3a\x00" + b"\x72" + bytes([len(entry)]) + entry
    with pytest.raises(ModelFileError, match="UTF-8"):
        split_model_bytes(data)


# --- expected graph I/O ---


def meta_for(cell: str) -> ModelMeta:
    model = tiny_model()
    doc = meta_doc(model)
    doc.update(cell=cell, layers=3, hidden_size=8)
    return meta_from_dict(doc)


def test_expected_io_for_a_gru() -> None:
    inputs, outputs = expected_io(meta_for("gru"))
    assert inputs == {"x": ["B", 2], "h": [3, "B", 8]}
    assert outputs == {"mean": ["B", 2], "log_var": ["B", 2], "h_out": [3, "B", 8]}


def test_expected_io_for_an_lstm() -> None:
    meta = meta_for("lstm")
    assert meta.state_names == ("h", "c")
    inputs, outputs = expected_io(meta)
    assert inputs == {"x": ["B", 2], "h": [3, "B", 8], "c": [3, "B", 8]}
    assert list(outputs) == ["mean", "log_var", "h_out", "c_out"]
    assert outputs["c_out"] == [3, "B", 8]


# --- which raw score the calibration describes ---


def test_a_file_without_raw_score_means_the_gaussian_nll_of_older_files() -> None:
    _, doc, data = good_file()
    assert "raw_score" not in doc["calibration"]
    assert parse_artifact(data).calibration.raw_score == "gaussian_nll"


@pytest.mark.parametrize("kind", ["student_t", "gaussian_nll"])
def test_a_known_raw_score_is_read(kind: str) -> None:
    model, doc, _ = good_file()
    doc["calibration"]["raw_score"] = kind
    assert parse_artifact(file_bytes(model, json.dumps(doc))).calibration.raw_score == kind


@pytest.mark.parametrize(("value", "says"), [("cauchy", "is not one of"), (3, "wrong type")])
def test_an_unknown_raw_score_is_refused_by_name(value: object, says: str) -> None:
    model, doc, _ = good_file()
    doc["calibration"]["raw_score"] = value
    message = rejection(file_bytes(model, json.dumps(doc)))
    assert "calibration.raw_score" in message and says in message


def test_the_level_spread_is_optional_and_checked() -> None:
    doc = meta_doc(tiny_model())  # as files before it: no level_std
    assert meta_from_dict(doc).calibration.level_std == 0.0  # read as one stream's
    doc["calibration"]["level_std"] = 0.25
    assert meta_from_dict(doc).calibration.level_std == 0.25
    for bad in (-0.1, float("inf"), "0.1"):
        doc["calibration"]["level_std"] = bad
        with pytest.raises(ModelFileError, match="level_std"):
            meta_from_dict(doc)
    doc["calibration"]["level_std"] = 0.25
    assert meta_from_dict(doc).calibration.level_streams == 0  # not recorded
    doc["calibration"]["level_streams"] = 8
    assert meta_from_dict(doc).calibration.level_streams == 8
    for bad in (-1, 2.5, "8"):
        doc["calibration"]["level_streams"] = bad
        with pytest.raises(ModelFileError, match="level_streams"):
            meta_from_dict(doc)


def identity(n: int) -> list[list[float]]:
    return [[float(i == j) for j in range(n)] for i in range(n)]


def test_the_relations_prior_is_optional_and_checked() -> None:
    doc = meta_doc(tiny_model())  # as files before it: no relations, the check is off
    assert meta_from_dict(doc).calibration.relations is None
    good = {"covariance": [[1.0, 0.5], [0.5, 2.0]], "window": 50, "average_var": [0.3, 0.4],
            "steps": 3000}  # fmt: skip
    doc["calibration"]["relations"] = good
    rel = meta_from_dict(doc).calibration.relations
    assert rel is not None and rel.covariance[1][1] == 2.0 and rel.steps == 3000
    # the values and their averages (2F x 2F), as the trainer writes it now
    doc["calibration"]["relations"] = {**good, "covariance": identity(4)}
    rel = meta_from_dict(doc).calibration.relations
    assert rel is not None and len(rel.covariance) == 4
    three = identity(3)
    bad_values = {
        "covariance": (
            [[1.0, 0.5]],
            [[1.0, 0.5], [0.5, float("nan")]],
            [[-1.0, 0], [0, 1.0]],
            three,
        ),  # fmt: skip
        "average_var": ([0.3], [0.3, -0.1], [0.3, "0.4"]),
        "window": (0, 2.5),
        "steps": (0, "3000"),
    }
    for field, values in bad_values.items():
        for bad in values:
            doc["calibration"]["relations"] = {**good, field: bad}
            with pytest.raises(ModelFileError, match="relations"):
                meta_from_dict(doc)
    doc["calibration"]["relations"] = {**good, "unknown": 1}
    with pytest.raises(ModelFileError, match="malformed"):
        meta_from_dict(doc)
    for bad in ([good], "relations", 3):
        doc["calibration"]["relations"] = bad
        with pytest.raises(ModelFileError, match="relations"):
            meta_from_dict(doc)


def test_the_step_checks_tail_prior_is_optional_and_checked() -> None:
    doc = meta_doc(tiny_model())  # as files before it: a Gaussian's tail
    cal = meta_from_dict(doc).calibration
    assert cal.tail_rate is None and cal.tail_excess is None
    doc["calibration"].update(tail_rate=[0.003, 0.05], tail_excess=[0.9, 210.0])
    cal = meta_from_dict(doc).calibration
    assert cal.tail_rate == [0.003, 0.05] and cal.tail_excess == [0.9, 210.0]
    for field, bad in (("tail_rate", [0.003]), ("tail_rate", [0.003, 1.5]),
                       ("tail_rate", [0.0, 0.05]), ("tail_excess", [0.9, float("inf")]),
                       ("tail_excess", [0.9, "210"]), ("tail_excess", None)):  # fmt: skip
        wrong = {**doc["calibration"], field: bad}
        with pytest.raises(ModelFileError, match="tail_"):
            meta_from_dict({**doc, "calibration": wrong})


def test_the_errors_lag_and_the_settling_time_are_optional_and_checked() -> None:
    doc = meta_doc(tiny_model())  # as files before them: errors as they come, a fixed warm-up
    cal = meta_from_dict(doc).calibration
    assert cal.error_lag is None and cal.settle_steps is None
    doc["calibration"].update(error_lag=[-0.3, 0.05], settle_steps=140)
    cal = meta_from_dict(doc).calibration
    assert cal.error_lag == [-0.3, 0.05] and cal.settle_steps == 140
    for field, bad in (("error_lag", [-0.3]), ("error_lag", [-0.95, 0.0]),
                       ("error_lag", [float("nan"), 0.0]), ("error_lag", ["0", 0.0]),
                       ("settle_steps", -1), ("settle_steps", 1.5),
                       ("settle_steps", True)):  # fmt: skip
        wrong = {**doc["calibration"], field: bad}
        with pytest.raises(ModelFileError, match=field):
            meta_from_dict({**doc, "calibration": wrong})


def test_a_model_file_anyone_may_write_is_loaded_with_a_warning(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil
    import stat

    from detector.model import LoadedModel

    path = tmp_path / "open.onnx"
    shutil.copy(tiny_model, path)
    with caplog.at_level(logging.WARNING, logger="detector.model"):
        LoadedModel.load(path)
    assert "writable by every user" not in caplog.text
    path.chmod(path.stat().st_mode | stat.S_IWOTH)
    with caplog.at_level(logging.WARNING, logger="detector.model"):
        LoadedModel.load(path)
    assert "writable by every user" in caplog.text and str(path) in caplog.text
