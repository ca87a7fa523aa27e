"""The playground page: tabs Erase, Compare, Runs and Leaderboard, wired to :class:`ui.studio.Studio`.

Public API endpoints (what ``gradio_client`` calls, and what the page's buttons call too):

* ``/erase`` ``(backbone, method, params_json, target, budget, seed)`` → streams ``(job_id, status, log, run)``
* ``/cancel`` ``(job_id)`` → status line
* ``/compare`` ``(run, images_per_concept, retained, retained_prompts, steps, guidance, seed)`` →
  ``(slider pair, target gallery, retained gallery, judge table, metrics table, note)``
* ``/runs``, ``/run_details`` ``(run)``, ``/leaderboard``

The method parameter form is built from each registered method's ``Params`` model when the app is created, so a
newly registered method appears on the next start without UI changes.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from typing import Any

import gradio as gr

from erasure.registry import get_method, list_methods
from generators.minicanvas.concepts import OBJECTS, STYLES
from ui.param_form import FieldSpec, default_budget
from ui.run_index import SUMMARY_COLUMNS
from ui.settings import UISettings
from ui.studio import DEFAULT_GUIDANCE, DEFAULT_IMAGES_PER_CONCEPT, DEFAULT_SAMPLE_STEPS, Studio, frame

CSS = """
.pixelated img { image-rendering: pixelated; }
"""
TITLE = "Erasure Studio"


def create_app(settings: UISettings) -> tuple[gr.Blocks, Studio]:
    """The page and its server state (not yet queued or launched; see :func:`ui.server.launch`)."""
    studio = Studio(settings)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {TITLE}\nErase a concept from a generative image model, then compare the same prompts and seeds "
            "before and after."
        )
        with gr.Tabs(selected="erase") as tabs:
            with gr.Tab("Erase", id="erase"):
                erase_ui = _erase_tab(studio)
            with gr.Tab("Compare", id="compare"):
                compare_ui = _compare_tab(studio)
            with gr.Tab("Runs", id="runs"):
                runs_ui = _runs_tab(studio)
            with gr.Tab("Leaderboard", id="leaderboard"):
                board_ui = _leaderboard_tab(studio)

        _wire_erase(studio, erase_ui, compare_ui, runs_ui)
        _wire_compare(studio, compare_ui)
        _wire_runs(studio, runs_ui, compare_ui, tabs)
        board_ui["refresh"].click(
            studio.leaderboard_table, None, [board_ui["table"], board_ui["source"]], api_name="leaderboard"
        )
        demo.load(studio.run_choices, None, compare_ui["run"], api_visibility="private")
        demo.load(studio.run_choices, None, runs_ui["run"], api_visibility="private")
        demo.load(studio.runs_table, None, runs_ui["table"], api_visibility="private")
        demo.load(
            studio.leaderboard_table, None, [board_ui["table"], board_ui["source"]], api_visibility="private"
        )
        if studio.default_backbone() is not None:
            demo.load(
                studio.backbone_selected,
                erase_ui["backbone"],
                [erase_ui["method"], erase_ui["kind"], erase_ui["style"], erase_ui["object"], erase_ui["text"],
                 erase_ui["backbone_note"]],
                api_visibility="private",
            )  # fmt: skip
    return demo, studio


# ------------------------------------------------------------------------------------------------ erase tab


def _erase_tab(studio: Studio) -> dict[str, Any]:
    limits = studio.limits
    ui: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            ui["backbone"] = gr.Dropdown(
                studio.backbone_labels(),
                value=studio.default_backbone(),
                label="Backbone",
                elem_id="backbone",
                allow_custom_value=True,  # the handler checks it (and rescans the models directory)
            )
            ui["backbone_note"] = gr.Markdown()
            methods = list_methods()
            ui["method"] = gr.Dropdown(
                methods,
                value=methods[0] if methods else None,
                label="Method",
                elem_id="method",
                allow_custom_value=True,
            )
            ui["method_info"] = gr.Markdown(studio.method_summary(methods[0] if methods else None))
            ui["groups"] = {}
            widgets: list[Any] = []
            for name in methods:
                with gr.Group(visible=name == (methods[0] if methods else None)) as group:
                    for spec in studio.method_fields(name):
                        widgets.append(_widget(spec))
                        studio.param_index.append((name, spec))
                ui["groups"][name] = group
            ui["widgets"] = widgets
            ui["extra"] = gr.Textbox(
                label="Extra parameters (JSON object, optional)", placeholder='{"lr": 1e-5}', lines=1,
                max_length=limits.max_params_chars,
            )  # fmt: skip
            ui["kind"] = gr.Radio(["style", "object", "text"], value="style", label="Target kind")
            ui["style"] = gr.Dropdown(STYLES, value=STYLES[0], label="Style to erase", elem_id="target-style")
            ui["object"] = gr.Dropdown(OBJECTS, value=OBJECTS[0], label="Object to erase", visible=False)
            ui["text"] = gr.Textbox(
                label="Concept to erase (free text)", max_length=limits.max_prompt_chars, visible=False
            )
            # Numbers sent to the public endpoints carry no widget bounds or rounding: the handlers check them
            # (and name the input and its range in the error), whoever calls.
            first = methods[0] if methods else None
            ui["budget"] = gr.Number(
                label=f"Budget (training steps, ≤ {limits.max_steps})",
                value=default_budget(get_method(first).Params, limits) if first else None, elem_id="budget",
            )  # fmt: skip
            ui["seed"] = gr.Number(label="Seed", value=0)
            with gr.Row():
                ui["erase"] = gr.Button("Erase", variant="primary", elem_id="erase-button")
                ui["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
        with gr.Column(scale=1):
            ui["params_json"] = gr.Textbox(label="Parameters sent", interactive=False)
            ui["target"] = gr.Textbox(label="Target sent", interactive=False)
            ui["job_id"] = gr.Textbox(label="Job", interactive=False, elem_id="job-id")
            ui["status"] = gr.Textbox(label="Status", interactive=False, elem_id="job-status")
            ui["run"] = gr.Textbox(label="Finished run", interactive=False, elem_id="finished-run")
            ui["log"] = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True)
    return ui


def _widget(spec: FieldSpec) -> Any:
    label = spec.name.replace("_", " ")
    info = spec.description or None
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default, label=label, info=info)
    if spec.kind == "bool":
        return gr.Checkbox(value=spec.default, label=label, info=info)
    if spec.kind in ("int", "float"):
        return gr.Number(
            value=spec.default, label=label, info=info, precision=0 if spec.kind == "int" else None,
            minimum=spec.minimum, maximum=spec.maximum,
        )  # fmt: skip
    return gr.Textbox(value=spec.default, label=label, info=info)


def _wire_erase(
    studio: Studio, ui: dict[str, Any], compare_ui: dict[str, Any], runs_ui: dict[str, Any]
) -> None:
    groups = ui["groups"]

    def method_selected(method: str | None) -> tuple[Any, ...]:
        visibility = [gr.update(visible=name == method) for name in groups]
        return (studio.method_summary(method), studio.budget_for(method), *visibility)

    ui["method"].change(
        method_selected,
        ui["method"],
        [ui["method_info"], ui["budget"], *groups.values()],
        api_visibility="private",
    )
    ui["backbone"].change(
        studio.backbone_selected,
        ui["backbone"],
        [ui["method"], ui["kind"], ui["style"], ui["object"], ui["text"], ui["backbone_note"]],
        api_visibility="private",
    )
    ui["kind"].change(studio.target_pickers, ui["kind"], [ui["style"], ui["object"], ui["text"]],
                      api_visibility="private")  # fmt: skip

    collected = ui["erase"].click(
        studio.collect,
        [ui["method"], ui["kind"], ui["style"], ui["object"], ui["text"], ui["extra"], *ui["widgets"]],
        [ui["params_json"], ui["target"]],
        api_visibility="private",
    )
    erased = collected.success(
        studio.erase,
        [ui["backbone"], ui["method"], ui["params_json"], ui["target"], ui["budget"], ui["seed"]],
        [ui["job_id"], ui["status"], ui["log"], ui["run"]],
        api_name="erase",
        concurrency_limit=studio.limits.max_running_jobs,
        concurrency_id="erase",
    )
    erased.success(
        lambda run: (studio.run_choices(run), studio.run_choices(run), studio.runs_table()),
        ui["run"],
        [compare_ui["run"], runs_ui["run"], runs_ui["table"]],
        api_visibility="private",
    )
    # Not queued: a cancel must get through even when the queue is full of waiting erasure requests.
    ui["cancel"].click(studio.cancel, ui["job_id"], ui["status"], api_name="cancel", queue=False)


# ---------------------------------------------------------------------------------------------- compare tab


def _compare_tab(studio: Studio) -> dict[str, Any]:
    limits = studio.limits
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["run"] = gr.Dropdown([], label="Run", elem_id="compare-run", scale=3, allow_custom_value=True)
        ui["refresh"] = gr.Button("Refresh runs", scale=1)
    with gr.Row():
        # No widget bounds: the handler checks these (see the erase tab).
        ui["count"] = gr.Number(
            min(DEFAULT_IMAGES_PER_CONCEPT, limits.max_images_per_concept),
            label=f"Images per concept (≤ {limits.max_images_per_concept})",
        )
        ui["steps"] = gr.Number(
            min(DEFAULT_SAMPLE_STEPS, limits.max_sample_steps),
            label=f"Sampling steps (≤ {limits.max_sample_steps})",
        )
        ui["guidance"] = gr.Number(DEFAULT_GUIDANCE, label=f"Guidance (≤ {limits.max_guidance:g})")
        ui["seed"] = gr.Number(0, label="First seed")
    ui["retained"] = gr.Dropdown(
        [], value=[], multiselect=True, label=f"Retained concepts (≤ {limits.max_retained_concepts})",
        elem_id="retained-concepts",
        max_choices=limits.max_retained_concepts, allow_custom_value=True,
    )  # fmt: skip
    ui["prompts"] = gr.Textbox(
        label=f"Retained prompts, one per line (≤ {limits.max_prompts})", lines=3, visible=False,
        max_length=limits.max_prompts * (limits.max_prompt_chars + 1),
    )  # fmt: skip
    ui["go"] = gr.Button("Compare", variant="primary", elem_id="compare-button")
    ui["note"] = gr.Markdown(elem_id="compare-note")
    with gr.Row():
        ui["slider"] = gr.ImageSlider(
            label="Before | after (first target image)", format="png", type="pil", interactive=False,
            elem_id="before-after-slider", elem_classes=["pixelated"], height=320,
        )  # fmt: skip
        ui["judge"] = gr.Dataframe(
            value=frame(["concept", "role", "images", "before", "after"], []), label="Judge (MiniCanvas classifier)",
            interactive=False,
        )  # fmt: skip
    ui["target_gallery"] = gr.Gallery(
        label="Target concept: before | after", format="png", columns=4, object_fit="contain", height="auto",
        elem_id="target-gallery", elem_classes=["pixelated"], interactive=False,
    )  # fmt: skip
    ui["retained_gallery"] = gr.Gallery(
        label="Retained concepts: before | after", format="png", columns=4, object_fit="contain", height="auto",
        elem_id="retained-gallery", elem_classes=["pixelated"], interactive=False,
    )  # fmt: skip
    ui["metrics"] = gr.Dataframe(value=frame(["metric", "value"], []), label="Run metrics (metrics.json)",
                                 interactive=False)  # fmt: skip
    return ui


def _wire_compare(studio: Studio, ui: dict[str, Any]) -> None:
    ui["refresh"].click(lambda run: studio.run_choices(run), ui["run"], ui["run"], api_visibility="private")
    ui["run"].change(studio.run_selected, ui["run"], [ui["retained"], ui["prompts"], ui["metrics"]],
                     api_visibility="private")  # fmt: skip
    ui["go"].click(
        studio.compare,
        [ui["run"], ui["count"], ui["retained"], ui["prompts"], ui["steps"], ui["guidance"], ui["seed"]],
        [ui["slider"], ui["target_gallery"], ui["retained_gallery"], ui["judge"], ui["metrics"], ui["note"]],
        api_name="compare",
        concurrency_id="compare",
    )


# ------------------------------------------------------------------------------------------ runs, leaderboard


def _runs_tab(studio: Studio) -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["refresh"] = gr.Button("Refresh")
    ui["table"] = gr.Dataframe(value=frame(SUMMARY_COLUMNS, []), label="Finished runs", interactive=False)
    with gr.Row():
        ui["run"] = gr.Dropdown([], label="Run", elem_id="runs-run", scale=3, allow_custom_value=True)
        ui["open"] = gr.Button("Open in Compare", scale=1, elem_id="open-in-compare")
    with gr.Row():
        ui["config"] = gr.Code(label="config.resolved.yaml", language="yaml", interactive=False)
        ui["metrics"] = gr.Dataframe(
            value=frame(["metric", "value"], []), label="metrics.json", interactive=False
        )
    ui["log"] = gr.Textbox(label="log.txt", lines=10, max_lines=20, interactive=False)
    return ui


def _wire_runs(studio: Studio, ui: dict[str, Any], compare_ui: dict[str, Any], tabs: gr.Tabs) -> None:
    ui["refresh"].click(studio.runs_table, None, ui["table"], api_name="runs").then(
        lambda run: studio.run_choices(run), ui["run"], ui["run"], api_visibility="private"
    )
    ui["run"].change(
        studio.run_details, ui["run"], [ui["config"], ui["metrics"], ui["log"]], api_name="run_details"
    )
    ui["open"].click(
        lambda run: (studio.run_choices(run), gr.Tabs(selected="compare")),
        ui["run"],
        [compare_ui["run"], tabs],
        api_visibility="private",
    )


def _leaderboard_tab(studio: Studio) -> dict[str, Any]:
    ui: dict[str, Any] = {}
    ui["refresh"] = gr.Button("Refresh")
    ui["source"] = gr.Markdown()
    ui["table"] = gr.Dataframe(value=frame(["run"], []), label="Leaderboard", interactive=False)
    return ui
