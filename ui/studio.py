"""The playground's request handlers, independent of the page layout (see :mod:`ui.app` for that).

Every handler validates its inputs on the server (:mod:`ui.validation`, :mod:`ui.job_request`) and turns a
:class:`~erasure.errors.UserError` into a ``gr.Error`` with the same one-line message; any other exception is
logged with its traceback on the server and reported as one line, so a bad request never takes the server down.
"""

from __future__ import annotations

import functools
import html
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr
import pandas as pd

from erasure.devices import resolve_device
from erasure.errors import UserError
from erasure.registry import get_method
from erasure.yamlfile import dump_yaml
from generators.minicanvas.world import SD_GUIDANCE, SD_STEPS
from ui import compare as comparing
from ui.backbones import BackboneChoiceError, list_choices, resolve_choice
from ui.image_files import ImageFiles, save_png
from ui.job_request import build_job_request, methods_for
from ui.jobs import JobManager
from ui.leaderboard import leaderboard
from ui.models import ModelPool
from ui.param_form import FieldSpec, ParamsError, budget_field, default_budget, form_fields, parse_params_json
from ui.prompts import default_retained
from ui.run_index import (
    SUMMARY_COLUMNS,
    RunInfo,
    list_runs,
    metrics_rows,
    open_run,
    read_log,
    run_names,
    summary_rows,
)
from ui.settings import UISettings

log = logging.getLogger("erasure_studio.ui")

POLL_SECONDS = 0.5
"""How often a running job's progress is sent to the page."""
DEFAULT_SAMPLE_STEPS = SD_STEPS
DEFAULT_GUIDANCE = SD_GUIDANCE
DEFAULT_IMAGES_PER_CONCEPT = 4

F = TypeVar("F", bound=Callable[..., Any])


def reported(fn: F) -> F:
    """Turn errors of a handler into one-line ``gr.Error`` messages (generators included)."""

    def convert(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, UserError):
            return gr.Error(_plain(str(err)), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(_plain(f"internal error: {type(err).__name__}: {err}"), print_exception=False)

    if _is_generator(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - every error becomes one line on the page
                raise convert(err) from None

        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - every error becomes one line on the page
            raise convert(err) from None

    return wrapper  # type: ignore[return-value]


def _plain(message: str) -> str:
    """The page renders error messages as HTML: escape ``&``, ``<`` and ``>`` so input echoed back stays text."""
    return html.escape(message, quote=False)


def _is_generator(fn: Callable[..., Any]) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


def frame(columns: list[str], rows: list[list[Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


class Studio:
    """The server's shared state: its settings, running jobs and loaded models."""

    def __init__(self, settings: UISettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.jobs = JobManager(self.limits.max_running_jobs, self.limits.max_job_seconds)
        self.pool = ModelPool(resolve_device(settings.device))
        self.images = ImageFiles()
        """Where comparisons write the images they return (one folder per request)."""
        self.param_index: list[tuple[str, FieldSpec]] = []
        """(method, field) of every parameter widget, in the order the form passes their values (set by the app)."""

    # ------------------------------------------------------------------------------------------ choices

    def backbone_labels(self) -> list[str]:
        return [choice.label for choice in list_choices(self.settings.models_dir)]

    def default_backbone(self) -> str | None:
        choices = list_choices(self.settings.models_dir)
        available = [choice.label for choice in choices if choice.available]
        return available[0] if available else (choices[0].label if choices else None)

    def method_fields(self, method: str) -> list[FieldSpec]:
        return form_fields(get_method(method).Params, self.limits)

    def method_summary(self, method: str | None) -> str:
        if not method:
            return "No method for this backbone is registered yet."
        cls = get_method(method)
        budget = budget_field(cls.Params)
        budget_line = (
            f"Budget sets `{budget}`." if budget else "This method has no training steps: no budget."
        )
        return f"**{cls.name}** — {cls.description}  \n{budget_line}"

    # ------------------------------------------------------------------------------------------ erase

    @reported
    def erase(
        self,
        backbone: str,
        method: str,
        params_json: str,
        target: str,
        budget: float,
        seed: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio injects its progress tracker
    ) -> Iterator[tuple[str, str, str, str]]:
        """Start an erasure job and stream ``(job id, status, log tail, run name)`` until it ends.

        The run name is empty unless the job finished. A failed job raises its error; a cancelled one ends
        normally with a status saying so. If the page that started the job goes away, the job is cancelled.
        """
        request = build_job_request(self.settings, backbone, method, params_json, target, budget, seed)
        state = self.jobs.start(request.job, request.dest)
        yield state.id, state.summary(), "", ""
        try:
            while not state.done.wait(POLL_SECONDS):
                if state.total:
                    progress((state.step, state.total), desc="erasing", unit="steps")
                yield state.id, state.summary(), "\n".join(state.log), ""
        finally:
            if not state.done.is_set():
                self.jobs.cancel(state.id, "the request that started it went away")
        if state.status == "failed":
            raise UserError(state.error or "the job failed")
        run = state.run_name if state.status == "finished" else ""
        yield state.id, state.summary(), "\n".join(state.log), run

    @reported
    def cancel(self, job_id: str) -> str:
        """Cancel a running job by its id (shown on the page); says what happened."""
        if not isinstance(job_id, str) or not job_id.strip():
            return "no job to cancel"
        if self.jobs.cancel(job_id.strip()):
            return "cancelling: the job stops at its next step and keeps no run"
        state = self.jobs.get(job_id.strip())
        return f"nothing to cancel: the job has {state.status}" if state else "nothing to cancel: unknown job"

    # ------------------------------------------------------------------------------------------ compare

    def open_run(self, name: str) -> RunInfo:
        return open_run(self.settings.runs_dir, name)

    @reported
    def run_selected(self, name: str) -> tuple[Any, Any, pd.DataFrame]:
        """Compare-tab widgets for a run: retained concept choices (MiniCanvas) or retained prompts, metrics."""
        if not name:
            return gr.update(choices=[], value=[]), gr.update(visible=False), frame(["metric", "value"], [])
        run = self.open_run(name)
        allowed = comparing.retained_allowed(run)
        if allowed:
            kind, target = comparing.run_target(run)
            retained = gr.update(choices=allowed, value=default_retained(kind, target), visible=True)
            prompts = gr.update(visible=False)
        else:
            retained = gr.update(choices=[], value=[], visible=False)
            prompts = gr.update(visible=True)
        return retained, prompts, frame(["metric", "value"], metrics_rows(run))

    @reported
    def compare(
        self,
        run_name: str,
        images_per_concept: float,
        retained: list[str] | None,
        retained_prompts: str,
        steps: float,
        guidance: float,
        seed: float,
    ) -> tuple[Any, list[Any], list[Any], pd.DataFrame, pd.DataFrame, str]:
        """``(slider pair, target gallery, retained gallery, judge table, metrics table, note)`` for a run."""
        run = self.open_run(run_name)
        request = comparing.check_request(
            self.limits,
            images_per_concept,
            retained,
            retained_prompts,
            steps,
            guidance,
            seed,
            comparing.retained_allowed(run),
        )
        result = comparing.compare(run, request, self.pool)
        first = result.target[0] if result.target else (result.retained[0] if result.retained else None)
        folder = self.images.new_folder()
        slider = (
            (
                save_png(first.before, folder / "slider-before.png"),
                save_png(first.after, folder / "slider-after.png"),
            )
            if first
            else None
        )
        note = result.note or f"Run {run.name}: {run.method} erased {run.target} from {run.backbone}."
        return (
            slider,
            comparing.gallery_items(result.target, folder, "target"),
            comparing.gallery_items(result.retained, folder, "retained"),
            frame(comparing.JUDGE_COLUMNS, result.judge_rows),
            frame(["metric", "value"], metrics_rows(run)),
            note,
        )

    # ------------------------------------------------------------------------------------------ runs

    @reported
    def runs_table(self) -> pd.DataFrame:
        return frame(SUMMARY_COLUMNS, summary_rows(list_runs(self.settings.runs_dir)))

    def run_choices(self, select: str | None = None) -> Any:
        names = run_names(self.settings.runs_dir)
        value = select if select in names else (names[0] if names else None)
        return gr.update(choices=names, value=value)

    @reported
    def run_details(self, name: str) -> tuple[str, pd.DataFrame, str]:
        """``(config YAML, metrics table, log)`` of a run."""
        if not name:
            return "", frame(["metric", "value"], []), ""
        run = self.open_run(name)
        return dump_yaml(run.config), frame(["metric", "value"], metrics_rows(run)), read_log(run)

    @reported
    def leaderboard_table(self) -> tuple[pd.DataFrame, str]:
        (columns, rows), source = leaderboard(self.settings.runs_dir)
        return frame(columns, rows), f"Source: {source}. {len(rows)} run(s)."

    # ------------------------------------------------------------------------------------------ erase form

    @reported
    def backbone_selected(self, label: str) -> tuple[Any, ...]:
        """Method choices and target pickers for a backbone: MiniCanvas concept pickers or free text."""
        try:
            choice = resolve_choice(label, self.settings.models_dir)
        except BackboneChoiceError as err:
            raise UserError(str(err)) from None
        methods = methods_for(choice.kind)
        method = gr.update(choices=methods, value=methods[0] if methods else None)
        note = (
            ""
            if choice.available
            else f"⚠ {choice.label} is not built yet: run `erasure-studio world build`."
        )
        if choice.minicanvas:
            kind = gr.update(choices=["style", "object", "text"], value="style", visible=True)
        else:
            kind = gr.update(choices=["text"], value="text", visible=False)
        return (method, kind, *self.target_pickers("style" if choice.minicanvas else "text"), note)

    def target_pickers(self, kind: str) -> tuple[Any, Any, Any]:
        return (
            gr.update(visible=kind == "style"),
            gr.update(visible=kind == "object"),
            gr.update(visible=kind == "text"),
        )

    @reported
    def collect(
        self, method: str, kind: str, style: str, obj: str, text: str, extra_json: str, *values: Any
    ) -> tuple[str, str]:
        """``(params JSON, target spec)`` from the form (the same inputs the ``erase`` API takes)."""
        if not method:
            raise UserError("choose a method")
        params: dict[str, Any] = {}
        for (owner, spec), value in zip(self.param_index, values):
            if owner == method and value is not None and value != spec.default:
                params[spec.name] = value
        try:
            params.update(parse_params_json(extra_json or "", self.limits))
        except ParamsError as err:
            raise UserError(f"extra parameters: {err}") from None
        target = {"style": f"style:{style}", "object": f"object:{obj}"}.get(
            kind, f"text:{(text or '').strip()}"
        )
        return json.dumps(params), target

    def budget_for(self, method: str | None) -> Any:
        if not method:
            return gr.update(interactive=False)
        params_cls = get_method(method).Params
        default = default_budget(params_cls, self.limits)
        if default is None:
            return gr.update(
                value=None, interactive=False, label="Budget: not applicable (no training steps)"
            )
        return gr.update(
            value=default, interactive=True, label=f"Budget (training steps, ≤ {self.limits.max_steps})"
        )

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel running jobs and wait for them to clean up (their partial run folders are removed); remove the
        comparisons' image files."""
        self.jobs.cancel_all()
        deadline = time.monotonic() + timeout
        for state in self.jobs.running():
            state.done.wait(max(0.0, deadline - time.monotonic()))
        self.images.close()
