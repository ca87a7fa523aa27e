"""The erasure-studio command line: help, listings, honest "not yet available", the erase flow, shadowing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from erasure.base import ErasureMethod
from erasure.cli import app, evaluate_shadowing
from generators.minicanvas.concepts import OBJECTS, STYLES

COMMANDS = ["erase", "evaluate", "batch", "leaderboard", "export", "ui", "world", "methods"]
runner = CliRunner()


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "erasure-studio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "erasure.cli"]


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in result.output, command


@pytest.mark.parametrize(
    "args",
    [[c, "--help"] for c in COMMANDS] + [["world", sub, "--help"] for sub in ("build", "verify", "concepts")],
    ids=lambda args: " ".join(args[:-1]),
)
def test_every_command_has_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize("command", ["erase", "batch", "evaluate"])
def test_config_commands_accept_out_and_set(command: str) -> None:
    output = runner.invoke(app, [command, "--help"]).output
    assert "--out" in output and "--set" in output


def test_console_script_runs_the_real_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [*cli_command(), "--help"], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_methods_json_lists_registered_methods(shift_method: type[ErasureMethod]) -> None:
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert {"name": "test_shift", "backbone": "sd", "description": "Test-only: shifts one UNet bias."} in rows
    assert all(set(row) == {"name", "backbone", "description"} for row in rows)
    assert [row["name"] for row in rows] == sorted(row["name"] for row in rows)


def test_methods_without_json_is_a_table(shift_method: type[ErasureMethod]) -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    assert any(line.split()[:2] == ["test_shift", "sd"] for line in result.output.splitlines())


def test_world_concepts_json() -> None:
    result = runner.invoke(app, ["world", "concepts", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == {"styles": list(STYLES), "objects": list(OBJECTS)}


# --------------------------------------------------------------------------------------------------- world


def test_world_build_without_the_builder_is_not_yet_available(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import raise ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "generators.minicanvas.world", None)
    result = runner.invoke(app, ["world", "build"])
    assert result.exit_code == 1
    assert "not yet available" in result.output


def fake_world(
    monkeypatch: pytest.MonkeyPatch, report: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    """Stand in for generators.minicanvas.world; returns the list of calls it receives."""
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("generators.minicanvas.world")
    module.STAGES = ("classifier", "clip", "sd", "gan")  # type: ignore[attr-defined]
    module.build = lambda **kwargs: calls.append(("build", kwargs))  # type: ignore[attr-defined]
    module.verify = lambda **kwargs: calls.append(("verify", kwargs)) or report  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "generators.minicanvas.world", module)
    return calls


def test_world_build_passes_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_world(monkeypatch)
    args = ["world", "build", "--only", "classifier", "--only", "sd", "--device", "cpu", "--no-resume"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [("build", {"only": ["classifier", "sd"], "device": "cpu", "resume": False})]
    runner.invoke(app, ["world", "build"])
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert calls[-1] == ("build", {"only": None, "device": auto, "resume": True})


def test_world_build_set_overrides_the_build_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from generators.minicanvas.train import WorldSettings

    calls = fake_world(monkeypatch)
    args = ["world", "build", "--only", "gan", "--device", "cpu", "--set", "gan_steps=20000", "--set", "unet.batch=64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = calls
    settings = kwargs["settings"]
    assert isinstance(settings, WorldSettings)
    assert settings.gan_steps == 20000 and settings.unet.batch == 64
    # Everything not overridden keeps the recipe's defaults.
    assert settings.model_dump(exclude={"gan_steps", "unet"}) == WorldSettings().model_dump(
        exclude={"gan_steps", "unet"})
    assert settings.unet.lr == WorldSettings().unet.lr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--device", "tpu"], "--device: got 'tpu'"), (["--only", "dragons"], "--only: got 'dragons'"),
     (["--set", "gan_stepz=5"], "gan_stepz: unknown field; allowed fields here: classifier, clip,"),
     (["--set", "unet.batch=0"], "(--set unet.batch=0): unet.batch: got 0; must be > 0"),
     (["--set", "unet.speed=3"], "unet.speed: unknown field; allowed fields here: steps, batch, lr, warmup, seed")],
    ids=["device", "only", "unknown-field", "bad-value", "unknown-nested"],
)
def test_world_build_rejects_bad_options(
    monkeypatch: pytest.MonkeyPatch, args: list[str], fragment: str
) -> None:
    calls = fake_world(monkeypatch)
    result = runner.invoke(app, ["world", "build", *args])
    assert result.exit_code == 2
    assert fragment in result.output
    assert calls == []


@pytest.mark.parametrize(
    ("report", "code"), [({"clip_top1": 0.9}, 0), ({"clip_top1": 0.1, "passed": False}, 1)]
)
def test_world_verify_prints_and_writes_the_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, report: dict[str, Any], code: int
) -> None:
    monkeypatch.setenv("ERASURE_STUDIO_WORLD", str(tmp_path))
    calls = fake_world(monkeypatch, report)
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["world", "verify", "--json", str(out), "--tier", "quick", "--device", "cpu"])
    assert result.exit_code == code
    assert calls == [("verify", {"tier": "quick", "device": "cpu"})]
    assert json.loads(result.output) == report == json.loads(out.read_text())
    assert runner.invoke(app, ["world", "verify", "--tier", "huge"]).exit_code == 2


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_world(monkeypatch)

    def broken_build(**kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sys.modules["generators.minicanvas.world"], "build", broken_build)
    result = runner.invoke(app, ["world", "build", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "internal error: RuntimeError: disk on fire (rerun with --debug for the traceback)"
    )
    debug = runner.invoke(app, ["--debug", "world", "build", "--device", "cpu"])
    assert isinstance(debug.exception, RuntimeError)


def test_world_verify_without_a_world_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ERASURE_STUDIO_WORLD", str(tmp_path / "none"))
    calls = fake_world(monkeypatch, {})
    result = runner.invoke(app, ["world", "verify", "--device", "cpu"])
    assert result.exit_code == 1
    assert "world build" in result.output
    assert calls == []


# ---------------------------------------------------------------------------------------------- erase flow


def write_job(tmp_path: Path, backbone: Path | str, **changes: Any) -> Path:
    job = {
        "name": "shifted",
        "seed": 1,
        "device": "cpu",
        "backbone": str(backbone),
        "method": {"name": "test_shift", "params": {"shift": 0.25, "steps": 4}},
        "target": "text:a red car",
        **changes,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_erase_writes_a_complete_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_pipeline: Path, shift_method: type[ErasureMethod]
) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_job(tmp_path, tiny_pipeline)

    result = runner.invoke(app, ["erase", str(config), "--set", "method.params.shift=0.75"])

    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "shifted"
    assert sorted(p.name for p in run.iterdir()) == [
        "config.resolved.yaml", "env.json", "log.txt", "metrics.json", "samples", "weights",
    ]  # fmt: skip
    # No partial or checkpoint folder is left next to it.
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["shifted"]

    resolved = yaml.safe_load((run / "config.resolved.yaml").read_text())
    assert resolved["method"] == {"name": "test_shift", "params": {"shift": 0.75, "steps": 4}}
    assert resolved["backbone"] == str(tiny_pipeline.resolve())

    base = load_file(tiny_pipeline / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.bias"]
    changed = load_file(run / "weights" / "unet.safetensors")
    assert list(changed) == ["conv_in.bias"]
    assert (changed["conv_in.bias"] - base).sub(0.75).abs().max() < 1e-6

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"method", "efficiency"}  # no suites were asked for
    assert metrics["method"] == {"final_loss": 0.5}
    assert set(metrics["efficiency"]) == {"erase_time_s", "peak_mem_mb", "storage_mb"}
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 1 and env["device"] == "cpu"
    assert env["packages"]["torch"] and env["packages"]["diffusers"]
    assert {"load", "erase", "total"} <= set(env["timings_s"])
    cpu = env["cpu"]  # the machine behind the timings
    assert cpu["model"] and cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["torch_threads"] == torch.get_num_threads() and cpu["logical_cores"] >= 1
    assert "step 4/4 loss=0.25" in (run / "log.txt").read_text()


def test_erase_refuses_to_replace_a_finished_run_without_overwrite(
    tmp_path: Path, tiny_pipeline: Path, shift_method: type[ErasureMethod]
) -> None:
    config = write_job(tmp_path, tiny_pipeline)
    out = tmp_path / "out"
    assert runner.invoke(app, ["erase", str(config), "--out", str(out)]).exit_code == 0
    first = (out / "weights" / "unet.safetensors").read_bytes()

    again = runner.invoke(app, ["erase", str(config), "--out", str(out), "--set", "method.params.shift=2"])
    assert again.exit_code == 1
    assert "already holds a finished run" in again.output and "--overwrite" in again.output
    assert (out / "weights" / "unet.safetensors").read_bytes() == first

    replaced = runner.invoke(
        app, ["erase", str(config), "--out", str(out), "--set", "method.params.shift=2", "--overwrite"]
    )
    assert replaced.exit_code == 0, replaced.output
    assert (out / "weights" / "unet.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "out"]


def test_erase_on_a_stylegan2_checkpoint(
    tmp_path: Path, tiny_gan_checkpoint: Path, gan_method: type[ErasureMethod]
) -> None:
    config = write_job(
        tmp_path, tiny_gan_checkpoint, method={"name": "test_zero_const"}, target="object:face"
    )
    out = tmp_path / "gan-run"
    result = runner.invoke(app, ["erase", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert list(load_file(out / "weights" / "generator.safetensors")) == ["input.input"]
    assert not load_file(out / "weights" / "generator.safetensors")["input.input"].any()

    export = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exported")])
    assert export.exit_code == 1 and "needs a diffusion (sd) run" in export.output


def test_erase_on_an_unbuilt_minicanvas_world_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift_method: type[ErasureMethod]
) -> None:
    monkeypatch.setenv("ERASURE_STUDIO_WORLD", str(tmp_path / "no-world"))
    monkeypatch.chdir(tmp_path)
    config = write_job(tmp_path, "minicanvas-sd", target="style:Ember")
    result = runner.invoke(app, ["erase", str(config)])
    assert result.exit_code == 1
    assert "not yet available" in result.output and "world build" in result.output
    assert not (tmp_path / "runs").exists()


# -------------------------------------------------------------------------------------- evaluate shadowing


def test_our_evaluate_package_is_the_one_imported() -> None:
    import evaluate

    assert evaluate_shadowing() is None
    assert evaluate.__erasure_studio__ is True


@pytest.mark.parametrize("namespace", [False, True], ids=["package", "namespace-package"])
def test_a_foreign_evaluate_stops_the_cli(tmp_path: Path, namespace: bool) -> None:
    fake = tmp_path / "site" / "evaluate"
    fake.mkdir(parents=True)
    if not namespace:
        (fake / "__init__.py").write_text("def load(name):\n    return name\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    result = subprocess.run(
        [*cli_command(), "methods", "--json"],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "evaluate" in lines[0] and "shadows" in lines[0] and str(fake) in lines[0]
    assert "Traceback" not in result.stderr


def test_world_build_continue_gan_reaches_the_build_and_needs_the_gan_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_world(monkeypatch)
    result = runner.invoke(app, ["world", "build", "--only", "gan", "--device", "cpu", "--continue-gan"])
    assert result.exit_code == 0, result.output
    assert calls == [("build", {"only": ["gan"], "device": "cpu", "resume": True, "continue_gan": True})]
    result = runner.invoke(app, ["world", "build", "--only", "sd", "--device", "cpu", "--continue-gan"])
    assert result.exit_code == 2 and "--continue-gan applies to the gan stage" in result.output
    assert len(calls) == 1
