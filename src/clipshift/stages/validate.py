"""The validate stage: data-quality suites over fetch's output, leakage control, Data Docs.

``run_validate`` reads every dataset listed in ``manifest.json`` into a per-sample table
(corrupt samples included), finds evaluation samples whose image also appears in training data
(identical bytes, or a near-identical perceptual hash), runs the Great Expectations suites,
and writes into ``out_dir`` (never into fetch's folder):

- ``report.json``   the :class:`ValidationReport` (suites, failures, counts, leaks; not its
                    ``seconds``: the folder is a DVC output, so nothing in it is a timing)
- ``exclude.json``  ``{dataset: [keys]}`` of leaked evaluation samples that loaders skip
                    (filled only with ``leakage: drop``; ``{}`` otherwise)
- ``leaks.csv``     every leaked (evaluation sample, training sample) pair
- ``metrics.json``  flat numbers for ``dvc metrics``
- ``data_docs/index.html``  the Data Docs site

When a rule fails, all of these are written first, then :class:`ValidationFailed` is raised
with one line per broken rule: which dataset, which rule, how many rows, and the report path.
Pure library: no Prefect or MLflow here; the flow logs the outputs.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from clipshift.config import ValidateConfig
from clipshift.data import tables as tb
from clipshift.data.manifest import manifest_datasets
from clipshift.errors import ConfigError, ValidationFailed

REPORT_FILE = "report.json"
EXCLUDE_FILE = "exclude.json"
METRICS_FILE = "metrics.json"
LEAKS_FILE = "leaks.csv"
DOCS_DIR = "data_docs"
PARALLEL_MIN_SAMPLES = 4000


# --------------------------------------------------------------------------------------------
# the report


class CheckResult(BaseModel):
    rule: str
    check: str = Field(description="GX expectation type and column")
    success: bool
    unexpected: int = Field(description="Rows that broke the rule")
    total: int = Field(description="Rows checked")


class SuiteResult(BaseModel):
    name: str
    dataset: str | None = Field(None, description="Dataset checked; None for cross-dataset suites")
    success: bool
    checks: list[CheckResult]


class RuleFailure(BaseModel):
    dataset: str
    suite: str
    rule: str
    check: str
    rows: int = Field(description="Rows of this dataset that broke the rule")
    total: int = Field(description="Rows checked (0 when unknown)")
    examples: list[str] = Field(default_factory=list)
    detail: str = ""
    fix: str = ""

    def line(self) -> str:
        noun = "rows" if self.rows != 1 or self.total else "row"
        of = f" of {self.total}" if self.total else ""
        eg = f" (e.g. {', '.join(self.examples[:3])})" if self.examples else ""
        detail = f"; {self.detail}" if self.detail else ""
        return (
            f"dataset '{self.dataset}': rule '{self.rule}' [{self.suite}: {self.check}] "
            f"failed on {self.rows}{of} {noun}{eg}{detail}. Fix: {self.fix}"
        )


class LeakCount(BaseModel):
    dataset: str = Field(description="Evaluation dataset")
    train_dataset: str = Field(description="Training split or pretraining pool")
    leaked: int = Field(description="Evaluation samples found in the training dataset")
    exact: int = Field(description="... with identical image bytes")
    near: int = Field(description="... with different bytes but pHash distance within the limit")


class DatasetSummary(BaseModel):
    name: str
    role: str
    samples: int
    corrupt: int
    leaked: int = 0
    excluded: int = 0


class ValidationReport(BaseModel):
    success: bool
    data_dir: str
    out_dir: str
    report_path: str
    docs_path: str
    exclude_path: str
    metrics_path: str
    leakage: str
    phash_max_distance: int
    datasets: list[DatasetSummary]
    suites: list[SuiteResult]
    failures: list[RuleFailure]
    leaks: list[LeakCount]
    excluded: dict[str, list[str]]
    seconds: float = Field(description="Wall time of the run (metrics only, not report.json)")

    def failure_message(self) -> str:
        head = f"validate failed: {len(self.failures)} rule(s) broken in '{self.data_dir}':"
        lines = [f"  - {f.line()}" for f in self.failures]
        tail = f"Report: {self.report_path}; Data Docs: {self.docs_path}"
        return "\n".join([head, *lines, tail])

    def summary_markdown(self) -> str:
        """A short human summary (Prefect artifact, MLflow text)."""
        verdict = "passed" if self.success else f"FAILED ({len(self.failures)} rule(s))"
        lines = [
            f"## Data validation {verdict}",
            "",
            f"Report `{self.report_path}`, Data Docs `{self.docs_path}`, leakage mode "
            f"`{self.leakage}`, pHash distance <= {self.phash_max_distance}.",
            "",
            "| dataset | role | samples | corrupt | leaked | excluded |",
            "|---|---|---:|---:|---:|---:|",
            *(
                f"| {d.name} | {d.role} | {d.samples} | {d.corrupt} | {d.leaked} | {d.excluded} |"
                for d in self.datasets
            ),
        ]
        leaks = [x for x in self.leaks if x.leaked]
        if leaks:
            lines += [
                "",
                "| evaluation set | training set | leaked | identical | near |",
                "|---|---|---:|---:|---:|",
            ]
            lines += [
                f"| {x.dataset} | {x.train_dataset} | {x.leaked} | {x.exact} | {x.near} |"
                for x in leaks
            ]
        if self.failures:
            lines += ["", "### Broken rules", "", *(f"- {f.line()}" for f in self.failures)]
        return "\n".join(lines) + "\n"

    def metrics(self) -> dict[str, float]:
        """Flat numbers for DVC / MLflow."""
        out: dict[str, float] = {}
        for d in self.datasets:
            out[f"samples/{d.name}"] = d.samples
            out[f"corrupt/{d.name}"] = d.corrupt
            if d.role in tb.EVAL_ROLES:
                out[f"leaked/{d.name}"] = d.leaked
                out[f"excluded/{d.name}"] = d.excluded
        out["samples_total"] = sum(d.samples for d in self.datasets)
        out["corrupt_total"] = sum(d.corrupt for d in self.datasets)
        out["leaked_total"] = sum(d.leaked for d in self.datasets)
        out["excluded_total"] = sum(d.excluded for d in self.datasets)
        out["suites_passed"] = sum(s.success for s in self.suites)
        out["suites_total"] = len(self.suites)
        out["rules_failed"] = len(self.failures)
        out["success"] = int(self.success)
        return out


# --------------------------------------------------------------------------------------------
# steps


def _check_dirs(data_dir: Path, out_dir: Path) -> None:
    data, out = data_dir.resolve(), out_dir.resolve()
    if out == data or data in out.parents:
        raise ConfigError(
            f"validate.out_dir '{out_dir}' lies inside validate.data_dir '{data_dir}'; validate "
            "never writes into fetch's output: choose another folder, e.g. data/validate"
        )


def _workers(total_samples: int) -> int:
    """Shard-reading processes: one per usable core, once there is enough data to pay for
    starting them and shipping the rows back."""
    if total_samples < PARALLEL_MIN_SAMPLES:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _read_all(data_dir: Path, infos: dict[str, Any], progress: bool) -> list[tb.DatasetRead]:
    total = sum(info.num_samples for info in infos.values())
    with tqdm(total=total, unit="sample", desc="validate: reading", disable=not progress) as bar:
        return tb.read_datasets(data_dir, infos, _workers(total), bar.update)


def _find_leaks(
    reads: list[tb.DatasetRead], max_distance: int
) -> tuple[pd.DataFrame, list[str], list[str]]:
    evals = [r for r in reads if r.info.role in tb.EVAL_ROLES]
    trains = [r for r in reads if r.info.role in tb.TRAIN_ROLES]
    empty = pd.DataFrame(columns=tb.SAMPLE_COLUMNS)
    pairs = tb.leak_pairs(
        pd.concat([r.samples for r in evals]) if evals else empty,
        pd.concat([r.samples for r in trains]) if trains else empty,
        max_distance,
    )
    return pairs, [r.name for r in evals], [r.name for r in trains]


def _leak_table(pairs: pd.DataFrame, excluded: dict[str, set[str]]) -> pd.DataFrame:
    """One row per leaked evaluation sample; ``kept``: still evaluated on (not excluded)."""
    columns = ["dataset", "key", "into", "exact", "excluded", "kept"]
    if pairs.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype=bool if c in columns[3:] else object) for c in columns}
        )
    g = pairs.groupby(["dataset", "key"], sort=True)
    table = g.agg(
        into=("train_dataset", lambda s: ",".join(sorted(set(s)))), exact=("exact", "any")
    ).reset_index()
    table["excluded"] = [
        k in excluded.get(d, set()) for d, k in zip(table["dataset"], table["key"], strict=True)
    ]
    table["kept"] = ~table["excluded"]
    return table[columns]


def _run_suites(
    cfg: ValidateConfig,
    out_dir: Path,
    reads: list[tb.DatasetRead],
    task_classes: list[str],
    coverage: pd.DataFrame,
    leak_table: pd.DataFrame,
):
    from clipshift.data import expectations as ex  # GX import costs seconds: only when running

    runner = ex.GXRunner(out_dir / DOCS_DIR)
    suites: list[tuple[str | None, ex.SuiteOutcome]] = []
    for r in reads:
        n_classes = len(tb.label_names(r.info, task_classes))
        exps = ex.sample_expectations(
            r.info,
            n_classes,
            max_corrupt_fraction=cfg.max_corrupt_fraction,
            caption_min_chars=cfg.caption_min_chars,
            caption_max_chars=cfg.caption_max_chars,
            has_labels=r.info.role in tb.LABELLED_ROLES,
            has_captions=r.info.role in tb.CAPTION_ROLES,
        )
        suites.append((r.name, runner.validate(f"{r.name}.samples", r.samples, exps, ["key"])))
    cross = [
        ("coverage", coverage, ex.coverage_expectations(cfg.min_per_class), ["dataset", "class"]),
        ("manifest", tb.manifest_table(reads), ex.manifest_expectations(), ["dataset"]),
        ("shards", tb.shard_table(reads), ex.shard_expectations(), ["dataset", "shard"]),
        (
            "leakage",
            leak_table,
            ex.leakage_expectations(cfg.phash_max_distance),
            ["dataset", "key"],
        ),
        ("drawings", tb.drawing_overlap(reads), ex.drawing_expectations(), ["dataset", "drawing"]),
    ]
    for name, table, exps, ids in cross:
        suites.append((None, runner.validate(name, table, exps, ids, complete=True)))
    return suites, runner.build_docs()


def _example(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in row.items() if k != "dataset")


def _failures(suites, leaks: pd.DataFrame) -> list[RuleFailure]:
    """One failure per (broken rule, dataset); cross-dataset suites are split by dataset."""
    out = []
    for dataset, suite in suites:
        for o in suite.outcomes:
            if o.success:
                continue
            base = dict(suite=suite.name, rule=o.rule, check=o.describe_check(), fix=o.fix)
            if o.error:
                base["detail"] = f"the check itself raised: {o.error}"
            if dataset is not None or not o.examples:
                examples = [_example(e) for e in o.examples]
                out.append(
                    RuleFailure(
                        dataset=dataset or "(all)",
                        rows=o.unexpected,
                        total=o.total,
                        examples=examples,
                        **base,
                    )
                )
                continue
            by_dataset: dict[str, list[dict]] = defaultdict(list)
            for row in o.examples:
                by_dataset[str(row.get("dataset"))].append(row)
            for name, rows in by_dataset.items():
                detail = _leak_detail(leaks, name) if suite.name == "leakage" else ""
                examples = [_example(e) for e in rows[:5]]
                out.append(
                    RuleFailure(
                        dataset=name,
                        rows=len(rows),
                        total=0,
                        detail=detail,
                        examples=examples,
                        **base,
                    )
                )
    return out


def _leak_detail(leaks: pd.DataFrame, dataset: str) -> str:
    rows = leaks[(leaks["dataset"] == dataset) & (leaks["leaked"] > 0)]
    parts = [
        f"{r.leaked} in '{r.train_dataset}' ({r.exact} identical bytes, {r.near} near)"
        for r in rows.itertuples()
    ]
    return "leaked samples: " + "; ".join(parts)


def _summaries(
    reads: list[tb.DatasetRead], pairs: pd.DataFrame, excluded: dict[str, list[str]]
) -> list[DatasetSummary]:
    leaked = pairs.groupby("dataset")["key"].nunique() if len(pairs) else pd.Series(dtype=int)
    return [
        DatasetSummary(
            name=r.name,
            role=r.info.role,
            samples=len(r.samples),
            corrupt=int((~r.samples["decodable"]).sum()),
            leaked=int(leaked.get(r.name, 0)),
            excluded=len(excluded.get(r.name, [])),
        )
        for r in reads
    ]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)  # readers (DVC, the next stage) never see half a file


# --------------------------------------------------------------------------------------------
# the stage


def run_validate(cfg: ValidateConfig, progress: bool = True) -> ValidationReport:
    """Validate fetch's output; write the report, exclusions, metrics and Data Docs.

    Raises :class:`ValidationFailed` (after writing everything) when a rule fails, and
    ``DataError`` when ``data_dir`` is not a fetch output at all.
    """
    start = time.perf_counter()
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    _check_dirs(data_dir, out_dir)
    task_classes, infos = manifest_datasets(data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    reads = _read_all(data_dir, infos, progress)
    pairs, eval_names, train_names = _find_leaks(reads, cfg.phash_max_distance)
    leak_counts = tb.leak_counts(pairs, eval_names, train_names)
    excluded: dict[str, list[str]] = {}
    if cfg.leakage == "drop":
        excluded = {d: sorted(set(g["key"])) for d, g in pairs.groupby("dataset")}
    excluded_sets = {d: set(keys) for d, keys in excluded.items()}
    coverage = tb.coverage_table(reads, task_classes, excluded_sets)
    leak_table = _leak_table(pairs, excluded_sets)

    suites, docs = _run_suites(cfg, out_dir, reads, task_classes, coverage, leak_table)
    failures = _failures(suites, leak_counts)
    report = ValidationReport(
        success=not failures,
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        report_path=str(out_dir / REPORT_FILE),
        docs_path=str(docs),
        exclude_path=str(out_dir / EXCLUDE_FILE),
        metrics_path=str(out_dir / METRICS_FILE),
        leakage=cfg.leakage,
        phash_max_distance=cfg.phash_max_distance,
        datasets=_summaries(reads, pairs, excluded),
        suites=[
            SuiteResult(
                name=s.name,
                dataset=d,
                success=s.success,
                checks=[
                    CheckResult(
                        rule=o.rule,
                        check=o.describe_check(),
                        success=o.success,
                        unexpected=o.unexpected,
                        total=o.total,
                    )
                    for o in s.outcomes
                ],
            )
            for d, s in suites
        ],
        failures=failures,
        leaks=[LeakCount(**row) for row in leak_counts.to_dict("records")],
        excluded=excluded,
        seconds=time.perf_counter() - start,
    )
    pairs.to_csv(out_dir / LEAKS_FILE, index=False)
    _write_json(out_dir / EXCLUDE_FILE, excluded)
    _write_json(out_dir / METRICS_FILE, report.metrics())
    _write_json(out_dir / REPORT_FILE, report.model_dump(mode="json", exclude={"seconds"}))
    if failures:
        raise ValidationFailed(report.failure_message())
    return report


def load_exclusions(path: str | Path) -> dict[str, set[str]]:
    """``exclude.json`` as {dataset: set of keys}; a missing file means nothing is excluded."""
    path = Path(path)
    if not path.exists():
        return {}
    return {name: set(keys) for name, keys in json.loads(path.read_text()).items()}
