"""The study report: one self-contained HTML page with the findings, the figures and the lineage.

The page is for reading, not for clicking: a findings table (value, 95 % interval, criterion,
verdict), the figures the stages drew (embedded as data URIs, so the file can be mailed,
attached to an MLflow run or opened offline), and where every number came from (git, DVC,
MLflow, Prefect). No script and no external resource; every text is HTML-escaped.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from clipshift.lineage import Lineage, RunRef

TITLE = "clipshift study report"
MAX_CHANGES = 25  # changed-file lines shown under a dirty working tree; the rest are counted


@dataclass(frozen=True)
class FindingRow:
    fid: str
    statement: str
    criterion: str
    value: float | None  # None: no stage computed the finding
    ci95: tuple[float, float] | None
    interval: str  # the CI as the README writes it: [lo, hi], or why there is none
    holds: bool | None  # None: reported without a target, or not computed


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    intro: str
    figures: list[Figure]
    absent: str  # shown instead of the figures when there are none


# --------------------------------------------------------------------------------------------
# the figures on disk, with captions

SCATTER_AXES = (
    "x: accuracy on the reference test set; y: accuracy under the shift; both logit-scaled. "
    "The black line is the fit through the reference-only baselines; a model's effective "
    "robustness is its height above it."
)
GROUPS = {
    "natural": "all natural shifts (other artists' drawings)",
    "natural-covered": "natural shifts in a style some pretraining pool covers",
    "natural-unseen": "natural shifts in a style no pretraining pool covers",
    "synthetic": "synthetic shifts (grayscale, corruptions)",
}
TASKS = {  # the scaling stage's tasks, in its order, and what each figure's y axis is
    "zeroshot": "zero-shot classification error",
    "retrieval": "retrieval error (1 − recall@5)",
    "linear_probe": "linear-probe error",
}
SCALING_NAME = re.compile(r"(?P<task>[a-z_]+)-(?P<pool>[\w.-]+)-vs_(?P<x>[a-z_]+)")


def _pngs(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def group_figures(scatter_dir: Path) -> list[Figure]:
    """The effective-robustness scatter of each shift group, then of the mean over shifts."""
    figures = []
    for path in _pngs(scatter_dir, "effective_robustness_group-*.png"):
        group = path.stem.removeprefix("effective_robustness_group-")
        what = GROUPS.get(group, f"the shifts of group {group}")
        figures.append(Figure(path, f"Shift group {group}: mean accuracy over {what}."))
    for path in _pngs(scatter_dir, "effective_robustness_avg.png"):
        figures.append(Figure(path, "Mean accuracy over every shift."))
    return figures


def shift_figures(scatter_dir: Path) -> list[Figure]:
    """One scatter per shift, each with the WiSE-FT α-curves from zero-shot to fine-tuned."""
    return [
        Figure(path, f"Shift {path.stem.removeprefix('effective_robustness_shift-')}.")
        for path in _pngs(scatter_dir, "effective_robustness_shift-*.png")
    ]


def _scaling_caption(stem: str) -> tuple[int, str]:
    """(sort rank, caption) of a scaling figure named as the scaling stage names them."""
    if stem == "er-vs_flops":
        return len(TASKS), "Effective robustness (mean over shifts) against compute, per pool."
    if stem == "pool_size":
        return len(TASKS) + 1, "Pool-size ablation: zero-shot accuracy at equal compute."
    match = SCALING_NAME.fullmatch(stem)
    if match is None or match["task"] not in TASKS:
        return len(TASKS) + 2, stem
    rank, what, x = list(TASKS).index(match["task"]), TASKS[match["task"]], match["x"]
    if match["pool"] == "pools":
        return rank, f"{what.capitalize()} against {x}: every run of each pool, and the fits."
    return rank, (
        f"{what.capitalize()} against {x}, pool {match['pool']}: the power law fitted on the "
        "compute-Pareto frontier, with its 95 % bootstrap band."
    )


def scaling_figures(figures_dir: Path) -> list[Figure]:
    ranked = [(*_scaling_caption(p.stem), p) for p in _pngs(figures_dir, "*.png")]
    return [Figure(path, caption) for _, caption, path in sorted(ranked)]


def study_sections(scatter_dir: Path, scaling_dir: Path, contact_sheet: Path) -> list[Section]:
    card = (
        [
            Figure(
                contact_sheet,
                "Contact sheet of the dataset card: sample images of each "
                "dataset, at their true pixels.",
            )
        ]
        if contact_sheet.is_file()
        else []
    )
    return [
        Section(
            "robustness",
            "Effective robustness by shift group",
            SCATTER_AXES,
            group_figures(scatter_dir),
            f"No scatter plots in {scatter_dir}: the evaluate stage has not run.",
        ),
        Section(
            "wiseft",
            "WiSE-FT curves, per shift",
            "Each green curve interpolates the weights from the zero-shot model (α = 0) to the "
            "fine-tuned one (α = 1); α is chosen on held-out reference data. " + SCATTER_AXES,
            shift_figures(scatter_dir),
            f"No per-shift scatter plots in {scatter_dir}: the evaluate stage has not run.",
        ),
        Section(
            "scaling",
            "Scaling laws",
            "Error against compute, fitted as E = A·C^α on the compute-Pareto frontier; the "
            "band is the 95 % bootstrap interval of the fit.",
            scaling_figures(scaling_dir),
            f"No figures in {scaling_dir}: the scaling stage has not run.",
        ),
        Section(
            "dataset",
            "Dataset",
            "The built-in world's dataset card (fetch stage).",
            card,
            f"No contact sheet at {contact_sheet}: only the built-in world has a dataset card.",
        ),
    ]


# --------------------------------------------------------------------------------------------
# HTML

CSS = """
body { font: 16px/1.5 Georgia, "DejaVu Serif", serif; color: #222; background: #fff;
       margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; }
h1 { font-size: 1.8em; margin-bottom: 0.2em; }
h2 { font-size: 1.35em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.5em; }
.meta, figcaption, .note { color: #555; }
code, .id { font: 0.85em/1.4 "DejaVu Sans Mono", monospace; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 0.35em 0.7em; text-align: left;
         vertical-align: top; }
th { border-bottom: 2px solid #999; }
td.finding { width: 45%; }
td.note { font-size: 0.9em; color: #555; }
td.ci { white-space: nowrap; font-variant-numeric: tabular-nums; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.absent { color: #555; font-style: italic; }
.yes { color: #1a6b2a; font-weight: bold; }
.no { color: #a61b1b; font-weight: bold; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr));
           gap: 1.5em; }
.figures.one { grid-template-columns: 1fr; }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _verdict(row: FindingRow) -> str:
    if row.value is None:
        return '<span class="no">not computed</span>'
    if row.holds is None:
        return "—"
    return '<span class="yes">yes</span>' if row.holds else '<span class="no">no</span>'


def _interval(row: FindingRow) -> str:
    if row.value is None:
        return "<td>—</td>"
    return f'<td class="{"note" if row.ci95 is None else "ci"}">{_e(row.interval)}</td>'


def findings_html(rows: Sequence[FindingRow]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("finding", "value", "95 % CI", "criterion", "holds"))
    body = []
    for row in rows:
        value = "—" if row.value is None else f"{row.value:.3f}"
        body.append(
            f'<tr><td class="finding"><code>{_e(row.fid)}</code><br>{_e(row.statement)}</td>'
            f'<td class="num">{_e(value)}</td>{_interval(row)}'
            f"<td>{_e(row.criterion)}</td><td>{_verdict(row)}</td></tr>"
        )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section_html(section: Section) -> str:
    parts = [f'<h2 id="{_e(section.anchor)}">{_e(section.title)}</h2>']
    parts.append(f'<p class="note">{_e(section.intro)}</p>')
    if not section.figures:
        return "".join([*parts, f'<p class="absent">{_e(section.absent)}</p>'])
    figures = [
        f'<figure><img src="{data_uri(f.path)}" alt="{_e(f.caption)}">'
        f"<figcaption>{_e(f.caption)} <code>{_e(f.path)}</code></figcaption></figure>"
        for f in section.figures
    ]
    grid = "figures one" if len(figures) == 1 else "figures"  # a lone figure: full width
    return "".join([*parts, f'<div class="{grid}">', *figures, "</div>"])


def _run_id(run: RunRef) -> str:
    text = f'<span class="id">{_e(run.run_id)}</span>'
    return f'<a href="{_e(run.url)}">{text}</a>' if run.url else text


def _changes_html(lineage: Lineage) -> str:
    outputs = (
        f" {lineage.rewritten} committed pipeline output(s) (dvc.lock and the stages' outs) "
        "differ from the commit: this run rewrote them; commit them with the code."
        if lineage.rewritten
        else ""
    )
    if not lineage.dirty:
        return "clean (the tracked sources are as committed)." + _e(outputs)
    shown = lineage.changes[:MAX_CHANGES]
    more = len(lineage.changes) - len(shown)
    lines = [*shown, f"… and {more} more"] if more > 0 else shown
    return (
        "<strong>dirty</strong>: tracked sources differ from the commit<pre>"
        + _e("\n".join(lines))
        + "</pre>"
        + _e(outputs)
    )


def runs_html(lineage: Lineage) -> str:
    if lineage.parent is None:
        return '<p class="note">No MLflow pipeline run: the page was rendered outside a stage.</p>'
    parent = lineage.parent
    head = "".join(
        f"<th>{h}</th>" for h in ("run", "stage", "status", "MLflow run id", "Prefect flow-run id")
    )
    rows = [
        f"<tr><td>{_e(r.name)}</td><td>{_e(r.stage)}</td><td>{_e(r.status)}</td>"
        f'<td>{_run_id(r)}</td><td><span class="id">{_e(r.flow_run_id or "—")}</span></td></tr>'
        for r in lineage.runs
    ]
    local = (
        ""
        if parent.url
        else (
            f" Local store: open it with <code>mlflow ui --backend-store-uri "
            f"{_e(lineage.tracking_uri)}</code>."
        )
    )
    return (
        f"<p>Pipeline (parent) run <strong>{_e(parent.name)}</strong>: {_run_id(parent)}"
        + (
            f', Prefect flow run <span class="id">{_e(parent.flow_run_id)}</span>'
            if parent.flow_run_id
            else ""
        )
        + f". Tracking store: <code>{_e(lineage.tracking_uri)}</code>.{local}</p>"
        + '<p class="note">The stages run under this pipeline run. A stage DVC did not re-run '
        "(its inputs unchanged) is not listed: the hashes below identify its outputs, and each "
        "stage run that read them carries them as <code>dvc.dep.&lt;path&gt;</code> tags.</p>"
        + f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def outputs_html(lineage: Lineage) -> str:
    if not lineage.outputs:
        return '<p class="note">No dvc.lock: no stage has been run by DVC.</p>'
    rows = [
        f"<tr><td>{_e(stage)}</td><td><code>{_e(o.path)}</code></td>"
        f'<td><span class="id">{_e(o.md5)}</span></td>'
        f'<td class="num">{"" if o.files is None else _e(o.files)}</td></tr>'
        for stage, outs in lineage.outputs.items()
        for o in outs
    ]
    head = "<tr><th>stage</th><th>output</th><th>md5 (dvc.lock)</th><th>files</th></tr>"
    return (
        '<p class="note">As dvc.lock recorded them when this page was written; the report '
        "stage's own outputs are recorded once it has finished.</p>"
        f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def lineage_html(lineage: Lineage) -> str:
    if lineage.commit == "unknown":  # git knows no commit here: there is no tree to compare
        state = "unknown (not a git checkout, or nothing committed yet)"
    else:
        state = (
            f'<span class="id">{_e(lineage.commit)}</span>; working tree {_changes_html(lineage)}'
        )
    return (
        '<h2 id="lineage">Lineage</h2>'
        f"<p>Commit {state}</p>"
        f"<h3>MLflow and Prefect runs</h3>{runs_html(lineage)}"
        f"<h3>DVC outputs</h3>{outputs_html(lineage)}"
    )


def render(rows: Sequence[FindingRow], sections: Sequence[Section], lineage: Lineage) -> str:
    """The whole page."""
    toc = " · ".join(
        f'<a href="#{_e(a)}">{_e(t)}</a>'
        for a, t in [
            ("findings", "Findings"),
            *((s.anchor, s.title) for s in sections),
            ("lineage", "Lineage"),
        ]
    )
    commit = lineage.commit[:12] + (" (dirty)" if lineage.dirty else "")
    body = [
        f"<h1>{TITLE}</h1>",
        f'<p class="meta">Commit <span class="id">{_e(commit)}</span>. Written by the report '
        "stage from the stages' metrics, plots and dvc.lock; nothing on it is typed by hand.</p>",
        f"<p>{toc}</p>",
        '<h2 id="findings">Findings</h2>',
        '<p class="note">Each finding is a number with its class-bootstrap 95 % confidence '
        "interval, judged against the criterion the study set for it in advance.</p>",
        findings_html(rows),
        *(section_html(s) for s in sections),
        lineage_html(lineage),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # an empty icon: the browser then asks for no /favicon.ico, which would fail
        '<link rel="icon" href="data:,">'
        f"<title>{TITLE}</title><style>{CSS}</style></head>\n"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )
