"""erasure-studio batch: benchmark configs, cells keyed by config hash, skip/resume/failure handling, locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from batch_plugin import FailOnDog, SlowTrain
from safetensors.torch import load_file
from typer.testing import CliRunner

import erasure.runner
from erasure.base import ErasureMethod
from erasure.batch import SUMMARY_FILE, error_path, lock_path
from erasure.benchmark import load_benchmark
from erasure.cli import app
from erasure.errors import ConfigError
from erasure.locks import FileLock, process_start
from erasure.registry import get_method, list_methods, register_method, unregister_method

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def plugin_methods() -> Iterator[None]:
    register_method(SlowTrain)
    register_method(FailOnDog)
    yield
    unregister_method(SlowTrain.name)
    unregister_method(FailOnDog.name)


def write_benchmark(folder: Path, backbone: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "tiny",
        "backbones": [str(backbone)],
        "methods": [{"name": "test_shift", "params": {"steps": 2}, "grid": {"shift": [0.5, 1.0]}}],
        "targets": ["text:a cat", "text:a dog"],
        "seeds": [0],
        "evaluate": {"suites": [], "tier": "smoke"},
        "device": "cpu",
    }
    data.update(changes)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / SUMMARY_FILE).read_text())


def finished_cells(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if (p / "metrics.json").is_file())


def bias_of(run: Path) -> list[float]:
    return load_file(run / "weights" / "unet.safetensors")["conv_in.bias"].tolist()


def results_of(run: Path) -> dict[str, Any]:
    """metrics.json without the efficiency measurements (time and memory differ from run to run)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("efficiency", None)
    return metrics


# ------------------------------------------------------------------------------------------ config


def test_cells_are_the_product_and_named_by_their_config_hash(
    shift_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path
) -> None:
    bench = load_benchmark(write_benchmark(tmp_path, tiny_pipeline, seeds=[0, 3]))
    names = [cell.name for cell in bench.cells]
    assert len(names) == len(set(names)) == 2 * 2 * 2  # shift grid × targets × seeds
    assert {cell.job.method.params.shift for cell in bench.cells} == {0.5, 1.0}  # type: ignore[attr-defined]
    assert names[0].startswith("test_shift-a_cat-s0-") and len(names[0].rsplit("-", 1)[1]) == 8
    # The device and checkpoint interval do not change what a cell computes, so not its name either.
    moved = load_benchmark(bench.source, ["device=auto", "checkpoint_every=7"])
    assert [cell.name for cell in moved.cells] == names
    changed = load_benchmark(bench.source, ["seeds=[0,4]"])
    assert set(names) & {cell.name for cell in changed.cells} == {name for name in names if "-s0-" in name}


def test_methods_for_another_backbone_kind_are_left_out(
    shift_method: type[ErasureMethod], gan_method: type[ErasureMethod], tiny_pipeline: Path,
    tiny_gan_checkpoint: Path, tmp_path: Path,
) -> None:  # fmt: skip
    config = write_benchmark(
        tmp_path, tiny_pipeline,
        backbones=[str(tiny_pipeline), str(tiny_gan_checkpoint)],
        methods=[{"name": "test_shift"}, {"name": "test_zero_const"}],
    )  # fmt: skip
    cells = load_benchmark(config).cells
    pairs = {(Path(c.job.backbone).name, c.job.method.name) for c in cells}
    assert pairs == {("pipeline", "test_shift"), ("g.safetensors", "test_zero_const")}


@pytest.mark.parametrize(
    ("changes", "sets", "fragment"),
    [
        ({"colour": "red"}, [], "colour: unknown field; allowed fields here: name, backbones, methods"),
        ({"methods": [{"name": "nope"}]}, [], "methods[0].name: got 'nope'; must be a registered method"),
        ({"methods": [{"name": "test_shift", "grid": {"shift": []}}]}, [], "methods[0].grid: got"),
        ({"methods": [{"name": "test_shift", "grid": {"shift": [1, -1]}}]}, [], "methods[0].grid.shift: got -1"),
        ({"methods": [{"name": "test_shift", "params": {"lr": 1}}]}, [],
         "methods[0].params.lr: unknown field; allowed fields here: shift, steps"),
        ({"methods": [{"name": "test_shift", "budget": 3}]}, [], "methods[0].budget: unknown field"),
        ({"targets": ["cat"]}, [], "targets[0]: got 'cat'; must be 'style:<name>'"),
        ({"targets": []}, [], "targets: got []"),
        ({"seeds": [0, 0]}, [], "seeds[1]: got 0; is listed twice"),
        ({"seeds": [-1]}, [], "seeds[0]: got -1; must be >= 0"),
        ({"evaluate": {"suites": [], "tier": "huge"}}, [], "evaluate.tier: got 'huge'"),
        ({"backbones": ["no/such/pipeline"]}, [], "backbones[0]: got 'no/such/pipeline'"),
        ({"evaluate": {"suites": ["gan"]}}, [], "evaluate.suites[0]: got 'gan'; it runs on none of the backbones"),
        ({"evaluate": {"suites": ["canvas"]}}, [], "evaluate.suites: canvas after erasure needs a MiniCanvas"),
        ({}, ["seeds=[1,x]"], "(--set seeds=[1,x]): seeds[1]: got 'x'"),
        ({}, ["methods"], "--set methods: expected dotted.path=value"),
    ],
    ids=["extra", "method", "empty-grid", "grid-value", "param-name", "entry-field", "target", "no-targets",
         "seed-twice", "seed-negative", "tier", "backbone", "suite-kind", "suite-backbone", "set", "set-syntax"],
)  # fmt: skip
def test_bad_benchmark_configs_exit_2_with_one_line(
    shift_method: type[ErasureMethod],
    tiny_pipeline: Path,
    tmp_path: Path,
    changes: dict[str, Any],
    sets: list[str],
    fragment: str,
) -> None:
    config = write_benchmark(tmp_path, tiny_pipeline, **changes)
    out = tmp_path / "out"
    args = ["batch", str(config), "--out", str(out)] + [arg for s in sets for arg in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}"), result.output
    assert fragment in lines[0]
    assert not out.exists()


def test_each_backbone_gets_the_suites_that_run_on_it(
    shift_method: type[ErasureMethod], gan_method: type[ErasureMethod], tmp_path: Path
) -> None:
    config = tmp_path / "bench.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "mixed",
                "backbones": ["minicanvas-sd", "minicanvas-gan"],
                "methods": [{"name": "test_shift"}, {"name": "test_zero_const"}],
                "targets": ["style:Ember"],
                "evaluate": {"suites": ["canvas", "gan"], "tier": "smoke"},
            }
        )
    )
    suites = {cell.job.backbone: cell.job.evaluate.suites for cell in load_benchmark(config).cells}
    assert suites == {"minicanvas-sd": ["canvas"], "minicanvas-gan": ["gan"]}


def test_a_method_that_fits_no_backbone_is_a_config_error(
    gan_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path
) -> None:
    config = write_benchmark(tmp_path, tiny_pipeline, methods=[{"name": "test_zero_const"}])
    with pytest.raises(ConfigError, match=r"methods\[0\]\.name: got 'test_zero_const'; it works on gan"):
        load_benchmark(config)


def test_a_missing_benchmark_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["batch", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nope.yaml'}: no such file"


def test_shipped_benchmark_configs_validate() -> None:
    """Every configs/benchmarks/*.yaml validates (needs its methods and suites registered)."""
    configs = sorted((REPO / "configs" / "benchmarks").glob("*.yaml"))
    assert {path.name for path in configs} >= {"minicanvas.yaml", "minicanvas-smoke.yaml"}
    problems = []
    for path in configs:
        try:
            load_benchmark(path)
        except ConfigError as err:
            problems.append(str(err))
    assert not problems, f"registered methods: {list_methods()}; problems: {problems}"
    # minicanvas.yaml covers every registered diffusion method (test-only methods aside; soup erases only its own
    # shards' styles, so it has its own job config instead of the benchmark's target grid).
    reference = load_benchmark(REPO / "configs" / "benchmarks" / "minicanvas.yaml")
    shipped = {entry.name for entry in reference.config.methods}
    registered = {name for name in list_methods() if get_method(name).backbone_kind == "sd"}
    assert {name for name in registered if not name.startswith("test_")} - {"soup"} <= shipped


# ------------------------------------------------------------------------------------------ running


def test_a_batch_runs_every_cell_and_a_rerun_does_no_work(
    shift_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_benchmark(tmp_path, tiny_pipeline)
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = [cell.name for cell in load_benchmark(config).cells]
    assert finished_cells(out) == sorted(names)
    summary = summary_of(out)
    assert summary["counts"] == {"finished": 4}
    assert [cell["this_batch"] for cell in summary["cells"]] == ["ran"] * 4
    assert "4 finished" in result.output and "4 ran" in result.output
    shifted = {cell["name"]: cell["params"]["shift"] for cell in summary["cells"]}
    for name, shift in shifted.items():
        config_text = yaml.safe_load((out / name / "config.resolved.yaml").read_text())
        assert config_text["name"] == name and config_text["method"]["params"]["shift"] == shift
    assert not [p for p in out.iterdir() if p.name.endswith((".lock", ".error.json")) or "partial" in p.name]

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(erasure.runner, "run_erase", no_work)
    started = time.perf_counter()
    again = runner.invoke(app, ["batch", str(config), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert time.perf_counter() - started < 60
    assert [cell["this_batch"] for cell in summary_of(out)["cells"]] == ["skipped"] * 4
    assert "4 skipped" in again.output


def test_a_failing_cell_is_reported_and_the_others_finish(
    plugin_methods: None, tiny_pipeline: Path, tmp_path: Path
) -> None:
    config = write_benchmark(tmp_path, tiny_pipeline, methods=[{"name": "test_fail_on_dog"}])
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(config), "--out", str(out)])
    assert result.exit_code == 1
    cells = {cell["target"]: cell for cell in summary_of(out)["cells"]}
    assert cells["text:a cat"]["status"] == "finished"
    dog = cells["text:a dog"]
    assert dog["status"] == "failed" and dog["this_batch"] == "failed"
    assert dog["error"] == "RuntimeError: cannot erase 'a dog'"
    assert f"failed: {dog['name']}: RuntimeError: cannot erase 'a dog'" in result.output
    marker = json.loads(error_path(out, dog["name"]).read_text())
    assert "Traceback" in marker["traceback"]
    assert finished_cells(out) == [cells["text:a cat"]["name"]]
    assert not list(out.glob(".*.partial-*")) and not list(out.glob(".*.lock"))


def test_a_locked_cell_is_not_run_twice(
    shift_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path
) -> None:
    config = write_benchmark(tmp_path, tiny_pipeline, targets=["text:a cat"])
    out = tmp_path / "out"
    busy, free = (cell.name for cell in load_benchmark(config).cells)
    with FileLock(lock_path(out, busy)):  # as if another live process were running it
        result = runner.invoke(app, ["batch", str(config), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"left {busy}: it is running in pid {os.getpid()}" in result.output
        cells = {cell["name"]: cell for cell in summary_of(out)["cells"]}
        assert cells[busy]["status"] == "running" and cells[busy]["this_batch"] == "busy"
        assert finished_cells(out) == [free]
    again = runner.invoke(app, ["batch", str(config), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert finished_cells(out) == sorted([busy, free])


def test_a_killed_cell_leaving_a_stale_lock_and_partial_folder_is_rerun(
    shift_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path
) -> None:
    config = write_benchmark(
        tmp_path, tiny_pipeline, targets=["text:a cat"], methods=[{"name": "test_shift"}]
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert runner.invoke(app, ["batch", str(config), "--out", str(clean)]).exit_code == 0
    (name,) = (cell.name for cell in load_benchmark(config).cells)
    dead = dead_pid()
    killed.mkdir()
    lock_path(killed, name).write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead, "start": None, "created": time.time()})
    )
    partial = killed / f".{name}.partial-{dead}"
    (partial / "weights").mkdir(parents=True)
    (partial / "log.txt").write_text("killed here\n")
    result = runner.invoke(app, ["batch", str(config), "--out", str(killed)])
    assert result.exit_code == 0, result.output
    assert finished_cells(killed) == [name]
    assert not partial.exists() and not lock_path(killed, name).exists()
    assert bias_of(killed / name) == bias_of(clean / name)
    assert results_of(killed / name) == results_of(clean / name)


def test_a_batch_killed_mid_cell_resumes_to_the_same_numbers(
    plugin_methods: None, tiny_pipeline: Path, tmp_path: Path
) -> None:
    """SIGKILL a real `erasure-studio batch` after the cell's first checkpoint; the rerun resumes from it."""
    method = {"name": "test_slow_train", "params": {"steps": 6, "sleep_s": 0.5}}
    config = write_benchmark(
        tmp_path, tiny_pipeline, targets=["text:a cat"], methods=[method], checkpoint_every=1
    )
    (name,) = (cell.name for cell in load_benchmark(config).cells)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    checkpoint = killed / f".{name}.checkpoints" / "training_state.safetensors"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "batch_plugin.py"), "batch", str(config), "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / name).exists()
    assert lock_path(killed, name).exists() and list(killed.glob(f".{name}.partial-*"))

    resumed = runner.invoke(app, ["batch", str(config), "--out", str(killed)])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from checkpoint at step" in (killed / name / "log.txt").read_text()
    assert not list(killed.glob(".*.partial-*")) and not lock_path(killed, name).exists()
    assert not checkpoint.parent.exists()

    uninterrupted = runner.invoke(app, ["batch", str(config), "--out", str(clean)])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert bias_of(killed / name) == bias_of(clean / name)
    assert results_of(killed / name) == results_of(clean / name)


def test_processes_run_cells_in_parallel_workers(
    plugin_methods: None, tiny_pipeline: Path, tmp_path: Path
) -> None:
    config = write_benchmark(
        tmp_path, tiny_pipeline, methods=[{"name": "test_slow_train", "params": {"steps": 2}}],
        seeds=[0, 1],
    )  # fmt: skip
    out = tmp_path / "out"
    result = runner.invoke(app, ["batch", str(config), "--out", str(out), "--processes", "2"])
    assert result.exit_code == 0, result.output
    summary = summary_of(out)
    assert summary["counts"] == {"finished": 4}
    sequential = tmp_path / "sequential"
    assert runner.invoke(app, ["batch", str(config), "--out", str(sequential)]).exit_code == 0
    for cell in summary["cells"]:
        assert bias_of(out / cell["name"]) == bias_of(sequential / cell["name"])


def test_launcher_ranks_split_the_cells(
    shift_method: type[ErasureMethod], tiny_pipeline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under accelerate/torchrun (RANK, WORLD_SIZE), each process runs every WORLD_SIZE-th cell."""
    config = write_benchmark(
        tmp_path, tiny_pipeline, methods=[{"name": "test_shift", "grid": {"shift": [1, 2]}}]
    )
    names = [cell.name for cell in load_benchmark(config).cells]
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        result = runner.invoke(app, ["batch", str(config), "--out", str(out)])
        assert result.exit_code == 0, result.output
        expected = names[int(rank) :: 2] if rank == "1" else names
        assert finished_cells(out) == sorted(expected)
    summary = summary_of(out)
    assert (summary["rank"], summary["world_size"]) == (0, 2)
    assert [cell.get("this_batch") for cell in summary["cells"]] == ["ran", None, "ran", None]


# ------------------------------------------------------------------------------------------ locks


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "cell.lock"), FileLock(tmp_path / "cell.lock")
    assert first.acquire()
    assert not second.acquire()
    owner = second.owner()
    assert owner is not None and owner.pid == os.getpid()
    first.release()
    assert not (tmp_path / "cell.lock").exists()
    assert second.acquire()
    second.release()


def test_a_stale_lock_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "cell.lock"
    host = os.uname().nodename
    path.write_text(json.dumps({"host": host, "pid": dead_pid(), "start": None, "created": 0.0}))
    lock = FileLock(path)
    assert lock.acquire()
    lock.release()
    # A live pid that now belongs to another process (pid reuse) does not hold the lock either.
    if process_start(os.getpid()) is not None:
        path.write_text(json.dumps({"host": host, "pid": os.getpid(), "start": "1", "created": 0.0}))
        assert lock.acquire()
        lock.release()


def test_a_lock_being_written_or_held_on_another_host_is_respected(tmp_path: Path) -> None:
    path = tmp_path / "cell.lock"
    path.write_text("")  # created by O_EXCL, owner not written yet
    assert not FileLock(path).acquire()
    path.write_text(json.dumps({"host": "elsewhere", "pid": dead_pid(), "start": None, "created": 0.0}))
    assert not FileLock(path).acquire()
