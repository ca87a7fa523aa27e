"""Run folders are atomic; file writes are atomic; tensors load without unpickling code."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from erasure.base import ErasureResult
from erasure.errors import UserError
from erasure.io import atomic_write_json, load_tensors, safe_torch_load, save_tensors
from erasure.runs import RunWriter, is_finished_run, read_run_weights


def finished_runs_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and (p / "metrics.json").exists()]


def test_a_committed_run_appears_at_once_with_all_its_files(tmp_path: Path) -> None:
    dest = tmp_path / "runs" / "job"
    with RunWriter.open(dest) as run:
        run.log("hello")
        run.save_weights("unet", {"w": torch.ones(2)})
        run.write_env({"seed": 0})
        assert not dest.exists()
        assert run.path.name.startswith(".job.partial-")
        run.commit({"method": {}, "suites": {}})
    assert is_finished_run(dest)
    assert sorted(p.name for p in dest.iterdir()) == [
        "env.json",
        "log.txt",
        "metrics.json",
        "samples",
        "weights",
    ]
    assert [p.name for p in dest.parent.iterdir()] == ["job"]
    assert read_run_weights(dest)["unet"]["w"].tolist() == [1.0, 1.0]
    assert load_tensors(dest / "weights" / "unet.safetensors")[1] == {
        "component": "unet",
        "content": "changed",
    }


def test_an_exception_mid_run_leaves_no_run_folder(tmp_path: Path) -> None:
    dest = tmp_path / "runs" / "job"
    with pytest.raises(RuntimeError, match="boom"), RunWriter.open(dest) as run:
        run.save_weights("unet", {"w": torch.ones(2)})
        raise RuntimeError("boom")
    assert not dest.exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failure_while_committing_leaves_no_finished_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "runs" / "job"

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot finish the run"), RunWriter.open(dest) as run:
        monkeypatch.setattr("erasure.runs.os.rename", failing_rename)
        run.commit({"method": {}})
    assert finished_runs_under(tmp_path) == []


def test_a_killed_process_leaves_only_a_hidden_partial_folder(tmp_path: Path) -> None:
    """Crash for real (os._exit, no cleanup) after metrics.json is written but before the rename."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from erasure import runs
        runs.os.rename = lambda src, dst: os._exit(9)
        with runs.RunWriter.open({str(tmp_path / "runs" / "job")!r}) as run:
            run.save_weights("unet", {{"w": torch.ones(2)}})
            run.commit({{"method": {{}}}})
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 9, result.stderr
    leftovers = list((tmp_path / "runs").iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".job.partial-")
    assert not (tmp_path / "runs" / "job").exists()
    assert [p for p in finished_runs_under(tmp_path) if is_finished_run(p)] == []


def test_overwrite_replaces_a_finished_run_and_nothing_else(tmp_path: Path) -> None:
    dest = tmp_path / "job"
    with RunWriter.open(dest) as run:
        run.commit({"version": 1})
    with pytest.raises(UserError, match="--overwrite"):
        RunWriter.open(dest).__enter__()
    with RunWriter.open(dest, overwrite=True) as run:
        run.commit({"version": 2})
    assert json.loads((dest / "metrics.json").read_text()) == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["job"]

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a run folder"):
        RunWriter.open(other, overwrite=True).__enter__()
    assert (other / "notes.txt").read_text() == "keep me"


def test_checkpoints_are_kept_on_failure_and_removed_on_success(tmp_path: Path) -> None:
    dest = tmp_path / "job"
    with pytest.raises(RuntimeError), RunWriter.open(dest) as run:
        run.checkpoint_dir.mkdir()
        (run.checkpoint_dir / "step-50.safetensors").write_bytes(b"x")
        raise RuntimeError
    assert (tmp_path / ".job.checkpoints" / "step-50.safetensors").exists()
    with RunWriter.open(dest) as run:
        run.commit({})
    assert not (tmp_path / ".job.checkpoints").exists()


# ------------------------------------------------------------------------------------------------ file I/O


def test_atomic_write_keeps_the_old_file_when_writing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(3)})
    monkeypatch.setattr("erasure.io.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(3)})
    assert load_tensors(tmp_path / "w.safetensors")[0]["x"].tolist() == [0.0, 0.0, 0.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "w.safetensors"]


def test_save_tensors_handles_shared_and_non_contiguous_tensors(tmp_path: Path) -> None:
    base = torch.arange(6.0).reshape(2, 3)
    save_tensors(tmp_path / "w.safetensors", {"a": base, "a_t": base.t()})
    loaded, _ = load_tensors(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a_t"], base.t())


class NotATensor:
    pass


def test_safe_torch_load_refuses_pickled_objects(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"g_ema": {"w": torch.ones(1)}}, good)
    assert safe_torch_load(good)["g_ema"]["w"].item() == 1.0

    bad = tmp_path / "bad.pt"
    torch.save({"model": NotATensor()}, bad, pickle_module=pickle)
    with pytest.raises(UserError, match="refusing to load") as info:
        safe_torch_load(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no such file"):
        safe_torch_load(tmp_path / "missing.pt")


def test_erasure_result_rejects_what_cannot_be_saved() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ErasureResult(changed={})
    with pytest.raises(TypeError, match="not a tensor"):
        ErasureResult(changed={"unet": {"w": [1.0]}})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be a number"):
        ErasureResult(changed={"unet": {"w": torch.ones(1)}}, metrics={"loss": "low"})  # type: ignore[dict-item]
    full = ErasureResult.from_components({"generator": torch.nn.Linear(2, 2)})
    assert set(full.changed["generator"]) == {"weight", "bias"}
