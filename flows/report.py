"""Report flow: merge every stage's findings, judge each against its target, write
metrics/findings.json (the README's results table is generated from it) and the study report
(reports/study.html), which goes to the pipeline's MLflow run as well as to the stage's."""

from __future__ import annotations

from prefect import flow

from clipshift.config import ReportConfig
from clipshift.lineage import collect_lineage
from clipshift.stages.report import interval_text, run_report, write_study
from flows._common import report_table, tracked_stage


@flow(name="report", log_prints=True)
def report_flow(config: ReportConfig = ReportConfig()) -> dict:
    """Every finding with its 95 % interval, criterion and verdict."""
    with tracked_stage("report", config) as tracker:
        report = run_report(config)
        findings = report["findings"]
        tracker.log_metrics(
            {f"findings/{fid}/value": float(f["value"]) for fid, f in findings.items()}
            | {
                f"findings/{fid}/holds": float(f["holds"])
                for fid, f in findings.items()
                if f["holds"] is not None
            }
        )
        tracker.log_artifact(config.findings_path, "metrics")
        report_table(
            "findings",
            [
                {
                    "finding": fid,
                    "value": round(f["value"], 4),
                    "ci95": interval_text(f, digits=4),
                    "criterion": f["criterion"],
                    "holds": f["holds"],
                }
                for fid, f in sorted(findings.items())
            ],
            "The study's findings: value, class-bootstrap 95 % CI, criterion and verdict",
        )
        for fid in report["missing"]:
            print(f"finding {fid} was not computed by any stage")
        lineage = collect_lineage(tracker, "report")
        html = write_study(config, report, lineage)
        tracker.log_artifact(html, "reports")
        if lineage.parent is not None:  # where a reader of the pipeline run finds it
            tracker.client.log_artifact(lineage.parent.run_id, str(html), "reports")
            tracker.client.set_tag(
                lineage.parent.run_id, "clipshift.study_report", f"reports/{html.name}"
            )
        print(f"study report: {html}")
        return report
