"""The leaderboard's metric columns: UnlearnCanvas' order first, then HUB aspects, attack ASRs and GAN metrics.

UnlearnCanvas (Zhang et al. 2024, Table 3) reports style UA/IRA/CRA, object UA/IRA/CRA, FID, then time, memory
and storage; the studio adds the CLIP score after FID. Style columns average the runs whose target is a style,
object columns the runs whose target is an object; every other column averages all runs of a row. Metric keys
are the dotted keys of metrics.json (see :func:`erasure.leaderboard.records.flatten_metrics`).

Metrics no column here knows (a new ``hub.*`` aspect, an ASR from another suite, a new ``gan.*`` key) get a
column of their own, named by their key, next to their kind; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from erasure.leaderboard.records import RunRecord

Better = Literal["higher", "lower"] | None


@dataclass(frozen=True)
class Column:
    id: str
    """Stable identifier, also the CSV column prefix (``style_ua_pct`` → ``style_ua_pct_mean``...)."""
    label: str
    key: str
    """The metrics.json key (dotted) read from each run."""
    better: Better = None
    scale: float = 1.0
    """Multiplier from the metrics.json value to the shown value (fractions → %)."""
    decimals: int | None = None
    """Digits after the point; None = 4 significant digits."""
    target_kind: str | None = None
    """Only runs with a target of this kind count (``style``/``object``); None = every run."""

    def value(self, run: RunRecord) -> float | None:
        if self.target_kind is not None and run.target_kind != self.target_kind:
            return None
        raw = run.metrics.get(self.key)
        return None if raw is None else raw * self.scale

    def header(self) -> str:
        arrow = {"higher": " ↑", "lower": " ↓"}.get(self.better or "", "")
        return self.label + arrow


def _canvas_accuracy(kind: str, metric: str) -> Column:
    return Column(
        id=f"{kind}_{metric}_pct",
        label=f"{kind.capitalize()} {metric.upper()} (%)",
        key=f"canvas.{metric}",
        better="higher",
        scale=100.0,
        decimals=1,
        target_kind=kind,
    )


UNLEARNCANVAS_COLUMNS: tuple[Column, ...] = (
    *(_canvas_accuracy("style", metric) for metric in ("ua", "ira", "cra")),
    *(_canvas_accuracy("object", metric) for metric in ("ua", "ira", "cra")),
    Column("fid", "FID", "canvas.fid", better="lower", decimals=2),
    Column("clip_score", "CLIP", "canvas.clip_score", better="higher", decimals=2),
    Column("time_s", "Time (s)", "efficiency.erase_time_s", better="lower", decimals=1),
    Column("memory_mb", "Memory (MB)", "efficiency.peak_mem_mb", better="lower", decimals=0),
    Column("storage_mb", "Storage (MB)", "efficiency.storage_mb", better="lower", decimals=2),
)

HUB_COLUMNS: tuple[Column, ...] = (
    # The ``hub`` suite's aspects (evaluate/suites/hub.py); rates in %.
    Column("hub_target_proportion_pct", "HUB target proportion (%)", "hub.target_proportion", "lower", 100.0, 1),
    Column("hub_multilingual_pct", "HUB multilingual (%)", "hub.multilingual", "lower", 100.0, 1),
    Column("hub_selective_alignment_pct", "HUB selective alignment (%)", "hub.selective_alignment", "higher",
           100.0, 1),
    Column("hub_pinpoint_pct", "HUB pinpoint (%)", "hub.pinpoint", "higher", 100.0, 1),
    Column("hub_quality_fid", "HUB quality FID", "hub.quality_fid", "lower", decimals=2),
    Column("hub_alignment", "HUB alignment (CLIP)", "hub.alignment", "higher", decimals=2),
)  # fmt: skip

ATTACK_COLUMNS: tuple[Column, ...] = (
    # UnlearnDiffAtk's Pre-ASR and ASR, as the ``hub`` suite reports them.
    Column("pre_attack_asr_pct", "Pre-attack ASR (%)", "hub.pre_attack_asr", "lower", 100.0, 1),
    Column("attack_asr_pct", "Attack ASR (%)", "hub.attack_asr", "lower", 100.0, 1),
)

GAN_COLUMNS: tuple[Column, ...] = (
    # The ``gan`` suite (evaluate/suites/gan.py); shown only when some run has gan metrics.
    Column("gan_target_before_pct", "GAN target before (%)", "gan.target_frac_before", None, 100.0, 1),
    Column("gan_target_after_pct", "GAN target after (%)", "gan.target_frac_after", "lower", 100.0, 1),
    Column("gan_fid", "GAN FID", "gan.fid", "lower", decimals=2),
    Column("gan_fid_ratio", "GAN FID ratio", "gan.fid_ratio", "lower", decimals=3),
    Column("gan_kept_share", "GAN kept share", "gan.kept_share", "higher", decimals=3),
    Column("gan_clip_unlearning", "GAN CLIP W1", "gan.clip_unlearning", "higher", decimals=2),
)

KNOWN_KEYS = frozenset(c.key for c in (*UNLEARNCANVAS_COLUMNS, *HUB_COLUMNS, *ATTACK_COLUMNS, *GAN_COLUMNS))


def is_asr_key(key: str) -> bool:
    """Attack success rates: any metric whose last name part mentions ``asr`` (``asr``, ``pre_attack_asr``...)."""
    return "asr" in key.rsplit(".", 1)[-1].split("_")


def extra_columns(runs: list[RunRecord]) -> list[Column]:
    """Columns for metrics no fixed column knows: other ``hub.*`` aspects, ASRs of any suite, other ``gan.*``."""
    keys = sorted({key for run in runs for key in run.metrics if key not in KNOWN_KEYS})
    hub = [key for key in keys if key.startswith("hub.") and not is_asr_key(key)]
    asr = [key for key in keys if is_asr_key(key) and not key.startswith("method.")]
    gan = [key for key in keys if key.startswith("gan.") and not is_asr_key(key)]
    columns = [Column(_column_id(key), f"HUB {key.removeprefix('hub.')}", key) for key in hub]
    columns += [Column(_column_id(key), f"ASR {key}", key, better="lower") for key in asr]
    columns += [Column(_column_id(key), f"GAN {key.removeprefix('gan.')}", key) for key in gan]
    return columns


def leaderboard_columns(runs: list[RunRecord]) -> list[Column]:
    """UnlearnCanvas' columns, HUB aspects, attack ASRs (always), GAN columns (if any run has them), extras."""
    has_gan = any(key.startswith("gan.") for run in runs for key in run.metrics)
    extras = extra_columns(runs)
    hub_extras = [c for c in extras if c.key.startswith("hub.") and not is_asr_key(c.key)]
    asr_extras = [c for c in extras if is_asr_key(c.key)]
    gan_extras = [c for c in extras if c.key.startswith("gan.") and not is_asr_key(c.key)]
    gan = [*GAN_COLUMNS, *gan_extras] if has_gan else []
    return [*UNLEARNCANVAS_COLUMNS, *HUB_COLUMNS, *hub_extras, *ATTACK_COLUMNS, *asr_extras, *gan]


def _column_id(key: str) -> str:
    return key.replace(".", "_")
