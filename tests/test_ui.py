"""The Gradio playground (ui/): request checks, the runner's cancel hook, and the app driven end to end.

The end-to-end tests launch the app on 127.0.0.1 (a free port, ``prevent_thread_lock``) and drive it with
``gradio_client``, the way a second program or a second user would. The mechanics run on a tiny *untrained* world
(``tests/tiny_world.py``) with test-only methods; the proof that erasure works (target style changed, retained
style kept, judged by the MiniCanvas classifier) runs on the shipped world with ESD and is skipped until both exist.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import Field

from erasure.base import ErasureMethod, ErasureResult, MethodParams, RunContext
from erasure.config import validate_job
from erasure.registry import list_methods, register_method, unregister_method
from generators.minicanvas.paths import WORLD_DIR, WORLD_ENV_VAR

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_WORLD_READY = (WORLD_DIR / "sd" / "model_index.json").is_file() and (
    WORLD_DIR / "classifier"
).is_dir()

# The real-world proof: a small ESD budget on MiniSD: ESD-x with its defaults but a 5x learning rate, 200 steps.
# Measured on the world with MiniSD's earlier 9,000-step UNet, 8 images per style (seeds 0-7), judged by the
# MiniCanvas classifier (the test passes on the shipped 7,200-step UNet as well):
#   200 steps, lr 1e-3, 48 trajectories (this):  Ember 100% -> 0%,   Lagoon 100% -> 100%
#   150 steps, lr 1e-3, 16 trajectories:         Ember 100% -> 12%,  Lagoon 100% -> 75%  (too close to the bar)
#    60 steps, lr 5e-4, 16 trajectories:         Ember 100% -> 62%,  Lagoon 100% -> 100% (not erased)
ESD_BUDGET = 200
ESD_PARAMS = {"lr": 1e-3}
IMAGES_PER_STYLE = 8
ERASED_STYLE = "Ember"
RETAINED_STYLE = "Lagoon"  # far from Ember (Cinder is its look-alike and may be dragged along)


# ----------------------------------------------------------------------------------------- test-only methods


class SlowParams(MethodParams):
    steps: int = Field(20, ge=1)
    delay: float = Field(0.05, ge=0, le=1)


class SlowShift(ErasureMethod):
    """Test-only: like ``test_shift`` but sleeps ``delay`` s per step, so a job can be watched and cancelled."""

    name = "test_slow"
    backbone_kind = "sd"
    description = "Test-only: shifts one UNet bias, slowly."
    Params = SlowParams

    def erase(self, backbone: Any, target: Any, params: SlowParams, ctx: RunContext) -> ErasureResult:
        for step in range(1, params.steps + 1):
            time.sleep(params.delay)
            ctx.progress(step, params.steps, loss=1.0 / step)
        bias = backbone.unet.conv_in.bias.detach().float().cpu()
        return ErasureResult(changed={"unet": {"conv_in.bias": bias + 0.5}}, metrics={"final_loss": 0.5})


@pytest.fixture(scope="module")
def test_methods() -> Iterator[None]:
    from conftest import ShiftBias, ZeroConstant

    added = [cls for cls in (ShiftBias, ZeroConstant, SlowShift) if cls.name not in list_methods()]
    for cls in added:
        register_method(cls)
    yield
    for cls in added:
        unregister_method(cls.name)


@pytest.fixture(scope="module")
def tiny_world_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny untrained world (SD, GAN, classifier) as ``$ERASURE_STUDIO_WORLD`` for the whole module."""
    from tiny_world import build_tiny_world

    folder = build_tiny_world(tmp_path_factory.mktemp("ui-world") / "world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(WORLD_ENV_VAR, str(folder))
        yield folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------------------------- unit: params


def test_param_form_follows_the_params_model() -> None:
    from typing import Literal

    from ui.param_form import budget_field, build_params, form_fields
    from ui.settings import Limits

    class P(MethodParams):
        iterations: int = Field(100, ge=1)
        lr: float = Field(1e-4, gt=0)
        mode: Literal["a", "b"] = "a"
        flag: bool = False
        batch_size: int = Field(4, ge=1)
        depth: int = Field(3, ge=1, le=5)
        names: list[str] = Field(default_factory=list)

    limits = Limits(max_steps=500, int_param_factor=10)
    assert budget_field(P) == "iterations"
    specs = {spec.name: spec for spec in form_fields(P, limits)}
    assert list(specs) == ["lr", "mode", "flag", "batch_size", "depth"]  # budget and the list are not widgets
    assert (specs["lr"].kind, specs["lr"].minimum, specs["lr"].exclusive_minimum) == ("float", 0.0, True)
    assert specs["mode"].choices == ("a", "b")
    assert specs["batch_size"].maximum == 40  # no own upper bound: 10 x default
    assert specs["depth"].maximum == 5

    params = build_params(P, {"lr": 1e-3, "batch_size": 8.0}, budget=200, limits=limits)
    assert (params.iterations, params.lr, params.batch_size) == (200, 1e-3, 8)


@pytest.mark.parametrize(
    ("values", "budget", "message"),
    [
        ({}, 501, "budget: got 501; must be at most 500"),
        ({"batch_size": 41}, 10, "batch_size: got 41; must be at most 40"),
        ({"batch_size": 2.5}, 10, "batch_size: got 2.5; must be a whole number"),
        ({"lr": float("nan")}, 10, "lr: got nan; must be a finite number"),
        ({"lr": -1}, 10, "lr: got -1"),
        ({"mode": "c"}, 10, "mode: got 'c'"),
        ({"bogus": 1}, 10, "bogus: unknown parameter"),
        ({"iterations": 7}, 10, "iterations: set it with the budget"),
    ],
)
def test_build_params_refuses(values: dict[str, Any], budget: int, message: str) -> None:
    from typing import Literal

    from ui.param_form import ParamsError, build_params
    from ui.settings import Limits

    class P(MethodParams):
        iterations: int = Field(100, ge=1)
        lr: float = Field(1e-4, gt=0)
        mode: Literal["a", "b"] = "a"
        batch_size: int = Field(4, ge=1)

    with pytest.raises(ParamsError) as err:
        build_params(P, values, budget, Limits(max_steps=500, int_param_factor=10))
    assert message in str(err.value)


def test_params_json_is_bounded_and_must_be_an_object() -> None:
    from ui.param_form import ParamsError, parse_params_json
    from ui.settings import Limits

    limits = Limits(max_params_chars=50)
    assert parse_params_json("", limits) == {}
    assert parse_params_json('{"a": 1}', limits) == {"a": 1}
    for text, message in [
        ("[1]", "must be a JSON object"),
        ("{", "not valid JSON"),
        ("{}" + " " * 60, "at most 50"),
    ]:
        with pytest.raises(ParamsError, match=message):
            parse_params_json(text, limits)


# --------------------------------------------------------------------------------------- unit: choices, runs


def test_models_dir_choices_refuse_traversal(
    tmp_path: Path, tiny_pipeline: Path, tiny_gan_checkpoint: Path
) -> None:
    from ui.backbones import BackboneChoiceError, list_choices, resolve_choice

    models = tmp_path / "models"
    (models / "sd").mkdir(parents=True)
    (models / "sd" / "tiny").symlink_to(tiny_pipeline, target_is_directory=True)  # a link inside -> outside
    (models / "g.safetensors").write_bytes(tiny_gan_checkpoint.read_bytes())
    (models / "notes.txt").write_text("not a model")
    outside = tmp_path / "outside.pt"
    outside.write_bytes(b"")
    (models / "escape.pt").symlink_to(outside)

    labels = {choice.label: choice for choice in list_choices(models)}
    assert {"minicanvas-sd", "minicanvas-gan", "models/g.safetensors"} <= set(labels)
    assert (
        "models/sd/tiny" not in labels and "models/escape.pt" not in labels
    )  # links leading out are not offered
    assert "models/notes.txt" not in labels
    assert labels["models/g.safetensors"].kind == "gan"

    for bad in ["../outside.pt", str(outside), "models/../outside.pt", "models/escape.pt", str(tiny_pipeline),
                "models/sd/tiny", "", None, 3]:  # fmt: skip
        with pytest.raises(BackboneChoiceError, match="must be one of the offered backbones"):
            resolve_choice(bad, models)

    (models / "real").mkdir()
    (models / "real" / "model_index.json").write_text("{}")
    assert resolve_choice("models/real", models).spec == str((models / "real").resolve())


def test_open_run_accepts_only_finished_runs_of_the_runs_dir(tmp_path: Path) -> None:
    from ui.run_index import RunChoiceError, list_runs, open_run

    runs = tmp_path / "runs"
    good = runs / "good"
    good.mkdir(parents=True)
    (good / "metrics.json").write_text(json.dumps({"method": {"final_loss": 0.5}}))
    (good / "config.resolved.yaml").write_text("name: good\nbackbone: minicanvas-sd\ntarget: style:Ember\n")
    (runs / ".good.partial-1").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "metrics.json").write_text("{}")
    (outside / "config.resolved.yaml").write_text("name: x\n")
    (runs / "linked").symlink_to(outside, target_is_directory=True)

    assert [run.name for run in list_runs(runs)] == ["good"]
    assert open_run(runs, "good").target == "style:Ember"
    for bad in [
        "../elsewhere",
        str(outside),
        "good/../good",
        ".good.partial-1",
        "linked",
        "missing",
        "",
        None,
    ]:
        with pytest.raises(RunChoiceError):
            open_run(runs, bad)


def test_request_checks_name_the_input() -> None:
    from ui.validation import RequestError, bounded_float, bounded_int, bounded_lines, bounded_text, choices

    assert bounded_int("n", 3.0, 1, 5) == 3
    cases = [
        (lambda: bounded_int("n", 6, 1, 5), "n: got 6; must be from 1 to 5"),
        (lambda: bounded_int("n", True, 1, 5), "n: got True"),
        (lambda: bounded_int("n", float("inf"), 1, 5), "n: got inf"),
        (lambda: bounded_float("g", 1e9, 0, 20), "g: got 1e+09; must be from 0 to 20"),
        (lambda: bounded_text("t", "x" * 11, 10), "t: 11 characters; at most 10"),
        (lambda: bounded_text("t", "  ", 10), "t: must not be empty"),
        (lambda: bounded_lines("p", "a\nb\nc", 2, 10), "p: 3 lines; at most 2"),
        (lambda: choices("r", ["Ember", "Nope"], ["Ember"], 2), "r: got 'Nope'"),
    ]
    for call, message in cases:
        with pytest.raises(RequestError) as err:
            call()
        assert message in str(err.value)


# ------------------------------------------------------------------------------------- runner cancel hook


def _shift_job(backbone: Path | str, name: str, method: str = "test_slow", **params: Any) -> Any:
    data = {
        "name": name,
        "device": "cpu",
        "backbone": str(backbone),
        "method": {"name": method, "params": params},
        "target": "text:a red car",
    }
    return validate_job(data, source="test")


def test_cancel_event_stops_the_runner_and_leaves_no_half_run(
    tmp_path: Path, tiny_pipeline: Path, test_methods: None
) -> None:
    from erasure.runner import JobCancelled, run_erase

    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def on_progress(step: int, total: int, scalars: dict[str, float]) -> None:
        seen.append((step, total))
        if step == 2:
            cancel.set()

    dest = tmp_path / "runs" / "cancelled"
    job = _shift_job(tiny_pipeline, "cancelled", steps=50, delay=0.0)
    with pytest.raises(JobCancelled):
        run_erase(job, dest, echo=lambda line: None, on_progress=on_progress, cancel=cancel)
    assert seen == [(1, 50), (2, 50)]
    assert list((tmp_path / "runs").iterdir()) == []  # no run, no .partial-<pid>, no .checkpoints


def test_job_manager_times_out_and_cancels(tmp_path: Path, tiny_pipeline: Path, test_methods: None) -> None:
    from ui.jobs import BusyError, JobManager

    manager = JobManager(max_running=1, max_seconds=0.0)
    state = manager.start(_shift_job(tiny_pipeline, "late", steps=5, delay=0.0), tmp_path / "runs" / "late")
    with pytest.raises(BusyError):
        manager.start(_shift_job(tiny_pipeline, "other", steps=5, delay=0.0), tmp_path / "runs" / "other")
    assert state.done.wait(600)
    assert state.status == "cancelled" and "time limit" in (state.cancel_reason or "")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


# ------------------------------------------------------------------------------------------ the live app


LIMITS_FOR_TESTS = {
    "max_steps": 200,
    "max_images_per_concept": 4,
    "max_sample_steps": 10,
    "max_prompt_chars": 60,
}


@pytest.fixture(scope="module")
def app_server(
    tiny_world_dir: Path, test_methods: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from ui.server import launch
    from ui.settings import Limits, UISettings

    base = tmp_path_factory.mktemp("ui-app")
    models = base / "models"
    models.mkdir()
    settings = UISettings(
        runs_dir=base / "runs",
        models_dir=models,
        device="cpu",
        limits=Limits(**LIMITS_FOR_TESTS),  # type: ignore[arg-type]
    )
    server = launch(settings, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    yield server
    server.close()


@pytest.fixture
def client(app_server: Any, tmp_path: Path) -> Any:
    from gradio_client import Client

    return Client(app_server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))


def runs_dir_of(app_server: Any) -> Path:
    return app_server.studio.settings.runs_dir


def erase(client: Any, method: str = "test_shift", params: dict[str, Any] | None = None, target: str = "style:Ember",
          budget: int = 3, seed: int = 0, backbone: str = "minicanvas-sd") -> tuple[str, str, str, str]:  # fmt: skip
    return client.predict(backbone, method, json.dumps(params or {}), target, budget, seed, api_name="/erase")


def gallery_pairs(gallery: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(caption, before file, after file)`` from a before/after gallery (items alternate before, after)."""
    assert len(gallery) % 2 == 0
    pairs = []
    for before, after in zip(gallery[0::2], gallery[1::2]):
        assert before["caption"].startswith("before · ") and after["caption"].startswith("after · ")
        assert before["caption"][len("before · ") :] == after["caption"][len("after · ") :]
        pairs.append((before["caption"][len("before · ") :], before["image"], after["image"]))
    return pairs


def load_image(path: str) -> torch.Tensor:
    """A PNG the app served, as ``[3, H, W]`` in ``[-1, 1]`` (exact: PNG is lossless)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def test_page_and_api_info_are_served(app_server: Any) -> None:
    page = httpx.get(app_server.url, timeout=60)
    assert page.status_code == 200 and "Erasure Studio" in page.text
    info = httpx.get(app_server.url.rstrip("/") + "/gradio_api/info", timeout=60)
    assert info.status_code == 200
    endpoints = info.json()["named_endpoints"]
    assert {"/erase", "/cancel", "/compare", "/runs", "/run_details", "/leaderboard"} <= set(endpoints)


def test_erase_then_compare_end_to_end(app_server: Any, client: Any) -> None:
    job_id, status, log, run = erase(client, params={"shift": 0.5}, budget=3)
    assert job_id and status.startswith("finished") and run
    assert "step 3/3" in log
    runs = runs_dir_of(app_server)
    assert (runs / run / "metrics.json").is_file()
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # no partial or checkpoint folders left
    config = (runs / run / "config.resolved.yaml").read_text()
    assert "name: test_shift" in config and "steps: 3" in config and "style:Ember" in config

    slider, target, retained, judge, metrics, _ = client.predict(
        run, 2, ["Cinder", "Lagoon"], "", 2, 5.0, 7, api_name="/compare"
    )
    target_pairs, retained_pairs = gallery_pairs(target), gallery_pairs(retained)
    assert [caption for caption, _, _ in target_pairs] == [
        "A circle image in Ember style. (seed 7)", "A diamond image in Ember style. (seed 8)",
    ]  # fmt: skip
    assert [caption for caption, _, _ in retained_pairs][::2] == [
        "A circle image in Cinder style. (seed 7)", "A circle image in Lagoon style. (seed 7)",
    ]  # fmt: skip
    for _, before, after in target_pairs:
        assert load_image(before).shape == (3, 32, 32)
        assert not torch.equal(load_image(before), load_image(after))  # test_shift changes every image
    slider_before, slider_after = slider
    assert torch.equal(load_image(slider_before), load_image(target_pairs[0][1]))
    assert torch.equal(load_image(slider_after), load_image(target_pairs[0][2]))
    judged = {row[0]: row for row in judge["data"]}
    assert (
        set(judged) == {"style:Ember", "style:Cinder", "style:Lagoon"}
        and judged["style:Ember"][1] == "target"
    )
    assert ["method.final_loss", 0.5] in metrics["data"]

    # The same request again gives the same images (seeded per image; "before" images come from memory).
    again = gallery_pairs(client.predict(run, 2, ["Cinder", "Lagoon"], "", 2, 5.0, 7, api_name="/compare")[1])
    for (_, b1, a1), (_, b2, a2) in zip(target_pairs, again):
        assert torch.equal(load_image(b1), load_image(b2)) and torch.equal(load_image(a1), load_image(a2))

    table = client.predict(api_name="/runs")
    assert run in [row[0] for row in table["data"]]
    config_text, _, run_log = client.predict(run, api_name="/run_details")
    assert "test_shift" in config_text and "step 3/3" in run_log
    board, source = client.predict(api_name="/leaderboard")
    assert board["data"] and "run(s)" in source


def test_gan_backbone_erase_and_compare(app_server: Any, client: Any) -> None:
    _, status, _, run = erase(
        client, method="test_zero_const", target="object:circle", backbone="minicanvas-gan"
    )
    assert status.startswith("finished") and run
    _, target, retained, _, _, note = client.predict(run, 2, [], "", 1, 0.0, 0, api_name="/compare")
    pairs = gallery_pairs(target) + gallery_pairs(retained)
    assert len(pairs) == 8  # 2 images x 4 latents each, split by the judge
    assert "latents show object circle" in note


def test_server_side_bounds_are_enforced(app_server: Any, client: Any) -> None:
    from gradio_client.exceptions import AppError

    runs = runs_dir_of(app_server)
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    bad_erase = [
        ({"budget": 201}, "budget: got 201; must be from 1 to 200"),
        ({"budget": 0}, "budget: got 0"),
        ({"budget": 2.5}, "budget: got 2.5"),
        ({"params": {"shift": -1}}, "shift"),
        ({"params": {"steps": 5}}, "set it with the budget"),
        ({"params": {"nope": 1}}, "nope: unknown parameter"),
        ({"target": "text:" + "x" * 300}, "target: 305 characters"),
        ({"target": "style:Nope"}, "'Nope' is not a MiniCanvas style"),
        ({"target": "Ember"}, "target: got 'Ember'"),
        ({"seed": -1}, "seed: got -1"),
        ({"method": "no_such_method"}, "method: got 'no_such_method'"),
        ({"method": "test_zero_const"}, "works on gan backbones"),
    ]
    for kwargs, message in bad_erase:
        with pytest.raises(AppError) as err:
            erase(client, **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    with pytest.raises(AppError, match="at most 10000 allowed"):
        client.predict(
            "minicanvas-sd", "test_shift", "{" + " " * 10_001 + "}", "style:Ember", 3, 0, api_name="/erase"
        )

    _, _, _, run = erase(client)
    bad_compare = [
        ((run, 5, [], "", 2, 5.0, 0), "images per concept: got 5; must be from 1 to 4"),
        ((run, 1, [], "", 11, 5.0, 0), "sampling steps: got 11; must be from 1 to 10"),
        ((run, 1, [], "", 0, 5.0, 0), "sampling steps: got 0"),
        ((run, 1, [], "", 2, 1e9, 0), "guidance: got 1e+09"),
        ((run, 1, ["Cinder", "Lagoon", "Meadow", "Dusk", "Frost"], "", 2, 5.0, 0), "5 chosen; at most 4"),
        ((run, 1, ["Ember"], "", 2, 5.0, 0), "retained concepts: got 'Ember'"),
        ((run, 1, [], "", 2, 5.0, 2**31), "seed: got 2147483648"),
    ]
    for args, message in bad_compare:
        with pytest.raises(AppError) as err:
            client.predict(*args, api_name="/compare")
        assert message in str(err.value), (args, str(err.value))
    after = sorted(p.name for p in runs.iterdir())
    assert after == sorted([*before, run])  # only the one valid request made a run


def test_path_traversal_is_refused(app_server: Any, client: Any, tiny_world_dir: Path) -> None:
    from gradio_client.exceptions import AppError

    for backbone in [
        "../../etc",
        str(tiny_world_dir / "sd"),
        "/etc/passwd",
        "models/../../x",
        "minicanvas-sd/..",
    ]:
        with pytest.raises(AppError, match="must be one of the offered backbones"):
            erase(client, backbone=backbone)
    for run in ["../runs", "/etc/passwd", "..", "a/b", ".hidden", "no-such-run"]:
        with pytest.raises(AppError, match="run: "):
            client.predict(run, 1, [], "", 2, 5.0, 0, api_name="/compare")
        with pytest.raises(AppError, match="run: "):
            client.predict(run, api_name="/run_details")


def test_cancel_leaves_no_partial_run(app_server: Any, client: Any) -> None:
    runs = runs_dir_of(app_server)
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    job = client.submit(
        "minicanvas-sd", "test_slow", json.dumps({"delay": 0.2}), "style:Ember", 200, 0, api_name="/erase"
    )
    job_id = _wait_for_running(job)
    assert "cancelling" in client.predict(job_id, api_name="/cancel")
    job_id_again, status, _, run = job.result(timeout=600)
    assert job_id_again == job_id and status.startswith("cancelled") and run == ""
    assert sorted(p.name for p in runs.iterdir()) == before  # no run, no .partial, no .checkpoints
    assert "nothing to cancel" in client.predict(job_id, api_name="/cancel")


def _wait_for_running(job: Any, timeout: float = 600) -> str:
    """The job id once the job reports its first training step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outputs = job.outputs()
        if outputs and "step " in outputs[-1][1]:
            return str(outputs[-1][0])
        if job.done():
            raise AssertionError(f"the job ended early: {job.result()}")
        time.sleep(0.2)
    raise AssertionError("the job did not start")


def test_two_users_at_once(app_server: Any, tmp_path: Path) -> None:
    from gradio_client import Client

    first, second = (
        Client(app_server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / name))
        for name in ("first", "second")
    )
    _, _, _, run = erase(first)
    # Two erasures (the second waits in the queue) and two comparisons, from two users, at once.
    slow = json.dumps({"delay": 0.05})
    jobs = [
        first.submit("minicanvas-sd", "test_slow", slow, "style:Ember", 10, 0, api_name="/erase"),
        second.submit("minicanvas-sd", "test_slow", slow, "object:circle", 10, 1, api_name="/erase"),
        first.submit(run, 1, ["Cinder"], "", 2, 5.0, 0, api_name="/compare"),
        second.submit(run, 1, ["Lagoon"], "", 2, 5.0, 0, api_name="/compare"),
    ]
    results = [job.result(timeout=600) for job in jobs]
    assert results[0][1].startswith("finished") and results[1][1].startswith("finished")
    assert results[0][3] != results[1][3]
    assert len(results[2][1]) == 2 and len(results[3][1]) == 2
    assert httpx.get(app_server.url, timeout=60).status_code == 200  # still serving


def test_equal_images_of_concurrent_comparisons_are_separate_files(app_server: Any, client: Any) -> None:
    # Gradio writes a returned PIL image in place to a path named by its bytes: two requests showing the same
    # image would write one file at once and a client could be served a truncated copy. The handlers return
    # files of their own per request instead (gradio copies those atomically).
    _, _, _, run = erase(client)
    studio = app_server.studio
    first, second = (studio.compare(run, 1, ["Cinder"], "", 2, 5.0, 0) for _ in range(2))
    first_files = [first[0][0], first[0][1]] + [path for path, _ in first[1] + first[2]]
    second_files = [second[0][0], second[0][1]] + [path for path, _ in second[1] + second[2]]
    assert all(isinstance(path, str) for path in first_files + second_files)
    assert not set(first_files) & set(second_files)
    assert all(Path(path).parent.parent == studio.images.root for path in first_files + second_files)
    for a, b in zip(first_files, second_files):
        assert Path(a).read_bytes() == Path(b).read_bytes()  # same seed, same images


def test_image_folders_are_pruned_by_age_and_removed_on_close() -> None:
    from ui.image_files import ImageFiles

    images = ImageFiles(max_age_s=60)
    try:
        old, recent = images.new_folder(), images.new_folder()
        (old / "a.png").write_bytes(b"x")
        os.utime(old, (time.time() - 120, time.time() - 120))
        newest = images.new_folder()
        assert not old.exists() and recent.is_dir() and newest.is_dir()
    finally:
        images.close()
    assert images.root is not None and not images.root.exists()


# ---------------------------------------------------------------------------------------- the command line


def test_cli_ui_serves_page_and_api_info(tmp_path: Path, tiny_world_dir: Path) -> None:
    port = free_port()
    script = Path(sys.executable).parent / "erasure-studio"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "erasure.cli"]
    env = {**os.environ, WORLD_ENV_VAR: str(tiny_world_dir), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [*command, "ui", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        page = _get_when_up(url + "/", process)
        assert page.status_code == 200 and "Erasure Studio" in page.text
        info = httpx.get(url + "/gradio_api/info", timeout=60)
        assert info.status_code == 200 and "/erase" in info.json()["named_endpoints"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _get_when_up(url: str, process: subprocess.Popen[str], timeout: float = 900) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"erasure-studio ui exited with {process.returncode}: {process.stdout.read()}"
            )  # type: ignore[union-attr]
        try:
            return httpx.get(url, timeout=10)
        except httpx.TransportError:
            time.sleep(1)
    raise AssertionError(f"nothing served at {url} after {timeout:.0f} s")


def test_cli_ui_refuses_a_missing_models_dir(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasure.cli import app

    result = CliRunner().invoke(app, ["ui", "--models-dir", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "--models-dir" in result.output and "Traceback" not in result.output


# -------------------------------------------------------------------------------- the proof on the real world


@pytest.mark.slow
def test_erasing_a_style_changes_it_and_keeps_another(tmp_path: Path) -> None:
    assert SHIPPED_WORLD_READY and "esd" in list_methods()
    from gradio_client import Client

    from generators.minicanvas.concepts import STYLES
    from generators.minicanvas.world import SD_GUIDANCE, SD_STEPS, classify, load_classifier
    from ui.server import launch
    from ui.settings import UISettings

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(WORLD_ENV_VAR, raising=False)
        server = launch(
            UISettings(runs_dir=tmp_path / "runs", device="cpu"), port=free_port(), block=False, quiet=True
        )
        try:
            client = Client(
                server.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "dl")
            )
            _, status, _, run = erase(client, "esd", ESD_PARAMS, f"style:{ERASED_STYLE}", ESD_BUDGET)
            assert status.startswith("finished"), status
            result = client.predict(
                run, IMAGES_PER_STYLE, [RETAINED_STYLE], "", SD_STEPS, SD_GUIDANCE, 0, api_name="/compare"
            )
        finally:
            server.close()
        judge = load_classifier("cpu")

    def style_hits(pairs: list[tuple[str, str, str]], style: str) -> tuple[float, float]:
        index = STYLES.index(style)
        shares = []
        for column in (1, 2):
            images = torch.stack([load_image(pair[column]) for pair in pairs])
            shares.append(float((classify(judge, images)[0].argmax(1) == index).float().mean()))
        return shares[0], shares[1]

    target_before, target_after = style_hits(gallery_pairs(result[1]), ERASED_STYLE)
    kept_before, kept_after = style_hits(gallery_pairs(result[2]), RETAINED_STYLE)
    assert target_before >= 0.75, "MiniSD should draw the target style before erasure"
    assert target_after <= 0.25, f"the target style is still recognised in {target_after:.0%} of images"
    assert kept_before >= 0.75 and kept_after >= 0.75, (
        f"retained style: {kept_before:.0%} -> {kept_after:.0%}"
    )
