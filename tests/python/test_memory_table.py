"""scripts/memory_table.py: the cells, the table's ratios, the CSV round trip,
and one real set of cells through fxp-train."""

from __future__ import annotations

import importlib.util

from environment import ROOT, requires_fxp_train_and_data

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
