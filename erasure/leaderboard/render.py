"""Writing the leaderboard as Markdown, CSV and a standalone sortable HTML page (inline CSS/JS, images inlined)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from erasure.leaderboard.table import MISSING, Leaderboard, Row, format_number, format_stat

ROW_HEADERS = ("Backbone", "Method", "Budget", "Tier", "Runs", "Targets", "Seeds")

LEGEND = (
    f"Each number is the mean ± sample standard deviation over the row's runs (targets × seeds); "
    f"(n=k) marks a number that fewer runs than the row's stand behind (style columns count style targets, "
    f"object columns object targets); {MISSING} = not measured. ↑/↓: higher/lower is better. "
    "UA/IRA/CRA as in UnlearnCanvas (Zhang et al. 2024), in %; time, memory and storage of the erasure itself."
)


def _row_facts(row: Row) -> list[str]:
    seeds = row.seeds
    return [
        row.backbone_name,
        row.method,
        row.budget,
        row.tier or MISSING,
        str(len(row.runs)),
        str(len(row.targets)),
        str(len(seeds)) if seeds else MISSING,
    ]


# ------------------------------------------------------------------------------------------------ markdown


def render_markdown(board: Leaderboard, plots: list[str]) -> str:
    headers = [*ROW_HEADERS, *(column.header() for column in board.columns)]
    lines = [
        "# Leaderboard",
        "",
        LEGEND,
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * len(ROW_HEADERS) + ["--:"] * len(board.columns)) + "|",
    ]
    for row in board.rows:
        cells = _row_facts(row) + [
            format_stat(row.stats[column.id], column, len(row.runs)) for column in board.columns
        ]
        lines.append("| " + " | ".join(_md_escape(cell) for cell in cells) + " |")
    lines += ["", "## Runs behind each row", ""]
    for row in board.rows:
        seeds = ", ".join(str(seed) for seed in row.seeds) or MISSING
        lines.append(
            f"- {row.backbone_name} · {row.label}: targets {', '.join(row.targets)}; seeds {seeds}; "
            f"{machines_note(row)}"
        )
    machines = sorted({machine for row in board.rows for machine in row.machines})
    if len(machines) > 1:
        warning = (
            f"Warning: the runs were timed on {len(machines)} different machines; time columns "
            f"compare like with like only within one machine ({'; '.join(machines)})."
        )
        lines += ["", warning]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def machines_note(row: Row) -> str:
    """Where the row's times come from: one machine, several (then its time is a mix), or unknown."""
    machines = row.machines
    unknown = sum(run.machine is None for run in row.runs)
    if not machines:
        return "machine not recorded"
    text = (
        f"timed on {machines[0]}"
        if len(machines) == 1
        else f"timed on {len(machines)} machines: " + "; ".join(machines)
    )
    if unknown:
        text += f" ({unknown} run{'s' if unknown > 1 else ''} without a recorded machine)"
    return text


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# ------------------------------------------------------------------------------------------------ csv


def render_csv(board: Leaderboard) -> str:
    """One line per row; per column ``<id>_mean/_std/_min/_max/_n`` in the shown units; empty = not measured."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["backbone", "method", "budget", "params", "tier", "runs", "targets", "seeds", "target_list",
              "seed_list", "machines"]  # fmt: skip
    for column in board.columns:
        header += [f"{column.id}_{part}" for part in ("mean", "std", "min", "max", "n")]
    writer.writerow(header)
    for row in board.rows:
        line: list[object] = [
            row.backbone,
            row.method,
            row.budget,
            json.dumps(row.params, sort_keys=True),
            row.tier or "",
            len(row.runs),
            len(row.targets),
            len(row.seeds),
            " ".join(row.targets),
            " ".join(str(seed) for seed in row.seeds),
            " | ".join(row.machines),
        ]
        for column in board.columns:
            stat = row.stats[column.id]
            if stat is None:
                line += ["", "", "", "", 0]
            else:
                std = "" if stat.std is None else repr(stat.std)
                line += [repr(stat.mean), std, repr(stat.min), repr(stat.max), stat.n]
        writer.writerow(line)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ html

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
td.missing { color: #999; text-align: center; }
p.legend { max-width: 70em; font-size: 0.9em; color: #444; }
img { max-width: 45%; margin: 1em 1em 0 0; border: 1px solid #ddd; }
"""

_JS = """
(function () {
  const table = document.getElementById("leaderboard");
  const body = table.tBodies[0];
  table.querySelectorAll("th").forEach(function (th, index) {
    th.addEventListener("click", function () { sortBy(th, index); });
  });
  function sortBy(th, index) {
    const asc = !th.classList.contains("sorted-asc");
    table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    const numeric = th.dataset.type === "number";
    const rows = Array.from(body.rows);
    rows.sort(function (a, b) {
      const x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
      const xMissing = x === undefined || x === "", yMissing = y === undefined || y === "";
      if (xMissing || yMissing) { return xMissing === yMissing ? 0 : (xMissing ? 1 : -1); }
      const order = numeric ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
      return asc ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
})();
"""


def render_html(board: Leaderboard, images: dict[str, bytes]) -> str:
    """A standalone page: no server, no external files (the PNGs are inlined as data URIs)."""
    e = html.escape
    head = [(header, "text") for header in ROW_HEADERS[:4]] + [(h, "number") for h in ROW_HEADERS[4:]]
    head += [(column.header(), "number") for column in board.columns]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Erasure Studio leaderboard</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Leaderboard</h1>",
        f'<p class="legend">{e(LEGEND)} Click a column header to sort.</p>',
        '<table id="leaderboard" class="sortable"><thead><tr>',
        "".join(f'<th data-type="{kind}">{e(label)}</th>' for label, kind in head),
        "</tr></thead><tbody>",
    ]
    for row in board.rows:
        facts = _row_facts(row)
        cells = []
        for index, fact in enumerate(facts):
            value = fact if index < 4 else (fact if fact != MISSING else "")
            title = ""
            if index == 5:
                title = f' title="{e(", ".join(row.targets))}"'
            elif index == 6:
                title = f' title="{e(", ".join(str(s) for s in row.seeds))}"'
            cells.append(f'<td data-value="{e(value)}"{title}>{e(fact)}</td>')
        for column in board.columns:
            stat = row.stats[column.id]
            text = format_stat(stat, column, len(row.runs))
            if stat is None:
                cells.append(f'<td class="missing" data-value="">{MISSING}</td>')
                continue
            spread = (
                f"min {format_number(stat.min, column)}, max {format_number(stat.max, column)}, n={stat.n}"
            )
            cells.append(f'<td class="num" data-value="{stat.mean!r}" title="{e(spread)}">{e(text)}</td>')
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    for name, data in images.items():
        encoded = base64.b64encode(data).decode("ascii")
        parts.append(f'<img alt="{e(name)}" src="data:image/png;base64,{encoded}">')
    parts += [f"<script>{_JS}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def read_images(folder: Path, names: list[str]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names}
