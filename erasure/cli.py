"""The ``erasure-studio`` command line.

Heavy modules (torch, diffusers, the config models) are imported inside the commands, so ``--help`` is quick
and the check that our ``evaluate`` package is the one imported runs before anything imports it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import signal
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from typer.exceptions import TyperException

from erasure.errors import ConfigError, NotAvailableError, UserError

app = typer.Typer(
    name="erasure-studio",
    help="Erase concepts from generative image models, and prove that the erasure worked.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
world_app = typer.Typer(help="Build, verify and inspect the built-in MiniCanvas world.", no_args_is_help=True)
app.add_typer(world_app, name="world")

_debug = False

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="PATH=VALUE",
        help="Override a config field, e.g. --set seed=3 --set method.params.lr=1e-5 "
        "--set evaluate.suites=\\[canvas,hub]. Repeatable; values are read as YAML.",
    ),
]
OutOpt = Annotated[Path | None, typer.Option("--out", metavar="DIR", help="Write the result to DIR.")]

F = TypeVar("F", bound=Callable[..., Any])


INTERRUPTED_EXIT_CODE = 130
"""Exit code after Ctrl-C (SIGINT): 128 + 2, as shells report a process stopped by SIGINT."""

TERMINATED_EXIT_CODE = 143
"""Exit code after SIGTERM (``kill``, a batch scheduler, a container stop): 128 + 15."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that it takes the same clean way out: partial run folders
    removed, checkpoints kept. (A job started in the background by a non-interactive shell ignores SIGINT, so
    SIGTERM is how it is stopped.)"""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _guarded(fn: F) -> F:
    """Print a UserError as one line and exit with its code (2 for config errors); tracebacks only with --debug.

    Ctrl-C (SIGINT) stops with one line and exit code 130, SIGTERM with one line and 143: what was being written is
    not left half-written (run folders are only renamed into place when complete), and checkpoints are kept, so
    running the same command again resumes. A write error of the machine (disk full, permission denied) is one line
    too, not an internal error.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if _debug:
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:
            if _debug:
                raise
            terminated = isinstance(err, Terminated)
            typer.echo(
                f"{'terminated (SIGTERM)' if terminated else 'interrupted (Ctrl-C)'}: stopped without leaving a "
                "half-written result; checkpoints are kept, so running the same command again resumes",
                err=True,
            )
            raise typer.Exit(TERMINATED_EXIT_CODE if terminated else INTERRUPTED_EXIT_CODE) from None
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except OSError as err:
            if _debug:
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            typer.echo(f"error: {first} (rerun with --debug for the traceback)", err=True)
            raise typer.Exit(1) from None
        except Exception as err:
            if _debug:
                raise
            typer.echo(
                f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
                err=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    global _debug
    _debug = debug


# ------------------------------------------------------------------------------------------------ commands


@app.command()
@_guarded
def erase(
    config: Annotated[Path, typer.Argument(help="Job config (YAML).", show_default=False)],
    out: OutOpt = None,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a finished run of the same name.")
    ] = False,
) -> None:
    """Run one erasure job: erase the target concept and write a run folder (runs/<name>/ or --out)."""
    from erasure.config import load_job_config
    from erasure.runner import run_erase
    from erasure.runs import default_run_dir

    job = load_job_config(config, set_)
    run_erase(job, out or default_run_dir(job.name), overwrite=overwrite, echo=typer.echo)


@app.command()
@_guarded
def evaluate(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Run folder, backbone (minicanvas-sd, a pipeline folder, a checkpoint) or job config.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", metavar="MODEL", help="minicanvas-sd | PATH | RUN (instead of SOURCE)."),
    ] = None,
    suite: Annotated[
        list[str] | None,
        typer.Option("--suite", metavar="NAME", help="Suite to run (repeatable): canvas, hub, gan."),
    ] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="smoke, quick or full [default: quick].")] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target", metavar="KIND:NAME", help="style:NAME or object:NAME (a run's own target by default)."
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the report here.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", help="Also write the report to DIR/evaluation.json."),
    ] = None,
    set_: SetOpt = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="minicanvas or unlearncanvas.")] = "minicanvas",
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", metavar="DIR", help="Generation cache folder.")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Generate everything afresh; store nothing.")
    ] = False,
    style_classifier: Annotated[
        Path | None,
        typer.Option("--style-classifier", metavar="FILE", help="unlearncanvas: style ViT checkpoint."),
    ] = None,
    object_classifier: Annotated[
        Path | None,
        typer.Option("--object-classifier", metavar="FILE", help="unlearncanvas: object ViT checkpoint."),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            "--inception-weights",
            metavar="FILE",
            help="unlearncanvas: torchvision inception_v3 state dict for FID.",
        ),
    ] = None,
    real_images: Annotated[
        Path | None,
        typer.Option("--real-images", metavar="DIR", help="unlearncanvas: dataset <style>/<object>/<i>.jpg."),
    ] = None,
    clip: Annotated[
        Path | None, typer.Option("--clip", metavar="DIR", help="unlearncanvas: local CLIP folder.")
    ] = None,
) -> None:
    """Evaluate a run or a backbone with evaluation suites; prints the report as JSON (progress on stderr)."""
    from erasure.io import atomic_write_json
    from evaluate.command import EvaluateOptions, check_output_paths, run_evaluate

    check_output_paths(json_file, out)
    options = EvaluateOptions(
        source=source,
        model=model,
        suites=list(suite or []),
        tier=tier,
        target=target,
        device=device,
        protocol=protocol,
        overrides=list(set_ or []),
        cache_dir=cache_dir,
        no_cache=no_cache,
        style_classifier=style_classifier,
        object_classifier=object_classifier,
        inception_weights=inception_weights,
        real_images=real_images,
        clip=clip,
    )
    report = run_evaluate(options, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(report, indent=2))
    if json_file is not None:
        atomic_write_json(json_file, report)
    if out is not None:
        atomic_write_json(out / "evaluation.json", report)


@app.command()
@_guarded
def batch(
    config: Annotated[Path, typer.Argument(help="Benchmark config (YAML).", show_default=False)],
    out: OutOpt = None,
    set_: SetOpt = None,
    processes: Annotated[
        int, typer.Option("--processes", min=1, metavar="N", help="Run N cells at once (worker processes).")
    ] = 1,
) -> None:
    """Run every cell (backbone × method × params × target × seed) of a benchmark into runs/<name>/ or --out.

    Finished cells are skipped, interrupted ones resumed, failed ones reported without stopping the others;
    under `accelerate launch` each process takes its share of the cells. Exit code 1 if any cell failed.
    """
    from erasure.batch import run_batch
    from erasure.benchmark import load_benchmark
    from erasure.runs import RUNS_DIR

    bench = load_benchmark(config, set_)
    dest = out or RUNS_DIR / bench.config.name
    result = run_batch(bench, dest, processes=processes)
    counts = result.summary["counts"]
    typer.echo(
        f"batch {bench.config.name}: {len(bench.cells)} cells: "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        + f" (this run: {result.count('ran')} ran, {result.count('skipped')} skipped, "
        f"{len(result.failed)} failed); summary: {result.summary_path}"
    )
    for outcome in result.failed:
        typer.echo(f"failed: {outcome.name}: {outcome.error}", err=True)
    if result.failed:
        raise typer.Exit(1)


@app.command()
@_guarded
def leaderboard(
    runs: Annotated[
        list[Path], typer.Argument(help="Run folders, or folders searched for them.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option("--out", metavar="DIR", help="Folder for the leaderboard files.", show_default=False),
    ],
) -> None:
    """Rank finished runs: leaderboard.md/.csv/.html, pareto.png and time_memory.png in --out DIR."""
    from erasure.leaderboard import write_leaderboard

    result = write_leaderboard(runs, out, warn=lambda line: typer.echo(line, err=True))
    board = result.board
    typer.echo(
        f"leaderboard of {sum(len(row.runs) for row in board.rows)} runs in {len(board.rows)} rows: "
        + ", ".join(str(path) for path in result.files)
    )


class ExportFormat(str, Enum):
    diffusers = "diffusers"


@app.command()
@_guarded
def export(
    run: Annotated[Path, typer.Argument(help="Finished run folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder to write.", show_default=False)],
    fmt: Annotated[ExportFormat, typer.Option("--format", help="Output format.")] = ExportFormat.diffusers,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing export folder.")
    ] = False,
) -> None:
    """Materialise a run as a full model folder (diffusers: opens with StableDiffusionPipeline.from_pretrained)."""
    from erasure.export import export_diffusers

    written = export_diffusers(run, out, overwrite=overwrite)
    typer.echo(f"exported {run} to {written}")


@app.command()
@_guarded
def ui(
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to serve on.")] = 7860,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir",
            metavar="DIR",
            help="Also offer the diffusers pipeline folders and GAN checkpoints found in DIR as backbones.",
        ),
    ] = None,
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", metavar="DIR", help="Where runs are written and browsed.")
    ] = Path("runs"),
) -> None:
    """Serve the before/after playground (Gradio) at http://HOST:PORT/."""
    if models_dir is not None and not models_dir.is_dir():
        raise ConfigError(f"--models-dir: {models_dir} is not a folder")
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ConfigError(f"--runs-dir: {runs_dir} exists and is not a folder")
    from ui.server import launch
    from ui.settings import UISettings

    typer.echo(f"Erasure Studio playground: http://{host}:{port}/ (Ctrl-C to stop)")
    try:
        launch(UISettings(runs_dir=runs_dir, models_dir=models_dir), host=host, port=port, quiet=True)
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port}: {err}") from None


@app.command()
@_guarded
def methods(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the registered erasure methods with their backbone kind."""
    from erasure.registry import get_method, list_methods

    rows = [
        {
            "name": name,
            "backbone": get_method(name).backbone_kind,
            "description": get_method(name).description,
        }
        for name in list_methods()
    ]
    if json_:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("No erasure methods are registered yet.")
    else:
        width = max(len(row["name"]) for row in rows)
        for row in rows:
            typer.echo(f"{row['name']:<{width}}  {row['backbone']:<3}  {row['description']}")


# --------------------------------------------------------------------------------------------------- world


def _world_module() -> ModuleType:
    try:
        module = importlib.import_module("generators.minicanvas.world")
    except ModuleNotFoundError as err:
        if err.name != "generators.minicanvas.world":
            raise
        module = None
    if module is None or not (hasattr(module, "build") and hasattr(module, "verify")):
        raise NotAvailableError(
            "the MiniCanvas world builder", "generators.minicanvas.world is not written yet"
        )
    return module


def _device_option(device: str) -> str:
    """The concrete device (``auto`` resolved) for a ``--device`` option; ConfigError if unusable here."""
    from erasure.devices import check_device, resolve_device

    try:
        check_device(device)
    except ValueError as err:
        raise ConfigError(f"--device: got {device!r}; {err}") from None
    return str(resolve_device(device))


@world_app.command("build")
@_guarded
def world_build(
    only: Annotated[
        list[str] | None, typer.Option("--only", metavar="NAME", help="Build only this stage (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from checkpoints.")] = True,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="FIELD=VALUE",
                     help="Override a build setting, e.g. --set gan_steps=20000 --set unet.batch=64 (repeatable)."),
    ] = None,
    continue_gan: Annotated[
        bool,
        typer.Option("--continue-gan",
                     help="GAN stage without a training checkpoint (fresh checkout): continue from the published "
                          "gan/ (weights only, fresh optimiser) instead of from scratch."),
    ] = False,
) -> None:
    """Train the MiniCanvas world (judge, diffusion pipeline, GAN) into generators/minicanvas/world/."""
    world = _world_module()
    stages = list(getattr(world, "STAGES", ()))
    for name in only or []:
        if stages and name not in stages:
            raise ConfigError(f"--only: got {name!r}; must be one of {', '.join(stages)}")
    kwargs: dict[str, Any] = {}
    if set_:
        kwargs["settings"] = world_settings(set_)
    if continue_gan:
        if only and "gan" not in only:
            raise ConfigError("--continue-gan applies to the gan stage; add --only gan")
        kwargs["continue_gan"] = True
    world.build(only=only or None, device=_device_option(device), resume=resume, **kwargs)


def world_settings(overrides: list[str]):
    """The world build's settings (``generators.minicanvas.train.WorldSettings``) with ``--set`` overrides applied;
    a bad field or value fails here, before any training, naming the field and what is allowed."""
    from pydantic import ValidationError

    from erasure.config import format_validation_error
    from erasure.overrides import apply_overrides, parse_override
    from generators.minicanvas.train import WorldSettings

    parsed = [parse_override(raw) for raw in overrides]
    data = apply_overrides(WorldSettings().model_dump(), parsed)
    try:
        return WorldSettings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            format_validation_error(err, "world build settings", data, parsed, root=WorldSettings)
        ) from None


@world_app.command("verify")
@_guarded
def world_verify(
    json_file: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the report here.")
    ] = None,
    tier: Annotated[str, typer.Option("--tier", help="smoke, quick or full.")] = "full",
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
) -> None:
    """Measure the built world and print the report (JSON); exit 1 if the report says it did not pass."""
    from erasure.io import atomic_write_json
    from generators.minicanvas.paths import world_dir

    if tier not in ("smoke", "quick", "full"):
        raise ConfigError(f"--tier: got {tier!r}; must be smoke, quick or full")
    resolved = _device_option(device)
    world = _world_module()
    if not world_dir().is_dir():
        raise UserError(f"no MiniCanvas world at {world_dir()}; run `erasure-studio world build` first")
    report = world.verify(tier=tier, device=resolved)
    typer.echo(json.dumps(report, indent=2))
    if json_file is not None:
        atomic_write_json(json_file, report)
    if isinstance(report, dict) and report.get("passed") is False:
        raise typer.Exit(1)


@world_app.command("concepts")
@_guarded
def world_concepts(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the MiniCanvas styles and objects (the valid style:/object: targets)."""
    from generators.minicanvas.concepts import OBJECTS, STYLES

    if json_:
        typer.echo(json.dumps({"styles": list(STYLES), "objects": list(OBJECTS)}, indent=2))
    else:
        typer.echo("styles:  " + ", ".join(STYLES))
        typer.echo("objects: " + ", ".join(OBJECTS))


# ---------------------------------------------------------------------------------------------- entry point


def evaluate_shadowing() -> str | None:
    """A one-line problem if ``import evaluate`` would not give erasure-studio's own package, else None."""
    expected = Path(__file__).resolve().parent.parent / "evaluate" / "__init__.py"
    spec = importlib.util.find_spec("evaluate")
    ours = spec is not None and spec.origin is not None and Path(spec.origin).resolve() == expected
    if ours and getattr(importlib.import_module("evaluate"), "__erasure_studio__", False):
        return None
    found = (spec.origin or ", ".join(spec.submodule_search_locations or [])) if spec else "nothing"
    return (
        f"'import evaluate' finds {found}, not erasure-studio's evaluate package ({expected.parent}); "
        "another package named 'evaluate' (e.g. Hugging Face's) shadows it: uninstall it "
        "(pip uninstall evaluate) or take it off PYTHONPATH"
    )


def main() -> None:
    problem = evaluate_shadowing()
    if problem is not None:
        print(f"erasure-studio: {problem}", file=sys.stderr)
        raise SystemExit(2)
    signal.signal(signal.SIGTERM, _raise_terminated)
    app(prog_name="erasure-studio")


if __name__ == "__main__":
    main()
