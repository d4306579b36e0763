"""detector.csvdata: separators, timestamp columns, value columns, and clear DataErrors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from detector.csvdata import detect_separator, infer_interval, read_csv
from detector.errors import DataError

# 2024-01-01T00:00:00Z: 54 years after 1970, 13 of them leap (1972 .. 2020).
T0 = float((54 * 365 + 13) * 86_400)


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_comma_file_with_iso_timestamps(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "timestamp,a,b\n"
        "2024-01-01T00:00:00Z,1,2.5\n"
        "2024-01-01T00:00:10Z,3,-4\n"
        "2024-01-01T00:00:20+00:00,5,6e1\n",
    )
    table = read_csv(path)
    assert table.path == str(path)
    assert table.header == ["timestamp", "a", "b"]
    assert table.value_columns == ["a", "b"]
    assert table.timestamp_col == "timestamp"
    np.testing.assert_array_equal(table.values, [[1.0, 2.5], [3.0, -4.0], [5.0, 60.0]])
    assert table.values.dtype == np.float64
    assert table.timestamps is not None
    np.testing.assert_array_equal(table.timestamps, [T0, T0 + 10, T0 + 20])
    assert infer_interval(table.timestamps) == 10.0


def test_semicolon_file(tmp_path: Path) -> None:
    path = write(tmp_path, "datetime;a;b\n2024-01-01 00:00:00;1,5;2\n2024-01-01 00:01:00;3;4\n")
    table = read_csv(path)
    assert table.header == ["datetime", "a", "b"]
    assert table.timestamp_col == "datetime"
    # A decimal comma is not a number here: that cell becomes NaN.
    assert math.isnan(table.values[0, 0]) and table.values[0, 1] == 2.0
    assert table.values[1].tolist() == [3.0, 4.0]
    assert table.timestamps is not None
    assert table.timestamps.tolist() == [T0, T0 + 60]


@pytest.mark.parametrize("name", ["timestamp", "datetime", "time", "ts", "Timestamp", "TS"])
def test_timestamp_column_is_found_by_name(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f"v,{name}\n1,1704067200\n2,1704067205\n")
    table = read_csv(path)
    assert table.timestamp_col == name
    assert table.value_columns == ["v"]
    assert table.timestamps is not None
    assert table.timestamps.tolist() == [T0, T0 + 5]


def test_millisecond_epoch_timestamps(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "ts,v\n1704067200000,1\n1704067200500,2\n"))
    assert table.timestamps is not None
    assert table.timestamps.tolist() == [T0, T0 + 0.5]


def test_no_timestamp_column(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "a,b\n1,2\n3,4\n"))
    assert table.timestamp_col is None and table.timestamps is None
    assert table.value_columns == ["a", "b"]


def test_named_timestamp_column(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "when,v\n2024-01-01T00:00:00Z,1\n"), timestamp_col="when")
    assert table.timestamp_col == "when" and table.value_columns == ["v"]
    assert table.timestamps is not None and table.timestamps.tolist() == [T0]


def test_a_named_timestamp_column_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'when'"):
        read_csv(write(tmp_path, "ts,v\n1,1\n"), timestamp_col="when")


def test_label_columns_are_excluded_by_default(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,a,label,Anomaly,changepoint,b\n1,1,0,1,0,2\n2,3,1,0,0,4\n")
    table = read_csv(path)
    assert table.value_columns == ["a", "b"]
    np.testing.assert_array_equal(table.values, [[1.0, 2.0], [3.0, 4.0]])


def test_named_columns_may_include_labels_and_keep_their_order(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,a,label,b\n1,1,0,2\n2,3,1,4\n")
    table = read_csv(path, columns=["b", "label"])
    assert table.value_columns == ["b", "label"]
    np.testing.assert_array_equal(table.values, [[2.0, 0.0], [4.0, 1.0]])


def test_non_numeric_and_missing_cells_become_nan(tmp_path: Path) -> None:
    path = write(tmp_path, "a,b,c\n1,x,3\n,5,n/a\n7,8\n")
    table = read_csv(path)
    expected = np.array([[1.0, math.nan, 3.0], [math.nan, 5.0, math.nan], [7.0, 8.0, math.nan]])
    np.testing.assert_array_equal(table.values, expected)


def test_all_text_columns_are_left_out(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "site,a\nnorth,1\nsouth,2\n"))
    assert table.value_columns == ["a"]
    assert table.column("site") == ["north", "south"]


def test_blank_lines_are_skipped_and_cells_stripped(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, " a , b \n 1 , 2 \n\n,\n3,4\n"))
    assert table.header == ["a", "b"]
    np.testing.assert_array_equal(table.values, [[1.0, 2.0], [3.0, 4.0]])


def test_a_byte_order_mark_does_not_hide_the_timestamp(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "\ufefftimestamp,v\n1704067200,1\n"))
    assert table.timestamp_col == "timestamp"


def test_max_rows(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "v\n1\n2\n3\n4\n"), max_rows=2)
    assert table.values[:, 0].tolist() == [1.0, 2.0]


# --- errors ---


@pytest.mark.parametrize("text", ["", "\n", "   \n1,2\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="empty"):
        read_csv(write(tmp_path, text))


def test_header_only_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"):
        read_csv(write(tmp_path, "timestamp,a,b\n"))


def test_unknown_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_csv(write(tmp_path, "ts,a,b\n1,2,3\n"), columns=["a", "pressure", "flow"])
    message = str(info.value)
    assert "'pressure'" in message and "'flow'" in message
    assert "'a'" not in message.split("(")[0]


def test_no_numeric_column(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no numeric column"):
        read_csv(write(tmp_path, "timestamp,site,label\n1704067200,north,1\n"))


def test_bad_timestamp_cell_names_the_row(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,v\n2024-01-01T00:00:00Z,1\nlunchtime,2\n")
    with pytest.raises(DataError) as info:
        read_csv(path)
    message = str(info.value)
    assert "row 3" in message  # the file's line: header is row 1
    assert "'lunchtime'" in message and "'timestamp'" in message


def test_empty_timestamp_cell_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="row 2"):
        read_csv(write(tmp_path, "ts,v\n,1\n"))


def test_repeated_header_name(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="repeats"):
        read_csv(write(tmp_path, "a,a\n1,2\n"))


def test_missing_file_and_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_csv(tmp_path / "absent.csv")
    path = tmp_path / "latin1.csv"
    path.write_bytes("temp\u00e9,v\n1,2\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        read_csv(path)


def test_unknown_column_lookup(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "a\n1\n"))
    with pytest.raises(DataError, match="'b'"):
        table.column("b")


# --- helpers ---


@pytest.mark.parametrize(
    ("line", "sep"),
    [("a,b,c", ","), ("a;b;c", ";"), ("a;b,c;d", ";"), ("a,b;c,d", ","), ("a", ","), ("", ",")],
)
def test_detect_separator(line: str, sep: str) -> None:
    assert detect_separator(line) == sep


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        (None, None),
        ([], None),
        ([5.0], None),
        ([3.0, 3.0, 3.0], None),
        ([0.0, 2.0, 1.0, 3.0, 5.0], 2.0),
        ([0.0, 1.0, 2.0, 12.0], 1.0),
        ([0.0, 1.0, 4.0], 2.0),
    ],
)
def test_infer_interval(stamps: list[float] | None, expected: float | None) -> None:
    arg = None if stamps is None else np.array(stamps, dtype=np.float64)
    assert infer_interval(arg) == expected
