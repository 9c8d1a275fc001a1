"""scripts/memory_table.py: the cells, the table's ratios, the CSV round trip,
and one real set of cells through fxp-train."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from environment import FXP_TRAIN, ROOT, requires_fxp_train, requires_fxp_train_and_data

spec = importlib.util.spec_from_file_location("memory_table", ROOT / "scripts" / "memory_table.py")
memory_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_table)


def test_cells_cover_every_method_bits_batch_and_storage():
    cells = list(memory_table.cells())
    assert len(cells) == 2 * (1 + 3 * 4 * 2)  # per batch: fp32 once, three methods x four widths x two storages
    assert ("fp32", 32, 16, False) in cells and ("sqpu", 12, 256, True) in cells
    assert not any(m == "fp32" and packed for m, _, _, packed in cells)


def _row(method, bits, batch, packed, total, paper):
    parts = dict(parameters_bytes=total // 4, gradients_bytes=total // 4, optimizer_state_bytes=total // 4)
    parts["activations_bytes"] = total - 3 * (total // 4)
    return dict(method=method, bits=bits, batch_size=batch, packed=packed, device="cpu", **parts, total_bytes=total,
                step_peak_bytes=2 * total, model_paper_bytes=paper, model_full_bytes=paper)


def test_markdown_ratios_are_to_ste_with_float_storage(tmp_path):
    rows = [_row("ste", 16, 16, False, 4000, 1000), _row("sqpu", 16, 16, True, 1000, 500)]
    table = memory_table.markdown(rows)
    assert "| sqpu | 16 | packed | 0 | 0 | 0 | 0 | 1 | 2 | 0.250 | 0.500 |" in table
    md = tmp_path / "memory.md"
    md.write_text(f"intro\n{memory_table.MARKER}\nold\n{memory_table.MARKER}\noutro\n")
    csv_path = tmp_path / "rows.csv"
    memory_table.write_csv(csv_path, rows)
    assert memory_table.main(["--from-csv", str(csv_path), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "old" not in text and "0.250" in text and text.startswith("intro") and text.endswith("outro\n")


@requires_fxp_train_and_data
def test_real_cells_measure_packed_savings(tmp_path):
    csv_path = tmp_path / "m.csv"
    assert memory_table.main(["--bits", "8", "--batch-sizes", "16", "--csv", str(csv_path)]) == 0
    rows = {(r["method"], r["packed"]): r for r in memory_table.read_csv(csv_path)}
    assert len(rows) == 7
    float_sqpu, packed_sqpu = rows[("sqpu", False)], rows[("sqpu", True)]
    assert float_sqpu["parameters_bytes"] == 184490 * 4
    assert packed_sqpu["parameters_bytes"] == 184490 + 6 * 4  # int8 codes and the stand-ins
    assert packed_sqpu["optimizer_state_bytes"] == 184490  # int8 momentum codes
    # Parameters and momentum at a byte each, the saved layer inputs at a byte each (not 4).
    assert float_sqpu["total_bytes"] - packed_sqpu["total_bytes"] > 2 * 184490 * 3
    assert packed_sqpu["total_bytes"] < 0.45 * rows[("ste", False)]["total_bytes"]


def refused(args: list[str], monkeypatch, capsys) -> str:
    """The last line of stderr of memory_table with `args`, which it must refuse as a usage error (exit
    status 2) before it runs fxp-train, after its program name: "error: ..."."""
    def measured(*_, **__):
        raise AssertionError(f"memory_table {' '.join(args)}: the arguments were taken")
    monkeypatch.setattr(memory_table, "measure", measured)
    with pytest.raises(SystemExit) as e:
        memory_table.main(args)
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[-1].partition(" ")[2]


@pytest.mark.parametrize("args, message", [
    # fxp-train's widths are 2 to 32 and its batches at least 1: a CalledProcessError traceback after the first
    # run failed
    (["--bits", "1"], "argument --bits: must be in [2, 32], got 1"),
    (["--bits", "8", "64"], "argument --bits: must be in [2, 32], got 64"),
    (["--batch-sizes", "0"], "argument --batch-sizes: must be at least 1, got 0"),
    (["--batch-sizes", "x"], "argument --batch-sizes: expected a whole number, got 'x'"),
    (["--markdown", "/nonexistent/memory.md"],
     "--markdown /nonexistent/memory.md: cannot read it: No such file or directory"),
])
def test_arguments_are_checked_before_any_run(args, message, monkeypatch, capsys):
    assert refused(args, monkeypatch, capsys) == f"error: {message}"


def test_output_files_are_checked_before_any_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    for option in ("--csv", "--figure"):
        path = tmp_path / "file" / "m.csv"
        assert refused([option, str(path)], monkeypatch, capsys) == (
            f"error: argument {option}: {path}: {tmp_path / 'file'} is not a directory")


def test_a_markdown_without_the_markers_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    md = tmp_path / "memory.md"
    md.write_text("no markers\n")
    assert refused(["--markdown", str(md)], monkeypatch, capsys) == (
        f"error: {md} must hold two {memory_table.MARKER} lines around the table")


# The columns the table and the figure read, in the order of the CSV that --csv writes.
HEADER = ("method,bits,batch_size,packed,parameters_bytes,gradients_bytes,optimizer_state_bytes,activations_bytes,"
          "total_bytes,step_peak_bytes,model_paper_bytes")


def csv_file(tmp_path, text: str | bytes) -> pathlib.Path:
    path = tmp_path / "rows.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read it: No such file or directory"),  # a FileNotFoundError traceback
    (b"\xa9\x00\xffbinary", "cannot read it: not UTF-8 text (byte 0: invalid start byte)"),  # UnicodeDecodeError
    ("a,b\n1,2\n", "missing columns " + HEADER.replace(",", ", ")),  # KeyError: 'packed'
    ("", "holds no rows"),
    (HEADER + "\n", "holds no rows"),
    (HEADER + "\n" + "ste,8,16,Yes" + ",1" * 7 + "\n",
     "row 2: packed must be True or False, got Yes"),
    (HEADER + "\n" + "ste,eight,16,False" + ",1" * 7 + "\n",
     "row 2: bits must be a number, got eight"),
    (HEADER + "\n" + "ste,8,16,False,1\n",
     "row 2: gradients_bytes must be a number, got nothing"),
])
def test_a_bad_csv_is_an_error_naming_the_file_and_the_problem(tmp_path, monkeypatch, capsys, content, problem):
    path = tmp_path / "rows.csv" if content is None else csv_file(tmp_path, content)
    assert refused(["--from-csv", str(path)], monkeypatch, capsys) == (
        f"error: --from-csv {path}: {problem}")


def test_a_failing_fxp_train_is_one_line_with_its_message(tmp_path, capsys):
    fake = tmp_path / "fxp-train"
    fake.write_text("#!/bin/sh\necho 'fxp-train: device: no such device' >&2\necho 'Run with --help' >&2\nexit 2\n")
    fake.chmod(0o755)
    with pytest.raises(SystemExit) as e:
        memory_table.main(["--fxp-train", str(fake), "--bits", "8", "--batch-sizes", "16"])
    assert str(e.value) == ("memory_table.py: fxp-train failed (exit 2) on fp32, 32 bits, batch 16, float storage: "
                            "fxp-train: device: no such device")
    fake.chmod(0o644)
    with pytest.raises(SystemExit) as e:
        memory_table.main(["--fxp-train", str(fake), "--bits", "8", "--batch-sizes", "16"])
    assert str(e.value) == f"memory_table.py: cannot run {fake}: Permission denied"


@requires_fxp_train
def test_a_batch_fxp_train_refuses_is_its_message(tmp_path):
    # 2 x 40000 training images: more than Fashion-MNIST has (fxp-train checks before it reads any).
    with pytest.raises(SystemExit) as e:
        memory_table.main(["--fxp-train", str(FXP_TRAIN), "--bits", "8", "--batch-sizes", "40000"])
    assert str(e.value).startswith("memory_table.py: fxp-train failed (exit 2) on fp32, 32 bits, batch 40000, float "
                                   "storage: fxp-train: train_limit: must be at most 60000")
