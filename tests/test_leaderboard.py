"""erasure-studio leaderboard: grouping, means and spreads, the three tables, the two plots, honest gaps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from erasure.base import ErasureMethod
from erasure.cli import app
from erasure.envinfo import machine_label
from erasure.leaderboard import write_leaderboard
from erasure.leaderboard.plots import pareto_front
from erasure.leaderboard.records import budget_label, flatten_metrics

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    folder: Path,
    *,
    method: str,
    target: str,
    seed: int,
    suites: dict[str, Any],
    params: dict[str, Any] | None = None,
    backbone: str = "minicanvas-sd",
    evaluated: bool = True,
) -> Path:
    """A finished run folder as the runner writes it (only the files the leaderboard reads)."""
    folder.mkdir(parents=True)
    config = {
        "name": folder.name,
        "seed": seed,
        "backbone": backbone,
        "method": {"name": method, "params": params or {}},
        "target": target,
        "evaluate": {"suites": ["canvas"] if evaluated else [], "tier": "quick"},
    }
    (folder / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"method": {"final_loss": 0.1}, "suites": suites}))
    return folder


def canvas(ua: float, ira: float, cra: float, **more: float) -> dict[str, float]:
    return {"ua": ua, "ira": ira, "cra": cra, **more}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    efficiency = {"erase_time_s": 10.0, "peak_mem_mb": 500.0, "storage_mb": 3.0}
    make_run(
        root / "b1" / "alpha-Ember-s0",
        method="alpha",
        target="style:Ember",
        seed=0,
        suites={"canvas": canvas(0.8, 0.6, 0.9, fid=40.0, clip_score=30.0), "efficiency": efficiency},
    )
    make_run(
        root / "b1" / "alpha-Ember-s1",
        method="alpha",
        target="style:Ember",
        seed=1,
        suites={
            "canvas": canvas(1.0, 0.8, 0.7, fid=50.0, clip_score=28.0),
            "efficiency": {**efficiency, "erase_time_s": 14.0},
        },
    )
    make_run(
        root / "b2" / "deeper" / "alpha-Cat-s0",
        method="alpha",
        target="object:Cat",
        seed=0,
        suites={
            "canvas": canvas(0.5, 0.4, 0.3, fid=60.0),
            "hub": {"target_proportion": 0.25, "attack_asr": 0.5, "extra_aspect": 2.0},
        },
    )
    # Another budget of the same method: its own row. No evaluation at all: every metric is missing.
    make_run(
        root / "b2" / "alpha-big",
        method="alpha",
        target="style:Ember",
        seed=0,
        params={"steps": 9},
        suites={},
        evaluated=False,
    )
    make_run(
        root / "b2" / "beta-Ember-s0",
        method="beta",
        target="style:Ember",
        seed=0,
        suites={"canvas": canvas(0.9, 0.9, 0.9)},
    )
    # Not finished runs: a partial folder (hidden), a folder without metrics.json.
    make_run(
        root / "b1" / ".alpha-x.partial-123",
        method="alpha",
        target="style:Ember",
        seed=5,
        suites={"canvas": canvas(0.0, 0.0, 0.0)},
    )
    (root / "b1" / "unfinished").mkdir()
    return root


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as fh:
        return {(row["method"], row["budget"]): row for row in csv.DictReader(fh)}


def test_rows_average_over_targets_and_seeds_with_the_spread(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    result = write_leaderboard([runs / "b1", runs / "b2"], out, warn=lambda line: None)
    assert sorted(path.name for path in result.files) == [
        "leaderboard.csv", "leaderboard.html", "leaderboard.md", "pareto.png", "time_memory.png"
    ]  # fmt: skip
    rows = read_csv(out / "leaderboard.csv")
    assert set(rows) == {("alpha", "defaults"), ("alpha", "steps=9"), ("beta", "defaults")}
    alpha = rows[("alpha", "defaults")]
    assert (alpha["runs"], alpha["targets"], alpha["seeds"]) == ("3", "2", "2")
    assert alpha["target_list"] == "object:Cat style:Ember" and alpha["tier"] == "quick"
    # Style columns: the two style-target runs; UA 80 and 100 %.
    assert float(alpha["style_ua_pct_mean"]) == pytest.approx(90.0)
    assert float(alpha["style_ua_pct_std"]) == pytest.approx(math.sqrt(200.0))
    assert (alpha["style_ua_pct_min"], alpha["style_ua_pct_max"], alpha["style_ua_pct_n"]) == (
        "80.0",
        "100.0",
        "2",
    )
    assert float(alpha["style_ira_pct_mean"]) == pytest.approx(70.0)
    # Object columns: the one object-target run, no spread.
    assert float(alpha["object_ua_pct_mean"]) == pytest.approx(50.0)
    assert alpha["object_ua_pct_std"] == "" and alpha["object_ua_pct_n"] == "1"
    # FID over all three runs, CLIP over the two that have it.
    assert float(alpha["fid_mean"]) == pytest.approx(50.0) and alpha["fid_n"] == "3"
    assert float(alpha["clip_score_mean"]) == pytest.approx(29.0) and alpha["clip_score_n"] == "2"
    assert float(alpha["time_s_mean"]) == pytest.approx(12.0)
    assert float(alpha["hub_target_proportion_pct_mean"]) == pytest.approx(25.0)
    assert float(alpha["attack_asr_pct_mean"]) == pytest.approx(50.0)
    assert float(alpha["hub_extra_aspect_mean"]) == pytest.approx(2.0)
    assert alpha["pre_attack_asr_pct_mean"] == "" and "gan_fid_mean" not in alpha
    # Nothing is invented for a run without evaluation.
    unevaluated = rows[("alpha", "steps=9")]
    assert (
        unevaluated["tier"] == "" and unevaluated["style_ua_pct_mean"] == "" and unevaluated["fid_n"] == "0"
    )
    assert rows[("beta", "defaults")]["time_s_mean"] == ""


def test_markdown_columns_follow_unlearncanvas_and_show_gaps(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    write_leaderboard([runs], out, warn=lambda line: None)
    text = (out / "leaderboard.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Backbone"))
    expected = ["Backbone", "Method", "Budget", "Tier", "Runs", "Targets", "Seeds",
                "Style UA (%) ↑", "Style IRA (%) ↑", "Style CRA (%) ↑", "Object UA (%) ↑", "Object IRA (%) ↑",
                "Object CRA (%) ↑", "FID ↓", "CLIP ↑", "Time (s) ↓", "Memory (MB) ↓", "Storage (MB) ↓",
                "HUB target proportion (%) ↓", "HUB multilingual (%) ↓", "HUB selective alignment (%) ↑",
                "HUB pinpoint (%) ↑", "HUB quality FID ↓", "HUB alignment (CLIP) ↑", "HUB extra_aspect",
                "Pre-attack ASR (%) ↓", "Attack ASR (%) ↓"]  # fmt: skip
    assert [cell.strip() for cell in header.strip("|").split("|")] == expected
    alpha = next(line for line in text.splitlines() if line.startswith("| minicanvas-sd | alpha | defaults"))
    cells = [cell.strip() for cell in alpha.strip("|").split("|")]
    assert cells[4:7] == ["3", "2", "2"]
    assert cells[7] == "90.0 ± 14.1 (n=2)"
    assert cells[10] == "50.0 (n=1)"
    assert cells[13] == "50.00 ± 10.00"
    unevaluated = next(line for line in text.splitlines() if "| steps=9 |" in line)
    assert unevaluated.count("—") == len(expected) - 6  # tier, seeds... every metric
    assert "![pareto.png](pareto.png)" in text


def test_html_is_a_standalone_sortable_table(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    write_leaderboard([runs], out, warn=lambda line: None)
    page = (out / "leaderboard.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<table id="leaderboard" class="sortable">' in page
    assert 'addEventListener("click"' in page and "rows.sort(" in page
    assert page.count("<tr>") == 1 + 3  # header + rows
    assert 'data-type="number">Style UA (%) ↑</th>' in page
    assert "http://" not in page and "https://" not in page and 'src="data:image/png;base64,' in page
    assert '<td class="missing" data-value="">—</td>' in page


def test_plots_are_pngs_even_without_data(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    write_leaderboard([runs], out, warn=lambda line: None)
    empty = tmp_path / "empty"
    write_leaderboard([runs / "b2" / "alpha-big"], empty, warn=lambda line: None)
    for folder in (out, empty):
        for name in ("pareto.png", "time_memory.png"):
            assert (folder / name).read_bytes().startswith(PNG_MAGIC)


def test_pareto_front_keeps_the_undominated_points() -> None:
    points = [(90.0, 50.0), (80.0, 80.0), (70.0, 70.0), (95.0, 40.0), (80.0, 60.0)]
    assert pareto_front(points) == [1, 0, 3]


def test_flat_and_nested_metric_layouts_read_the_same() -> None:
    nested = {"method": {"loss": 1}, "suites": {"canvas": {"ua": 0.5, "note": "x"}}, "efficiency": {"t": 2}}
    flat = {"canvas.ua": 0.5, "suites": {"efficiency.t": 2}, "method.loss": 1, "bad": float("nan")}
    assert flatten_metrics(nested) == flatten_metrics(flat) == {"method.loss": 1.0, "canvas.ua": 0.5,
                                                                 "efficiency.t": 2.0}  # fmt: skip


def test_budget_names_the_params_that_differ_from_the_defaults(shift_method: type[ErasureMethod]) -> None:
    assert budget_label("test_shift", {"shift": 0.5, "steps": 3}) == "defaults"
    assert budget_label("test_shift", {"shift": 1.0, "steps": 3}) == "shift=1"
    assert budget_label("not_registered", {"b": 2, "a": 0.001}) == "a=0.001, b=2"


def test_the_cli_writes_the_files_and_reports_bad_input(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "board"
    result = runner.invoke(app, ["leaderboard", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "leaderboard of 5 runs in 3 rows" in result.output
    assert (out / "leaderboard.html").is_file()
    missing = runner.invoke(app, ["leaderboard", str(tmp_path / "nope"), "--out", str(out)])
    assert (
        missing.exit_code == 1
        and missing.output.strip() == f"error: {tmp_path / 'nope'}: no such file or folder"
    )
    nothing = runner.invoke(app, ["leaderboard", str(runs / "b1" / "unfinished"), "--out", str(out)])
    assert nothing.exit_code == 1 and "no finished run folders" in nothing.output


def test_an_unreadable_run_is_skipped_with_a_warning(runs: Path, tmp_path: Path) -> None:
    (runs / "b2" / "beta-Ember-s0" / "metrics.json").write_text("{not json")
    warnings: list[str] = []
    result = write_leaderboard([runs], tmp_path / "board", warn=warnings.append)
    assert len(result.skipped) == 1 and "beta-Ember-s0" in warnings[0]
    assert {row.method for row in result.board.rows} == {"alpha"}


def test_gan_metrics_get_their_columns(tmp_path: Path) -> None:
    make_run(
        tmp_path / "runs" / "gan-run",
        method="gamma",
        target="object:Cat",
        seed=0,
        backbone="minicanvas-gan",
        suites={"gan": {"fid": 12.5, "kept_share": 0.9}, "efficiency": {"erase_time_s": 3.0}},
    )
    result = write_leaderboard([tmp_path / "runs"], tmp_path / "board", warn=lambda line: None)
    ids = [column.id for column in result.board.columns]
    assert ids.index("attack_asr_pct") < ids.index("gan_fid") and "gan_clip_unlearning" in ids
    (row,) = result.board.rows
    assert row.stats["gan_fid"] is not None and row.stats["gan_fid"].mean == 12.5
    assert row.stats["style_ua_pct"] is None


def write_env(run: Path, **env: Any) -> None:
    (run / "env.json").write_text(json.dumps({"device": "cpu", "seed": 0, **env}))


def test_each_row_says_which_machines_its_times_come_from(runs: Path, tmp_path: Path) -> None:
    slow = {
        "model": "AMD EPYC (family 23, model 1)",
        "capability": "AVX2",
        "logical_cores": 2,
        "torch_threads": 2,
    }
    fast = {**slow, "model": "AMD EPYC (family 25, model 17)", "capability": "AVX512"}
    write_env(runs / "b1" / "alpha-Ember-s0", cpu=slow)
    write_env(runs / "b1" / "alpha-Ember-s1", cpu=fast)
    write_env(runs / "b2" / "beta-Ember-s0", cpu=slow, device="cuda:0", cuda_name="NVIDIA H200")
    (runs / "b2" / "deeper" / "alpha-Cat-s0" / "env.json").write_text("{not json")  # unreadable: unknown
    result = write_leaderboard([runs], tmp_path / "board", warn=lambda line: None)
    rows = {row.label: row for row in result.board.rows}
    assert rows["alpha"].machines == [
        "AMD EPYC (family 23, model 1), AVX2, 2 threads",
        "AMD EPYC (family 25, model 17), AVX512, 2 threads",
    ]
    assert rows["beta"].machines == ["NVIDIA H200"] and rows["alpha (steps=9)"].machines == []
    markdown = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "timed on 2 machines: AMD EPYC (family 23, model 1), AVX2, 2 threads; AMD EPYC" in markdown
    assert "(1 run without a recorded machine)" in markdown
    assert "beta: targets style:Ember; seeds 0; timed on NVIDIA H200" in markdown
    assert "alpha (steps=9): targets style:Ember; seeds 0; machine not recorded" in markdown
    assert "Warning: the runs were timed on 3 different machines" in markdown
    table = read_csv(tmp_path / "board" / "leaderboard.csv")
    assert table[("beta", "defaults")]["machines"] == "NVIDIA H200"
    assert table[("alpha", "defaults")]["machines"].count("AMD EPYC") == 2


def test_one_machine_gives_no_mixing_warning(runs: Path, tmp_path: Path) -> None:
    cpu = {"model": "Some CPU", "capability": "AVX2", "logical_cores": 2, "torch_threads": 2}
    for run in (
        runs / "b1" / "alpha-Ember-s0",
        runs / "b1" / "alpha-Ember-s1",
        runs / "b2" / "beta-Ember-s0",
    ):
        write_env(run, cpu=cpu)
    write_leaderboard([runs], tmp_path / "board", warn=lambda line: None)
    markdown = (tmp_path / "board" / "leaderboard.md").read_text()
    assert (
        "Warning" not in markdown
        and "beta: targets style:Ember; seeds 0; timed on Some CPU, AVX2, 2 threads" in markdown
    )
    assert machine_label({"cpu": {**cpu, "torch_threads": 1}}) == "Some CPU, AVX2, 1 thread"

