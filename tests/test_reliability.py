"""Reliability and security (issue 12): bad input never crashes or corrupts, killed jobs resume exactly, nothing
unsafe is ever unpickled, and the playground holds every request to its bounds.

* A table of malformed inputs through ``erasure-studio erase`` (in process with typer's CliRunner; a few also as
  real subprocesses, which must print the very same line): exit code 2, one line naming the file or field and
  what is allowed, no traceback, no run folder, no metrics.json. tests/test_config.py has 32 more such cases.
* Property-based fuzzing of the config loader (hypothesis): any mapping, YAML text or ``--set`` override either
  loads or raises ConfigError with one line.
* A short MiniCanvas ESD job (the ``minicanvas-sd`` backbone on a tiny random pipeline) killed with SIGKILL after its
  first checkpoint, resumed, interrupted with SIGINT, resumed, stopped with SIGTERM, resumed again: weights
  bit-identical to an uninterrupted run.
  Disk-full errors while checkpointing or writing the result keep the previous complete state.
* Pickles whose unpickling would create a file, offered as every kind of weights input: refused, no file appears.
* The same config and seed give the same metrics and weights twice.
* The playground: server-side checks of odd numbers and JSON, a malicious checkpoint in the models directory, no
  checkpoints left by a failed job, and the request queue's limit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field
from safetensors import safe_open
from typer.testing import CliRunner

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.cli import INTERRUPTED_EXIT_CODE, TERMINATED_EXIT_CODE, app
from erasure.config import load_job_config, validate_job
from erasure.errors import ConfigError, UserError
from erasure.registry import list_methods, register_method, unregister_method
from erasure.runs import remove_stale_partials
from generators.minicanvas.paths import WORLD_ENV_VAR

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
runner = CliRunner()

TINY_ESD = {"iterations": 8, "batch_size": 1, "ddim_steps": 3, "trajectories": 2}
JOB: dict[str, Any] = {
    "name": "job",
    "seed": 0,
    "device": "cpu",
    "backbone": "minicanvas-sd",
    "method": {"name": "esd", "params": TINY_ESD},
    "target": "style:Ember",
    "checkpoint_every": 2,
}
CHECKPOINT = Path(".job.checkpoints") / "training_state.safetensors"
"""Where the runner keeps the checkpoints of run ``runs/job`` (relative to the working directory)."""


def job_yaml(**changes: Any) -> str:
    return yaml.safe_dump({**JOB, **changes}, sort_keys=False)


def with_params(**params: Any) -> str:
    return job_yaml(method={"name": "esd", "params": {**TINY_ESD, **params}})


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "erasure-studio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "erasure.cli"]


def subprocess_env(world: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if world is not None:
        env[WORLD_ENV_VAR] = str(world)
    return env


def finished_runs(root: Path) -> list[Path]:
    return [path.parent for path in root.rglob("metrics.json")]


# ------------------------------------------------------------------------------------------- shared set-up


class CreatesFile:
    """Unpickling this opens (creates) ``target`` for writing."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


class RunsCommand:
    """Unpickling this runs ``touch target`` in a shell."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.target}",))


def write_malicious(path: Path, marker: Path, *, wrap_in_torch_save: bool = True) -> Path:
    """A ``.pt``/``.bin`` whose unpickling would create ``marker`` (both by ``open`` and by a shell command)."""
    payload = {
        "g_ema": {"style.1.weight": torch.zeros(1)},
        "opened": CreatesFile(marker),
        "touched": RunsCommand(marker.with_name(marker.name + "-shell")),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if wrap_in_torch_save:
        torch.save(payload, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(payload))
    return path


def markers_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("PWNED*"))


@pytest.fixture(scope="module")
def world(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MiniCanvas world folder whose ``sd/`` is the tiny random pipeline: ``minicanvas-sd`` jobs take seconds."""
    folder = tmp_path_factory.mktemp("reliability-world") / "world"
    folder.mkdir()
    shutil.copytree(tiny_pipeline, folder / "sd")
    return folder


@pytest.fixture
def world_env(world: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(WORLD_ENV_VAR, str(world))
    return world


@pytest.fixture(scope="module")
def bad_models(tiny_pipeline: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Model files that must not load: corrupted, foreign, empty, pickles (some malicious)."""
    from safetensors.torch import save_file

    from generators.stylegan2 import Generator
    from generators.stylegan2_io import save_generator_safetensors

    root = tmp_path_factory.mktemp("bad-models")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 7 + b"this is not a safetensors file")
    torch.manual_seed(0)
    save_generator_safetensors(Generator(size=8, style_dim=8, n_mlp=1, channels={4: 4, 8: 4}), root / "g.safetensors")
    (root / "truncated.safetensors").write_bytes((root / "g.safetensors").read_bytes()[:-64])
    save_file({"w": torch.zeros(3)}, str(root / "foreign.safetensors"))
    (root / "empty.pt").write_bytes(b"")
    write_malicious(root / "evil.pt", root / "PWNED-evil")
    write_malicious(root / "raw-pickle.pt", root / "PWNED-raw", wrap_in_torch_save=False)
    torch.save(torch.nn.Linear(2, 2), root / "module.pt")
    torch.save({"generator": {"w": torch.zeros(1)}}, root / "no-g-ema.pt")
    (root / "notes.bin").write_bytes(b"not a checkpoint")
    (root / "dangling.pt").symlink_to(root / "nowhere.pt")
    (root / "no-index").mkdir()
    (root / "no-index" / "unet").mkdir()

    shutil.copytree(tiny_pipeline, root / "corrupt-unet")
    (root / "corrupt-unet" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 20)
    shutil.copytree(tiny_pipeline, root / "bad-index")
    (root / "bad-index" / "model_index.json").write_text("{not json")
    shutil.copytree(tiny_pipeline, root / "pickled-unet")
    (root / "pickled-unet" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_malicious(root / "pickled-unet" / "unet" / "diffusion_pytorch_model.bin", root / "PWNED-sd")
    return root


# ------------------------------------------------------------------------------------------- bad-input table


@dataclass(frozen=True)
class Bad:
    id: str
    text: str | Callable[[Path], str] | None
    """The config file's text (a function of the bad-models folder), or None for "the config path is given"."""
    fragments: list[str]
    """What the one-line message must contain (the field or file, the value, what is allowed)."""
    overrides: list[str] = field(default_factory=list)
    config_path: Callable[[Path], Path] | None = None
    """Use this path (a function of the test's tmp folder) as the config instead of writing one."""
    names_config: bool = True
    """The message names the config file (model-loading errors name the model file instead)."""
    subprocess: bool = False
    """Also run it through the real ``erasure-studio`` executable: same exit code, same line."""


ALIAS_BOMB = "\n".join(
    ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]  # 9**10 leaves if expanded
    + ["name: *a9", "backbone: minicanvas-sd", "target: style:Ember", "method: {name: esd}", ""]
)


def gan_job(file: str) -> Callable[[Path], str]:
    return lambda models: job_yaml(backbone=str(models / file), method={"name": "test_zero_const"})


def sd_job(folder: str) -> Callable[[Path], str]:
    return lambda models: job_yaml(backbone=str(models / folder))


# fmt: off
BAD_INPUTS: list[Bad] = [
    # --- files and YAML
    Bad("yaml-tab-indent", "name: job\n\tseed: 0\n", ["invalid YAML", "'\\t'"]),
    Bad("yaml-unclosed-quote", "name: 'job\nseed: 0\n", ["invalid YAML", "quoted scalar"]),
    Bad("yaml-duplicate-key", job_yaml() + "seed: 3\n", ["invalid YAML", "duplicate key 'seed'"]),
    Bad(
        "yaml-python-tag",
        "!!python/object/apply:os.system ['touch PWNED-yaml']\n",
        ["invalid YAML", "python/object/apply:os.system"],
        subprocess=True,
    ),
    Bad("yaml-alias-bomb", ALIAS_BOMB, ["name: got [[[[", "must be a valid string"]),
    Bad("yaml-alias-cycle", "method: &m {name: esd, params: *m}\nname: x\n", ["refers to itself"]),
    Bad("yaml-nested-too-deep", "name: " + "[" * 5000 + "]" * 5000 + "\n", ["invalid YAML", "nested too deeply"]),
    Bad("comments-only", "# a job config, some day\n", ["empty", "mapping of job fields"]),
    Bad("top-level-string", "just some words\n", ["top level must be a mapping", "string"]),
    Bad("not-utf8", None, ["cannot read", "utf-8"], config_path=lambda tmp: _binary_file(tmp / "binary.yaml")),
    Bad("config-is-a-folder", None, ["not a file"], config_path=lambda tmp: tmp),
    Bad("config-name-too-long", None, ["cannot read", "File name too long"],
        config_path=lambda tmp: tmp / ("x" * 300 + ".yaml"), names_config=False),
    # --- fields: unknown, wrong types
    Bad("unknown-field-typo", job_yaml(sed=3), ["sed", "unknown field", "allowed fields here", "seed"]),
    Bad("unknown-esd-param", with_params(iteration=3), ["method.params.iteration", "unknown field", "iterations"]),
    Bad("seed-float", job_yaml(seed=1.5), ["seed", "1.5", "integer"]),
    Bad("seed-bool", job_yaml(seed=True), ["seed", "true", "integer"]),
    Bad("seed-too-big-for-numpy", job_yaml(seed=2**40), ["seed", "1099511627776", "<= 4294967295"]),
    Bad("name-not-text", job_yaml(name=123), ["name", "123", "string"]),
    Bad("checkpoint-every-text", job_yaml(checkpoint_every="10"), ["checkpoint_every", "'10'", "integer"]),
    Bad("evaluate-not-a-mapping", job_yaml(evaluate=["canvas"]), ["evaluate", "must be a mapping"]),
    Bad("params-not-a-mapping", job_yaml(method={"name": "esd", "params": [1]}), ["method.params", "esd parameters"]),
    Bad("target-not-text", job_yaml(target=5), ["target", "got 5", "style:<name>"]),
    # --- budgets
    Bad("iterations-zero", with_params(iterations=0), ["method.params.iterations", "got 0", ">= 1"]),
    Bad("iterations-negative", with_params(iterations=-5), ["method.params.iterations", "-5", ">= 1"]),
    Bad("iterations-absurd", with_params(iterations=1e30), ["method.params.iterations", "1e+30"]),
    Bad("iterations-text", with_params(iterations="many"), ["method.params.iterations", "'many'", "integer"]),
    Bad("lr-negative", with_params(lr=-1e-4), ["method.params.lr", "-0.0001", "> 0"]),
    Bad("lr-infinite", with_params(lr=float("inf")), ["method.params.lr", "inf", "finite"]),
    Bad("lr-nan", with_params(lr=float("nan")), ["method.params.lr", "nan", "finite"]),
    Bad("guidance-negative", with_params(negative_guidance=-1), ["method.params.negative_guidance", ">= 0"]),
    Bad("ddim-steps-one", with_params(ddim_steps=1), ["method.params.ddim_steps", ">= 2"]),
    # --- unknown methods, concepts, target kinds, parameter choices
    Bad("method-typo", job_yaml(method={"name": "esdd"}), ["method.name", "'esdd'", "registered method", "esd"]),
    Bad("target-kind-unknown", job_yaml(target="colour:red"), ["target", "'colour:red'", "'style:<name>'"]),
    Bad("target-kind-empty-name", job_yaml(target="object:"), ["target", "'object:'", "'object:<name>'"]),
    Bad("anchor-unknown-style", job_yaml(anchor="style:Nope"), ["anchor", "'Nope'", "Ember"]),
    Bad("object-unknown", job_yaml(target="object:dragon"), ["target", "'dragon'", "circle"]),
    Bad("train-method-unknown", with_params(train_method="esd-z"), ["method.params.train_method", "'esd-z'", "esd-u"]),
    Bad("precision-unknown", job_yaml(precision="fp8"), ["precision", "'fp8'", "'bf16'"]),
    # --- devices
    Bad("device-tpu", job_yaml(device="tpu"), ["device", "'tpu'", "cpu, cuda, cuda:N or auto"]),
    Bad("device-absent-gpu", job_yaml(device="cuda:7"), ["device", "'cuda:7'", "CUDA"]),
    Bad("device-negative-index", job_yaml(device="cuda:-1"), ["device", "'cuda:-1'", "cpu, cuda, cuda:N or auto"]),
    Bad("device-number", job_yaml(device=0), ["device", "got 0", "string"]),
    # --- model paths
    Bad("backbone-missing", job_yaml(backbone="/no/such/dir/g.pt"), ["backbone", "does not exist", "minicanvas-sd"]),
    Bad("backbone-dangling-link", lambda m: job_yaml(backbone=str(m / "dangling.pt")), ["backbone", "does not exist"]),
    Bad("backbone-folder-without-index", lambda m: job_yaml(backbone=str(m / "no-index")),
        ["backbone", "no model_index.json", "diffusers pipeline folder"]),
    Bad("backbone-wrong-suffix", lambda m: job_yaml(backbone=str(m / "notes.bin")),
        ["backbone", "notes.bin", "not a StyleGAN2 checkpoint", ".safetensors"]),
    Bad("backbone-name-too-long", job_yaml(backbone="m" * 5000), ["backbone", "cannot be used as a path"]),
    Bad("backbone-unknown-home", job_yaml(backbone="~no-such-user-xyz/model"), ["backbone", "cannot be used as a path"]),
    # --- corrupted weights (the config is valid; loading the model fails before anything is written)
    Bad("gan-garbage-safetensors", gan_job("garbage.safetensors"),
        ["backbone", "garbage.safetensors", "cannot load", "expected a StyleGAN2"], names_config=False),
    Bad("gan-truncated-safetensors", gan_job("truncated.safetensors"),
        ["backbone", "truncated.safetensors", "cannot load", "expected a StyleGAN2"], names_config=False),
    Bad("gan-foreign-safetensors", gan_job("foreign.safetensors"),
        ["foreign.safetensors", "not a StyleGAN2 generator safetensors file"], names_config=False),
    Bad("gan-empty-pt", gan_job("empty.pt"), ["empty.pt", "ends early", "expected a StyleGAN2"], names_config=False),
    Bad("gan-pt-without-g-ema", gan_job("no-g-ema.pt"), ["no-g-ema.pt", "no 'g_ema' entry"], names_config=False),
    Bad("sd-corrupted-unet", sd_job("corrupt-unet"),
        ["backbone", "corrupt-unet", "cannot load", "diffusers pipeline folder with safetensors"],
        names_config=False, subprocess=True),
    Bad("sd-bad-model-index", sd_job("bad-index"), ["bad-index", "model_index.json", "cannot load"], names_config=False),
    # --- pickles offered as weights (refused before unpickling anything)
    Bad("gan-malicious-pickle", gan_job("evil.pt"), ["evil.pt", "refusing to load", "it references"],
        names_config=False),
    Bad("gan-raw-pickle", gan_job("raw-pickle.pt"), ["raw-pickle.pt", "refusing to load"], names_config=False),
    Bad("gan-pickled-module", gan_job("module.pt"), ["module.pt", "refusing to load", "torch.nn.modules.linear.Linear"],
        names_config=False),
    Bad("sd-pickle-only-weights", sd_job("pickled-unet"), ["pickled-unet", "cannot load", "safetensors"],
        names_config=False),
    # --- overrides
    Bad("override-empty-path", job_yaml(), ["--set =3", "bad field path"], overrides=["=3"]),
    Bad("override-unclosed-list", job_yaml(), ["--set seed=[1,2", "invalid YAML value"], overrides=["seed=[1,2"]),
    Bad("override-duplicate-key", job_yaml(), ["duplicate key 'lr'"], overrides=["method.params={lr: 1, lr: 2}"]),
    Bad("override-wrong-type", job_yaml(), ["--set checkpoint_every=often", "checkpoint_every", "'often'"],
        overrides=["checkpoint_every=often"]),
    Bad("override-unknown-param", job_yaml(), ["method.params.learning_rate", "unknown field", "lr"],
        overrides=["method.params.learning_rate=1e-4"]),
    Bad("override-infinite-lr", job_yaml(), ["--set method.params.lr=.inf", "method.params.lr", "finite"],
        overrides=["method.params.lr=.inf"], subprocess=True),
    Bad("override-into-a-list", job_yaml(evaluate={"suites": []}), ["evaluate.suites", "not a mapping"],
        overrides=["evaluate.suites.canvas=1"]),
    Bad("override-nested-too-deep", job_yaml(), ["nested too deeply"],
        overrides=["method.params.lr=" + "[" * 300 + "]" * 300]),
    Bad("override-bad-device", job_yaml(), ["--set device=cuda:7", "device", "CUDA"], overrides=["device=cuda:7"]),
]
# fmt: on


def _binary_file(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe\x00\x81 not text")
    return path


def test_the_table_is_at_least_thirty_cases_and_ids_are_unique() -> None:
    ids = [case.id for case in BAD_INPUTS]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert sum(case.subprocess for case in BAD_INPUTS) >= 3


def _prepare(case: Bad, tmp_path: Path, models: Path) -> tuple[Path, list[str], Path]:
    """(config path, CLI arguments, the empty working directory the command runs in)."""
    work = tmp_path / "work"
    work.mkdir()
    if case.config_path is not None:
        config = case.config_path(tmp_path)
    else:
        config = tmp_path / "config" / "job.yaml"
        config.parent.mkdir()
        text = case.text(models) if callable(case.text) else case.text
        config.write_text(text or "")
    args = ["erase", str(config), *[arg for o in case.overrides for arg in ("--set", o)]]
    return config, args, work


def _check_one_line(output: str, case: Bad, config: Path) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in output and "internal error" not in line
    if case.names_config:
        assert str(config) in line, line
    for fragment in case.fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case: Bad,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    world_env: Path,
    bad_models: Path,
    gan_method: type[ErasureMethod],
) -> None:
    config, args, work = _prepare(case, tmp_path, bad_models)
    monkeypatch.chdir(work)

    started = time.monotonic()
    result = runner.invoke(app, args)

    assert result.exit_code == 2, result.output
    assert time.monotonic() - started < 120  # an alias bomb or deep nesting is refused, not expanded
    line = _check_one_line(result.output, case, config)
    assert len(line) < 1500, line
    assert list(work.iterdir()) == []  # no runs/ folder, no partial folder, no checkpoints
    assert finished_runs(tmp_path) == [] and finished_runs(bad_models) == []
    assert markers_in(bad_models) == [] and markers_in(work) == []
    assert not (world_env / "runs").exists()


SUBPROCESS_CASES = [case for case in BAD_INPUTS if case.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[case.id for case in SUBPROCESS_CASES])
def test_bad_input_through_the_real_executable_prints_the_same_line(
    case: Bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: Path, bad_models: Path
) -> None:
    config, args, work = _prepare(case, tmp_path, bad_models)

    result = subprocess.run(
        [*cli_command(), *args], cwd=work, env=subprocess_env(world), capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    line = _check_one_line(result.stderr, case, config)
    monkeypatch.chdir(work)
    monkeypatch.setenv(WORLD_ENV_VAR, str(world))
    in_process = runner.invoke(app, args)
    assert (in_process.exit_code, in_process.output.strip()) == (2, line)
    assert list(work.iterdir()) == [] and markers_in(work) == [] and markers_in(bad_models) == []


def test_the_shipped_esd_config_with_bad_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the issue's reviewer will try on configs/jobs/esd.yaml: exit 2, one line, no metrics.json."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs" / "jobs" / "esd.yaml"
    for overrides in (
        ["method.params.iterations=-1"], ["method.params.lr=nan"], ["seed=-3"], ["device=cuda:7"],
        ["target=style:Nope"], ["method.name=nope"], ["evaluate.tier=huge"], ["method.params.sampler=both"],
        ["checkpoint_every=0"], ["backbone=/nowhere/g.pt"], ["method.params"], ["method.params.batch_size=4.5"],
    ):  # fmt: skip
        result = runner.invoke(app, ["erase", str(config), *[a for o in overrides for a in ("--set", o)]])
        assert result.exit_code == 2, (overrides, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and str(config) in lines[0] and "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------------- fuzzing

FIELD_NAMES = [
    "name", "seed", "device", "precision", "backbone", "method", "target", "anchor", "evaluate", "checkpoint_every",
    "params", "suites", "tier", "iterations", "lr", "batch_size", "train_method", "ddim_steps", "prompts",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["esd", "uce", "cpu", "cuda:3", "auto", "style:Ember", "object:circle", "text:a cat", "fp16",
                     "minicanvas-sd", "minicanvas-gan", "~", "/", ".", "..", "smoke", "canvas", "esd-u", "x:y"]),
)  # fmt: skip
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is never a fluke
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _loads_or_config_error(call: Callable[[], Any]) -> None:
    try:
        call()
    except ConfigError as err:
        assert "\n" not in str(err), str(err)
    # any other exception fails the test (hypothesis shrinks it to a minimal example)


@FUZZ
@given(data=st.dictionaries(keys, values, max_size=8))
def test_fuzz_any_mapping_loads_or_is_a_config_error(data: dict[str, Any], tmp_path: Path) -> None:
    _loads_or_config_error(lambda: validate_job(data, source="fuzz"))
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    _loads_or_config_error(lambda: load_job_config(path))


@FUZZ
@given(path=st.sampled_from(["name", "seed", "device", "precision", "backbone", "method", "method.name",
                             "method.params", "method.params.lr", "method.params.iterations", "target", "anchor",
                             "evaluate", "evaluate.suites", "evaluate.tier", "checkpoint_every"]),
       value=values)  # fmt: skip
def test_fuzz_one_field_of_a_valid_config(path: str, value: Any, tmp_path: Path) -> None:
    data = json.loads(json.dumps({**JOB, "evaluate": {"suites": [], "tier": "smoke"}}))
    *parents, leaf = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    _loads_or_config_error(lambda: validate_job(data, source="fuzz"))


@FUZZ
@given(
    text=st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
        st.text(alphabet="[]{}:,-&*!|>'\"#%@ \n\tab01.", max_size=120),
        st.builds(yaml.safe_dump, st.dictionaries(keys, values, max_size=6)),
    )
)
def test_fuzz_any_yaml_text_loads_or_is_a_config_error(text: str, tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _loads_or_config_error(lambda: load_job_config(path))


override_paths = st.lists(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), min_size=0, max_size=4)
overrides = st.builds(
    lambda path, sep, value: ".".join(path) + sep + value,
    override_paths,
    st.sampled_from(["=", "", "==", "= "]),
    st.one_of(st.text(max_size=30), st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True).strip(), values)),
)


@FUZZ
@given(raw=st.lists(overrides, min_size=1, max_size=3))
def test_fuzz_any_override_loads_or_is_a_config_error(raw: list[str], tmp_path: Path) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(job_yaml())
    _loads_or_config_error(lambda: load_job_config(path, raw))


# ------------------------------------------------------------------------------- interruption and resumption

LAUNCHER = textwrap.dedent(
    """
    import signal, sys, time
    from erasure import runner

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started from a non-interactive shell
    report = runner.ProgressReporter.__call__

    def report_slowly(self, step, total, **scalars):  # time for the test to interrupt; the numbers are unchanged
        report(self, step, total, **scalars)
        time.sleep(0.4)

    runner.ProgressReporter.__call__ = report_slowly
    from erasure.cli import main

    sys.argv[0] = "erasure-studio"
    main()
    """
)


def checkpoint_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(json.loads((handle.metadata() or {})["training_state"])["step"])
    except Exception:  # noqa: BLE001 - not there (yet), or being replaced
        return None


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the job ended (code {process.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"timed out waiting for {what}")


def start_job(config: Path, cwd: Path, world: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, "erase", str(config)], cwd=cwd, env=subprocess_env(world),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def weights_bytes(run: Path) -> dict[str, tuple[dict[str, str], dict[str, bytes]]]:
    """``{file: (metadata, {tensor: its raw bytes})}`` of a run's weights: equal means bit-identical weights.

    (Not the files' bytes: safetensors writes its metadata mapping in hash order, which differs between writes.)
    """
    out = {}
    for path in sorted((run / "weights").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors = {
                key: handle.get_tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                for key in handle.keys()  # noqa: SIM118 - safe_open is not a dict
            }
            out[path.name] = (dict(handle.metadata() or {}), tensors)
    return out


def test_killed_and_interrupted_job_resumes_bit_identical(tmp_path: Path, world: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml())
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir()
    interrupted.mkdir()

    code, _, err = finish(start_job(config, straight, world))
    assert code == 0, err
    reference = weights_bytes(straight / "runs" / "job")
    assert reference and "unet.safetensors" in reference

    # 1. SIGKILL right after the first checkpoint: no run, the checkpoint stays.
    checkpoint = interrupted / "runs" / CHECKPOINT
    process = start_job(config, interrupted, world)
    wait_for(lambda: checkpoint_step(checkpoint) is not None, process, "the first checkpoint")
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    first = checkpoint_step(checkpoint)
    assert first is not None and first >= 2
    assert not (interrupted / "runs" / "job").exists() and finished_runs(interrupted) == []
    killed_partial = interrupted / "runs" / f".job.partial-{process.pid}"
    assert (killed_partial / "log.txt").is_file()  # a killed process cannot clean up; the next run sweeps it

    # 2. The same command resumes; SIGINT once it has checkpointed again: a message, exit code 130, nothing kept
    #    but the checkpoint.
    process = start_job(config, interrupted, world)
    partial = interrupted / "runs" / f".job.partial-{process.pid}"
    wait_for(lambda: (checkpoint_step(checkpoint) or 0) > first, process, "a checkpoint after resuming")
    log = (partial / "log.txt").read_text()
    assert f"resumed from checkpoint at step {first}" in log
    assert not killed_partial.exists()
    process.send_signal(signal.SIGINT)
    code, _, err = finish(process)
    assert code == INTERRUPTED_EXIT_CODE, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("interrupted")]) == 1, err
    assert "running the same command again resumes" in err
    assert not partial.exists() and not (interrupted / "runs" / "job").exists()
    second = checkpoint_step(checkpoint)
    assert second is not None and second > first

    # 3. Resumed again, then SIGTERM (kill, a scheduler, a container stop) once it has checkpointed: the same clean
    #    way out as Ctrl-C, with its own line and exit code 143.
    process = start_job(config, interrupted, world)
    partial = interrupted / "runs" / f".job.partial-{process.pid}"
    wait_for(lambda: (checkpoint_step(checkpoint) or 0) > second, process, "a checkpoint after the second resume")
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == TERMINATED_EXIT_CODE, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("terminated (SIGTERM)")]) == 1, err
    assert not partial.exists() and not (interrupted / "runs" / "job").exists()
    third = checkpoint_step(checkpoint)
    assert third is not None and third > second

    # 4. The same command again finishes the job: the weights are bit-identical to the uninterrupted run's.
    code, _, err = finish(start_job(config, interrupted, world))
    assert code == 0, err
    run = interrupted / "runs" / "job"
    assert f"resumed from checkpoint at step {third}" in (run / "log.txt").read_text()
    assert weights_bytes(run) == reference
    assert not checkpoint.parent.exists()  # checkpoints are removed once the run is finished
    assert finished_runs(interrupted) == [run]


def test_only_partial_folders_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dest = tmp_path / "runs" / "job"
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = dest.parent / f".job.partial-{int(finished.stdout)}"
    alive = dest.parent / f".job.partial-{os.getppid()}"  # our parent is running
    other = dest.parent / f".jobs.partial-{int(finished.stdout)}"  # another destination's
    for folder in (dead, alive, other):
        folder.mkdir(parents=True)
    assert remove_stale_partials(dest) == [dead]
    assert not dead.exists() and alive.is_dir() and other.is_dir()


@pytest.fixture(scope="module")
def reference_run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MiniCanvas ESD job run once, uninterrupted, in this process."""
    folder = tmp_path_factory.mktemp("reference")
    config = folder / "job.yaml"
    config.write_text(job_yaml())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORLD_ENV_VAR, str(world))
        result = runner.invoke(app, ["erase", str(config), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder / "run"


def comparable_metrics(run: Path) -> dict[str, Any]:
    """metrics.json without its efficiency section (wall-clock time and memory, which no seed fixes)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("efficiency")
    return metrics


def test_same_config_and_seed_give_identical_metrics_twice(reference_run: Path, tmp_path: Path, world_env: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml())
    result = runner.invoke(app, ["erase", str(config), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = comparable_metrics(tmp_path / "again")
    assert again == comparable_metrics(reference_run)
    assert again["method"]["final_loss"] > 0  # a real number was measured, twice
    assert weights_bytes(tmp_path / "again") == weights_bytes(reference_run)
    assert (tmp_path / "again" / "config.resolved.yaml").read_text() == (
        reference_run / "config.resolved.yaml"
    ).read_text()

    other_seed = runner.invoke(app, ["erase", str(config), "--out", str(tmp_path / "seed1"), "--set", "seed=1"])
    assert other_seed.exit_code == 0, other_seed.output
    assert weights_bytes(tmp_path / "seed1") != weights_bytes(reference_run)  # the seed does matter


def disk_full_after(calls: int, real: Callable[..., Any], seen: list[str]) -> Callable[..., Any]:
    """A stand-in for safetensors' ``save_file`` that writes half a file and fails with ENOSPC from call ``calls``."""

    def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        seen.append(str(filename))
        if len(seen) >= calls:
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        real(tensors, filename, metadata=metadata)

    return save_file


def test_write_errors_keep_the_previous_complete_state(
    reference_run: Path, tmp_path: Path, world_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import erasure.io
    import erasure.training_state

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml())
    checkpoint = tmp_path / "runs" / CHECKPOINT

    # The disk fills up while the second checkpoint is written: the first one stays, complete and loadable.
    seen: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(erasure.training_state, "save_file", disk_full_after(2, erasure.training_state.save_file, seen))
        result = runner.invoke(app, ["erase", str(config)])
    assert result.exit_code == 1 and len(seen) == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert checkpoint_step(checkpoint) == 2
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == [checkpoint.name]  # no half-written temp file
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".job.checkpoints"]

    # The disk fills up while the result's weights are written: no run, and the last checkpoint (two steps before
    # the end) stays.
    seen = []
    with monkeypatch.context() as patch:
        patch.setattr(erasure.io, "save_file", disk_full_after(1, erasure.io.save_file, seen))
        result = runner.invoke(app, ["erase", str(config)])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert len(seen) == 1 and "Traceback" not in result.output
    last = TINY_ESD["iterations"] - 2
    assert checkpoint_step(checkpoint) == last
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [".job.checkpoints"]
    assert finished_runs(tmp_path) == []

    # With space again, the same command finishes from that step, bit-identical to the uninterrupted run.
    result = runner.invoke(app, ["erase", str(config)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "job"
    assert f"resumed from checkpoint at step {last}" in (run / "log.txt").read_text()
    assert weights_bytes(run) == weights_bytes(reference_run)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["job"]

    # Replacing that finished run fails at its very last write (metrics.json): the old run is untouched.
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    real_write_json = erasure.io.atomic_write_json

    def metrics_disk_full(path: str | Path, obj: Any) -> None:
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write_json(path, obj)

    with monkeypatch.context() as patch:
        patch.setattr("erasure.runs.atomic_write_json", metrics_disk_full)
        result = runner.invoke(app, ["erase", str(config), "--overwrite", "--set", "seed=1"])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert finished_runs(tmp_path) == [run]
    assert not [p for p in (tmp_path / "runs").iterdir() if ".partial-" in p.name or ".replaced-" in p.name]


# -------------------------------------------------------------------------------------------- unsafe pickles


LAUNCH_WITH_TEST_METHODS = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    from conftest import ZeroConstant
    from erasure.registry import register_method
    from erasure.cli import main

    register_method(ZeroConstant)
    sys.argv[0] = "erasure-studio"
    main()
    """
)


@pytest.mark.parametrize("torch_saved", [True, False], ids=["torch-save", "plain-pickle"])
def test_a_malicious_stylegan_checkpoint_is_refused_by_the_real_cli(tmp_path: Path, torch_saved: bool) -> None:
    marker = tmp_path / "PWNED"
    evil = write_malicious(tmp_path / "models" / "stylegan2.pt", marker, wrap_in_torch_save=torch_saved)
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(backbone=str(evil), method={"name": "test_zero_const"}, target="object:face"))

    result = subprocess.run(
        [sys.executable, "-c", LAUNCH_WITH_TEST_METHODS, "erase", str(config), "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "refusing to load" in result.stderr and str(evil) in result.stderr and "Traceback" not in result.stderr
    assert markers_in(tmp_path) == []
    assert not (tmp_path / "out").exists()


def test_malicious_pickles_are_refused_wherever_weights_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_pipeline: Path
) -> None:
    from erasure.io import safe_torch_load
    from evaluate.fid import load_state_dict_file
    from generators.stylegan2_io import (
        UnsafeCheckpointError,
        load_rosinality_checkpoint,
        read_rosinality_checkpoint,
    )

    evil = write_malicious(tmp_path / "weights.pt", tmp_path / "PWNED")
    plain = write_malicious(tmp_path / "weights.pth", tmp_path / "PWNED-plain", wrap_in_torch_save=False)
    for path in (evil, plain):
        # --style-classifier / --object-classifier / --inception-weights of `erasure-studio evaluate`
        with pytest.raises(UserError, match="refusing to load") as refused:
            load_state_dict_file(path, what="the style classifier checkpoint", option="--style-classifier")
        assert "\n" not in str(refused.value) and str(path) in str(refused.value)
        with pytest.raises(UserError, match="refusing to load"):
            safe_torch_load(path)
        for read in (read_rosinality_checkpoint, load_rosinality_checkpoint):
            with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
                read(path)

    # `erasure-studio evaluate --model <checkpoint>`: the model is refused before any evaluation.
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate", "--model", str(evil), "--suite", "gan", "--target", "object:circle"])
    assert result.exit_code == 2, result.output
    assert "refusing to load" in result.output and "Traceback" not in result.output

    # A diffusers folder whose weights are only a (malicious) pickle is refused: safetensors only.
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    write_malicious(folder / "unet" / "diffusion_pytorch_model.bin", tmp_path / "PWNED-sd")
    from generators.loading import BackboneLoadError, load_backbone
    from generators.registry import resolve_backbone

    with pytest.raises(BackboneLoadError, match="safetensors"):
        load_backbone(resolve_backbone(str(folder)), torch.device("cpu"), "fp32")
    assert markers_in(tmp_path) == []


# ------------------------------------------------------------------------------------------------ playground


class SlowParams(MethodParams):
    steps: int = Field(40, ge=1)
    delay: float = Field(0.05, ge=0, le=1)


class SlowBias(ErasureMethod):
    """Test-only: sleeps ``delay`` s per step, then shifts one UNet bias."""

    name = "test_rel_slow"
    backbone_kind = "sd"
    description = "Test-only: slow."
    Params = SlowParams

    def erase(self, backbone: Any, target: Any, params: SlowParams, ctx: RunContext) -> ErasureResult:
        for step in range(1, params.steps + 1):
            time.sleep(params.delay)
            ctx.progress(step, params.steps)
        bias = backbone.unet.conv_in.bias.detach().float().cpu()
        return ErasureResult(changed={"unet": {"conv_in.bias": bias + 0.5}})


class FailParams(MethodParams):
    steps: int = Field(4, ge=1)


class CheckpointThenFail(ErasureMethod):
    """Test-only: trains a bias with checkpoints, then fails at the last step."""

    name = "test_rel_fail"
    backbone_kind = "sd"
    description = "Test-only: fails after checkpointing."
    Params = FailParams

    def erase(self, backbone: Any, target: Any, params: FailParams, ctx: RunContext) -> ErasureResult:
        from erasure.resume import TrainingCheckpoints, job_fingerprint

        module = torch.nn.Linear(1, 1)
        checkpoints = TrainingCheckpoints(ctx, job_fingerprint(self.name, params, target, ctx), modules={"m": module})
        for step in range(checkpoints.resume() + 1, params.steps + 1):
            checkpoints.step_done(step, params.steps)
            ctx.progress(step, params.steps)
            if step == params.steps - 1:
                assert (ctx.checkpoint_dir / "training_state.safetensors").is_file()
                raise RuntimeError("the method broke")
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def ui_methods() -> Iterator[None]:
    from conftest import ShiftBias, ZeroConstant

    added = [cls for cls in (ShiftBias, ZeroConstant, SlowBias, CheckpointThenFail) if cls.name not in list_methods()]
    for cls in added:
        register_method(cls)
    yield
    for cls in added:
        unregister_method(cls.name)


def ui_settings(tmp_path: Path, models: Path | None = None, **limits: Any) -> Any:
    from ui.settings import Limits, UISettings

    return UISettings(runs_dir=tmp_path / "runs", models_dir=models, device="cpu", limits=Limits(**limits))


def test_ui_requests_with_odd_numbers_and_json_are_refused_server_side(
    tmp_path: Path, tiny_pipeline: Path, ui_methods: None
) -> None:
    from ui.job_request import build_job_request
    from ui.validation import RequestError

    models = tmp_path / "models"
    shutil.copytree(tiny_pipeline, models / "tiny")
    settings = ui_settings(tmp_path, models, max_steps=100)
    good = {"backbone": "models/tiny", "method": "test_shift", "params_json": "{}", "target": "text:a cat",
            "budget": 3, "seed": 0}  # fmt: skip
    assert build_job_request(settings, **good).job.method.params.steps == 3
    for change, message in [
        ({"budget": float("nan")}, "budget: got nan"),
        ({"budget": float("inf")}, "budget: got inf"),
        ({"budget": True}, "budget: got True"),
        ({"budget": "100"}, "budget: got '100'"),
        ({"budget": 101}, "budget: got 101; must be from 1 to 100"),
        ({"budget": 10**30}, "budget: got"),
        ({"seed": 2**40}, "seed: got 1099511627776"),
        ({"seed": -0.5}, "seed: got -0.5"),
        ({"seed": None}, "seed: got None"),
        ({"params_json": "[" * 4999 + "]" * 4999}, "parameters: nested too deeply"),
        ({"params_json": '{"shift": Infinity}'}, "shift: got inf; must be a finite number"),
        ({"params_json": '{"shift": 1e400}'}, "shift: got inf"),
        ({"params_json": "null"}, "must be a JSON object"),
        ({"params_json": 5}, "must be a JSON object as text"),
        ({"target": "text:a\x00cat"}, "NUL"),
        ({"target": ["style:Ember"]}, "target: got ['style:Ember']; must be text"),
        ({"method": ["test_shift"]}, "method: got ['test_shift']"),
        ({"backbone": "models/tiny/../../runs"}, "must be one of the offered backbones"),
        ({"backbone": str(models / "tiny")}, "must be one of the offered backbones"),
        ({"backbone": {"label": "models/tiny"}}, "must be one of the offered backbones"),
    ]:
        with pytest.raises(RequestError) as err:
            build_job_request(settings, **{**good, **change})
        assert message in str(err.value), (change, str(err.value))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_ui_refuses_a_malicious_checkpoint_in_the_models_dir_and_keeps_nothing(
    tmp_path: Path, ui_methods: None
) -> None:
    from ui.job_request import build_job_request
    from ui.jobs import JobManager

    models = tmp_path / "models"
    write_malicious(models / "stylegan2.pt", tmp_path / "PWNED")
    settings = ui_settings(tmp_path, models)
    request = build_job_request(settings, "models/stylegan2.pt", "test_zero_const", "", "text:a face", 1, 0)
    manager = JobManager(max_running=1, max_seconds=600)
    state = manager.start(request.job, request.dest)
    assert state.done.wait(600)
    assert state.status == "failed" and "refusing to load" in (state.error or ""), state.error
    assert markers_in(tmp_path) == []
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_ui_failed_job_leaves_no_checkpoints(tmp_path: Path, tiny_pipeline: Path, ui_methods: None) -> None:
    from ui.jobs import JobManager

    job = validate_job(
        {"name": "fails", "device": "cpu", "backbone": str(tiny_pipeline), "method": {"name": "test_rel_fail"},
         "target": "text:a cat", "checkpoint_every": 1},
        source="test",
    )  # fmt: skip
    manager = JobManager(max_running=1, max_seconds=600)
    state = manager.start(job, tmp_path / "runs" / "fails")
    assert state.done.wait(600)
    assert state.status == "failed" and "the method broke" in (state.error or "")
    assert list((tmp_path / "runs").iterdir()) == []  # no run, no partial folder, no .fails.checkpoints


def test_ui_queue_holds_one_job_running_and_refuses_beyond_its_size(
    tmp_path: Path, tiny_pipeline: Path, ui_methods: None
) -> None:
    import httpx
    from gradio_client import Client
    from gradio_client.utils import QueueError, Status

    from ui.server import launch

    models = tmp_path / "models"
    shutil.copytree(tiny_pipeline, models / "tiny")
    settings = ui_settings(tmp_path, models, max_running_jobs=1, queue_size=1, concurrency=1)
    server = launch(settings, host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    try:
        client = Client(server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl"))
        slow = json.dumps({"delay": 0.1})

        def submit(seed: int) -> Any:
            return client.submit("models/tiny", "test_rel_slow", slow, "text:a cat", 40, seed, api_name="/erase")

        first = submit(0)
        _wait(lambda: bool(first.outputs()), "the first job to start")
        second = submit(1)
        _wait(lambda: second.status().code == Status.IN_QUEUE, "the second job to wait in the queue")
        assert len(server.studio.jobs.running()) == 1  # one erasure at a time: the second waits
        third = submit(2)
        with pytest.raises(QueueError, match="Queue is full"):
            third.result(timeout=600)
        # Cancelling is not queued: it gets through while the queue is full.
        cancel = httpx.post(
            server.url.rstrip("/") + "/gradio_api/run/cancel", json={"data": [first.outputs()[-1][0]]}, timeout=60
        )
        assert cancel.status_code == 200 and cancel.json()["data"][0].startswith("cancelling"), cancel.text
        assert first.result(timeout=600)[1].startswith("cancelled")
        assert second.result(timeout=600)[1].startswith("finished")
    finally:
        server.close()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1 and not runs[0].startswith(".")  # the finished one; the cancelled left nothing


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")

