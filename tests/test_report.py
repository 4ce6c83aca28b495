"""The report stage: findings merged from the stages, judged by the targets table, and the
README's results table generated from metrics/findings.json."""

from __future__ import annotations

import json
import logging

import pytest

from clipshift.config import ReportConfig
from clipshift.errors import DataError
from clipshift.stages import report as rp
from tests.conftest import REPO


def finding(value, lo, hi, **extra):
    return {"statement": "s", "value": value, "ci95": [lo, hi], **extra}


EVALUATE = {
    "baselines_on_line": finding(0.93, 0.88, 0.96),
    "zeroshot_above_line": finding(0.06, 0.01, 0.1),
    "finetune_loses_robustness": finding(0.04, -0.01, 0.09),
    "wiseft_beats_both": finding(0.03, 0.01, 0.05, id_gain=-0.02),
    "diverse_beats_narrow": finding(0.05, 0.02, 0.08),
    "language_not_the_cause": finding(0.04, 0.03, 0.05),
    "unseen_style_robustness": finding(-0.01, -0.03, 0.01),
}
SCALING = {
    "scaling_power_law_diverse": finding(0.95, 0.9, 0.99, holdout_rel_error=0.03),
    "scaling_power_law_narrow": finding(0.97, 0.9, 0.99, holdout_rel_error=-0.08),
}


@pytest.fixture
def sources(tmp_path):
    (tmp_path / "evaluate.json").write_text(json.dumps({"models": {}, "findings": EVALUATE}))
    (tmp_path / "scaling.json").write_text(json.dumps({"fits": {}, "findings": SCALING}))
    return [str(tmp_path / "evaluate.json"), str(tmp_path / "scaling.json")]


@pytest.mark.parametrize(
    "fid, entry, holds",
    [
        ("baselines_on_line", finding(0.90, 0.8, 0.95), True),
        ("baselines_on_line", finding(0.899, 0.8, 0.95), False),
        ("zeroshot_above_line", finding(0.05, 0.001, 0.1), True),
        ("zeroshot_above_line", finding(0.2, 0.0, 0.3), False),  # CI touches 0
        ("zeroshot_above_line", finding(0.04, 0.01, 0.1), False),
        ("finetune_loses_robustness", finding(0.01, 0.001, 0.02), True),
        ("finetune_loses_robustness", finding(0.1, -0.001, 0.2), False),
        ("wiseft_beats_both", finding(0.02, 0.001, 0.04, id_gain=-0.01), True),
        ("wiseft_beats_both", finding(0.02, 0.001, 0.04, id_gain=-0.011), False),
        ("wiseft_beats_both", finding(0.019, 0.001, 0.04, id_gain=0.0), False),
        ("wiseft_beats_both", finding(0.05, -0.001, 0.1, id_gain=0.0), False),
        ("diverse_beats_narrow", finding(0.01, 0.002, 0.03), True),
        ("language_not_the_cause", finding(0.05, -0.01, 0.1), True),  # CI contains 0
        ("language_not_the_cause", finding(-0.02, -0.03, -0.01), True),  # small
        ("language_not_the_cause", finding(0.03, 0.01, 0.05), False),
        ("scaling_power_law_diverse", finding(0.9, 0.8, 1, holdout_rel_error=-0.05), True),
        ("scaling_power_law_narrow", finding(0.95, 0.9, 1, holdout_rel_error=0.051), False),
        ("scaling_power_law_any", finding(0.89, 0.8, 1, holdout_rel_error=0.0), False),
        ("unseen_style_robustness", finding(0.3, 0.2, 0.4), None),
    ],
)
def test_each_target_decides_its_finding(fid, entry, holds):
    judged = rp.judge({fid: entry})[fid]
    assert judged["holds"] is holds
    assert judged["criterion"] == rp.TARGETS[rp.target_key(fid)].criterion
    assert judged["value"] == entry["value"] and judged["ci95"] == entry["ci95"]


def test_a_criterion_reading_an_absent_key_names_it():
    with pytest.raises(DataError, match="id_gain"):
        rp.judge({"wiseft_beats_both": finding(0.1, 0.05, 0.2)})


def test_report_merges_stages_and_writes_the_findings_file(tmp_path, sources, caplog):
    cfg = ReportConfig(sources=sources, findings_path=str(tmp_path / "m" / "findings.json"))
    report = rp.run_report(cfg)
    written = json.loads((tmp_path / "m" / "findings.json").read_text())
    assert written == report and written["missing"] == []
    assert set(written["findings"]) == set(EVALUATE) | set(SCALING)
    verdicts = {fid: f["holds"] for fid, f in written["findings"].items()}
    assert verdicts == {
        "baselines_on_line": True,
        "zeroshot_above_line": True,
        "finetune_loses_robustness": False,
        "wiseft_beats_both": False,
        "diverse_beats_narrow": True,
        "language_not_the_cause": False,
        "unseen_style_robustness": None,
        "scaling_power_law_diverse": True,
        "scaling_power_law_narrow": False,
    }
    # scaling not written yet: its target is missing, and the evaluate findings stand
    cfg.sources = [sources[0], str(tmp_path / "nope.json")]
    with caplog.at_level(logging.WARNING):
        partial = rp.run_report(cfg)
    assert partial["missing"] == ["scaling_power_law_<pool>"]
    assert "nope.json does not exist" in caplog.text


def test_the_same_finding_from_two_stages_is_an_error(tmp_path, sources):
    with pytest.raises(DataError, match="'baselines_on_line' is written by two"):
        rp.collect([sources[0], sources[0]])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"findings": {"x": {"value": 1.0}}}))
    with pytest.raises(DataError, match=r"lacks \['statement', 'ci95'\]"):
        rp.collect([str(bad)])


def test_readme_table_is_generated_between_the_markers(tmp_path, sources):
    cfg = ReportConfig(sources=sources[:1], findings_path=str(tmp_path / "findings.json"))
    report = rp.run_report(cfg)
    table = rp.results_table(report, {})
    lines = table.splitlines()
    assert lines[2] == "| finding | criterion | value | 95% CI | holds |"
    assert lines[4] == "| `baselines_on_line` | value ≥ 0.90 | 0.930 | [0.880, 0.960] | yes |"
    assert (
        "| `finetune_loses_robustness` | ci95 lower bound > 0 | 0.040 | [-0.010, 0.090] | **no** |"
        in lines
    )
    assert r"| ci95 contains 0, or \|value\| ≤ 0.02 |" in table  # pipes escaped
    assert lines[-2].startswith("| `unseen_style_robustness` | reported (no target) | -0.010 |")
    assert lines[-2].endswith("| — |")
    assert lines[-1] == (
        "| `scaling_power_law_<pool>` | R² ≥ 0.90 and hold-out error ≤ 0.05 | — | — | "
        "not computed |"
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n{rp.BEGIN}\nold table\n{rp.END}\n\nafter\n")
    assert rp.update_readme(readme, cfg.findings_path, check=True) is True
    assert "old table" in readme.read_text()  # --check leaves it alone
    assert rp.update_readme(readme, cfg.findings_path) is True
    text = readme.read_text()
    assert text == f"# x\n\n## Results\n{rp.BEGIN}\n{table}\n{rp.END}\n\nafter\n"
    assert rp.update_readme(readme, cfg.findings_path) is False  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(DataError, match="findings:begin"):
        rp.update_readme(readme, cfg.findings_path)
    with pytest.raises(DataError, match="run `dvc repro report`"):
        rp.update_readme(readme, tmp_path / "absent.json")


def test_a_finding_without_interval_needs_a_reason(tmp_path):
    entry = {"statement": "s", "value": 0.97, "ci95": None, "holdout_rel_error": 0.01}
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"findings": {"scaling_power_law_x": entry}}))
    with pytest.raises(DataError, match="ci95_note"):
        rp.collect([path])
    entry["ci95_note"] = "no CI: 4 frontier points"
    path.write_text(json.dumps({"findings": {"scaling_power_law_x": entry}}))
    judged = rp.judge(rp.collect([path]))
    assert judged["scaling_power_law_x"]["holds"] is True
    table = rp.results_table({"findings": judged, "missing": []}, {})
    assert "| 0.970 | none: no CI: 4 frontier points | yes |" in table


def test_other_seeds_sit_beside_the_main_run(tmp_path, sources):
    cfg = ReportConfig(sources=sources[:1], findings_path=str(tmp_path / "findings.json"))
    report = rp.run_report(cfg)
    other = json.loads(json.dumps(report))
    other["findings"]["baselines_on_line"].update(value=0.85, ci95=[0.8, 0.9], holds=False)
    del other["findings"]["finetune_loses_robustness"]
    seed_file = tmp_path / "seeds" / "seed-1.json"
    seed_file.parent.mkdir()
    seed_file.write_text(json.dumps({**other, "seed": 1, "commit": "abc"}))
    others = rp.load_other_seeds([seed_file, tmp_path / "seeds" / "seed-2.json"])  # 2: absent
    assert list(others) == ["seed 1"]
    lines = rp.results_table(report, others).splitlines()
    assert "seed-1.json` (seed 1)" in lines[0]
    assert lines[2].endswith("| value (seed 1) | 95% CI (seed 1) | holds (seed 1) |")
    assert lines[4].endswith("| yes | 0.850 | [0.800, 0.900] | **no** |")
    row = next(x for x in lines if x.startswith("| `finetune_loses_robustness`"))
    assert row.endswith("| **no** | — | — | not computed |")


def test_readme_has_one_pair_of_markers():
    text = (REPO / "README.md").read_text()
    assert text.count(rp.BEGIN) == 1 and text.count(rp.END) == 1
    assert text.index(rp.BEGIN) < text.index(rp.END)


def test_readme_results_table_is_generated_from_the_committed_findings(monkeypatch):
    """The README shows exactly what metrics/findings.json (and the other seeds' files) say
    (fix: `python -m clipshift.stages.report readme`)."""
    findings = REPO / "metrics" / "findings.json"
    assert findings.is_file(), (
        "metrics/findings.json is missing: run `dvc repro` (the report stage writes it), "
        "then `python -m clipshift.stages.report readme`"
    )
    readme = (REPO / "README.md").read_text()
    monkeypatch.chdir(REPO)  # the paths as params.yaml gives them, as the readme command runs
    others = rp.load_other_seeds(ReportConfig().other_seeds)
    expected = rp.render_readme(readme, json.loads(findings.read_text()), others)
    assert readme == expected, (
        "README's results table differs from metrics/findings.json; run "
        "`python -m clipshift.stages.report readme`"
    )
