"""csv_io: exact headers, the dialect's round trip, atomic writes, torch-free import."""

import csv
import os
import subprocess
import sys

import pandas as pd

from layers_core.csv_io import (
    IMPORTANT_WORDS,
    NEXT_TOKEN_LABEL,
    TOP_K_RECORD,
    TOP_K_VERBOSE,
    is_verbose_position,
    pure_header,
    records_header,
    write_csv_files,
)

RECORDS_45 = ("layer,pos,token,entropy," + ",".join(f"top{i},prob{i}" for i in range(1, 21))
              + ",rest_mass")
PURE_55 = RECORDS_45 + (",copy_collapse,entropy_collapse,is_answer,p_top1,p_top5,p_answer,"
                        "answer_rank,kl_to_final_bits,copy_collapse_prompt,copy_headline")
NASTY = ['"', ' ("-', "a,b", "x\ny", "\\core", NEXT_TOKEN_LABEL, "🙂", "", "cr\r", "\r\n", " lead"]


def test_exact_headers():
    assert ",".join(records_header()) == RECORDS_45 and len(records_header()) == 45
    assert ",".join(pure_header()) == PURE_55 and len(pure_header()) == 55  # legacy 48, 5 metrics, 2 flags


def test_header_shape_for_any_k():
    for k in (1, 5, 7):
        header = records_header(k)
        assert len(header) == 4 + 2 * k + 1
        assert header[:4] == ["layer", "pos", "token", "entropy"] and header[-1] == "rest_mass"


def test_constants():
    assert (TOP_K_RECORD, TOP_K_VERBOSE) == (5, 20)
    assert IMPORTANT_WORDS == ["Germany", "Berlin", "capital", "Answer", "word", "simply"]
    assert NEXT_TOKEN_LABEL == "\u27e8NEXT\u27e9"


def test_verbose_positions():
    assert is_verbose_position(" the", 4, 5)  # last position
    assert is_verbose_position(" Germany,", 1, 5)
    assert is_verbose_position("capitals", 1, 5)  # substring match
    assert is_verbose_position("ANSWER:", 0, 5)
    assert not is_verbose_position(" the", 1, 5)


def _rows(tokens):
    rows, pure = [], []
    for i, tok in enumerate(tokens):
        row = {"layer": 0, "pos": i, "token": tok, "entropy": 1.4627717064286117e-05,
               "top1": tok, "prob1": 16.956815719604492 / 17, "rest_mass": 0.0}
        rows.append(row)
        pure.append({**row, "token": NEXT_TOKEN_LABEL, "copy_collapse": True,
                     "entropy_collapse": False, "is_answer": False, "p_answer": None,
                     "answer_rank": 3, "kl_to_final_bits": 0.1 + 0.2})
    return rows, pure


def test_round_trip_with_csv_reader_and_pandas(tmp_path):
    rows, pure = _rows(NASTY)
    rec_path, pure_path = tmp_path / "r.csv", tmp_path / "p.csv"
    write_csv_files(rows, pure, str(rec_path), str(pure_path))
    with open(rec_path, newline="", encoding="utf-8") as handle:
        parsed = list(csv.reader(handle))
    assert parsed[0] == records_header()
    assert all(len(line) == 45 for line in parsed)
    assert [line[2] for line in parsed[1:]] == NASTY
    assert [line[4] for line in parsed[1:]] == NASTY
    assert float(parsed[1][3]) == 1.4627717064286117e-05  # bit-exact float
    assert float(parsed[1][5]) == 16.956815719604492 / 17
    assert parsed[1][6] == "" and parsed[1][-1] == "0.0"
    frame = pd.read_csv(pure_path, dtype=str, keep_default_na=False)
    assert list(frame.columns) == pure_header()
    assert list(frame["top1"]) == NASTY
    assert set(frame["copy_collapse"]) == {"True"} and set(frame["is_answer"]) == {"False"}
    assert set(frame["p_answer"]) == {""} and float(frame["kl_to_final_bits"][0]) == 0.1 + 0.2


def test_backslash_is_not_escaped_regression_defect_10(tmp_path):
    """Legacy defect 10: escapechar='\\\\' doubled backslashes; default readers broke."""
    rows, pure = _rows(["\\core"])
    write_csv_files(rows, pure, str(tmp_path / "r.csv"), str(tmp_path / "p.csv"))
    text = (tmp_path / "r.csv").read_text(encoding="utf-8")
    assert "\\core" in text and "\\\\core" not in text


def test_identical_to_csv_writer_quote_minimal_without_carriage_returns():
    import io

    from layers_core.csv_io import render_csv

    header = ["layer", "pos", "token", "entropy", "top1", "prob1", "top2"]
    cells = ['"', "a,b", "x\ny", "plain", "\\core", "", ' ("-']
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, cells])
    assert render_csv([dict(zip(header, cells))], header) == buffer.getvalue()


def test_no_temp_files_left(tmp_path):
    rows, pure = _rows(["a"])
    write_csv_files(rows, pure, str(tmp_path / "r.csv"), str(tmp_path / "p.csv"))
    assert sorted(os.listdir(tmp_path)) == ["p.csv", "r.csv"]


def test_leading_prompt_id_column(tmp_path):
    rows, pure = _rows(["a"])
    rows[0]["prompt_id"] = "q1"
    write_csv_files(rows, pure, str(tmp_path / "r.csv"), str(tmp_path / "p.csv"),
                    leading_columns=["prompt_id"])
    first = (tmp_path / "r.csv").read_text().splitlines()
    assert first[0].startswith("prompt_id,layer,pos") and first[1].startswith("q1,0,0")


def test_csv_io_and_run_dir_import_without_torch():
    code = ("import sys, layers_core.csv_io, layers_core.run_dir, layers_core.collapse_rules; "
            "import layers_core; layers_core.TOP_K_RECORD; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_every_lazy_export_resolves():
    import layers_core

    for name in layers_core.__all__:
        assert getattr(layers_core, name) is not None, name
