"""Great Expectations suites for the validate stage, and one GX context that runs them.

GX 1.x is used through its fluent API: one in-memory (ephemeral) context per run, one pandas
datasource, one dataframe asset + whole-dataframe batch definition per table, one suite and one
validation definition per table. The context keeps nothing on disk except the Data Docs site,
which is configured to write into the stage's output folder, so a re-run never mixes results of
an older run into the docs. Progress bars and analytics are off: this runs inside pipelines.

The site is a DVC output, so it is byte-deterministic: every validation runs under one fixed
run identifier (name ``clipshift-validate``, time ``$SOURCE_DATE_EPOCH`` or the Unix epoch)
instead of "now", which GX would put into page paths, the index and the results; the other
render-time values GX writes into the pages (the batch's ``ge_load_time``, a ``?d=<now>``
on its logo URL, random uuid4 ids of collapsible HTML elements) are rewritten after the build:
times to the run time, element ids to sequential ones. GX shows run times in the machine's
local time zone, so validations and the docs build run with ``TZ=UTC``. When the validation
ran is recorded by the stage's MLflow run, not in its outputs.

Every expectation carries ``meta`` with a ``rule`` (the check in words) and a ``fix`` (what the
user can do), which the stage turns into its failure message.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)

from clipshift.data.shards import DatasetInfo

ALLOWED_MODES = ["RGB", "RGBA", "L", "LA", "P"]  # what the loaders' convert("RGB") handles well
EXAMPLES = 5  # example rows kept per failing expectation on large tables

FIX_DATA = "re-run fetch for it (`dvc repro fetch`) or repair the source"
RUN_NAME = "clipshift-validate"
# What GX writes into Data Docs pages from the clock and from uuid4 (see the module doc)
_TIMESTAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _meta(rule: str, fix: str) -> dict[str, str]:
    return {"rule": rule, "fix": fix}


# --------------------------------------------------------------------------------------------
# suites


def sample_expectations(
    info: DatasetInfo,
    n_classes: int,
    *,
    max_corrupt_fraction: float,
    caption_min_chars: int,
    caption_max_chars: int,
    has_labels: bool,
    has_captions: bool,
) -> list[gxe.Expectation]:
    """Checks on one dataset's per-sample table."""
    exps: list[gxe.Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=1, meta=_meta("dataset is not empty", FIX_DATA)
        ),
        gxe.ExpectColumnValuesToBeUnique(
            column="key", meta=_meta("sample keys are unique", FIX_DATA)
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodable",
            value_set=[True],
            mostly=round(1.0 - max_corrupt_fraction, 12),
            meta=_meta(
                f"images decode (at most {max_corrupt_fraction:.2%} corrupt)",
                f"{FIX_DATA}, or raise validate.max_corrupt_fraction to tolerate them "
                "(loaders skip undecodable samples)",
            ),
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="mode",
            value_set=ALLOWED_MODES,
            meta=_meta(f"image mode in {ALLOWED_MODES}", f"convert the images and {FIX_DATA}"),
        ),
    ]
    if info.image_size:
        for col in ("width", "height"):
            exps.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column=col,
                    min_value=info.image_size,
                    max_value=info.image_size,
                    meta=_meta(
                        f"image {col} equals the declared image_size {info.image_size}",
                        f"resize the images or fix image_size in dataset.json; {FIX_DATA}",
                    ),
                )
            )
    if has_captions:
        exps += [
            gxe.ExpectColumnValuesToNotBeNull(
                column="caption", meta=_meta("every sample has a caption (txt)", FIX_DATA)
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="caption_len",
                min_value=caption_min_chars,
                max_value=caption_max_chars,
                meta=_meta(
                    f"caption length in [{caption_min_chars}, {caption_max_chars}] chars",
                    f"{FIX_DATA}, or change validate.caption_min_chars/caption_max_chars",
                ),
            ),
        ]
    if has_labels:
        exps += [
            gxe.ExpectColumnValuesToNotBeNull(
                column="cls", meta=_meta("every sample has a class label (cls)", FIX_DATA)
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="cls",
                min_value=0,
                max_value=max(n_classes - 1, 0),
                meta=_meta(f"class label in [0, {n_classes})", FIX_DATA),
            ),
        ]
    return exps


def coverage_expectations(min_per_class: int) -> list[gxe.Expectation]:
    return [
        gxe.ExpectColumnValuesToBeBetween(
            column="count",
            min_value=min_per_class,
            meta=_meta(
                f"every task class has at least {min_per_class} usable example(s)",
                "add examples of the class, lower validate.min_per_class, or (for a shift that "
                "covers part of the task) declare extra.class_subset in its dataset.json",
            ),
        )
    ]


def manifest_expectations() -> list[gxe.Expectation]:
    fix = "the data changed after fetch: re-run it (`dvc repro fetch`)"
    return [
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="declared_samples",
            column_B="counted_samples",
            meta=_meta("sample count in manifest.json matches the shards", fix),
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="declared_samples",
            column_B="info_samples",
            meta=_meta("manifest.json and dataset.json agree on the sample count", fix),
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="declared_shards",
            column_B="info_shards",
            meta=_meta("manifest.json and dataset.json list the same shards", fix),
        ),
    ]


def shard_expectations() -> list[gxe.Expectation]:
    fix = "the shard changed or was truncated after fetch: re-run it (`dvc repro fetch`)"
    return [
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="declared_sha256",
            column_B="actual_sha256",
            meta=_meta("shard sha256 matches the manifest", fix),
        ),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="declared_samples",
            column_B="counted_samples",
            meta=_meta("shard sample count matches the manifest", fix),
        ),
    ]


def leakage_expectations(max_distance: int) -> list[gxe.Expectation]:
    return [
        gxe.ExpectColumnValuesToBeInSet(
            column="kept",
            value_set=[False],
            meta=_meta(
                "no evaluation image is in the training data (identical bytes, or pHash "
                f"distance <= {max_distance})",
                "set validate.leakage=drop to exclude these samples from evaluation "
                "(exclude.json), or remove the duplicates from the training data",
            ),
        )
    ]


def drawing_expectations() -> list[gxe.Expectation]:
    return [
        gxe.ExpectColumnValuesToBeInSet(
            column="held_out",
            value_set=[False],
            meta=_meta(
                "no pretraining pool holds a drawing (emoji x artist design) that an evaluation "
                "or fine-tuning set shows, in any rendering",
                "rebuild the pool without these drawings: the built-in world leaves them out "
                "(re-run fetch with this clipshift); for your own pools, drop the listed "
                "drawings' samples",
            ),
        )
    ]


# --------------------------------------------------------------------------------------------
# results


@dataclass
class Outcome:
    """One expectation's result, in the terms the stage reports."""

    suite: str
    rule: str
    fix: str
    expectation: str
    column: str | None
    success: bool
    unexpected: int
    total: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def describe_check(self) -> str:
        on = f" on {self.column}" if self.column else ""
        return f"{self.expectation}{on}"


@dataclass
class SuiteOutcome:
    name: str
    success: bool
    outcomes: list[Outcome]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / pandas scalars
        return value.item()
    if value is pd.NA or value is None:
        return None
    return value


def _outcome(suite: str, res: Any) -> Outcome:
    cfg = res.expectation_config
    kwargs = cfg.kwargs or {}
    meta = cfg.meta or {}
    result = res.result or {}
    exc = res.exception_info or {}
    error = exc.get("exception_message") if exc.get("raised_exception") else None
    rows = result.get("unexpected_index_list") or result.get("partial_unexpected_index_list") or []
    examples = [{k: _jsonable(v) for k, v in row.items()} for row in rows if isinstance(row, dict)]
    unexpected = result.get("unexpected_count")
    if unexpected is None and not res.success:
        unexpected = 1  # table-level expectation (e.g. row count): the table itself fails
    return Outcome(
        suite=suite,
        rule=meta.get("rule", cfg.type),
        fix=meta.get("fix", ""),
        expectation=cfg.type,
        column=kwargs.get("column") or kwargs.get("column_A"),
        success=bool(res.success),
        unexpected=int(unexpected or 0),
        total=int(result.get("element_count") or result.get("observed_value") or 0),
        examples=examples,
        error=error,
    )


# --------------------------------------------------------------------------------------------
# the context


def run_identifier() -> RunIdentifier:
    """The fixed run identifier of every validation: Data Docs hold no wall-clock time.

    Its time is ``$SOURCE_DATE_EPOCH`` (the reproducible-builds convention) when set, else the
    Unix epoch."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH") or 0)
    when = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return RunIdentifier(run_name=RUN_NAME, run_time=when)


@contextlib.contextmanager
def utc_local_time() -> Iterator[None]:
    """Make UTC the process's local time zone meanwhile (GX renders times in local time)."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


class GXRunner:
    """One ephemeral GX context per validate run; Data Docs go to ``docs_dir``."""

    def __init__(self, docs_dir: str | Path) -> None:
        self.docs_dir = Path(docs_dir).resolve()
        self.run_id = run_identifier()
        shutil.rmtree(self.docs_dir, ignore_errors=True)  # our output: no stale pages
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            analytics_enabled=False,
            data_docs_sites={
                "clipshift": {
                    "class_name": "SiteBuilder",
                    "show_how_to_buttons": False,
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(self.docs_dir),
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                }
            },
        )
        self.context = gx.get_context(project_config=config, mode="ephemeral")
        self.source = self.context.data_sources.add_pandas("clipshift")

    def validate(
        self,
        name: str,
        table: pd.DataFrame,
        expectations: list[gxe.Expectation],
        id_columns: list[str],
        complete: bool = False,
    ) -> SuiteOutcome:
        """Run one suite on one table. ``complete``: list every failing row (small tables)."""
        asset = self.source.add_dataframe_asset(name=name)
        batch = asset.add_batch_definition_whole_dataframe(name)
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        for exp in expectations:
            suite.add_expectation(exp)
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result_format = {
            "result_format": "COMPLETE" if complete else "SUMMARY",
            "unexpected_index_column_names": id_columns,
            "partial_unexpected_count": EXAMPLES,
            "include_unexpected_rows": False,
        }
        with utc_local_time():
            res = definition.run(
                batch_parameters={"dataframe": table},
                result_format=result_format,
                run_id=self.run_id,
            )
        outcomes = [_outcome(name, r) for r in res.results]
        return SuiteOutcome(name, bool(res.success), outcomes)

    def build_docs(self) -> Path:
        with utc_local_time():
            self.context.build_data_docs()
        self._pin_pages()
        return self.docs_dir / "index.html"

    def _pin_pages(self) -> None:
        """Replace the clock times and random element ids GX rendered by fixed values."""
        run_time = self.run_id.run_time.strftime("%Y%m%dT%H%M%S.%fZ")
        ids: dict[str, str] = {}  # one id per uuid across the site, numbered in page order

        def element_id(match: re.Match[str]) -> str:
            return ids.setdefault(match.group(0), f"clipshift-{len(ids):06d}")

        for page in sorted(self.docs_dir.rglob("*.html")):
            html = page.read_text(encoding="utf-8")
            pinned = _UUID4.sub(element_id, _TIMESTAMP.sub(run_time, html))
            if pinned != html:
                page.write_text(pinned, encoding="utf-8")
