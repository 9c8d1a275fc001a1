"""scripts/report on results written here: what counts as seeds of one configuration, runs made twice,
unfinished runs, and figures and text that say what they hold (the report's other tests are in
test_sweep.py, its write failures in test_report_bad_input.py)."""
from __future__ import annotations

import sys
import warnings

import pandas as pd

from environment import ROOT
from test_sweep import SQPU, finished_run

sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402


def run(root, name, config, accuracy, grid="g"):
    """A finished run as fxp-train writes it: its config names its own directory and threads."""
    d = root / name
    return finished_run(d, {"output_dir": str(d), "data_dir": "/data", "threads": len(name), "lr": 0.01,
                            "train_limit": 1024, **config}, accuracy, grid)


def test_stats_keep_configurations_apart_and_count_a_repeat_once(tmp_path, capsys):
    """Two runs of one grid differing in a setting the stats' columns do not hold (train_limit) are two
    configurations, not two seeds: two rows of stats.csv, two sets of heat maps. The same configuration
    and seed in a second directory is one seed: left out (stats, methods), with a warning naming both."""
    first, second = tmp_path / "quick", tmp_path / "quick2"
    run(first, "sqpu-s0", SQPU, 0.5)
    run(first, "sqpu-s1", {**SQPU, "seed": 1}, 0.7)
    run(first, "fp32-s0", {**SQPU, "method": "fp32"}, 0.8)
    run(second, "sqpu-s0", {**SQPU, "train_limit": 512}, 0.3)
    run(second, "again-sqpu-s1", {**SQPU, "seed": 1}, 0.9)  # quick's sqpu-s1 once more
    # A grid of seeds alone (their directories and threads differ): one cell, one row of two seeds.
    run(first, "h-s0", SQPU, 0.4, grid="h")
    run(first, "h-s1", {**SQPU, "seed": 1}, 0.6, grid="h")
    out = tmp_path / "report"
    assert report.main([str(first), str(second), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"report: warning: skipping {second / 'again-sqpu-s1'}: the same grid, settings and seed as "
            f"{first / 'sqpu-s1'}, which counts, as the first given") in err
    stats = pd.read_csv(out / "stats.csv", keep_default_na=False)
    sqpu = stats[(stats.grid == "g") & (stats.method == "sqpu")].set_index("variant")
    assert sorted(sqpu.index) == ["train_limit=1024", "train_limit=512"]
    assert (sqpu.runs["train_limit=1024"], sqpu["mean"]["train_limit=1024"]) == (2, 0.6)  # not 3 runs, 0.7
    assert (sqpu.runs["train_limit=512"], sqpu["mean"]["train_limit=512"]) == (1, 0.3)
    [h] = stats[stats.grid == "h"].itertuples()
    assert (h.variant, h.runs, h.max, h.min) == ("", 2, 0.6, 0.4)
    for name in ["g-best-worst-sr-train_limit=1024.png", "g-best-worst-sr-train_limit=512.png",
                 "h-best-worst-sr.png"]:
        assert (out / name).stat().st_size > 0, name
    assert not (out / "g-best-worst-sr.png").exists()
    runs = pd.read_csv(out / "runs.csv").set_index("dir")
    assert runs.status[str(second / "again-sqpu-s1")] == "repeat" and (runs.status == "finished").sum() == 6
    assert "configuration" not in runs.columns  # the tables' key, not a run's column
    methods = pd.read_csv(out / "methods.csv").set_index("configuration")
    assert methods.runs["16/10/8 train_limit=1024"] == 2
    md = (out / "report.md").read_text()
    assert "6 finished runs, 0 failed, 1 repeat of a run before it (the same grid, settings and seed) left out" in md
    assert "| g | sqpu | 16/10/8 train_limit=512 | sr | 64 | 1 | 30.0% |" in md


def test_the_paper_section_only_for_the_papers_grids(tmp_path):
    run(tmp_path / "r", "sqpu", SQPU, 0.5)
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    assert "Beside the paper's stated numbers" not in (out / "report.md").read_text()
    run(tmp_path / "r", "fp32", {**SQPU, "method": "fp32"}, 0.8, grid="exp1")
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    assert "| exp1 | fp32 baseline, best run | 90.0% | 80.0% |" in (out / "report.md").read_text()


def test_a_paper_claim_per_configuration(tmp_path):
    run(tmp_path / "r", "fp32", {**SQPU, "method": "fp32"}, 0.8, grid="exp1")
    run(tmp_path / "r", "fp32-512", {**SQPU, "method": "fp32", "train_limit": 512}, 0.6, grid="exp1")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| exp1 (train_limit=1024) | fp32 baseline, worst run | 76.0% | 80.0% |" in md
    assert "| exp1 (train_limit=512) | fp32 baseline, worst run | 76.0% | 60.0% |" in md


def test_a_heat_map_holds_its_whole_title_and_label(tmp_path, monkeypatch):
    """One panel of one row makes a small figure: its title and its y label must still fit in the image."""
    import matplotlib.figure
    import matplotlib.image
    extents = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, **kwargs):
        save(fig, path, **kwargs)
        renderer, dpi = fig.canvas.get_renderer(), kwargs.get("dpi", fig.dpi)
        texts = [fig._suptitle] + [ax.yaxis.label for ax in fig.axes]
        extents[str(path)] = [(t.get_text(), t.get_window_extent(renderer, dpi).width,
                               t.get_window_extent(renderer, dpi).height) for t in texts if t and t.get_text()]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    run(tmp_path / "r", "sqpu", SQPU, 0.5, grid="compare-lenet5")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    path = out / "compare-lenet5-best-worst-sr.png"
    height, width = matplotlib.image.imread(path).shape[:2]
    texts = extents[str(path)]
    assert any(text.startswith("compare-lenet5: validation accuracy") for text, _, _ in texts)
    assert any(text.startswith("total / param frac") for text, _, _ in texts)
    for text, w, h in texts:
        assert w <= width and h <= height, (text, w, h, width, height)


def test_a_std_heat_map_of_single_seeds_draws_without_warnings(tmp_path):
    """One seed per cell: every std is NaN; the panel keeps its batch sizes (and matplotlib its peace)."""
    run(tmp_path / "r", "b16", {**SQPU, "batch_size": 16}, 0.5, grid="exp2")
    run(tmp_path / "r", "b64", SQPU, 0.6, grid="exp2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert report.main([str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert (tmp_path / "report" / "exp2-std.png").stat().st_size > 0


def test_unfinished_runs_are_counted_and_named(tmp_path, capsys):
    root = tmp_path / "r"
    run(root, "done", SQPU, 0.5)
    (root / "single").mkdir()  # fxp-train stopped after an epoch
    (root / "single" / "checkpoint.pt").write_bytes(b"")
    (root / "started").mkdir()  # the sweep started it
    (root / "started" / "sweep-run.json").write_text('{"grid": "g", "id": "started", "settings": {}}')
    failed = finished_run(root / "failed", SQPU)  # a failed run is no unfinished one
    (failed / "summary.json").rename(failed / "failed.json")
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    line = "2 unfinished runs (no summary.json or failed.json) left out"
    assert f"report: {line}: {root / 'single'}, {root / 'started'}\n" in capsys.readouterr().err
    assert f"{line}: `{root / 'single'}`, `{root / 'started'}`." in (out / "report.md").read_text()
    # With nothing finished: said before the error.
    assert report.main([str(root / "single"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"report: 1 unfinished run (no summary.json or failed.json) left out: {root / 'single'}\n")


def test_counts_of_one_are_singular(tmp_path, capsys):
    run(tmp_path / "r", "one", SQPU, 0.5)
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"report: 1 run -> {out}/runs.csv, stats.csv, report.md and 1 figure\n"
    assert "1 finished run, 0 failed, in grid g.\n" in (out / "report.md").read_text()


def test_seeds_that_start_from_their_own_seeds_runs_elsewhere_are_one_configuration(tmp_path):
    """MSQ fine-tunes each seed from that seed's float32 run, which may lie outside the report's
    directories (report results/msq-resnet20 alone): the writer's config.json stands for it, so the seeds
    stay one configuration, not one per checkpoint path."""
    sources = tmp_path / "fp32-runs"
    for seed in (0, 1):
        d = sources / f"fp32-s{seed}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(
            '{"method": "fp32", "seed": %d, "output_dir": "%s", "threads": 1, "lr": 0.01}' % (seed, d))
    msq = tmp_path / "msq"
    for seed in (0, 1):
        run(msq, f"sqpu-s{seed}", {**SQPU, "seed": seed,
                                   "init_from": str(sources / f"fp32-s{seed}" / "checkpoint.pt")}, 0.5 + seed / 10)
    out = tmp_path / "report"
    assert report.main([str(msq), "--out", str(out)]) == 0
    stats = pd.read_csv(out / "stats.csv", keep_default_na=False)
    [row] = stats.itertuples()
    assert (row.runs, row.variant) == (2, "")
