"""Job configs: validation errors (through the CLI), overrides, targets, registries, backbone resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ConfigDict
from typer.testing import CliRunner

from erasure.base import ErasureMethod, MethodParams
from erasure.cli import app
from erasure.config import JobConfig, Target, load_job_config
from erasure.errors import ConfigError
from erasure.overrides import apply_overrides, parse_override
from erasure.registry import UnknownNameError, get_method, register_method
from generators.minicanvas.concepts import STYLES
from generators.registry import resolve_backbone

DROP = object()
BASE: dict[str, Any] = {
    "name": "job",
    "seed": 0,
    "device": "cpu",
    "backbone": "minicanvas-sd",
    "method": {"name": "test_shift", "params": {"shift": 0.5}},
    "target": "style:Ember",
}


def job_yaml(**changes: Any) -> str:
    data = {**BASE, **changes}
    return yaml.safe_dump({key: value for key, value in data.items() if value is not DROP}, sort_keys=False)


# (id, file text or None for "no file", --set overrides, fragments the one-line message must contain)
BAD_CONFIGS: list[tuple[str, str | None, list[str], list[str]]] = [
    ("unknown-field", job_yaml(colour="red"), [], ["colour", "unknown field", "allowed fields", "target"]),
    (
        "unknown-param",
        job_yaml(method={"name": "test_shift", "params": {"sift": 1}}),
        [],
        ["method.params.sift", "shift"],
    ),
    ("param-out-of-range", job_yaml(), ["method.params.shift=-1"], ["method.params.shift", "-1", "> 0"]),
    (
        "param-wrong-type",
        job_yaml(method={"name": "test_shift", "params": {"steps": "many"}}),
        [],
        ["method.params.steps", "many"],
    ),
    ("unregistered-method", job_yaml(method={"name": "nope"}), [], ["method.name", "nope", "test_shift"]),
    ("method-not-a-mapping", job_yaml(method="test_shift"), [], ["method", "mapping"]),
    ("target-grammar", job_yaml(target="Ember"), [], ["target", "'Ember'", "style:<name>"]),
    ("unknown-style", job_yaml(target="style:Nope"), [], ["target", "Nope", STYLES[0]]),
    ("unknown-object", job_yaml(), ["target=object:dragon"], ["target", "dragon", "circle"]),
    ("anchor-equals-target", job_yaml(anchor="style:Ember"), [], ["anchor", "differ"]),
    ("missing-target", job_yaml(target=DROP), [], ["target", "missing"]),
    ("negative-seed", job_yaml(seed=-1), [], ["seed", "-1", ">= 0"]),
    ("seed-not-int", job_yaml(), ["seed=abc"], ["seed", "abc", "integer"]),
    ("bad-device", job_yaml(device="gpu"), [], ["device", "gpu", "cpu, cuda, cuda:N or auto"]),
    ("absent-cuda-device", job_yaml(device="cuda:99"), [], ["device", "cuda:99"]),
    ("bad-precision", job_yaml(precision="fp64"), [], ["precision", "fp64", "bf16"]),
    (
        "missing-backbone-path",
        job_yaml(backbone="/no/such/model"),
        [],
        ["backbone", "/no/such/model", "minicanvas-sd"],
    ),
    ("gan-backbone-for-sd-method", job_yaml(backbone="minicanvas-gan"), [], ["method.name", "sd", "gan"]),
    ("unsafe-name", job_yaml(name="../escape"), [], ["name", "../escape", "folder name"]),
    ("checkpoint-every-zero", job_yaml(checkpoint_every=0), [], ["checkpoint_every", ">= 1"]),
    ("bad-tier", job_yaml(evaluate={"tier": "huge"}), [], ["evaluate.tier", "huge", "smoke"]),
    ("unregistered-suite", job_yaml(), ["evaluate.suites=[nosuch]"], ["evaluate.suites[0]", "nosuch"]),
    ("unknown-evaluate-field", job_yaml(evaluate={"suite": []}), [], ["evaluate.suite", "suites, tier"]),
    ("yaml-syntax", "name: [job\nseed: 0\n", [], ["invalid YAML"]),
    ("empty-file", "", [], ["empty"]),
    ("top-level-list", "- name: job\n", [], ["mapping", "list"]),
    ("missing-file", None, [], ["no such file"]),
    ("override-without-equals", job_yaml(), ["seed"], ["--set seed", "dotted.path=value"]),
    ("override-bad-path", job_yaml(), ["method..name=x"], ["method..name"]),
    (
        "override-unknown-path",
        job_yaml(),
        ["method.nmae=x"],
        ["--set method.nmae=x", "method.nmae", "unknown field"],
    ),
    ("override-into-scalar", job_yaml(), ["target.kind=style"], ["target.kind", "not a mapping"]),
    ("override-bad-list", job_yaml(), ["evaluate.suites=[canvas"], ["evaluate.suites", "invalid YAML"]),
]


@pytest.mark.parametrize(
    ("text", "overrides", "fragments"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_exits_2_with_one_line_and_creates_nothing(
    text: str | None,
    overrides: list[str],
    fragments: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shift_method: type[ErasureMethod],
) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "job.yaml"
    if text is not None:
        config.write_text(text)
    args = ["erase", str(config), *[arg for o in overrides for arg in ("--set", o)]]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in message
    assert str(config) in message
    for fragment in fragments:
        assert fragment in message
    assert sorted(p.name for p in tmp_path.iterdir()) == (["job.yaml"] if text is not None else [])


def test_bad_config_with_out_creates_no_out_folder(tmp_path: Path, shift_method: type[ErasureMethod]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(colour="red"))
    out = tmp_path / "out" / "run"
    result = CliRunner().invoke(app, ["erase", str(config), "--out", str(out)])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path: Path, shift_method: type[ErasureMethod]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(colour="red"))
    result = CliRunner().invoke(app, ["--debug", "erase", str(config)])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


def test_every_shipped_job_config_validates_with_the_issue_overrides() -> None:
    jobs = sorted((Path(__file__).resolve().parent.parent / "configs" / "jobs").glob("*.yaml"))
    assert any(p.name == "quickstart.yaml" for p in jobs)
    for path in jobs:
        job = load_job_config(path, ["target=style:Lagoon", "seed=3"])
        assert job.target.spec == "style:Lagoon" and job.seed == 3, path
    quick = load_job_config(jobs[0].parent / "quickstart.yaml", ["method.name=esd"])
    assert quick.method.name == "esd"


# ------------------------------------------------------------------------------------------ valid configs


def test_valid_config_fills_defaults_and_validates_params(
    tmp_path: Path, shift_method: type[ErasureMethod]
) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(target="style:ember"))
    job = load_job_config(config)
    assert job.method.params == shift_method.Params(shift=0.5, steps=3)
    assert job.target.spec == "style:Ember"  # the canonical spelling
    assert (job.target.kind, job.target.name, job.target.prompt) == ("style", "Ember", "Ember style")
    assert job.evaluate.suites == [] and job.evaluate.tier == "smoke"
    assert job.checkpoint_every == 50 and job.precision == "fp32" and job.anchor is None


def test_resolved_yaml_round_trips(tmp_path: Path, shift_method: type[ErasureMethod]) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml(anchor="object:circle"))
    job = load_job_config(config, ["method.params.steps=7", "seed=3"])
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(job.to_yaml())
    assert yaml.safe_load(resolved.read_text())["target"] == "style:Ember"
    assert load_job_config(resolved) == job


SHIPPED_JOBS = sorted((Path(__file__).resolve().parent.parent / "configs" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED_JOBS, ids=[p.name for p in SHIPPED_JOBS])
def test_every_shipped_job_config_takes_the_common_overrides(
    config: Path, shift_method: type[ErasureMethod], gan_method: type[ErasureMethod]
) -> None:
    kind = resolve_backbone(yaml.safe_load(config.read_text())["backbone"]).kind
    method = shift_method if kind == "sd" else gan_method
    overrides = [f"target=style:{STYLES[1]}", f"method.name={method.name}", "seed=3", "evaluate.tier=quick"]
    job = load_job_config(config, overrides)
    assert (job.target.spec, job.method.name, job.seed, job.evaluate.tier) == (
        f"style:{STYLES[1]}",
        method.name,
        3,
        "quick",
    )
    assert job.method.params == method.Params()  # the old method's params were dropped


def test_backbone_path_override_switches_kind_and_lifts_concept_check(
    tmp_path: Path, shift_method: type[ErasureMethod]
) -> None:
    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    config = tmp_path / "job.yaml"
    config.write_text(job_yaml())
    job = load_job_config(config, [f"backbone={pipeline}", "target=style:Van Gogh"])
    assert job.backbone == str(pipeline.resolve())
    assert job.target.name == "Van Gogh"


# -------------------------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("raw", "path", "value"),
    [
        ("seed=3", ("seed",), 3),
        ("method.params.lr=1e-5", ("method", "params", "lr"), 1e-5),
        ("method.params.lr=2.5E+3", ("method", "params", "lr"), 2500.0),
        ("evaluate.suites=[canvas,hub]", ("evaluate", "suites"), ["canvas", "hub"]),
        ("evaluate.suites=[]", ("evaluate", "suites"), []),
        ("method.params={lr: 0.1, steps: 2}", ("method", "params"), {"lr": 0.1, "steps": 2}),
        ("anchor=null", ("anchor",), None),
        ("anchor=", ("anchor",), None),
        ("target=style:Ember", ("target",), "style:Ember"),
        ("target=text:a cat: sitting", ("target",), "text:a cat: sitting"),
        ("backbone=/some/path", ("backbone",), "/some/path"),
        ("name=run-2", ("name",), "run-2"),
        ("method.params.flag=true", ("method", "params", "flag"), True),
    ],
)
def test_parse_override(raw: str, path: tuple[str, ...], value: Any) -> None:
    override = parse_override(raw)
    assert (override.path, override.value) == (path, value)
    assert type(override.value) is type(value)


def test_apply_overrides_creates_nested_mappings_and_leaves_input_alone() -> None:
    data = {"method": {"name": "a"}, "evaluate": {"suites": ["x"]}}
    result = apply_overrides(
        data, [parse_override("method.params.lr=0.5"), parse_override("evaluate.suites=[y,z]")]
    )
    assert result == {"method": {"name": "a", "params": {"lr": 0.5}}, "evaluate": {"suites": ["y", "z"]}}
    assert data == {"method": {"name": "a"}, "evaluate": {"suites": ["x"]}}


def test_changing_the_method_drops_the_old_methods_params_but_keeps_new_ones() -> None:
    data = {"method": {"name": "a", "params": {"only_a_has_this": 1}}}
    changed = apply_overrides(data, [parse_override("method.params.lr=0.5"), parse_override("method.name=b")])
    assert changed["method"] == {"name": "b", "params": {"lr": 0.5}}
    same = apply_overrides(data, [parse_override("method.name=a")])
    assert same["method"] == {"name": "a", "params": {"only_a_has_this": 1}}


# ---------------------------------------------------------------------------------- targets, registries


@pytest.mark.parametrize(
    ("spec", "kind", "name", "prompt"),
    [
        ("style:Ember", "style", "Ember", "Ember style"),
        ("object:circle", "object", "circle", "circle"),
        ("text:a red car", "text", "a red car", "a red car"),
    ],
)
def test_target_parse(spec: str, kind: str, name: str, prompt: str) -> None:
    target = Target.parse(spec)
    assert (target.kind, target.name, target.prompt, target.spec) == (kind, name, prompt, spec)


@pytest.mark.parametrize("spec", ["Ember", "colour:red", "style:", "text:  "])
def test_target_parse_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="style:<name>"):
        Target.parse(spec)


def test_get_method_lists_available_names(shift_method: type[ErasureMethod]) -> None:
    with pytest.raises(UnknownNameError, match="unknown method 'nope'; available: .*test_shift"):
        get_method("nope")


def test_register_method_checks_the_contract(shift_method: type[ErasureMethod]) -> None:
    class LooseParams(MethodParams):
        model_config = ConfigDict(extra="allow")

    class Loose(ErasureMethod):
        name = "loose"
        backbone_kind = "sd"
        description = "accepts unknown params"
        Params = LooseParams

        def erase(self, *args: Any) -> Any:
            raise NotImplementedError

    with pytest.raises(TypeError, match="extra='forbid'"):
        register_method(Loose)

    class Impostor(shift_method):  # type: ignore[valid-type,misc]
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method(Impostor)


def test_job_config_forbids_extra_fields_everywhere() -> None:
    from erasure.config import EvaluateConfig, MethodConfig

    for model in (JobConfig, MethodConfig, EvaluateConfig, Target):
        assert model.model_config.get("extra") == "forbid", model


def test_resolve_backbone_by_name_and_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERASURE_STUDIO_WORLD", str(tmp_path / "world"))
    named = resolve_backbone("minicanvas-sd")
    assert (named.kind, named.path, named.minicanvas) == ("sd", tmp_path / "world" / "sd", True)
    assert resolve_backbone("minicanvas-gan").kind == "gan"

    pipeline = tmp_path / "pipe"
    pipeline.mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        resolve_backbone(str(pipeline))
    (pipeline / "model_index.json").write_text("{}")
    assert resolve_backbone(str(pipeline)).kind == "sd"

    checkpoint = tmp_path / "g.pt"
    checkpoint.write_bytes(b"")
    assert resolve_backbone(str(checkpoint)).kind == "gan"
    (tmp_path / "g.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a StyleGAN2 checkpoint"):
        resolve_backbone(str(tmp_path / "g.bin"))
    with pytest.raises(ValueError, match="minicanvas-sd"):
        resolve_backbone("sd-1.5")
