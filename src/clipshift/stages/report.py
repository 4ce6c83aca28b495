"""The report stage: every stage's findings judged against the study's targets, in one file.

Each stage writes its claims under ``"findings"`` in its own metrics file (evaluate: the
robustness claims; scaling: ``scaling_power_law_<pool>``), each entry
``{"statement", "value", "ci95": [lo, hi], ...evidence}``. This stage merges them, adds the
``criterion`` and the verdict ``holds`` from :data:`TARGETS` (the issue's targets table, the one
place they are written) and writes ``metrics/findings.json``:
``{"findings": {ID: {..., "criterion": str, "holds": bool | null}}, "missing": [ID, ...]}``
(``holds`` is null for a finding reported without a target; ``missing`` lists targeted findings
no stage wrote). The README's results table is generated from that file, never typed:
``python -m clipshift.stages.report readme`` rewrites it, ``... readme --check`` fails when it
is stale.

It also writes the study report (``report.study_html``): the findings, the figures evaluate and
scaling drew, the dataset card's contact sheet and the lineage, as one self-contained HTML page
(:mod:`clipshift.study_report`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipshift.config import ReportConfig, load_params
from clipshift.errors import DataError
from clipshift.io_utils import write_json_atomic, write_text_atomic
from clipshift.lineage import Lineage
from clipshift.study_report import FindingRow, render, study_sections

log = logging.getLogger(__name__)

POOL = "<pool>"  # a target ID ending in it matches one finding per pool
BEGIN = "<!-- findings:begin -->"
END = "<!-- findings:end -->"


@dataclass(frozen=True)
class Target:
    criterion: str
    holds: Callable[[Mapping[str, Any]], bool] | None  # None: reported, no target


def _lo(f: Mapping[str, Any]) -> float:
    return float(f["ci95"][0])


def _hi(f: Mapping[str, Any]) -> float:
    return float(f["ci95"][1])


#: The issue's "Targets" table (#9): what each finding must show to hold.
TARGETS: dict[str, Target] = {
    "baselines_on_line": Target("value ≥ 0.90", lambda f: f["value"] >= 0.90),
    "zeroshot_above_line": Target(
        "value ≥ 0.05 and ci95 lower bound > 0", lambda f: f["value"] >= 0.05 and _lo(f) > 0
    ),
    "finetune_loses_robustness": Target("ci95 lower bound > 0", lambda f: _lo(f) > 0),
    "wiseft_beats_both": Target(
        "value ≥ 0.02, ci95 lower bound > 0, and ID(α*) ≥ ID(1) − 0.01",
        lambda f: f["value"] >= 0.02 and _lo(f) > 0 and f["id_gain"] >= -0.01,
    ),
    "diverse_beats_narrow": Target("ci95 lower bound > 0", lambda f: _lo(f) > 0),
    "language_not_the_cause": Target(
        "ci95 contains 0, or |value| ≤ 0.02",
        lambda f: _lo(f) <= 0 <= _hi(f) or abs(f["value"]) <= 0.02,
    ),
    f"scaling_power_law_{POOL}": Target(
        "R² ≥ 0.90 and hold-out error ≤ 0.05",
        lambda f: f["value"] >= 0.90 and abs(f["holdout_rel_error"]) <= 0.05,
    ),
    "unseen_style_robustness": Target("reported (no target)", None),
}


def target_key(finding: str) -> str | None:
    """The :data:`TARGETS` key of a finding ID (``scaling_power_law_diverse`` →
    ``scaling_power_law_<pool>``), or None."""
    if finding in TARGETS:
        return finding
    for key in TARGETS:
        if key.endswith(POOL) and finding.startswith(key[: -len(POOL)]):
            return key
    return None


def collect(sources: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Every ``findings`` entry of the metrics files; the same ID twice is an error."""
    found: dict[str, dict[str, Any]] = {}
    for source in sources:
        path = Path(source)
        if not path.is_file():
            log.warning("report: %s does not exist; its findings are missing", path)
            continue
        entries = json.loads(path.read_text()).get("findings")
        if entries is None:
            log.warning("report: %s has no 'findings'", path)
            continue
        for fid, entry in entries.items():
            if fid in found:
                raise DataError(f"finding '{fid}' is written by two metrics files (one is {path})")
            _check_entry(fid, entry, path)
            found[fid] = dict(entry)
    return found


def _check_entry(fid: str, entry: Mapping[str, Any], path: Path) -> None:
    lacking = [k for k in ("statement", "value", "ci95") if k not in entry]
    if lacking:
        raise DataError(f"finding '{fid}' in {path} lacks {lacking}")
    if entry["ci95"] is None and entry.get("ci95_note"):
        return  # no interval, and the stage says why (e.g. too few frontier points)
    if entry["ci95"] is None or len(entry["ci95"]) != 2:
        raise DataError(
            f"finding '{fid}' in {path}: ci95 must be [lo, hi] (or null with a 'ci95_note' "
            "saying why there is none)"
        )


def judge(findings: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each finding with ``criterion`` and ``holds`` from its target."""
    out = {}
    for fid, entry in findings.items():
        key = target_key(fid)
        if key is None:
            log.warning("report: finding '%s' has no target in TARGETS", fid)
            out[fid] = {**entry, "criterion": "no target", "holds": None}
            continue
        target = TARGETS[key]
        try:
            holds = None if target.holds is None else bool(target.holds(entry))
        except KeyError as err:
            raise DataError(f"finding '{fid}' lacks {err}, which its criterion reads") from None
        out[fid] = {**entry, "criterion": target.criterion, "holds": holds}
    return out


def missing_targets(findings: Mapping[str, Any]) -> list[str]:
    """Targets no finding answers (a ``<pool>`` target needs at least one pool)."""
    answered = {target_key(fid) for fid in findings}
    return [key for key in TARGETS if key not in answered]


def run_report(cfg: ReportConfig) -> dict[str, Any]:
    findings = judge(collect(cfg.sources))
    missing = missing_targets(findings)
    for key in missing:
        log.warning("report: no stage wrote the finding '%s'", key)
    report = {"findings": findings, "missing": missing}
    write_json_atomic(cfg.findings_path, report)
    return report


# --------------------------------------------------------------------------------------------
# the README's results table


def _ordered(findings: Mapping[str, Any]) -> list[str]:
    """Findings in the targets table's order, then any others."""
    order = {key: i for i, key in enumerate(TARGETS)}
    return sorted(findings, key=lambda fid: (order.get(target_key(fid) or "", len(order)), fid))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # '|value|' would split a Markdown table cell


def _verdict(holds: bool | None) -> str:
    return "—" if holds is None else "yes" if holds else "**no**"


def interval_text(f: Mapping[str, Any], digits: int = 3) -> str:
    """``[lo, hi]``, or why the finding has no interval."""
    if f["ci95"] is None:
        return "none: " + str(f.get("ci95_note", "not computed"))
    lo, hi = f["ci95"]
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def _value_cells(f: Mapping[str, Any] | None) -> list[str]:
    if f is None:
        return ["—", "—", "not computed"]
    return [f"{f['value']:.3f}", _cell(interval_text(f)), _verdict(f["holds"])]


def results_table(report: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table of ``metrics/findings.json`` (what sits between the markers), with
    value, interval and verdict of each other seed's run beside the main one's."""
    findings = report["findings"]
    head = ["finding", "criterion", "value", "95% CI", "holds"]
    for label in others:
        head += [f"value ({label})", f"95% CI ({label})", f"holds ({label})"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fid in [*_ordered(findings), *report.get("missing", [])]:
        # a missing finding is listed by its TARGETS key
        criterion = findings[fid]["criterion"] if fid in findings else TARGETS[fid].criterion
        cells = [f"`{fid}`", _cell(criterion), *_value_cells(findings.get(fid))]
        for other in others.values():
            cells += _value_cells(other["findings"].get(fid))
        rows.append("| " + " | ".join(cells) + " |")
    note = (
        "Generated from `metrics/findings.json`"
        + "".join(f" and `{o['path']}` ({label})" for label, o in others.items())
        + " by `python -m clipshift.stages.report readme`; do not edit by hand."
    )
    return "\n".join([note, "", *rows])


def load_other_seeds(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """The other seeds' findings files that exist, labelled by their seeds."""
    out = {}
    for path in map(Path, paths):
        if path.is_file():
            other = json.loads(path.read_text())
            label = f"seed {other['seed']}" if "seed" in other else path.stem
            out[label] = {**other, "path": str(path)}
    return out


def render_readme(
    text: str, report: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by the table."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise DataError(f"the README needs one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{results_table(report, others or {})}\n{END}{tail}"


def update_readme(
    readme: str | Path,
    findings_path: str | Path,
    check: bool = False,
    other_seeds: Sequence[str | Path] = (),
) -> bool:
    """Rewrite the README's results table (``check``: only compare); True when it changed."""
    path, source = Path(readme), Path(findings_path)
    if not source.is_file():
        raise DataError(f"{source} does not exist; run `dvc repro report` first")
    text = path.read_text()
    new = render_readme(text, json.loads(source.read_text()), load_other_seeds(other_seeds))
    if new != text and not check:
        path.write_text(new)
    return new != text


# --------------------------------------------------------------------------------------------
# the study report (HTML)


def _finding_row(fid: str, f: Mapping[str, Any]) -> FindingRow:
    ci = None if f["ci95"] is None else (float(f["ci95"][0]), float(f["ci95"][1]))
    value, interval = float(f["value"]), interval_text(f)
    return FindingRow(fid, str(f["statement"]), f["criterion"], value, ci, interval, f["holds"])


def finding_rows(report: Mapping[str, Any]) -> list[FindingRow]:
    """The findings table's rows: the judged findings in the targets' order, then the missing."""
    findings = report["findings"]
    rows = [_finding_row(fid, findings[fid]) for fid in _ordered(findings)]
    rows += [
        FindingRow(key, "no stage wrote this finding", TARGETS[key].criterion, None, None, "", None)
        for key in report.get("missing", [])
    ]
    return rows


def write_study(cfg: ReportConfig, report: Mapping[str, Any], lineage: Lineage) -> Path:
    """Render the study report from the files on disk and write it to ``cfg.study_html``."""
    sections = study_sections(
        Path(cfg.scatter_dir), Path(cfg.scaling_figures_dir), Path(cfg.contact_sheet)
    )
    html = render(finding_rows(report), sections, lineage)
    return write_text_atomic(cfg.study_html, html, "the study report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipshift.stages.report")
    parser.add_argument("command", choices=["readme"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if the table is stale")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).report
    changed = update_readme(cfg.readme, cfg.findings_path, args.check, cfg.other_seeds)
    if args.check and changed:
        print(f"{cfg.readme}'s results table differs from {cfg.findings_path}", file=sys.stderr)
        return 1
    print(f"{cfg.readme}: results table {'updated' if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
