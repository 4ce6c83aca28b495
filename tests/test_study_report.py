"""The study report (reports/study.html): the findings table, the embedded figures, the
lineage, escaping; the report flow logging it to the pipeline's MLflow run; and the page in a
real headless Chromium (slow)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from clipshift import lineage as lin
from clipshift import tracking
from clipshift.config import ReportConfig
from clipshift.lineage import Lineage, Output, RunRef
from clipshift.stages import report as rp
from clipshift.study_report import render, study_sections
from tests.test_config import load_error

HOSTILE = "<script>alert('x')</script> & \"quoted\""


def finding(value, ci, **extra):
    return {"statement": "s", "value": value, "ci95": ci, **extra}


FINDINGS = {
    "zeroshot_above_line": finding(0.0612, [0.0213, 0.0987]),
    "diverse_beats_narrow": finding(-0.01, [-0.03, 0.005], statement=HOSTILE),
    "scaling_power_law_diverse": {
        **finding(0.97, None, holdout_rel_error=0.01),
        "ci95_note": "no CI: 4 frontier points",
    },
}


def png(path: Path, size: tuple[int, int] = (160, 120), color=(200, 60, 30)) -> Path:
    """A small picture with a diagonal line, so a screenshot of it is not one flat colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).line([(0, 0), size], fill=color, width=6)
    image.save(path)
    return path


def study_inputs(root: Path) -> ReportConfig:
    """A findings source, figures of each kind and a contact sheet under ``root``."""
    (root / "evaluate.json").write_text(json.dumps({"findings": FINDINGS}))
    scatter, figures = root / "plots/evaluate/scatter", root / "plots/scaling/figures"
    png(scatter / "effective_robustness_group-natural.png")
    png(scatter / "effective_robustness_shift-noto.png", color=(30, 60, 200))
    png(figures / "zeroshot-diverse-vs_flops.png", color=(30, 160, 60))
    png(root / "data/fetch/card/contact_sheet.png", (240, 80), (120, 0, 160))
    return ReportConfig(
        sources=[str(root / "evaluate.json")],
        findings_path=str(root / "metrics/findings.json"),
        study_html=str(root / "reports/study.html"),
        scatter_dir=str(scatter),
        scaling_figures_dir=str(figures),
        contact_sheet=str(root / "data/fetch/card/contact_sheet.png"),
    )


def sample_lineage(**overrides) -> Lineage:
    parent = RunRef("pipeline-workspace-abc", "p" * 32, "FINISHED", "", "", None)
    runs = [
        RunRef("fetch", "f" * 32, "FINISHED", "fetch", "11111111-aaaa", "http://ml:5000/#/r/f"),
        RunRef("report", "r" * 32, "RUNNING", "report", "22222222-bbbb", "http://ml:5000/#/r/r"),
    ]
    fields = {
        "commit": "0123456789abcdef0123",
        "dirty": True,
        "changes": [" M dvc.lock", " M metrics/findings.json"],
        "outputs": {"fetch": [Output("data/fetch", "d28fc061.dir", 36)]},
        "tracking_uri": "http://ml:5000",
        "parent": parent,
        "runs": runs,
    }
    return Lineage(**{**fields, **overrides})


class Page(HTMLParser):
    """The parts of a page the tests read: table rows as cell texts, <img> sources, links."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "a":
            self.links.append(attrs.get("href", ""))
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        """The one row whose first cell starts with ``first``."""
        (found,) = [r for r in self.rows if r and r[0].startswith(first)]
        return found


@pytest.fixture
def page(tmp_path) -> tuple[str, ReportConfig]:
    cfg = study_inputs(tmp_path)
    report = rp.run_report(cfg)
    path = rp.write_study(cfg, report, sample_lineage())
    return path.read_text(encoding="utf-8"), cfg


def test_findings_table_has_value_interval_criterion_and_verdict(page):
    html, _ = page
    doc = Page(html)
    assert doc.row("finding")[:5] == ["finding", "value", "95 % CI", "criterion", "holds"]
    zs = doc.row("zeroshot_above_line")
    assert zs[1:] == ["0.061", "[0.021, 0.099]", rp.TARGETS["zeroshot_above_line"].criterion, "yes"]
    assert doc.row("diverse_beats_narrow")[1:3] == ["-0.010", "[-0.030, 0.005]"]
    assert doc.row("diverse_beats_narrow")[4] == "no"
    assert doc.row("scaling_power_law_diverse")[2] == "none: no CI: 4 frontier points"
    # a targeted finding no stage wrote is listed as such, not left out
    missing = doc.row("baselines_on_line")
    assert missing[1:3] == ["—", "—"] and missing[4] == "not computed"
    # rows follow the targets table's order
    ids = [r[0].split()[0] for r in doc.rows[1:] if r and r[0].split()[0] in rp.TARGETS]
    assert ids == [k for k in rp.TARGETS if k in ids]


def test_every_figure_is_embedded_with_a_caption(page):
    html, cfg = page
    doc = Page(html)
    sources = {
        Path(cfg.scatter_dir) / "effective_robustness_group-natural.png",
        Path(cfg.scatter_dir) / "effective_robustness_shift-noto.png",
        Path(cfg.scaling_figures_dir) / "zeroshot-diverse-vs_flops.png",
        Path(cfg.contact_sheet),
    }
    embedded = []
    for img in doc.images:
        assert img["src"].startswith("data:image/png;base64,")
        embedded.append(base64.b64decode(img["src"].split(",", 1)[1]))
        assert img["alt"]
    assert sorted(embedded) == sorted(p.read_bytes() for p in sources)
    assert "Shift group natural: mean accuracy over all natural shifts" in html
    assert "Zero-shot classification error against flops, pool diverse" in html
    # self-contained: nothing is fetched, nothing runs
    assert doc.scripts == 0 and not re.search(r"""(src|href)=["'](?!data:|#|http://ml)""", html)


def test_text_is_escaped(page):
    html, _ = page
    assert "<script>" not in html and Page(html).scripts == 0
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert HOSTILE in Page(html).row("diverse_beats_narrow")[0]


def test_lineage_section_names_commit_changes_runs_and_hashes(page):
    html, _ = page
    doc = Page(html)
    assert "0123456789abcdef0123" in html and "dirty" in html and " M dvc.lock" in html
    fetch_rows = [r for r in doc.rows if r and r[0] == "fetch"]
    assert fetch_rows == [
        ["fetch", "fetch", "FINISHED", "f" * 32, "11111111-aaaa"],  # its MLflow run
        ["fetch", "data/fetch", "d28fc061.dir", "36"],  # its output in dvc.lock
    ]
    assert doc.row("report") == ["report", "report", "RUNNING", "r" * 32, "22222222-bbbb"]
    assert {"http://ml:5000/#/r/f", "http://ml:5000/#/r/r"} <= set(doc.links)
    assert "p" * 32 in html  # the pipeline (parent) run


def test_a_local_store_gets_no_links_but_the_command_to_open_it(tmp_path):
    cfg = study_inputs(tmp_path)
    local = sample_lineage(
        tracking_uri="sqlite:///mlflow.db",
        runs=[RunRef("fetch", "f" * 32, "FINISHED", "fetch", "", None)],
        dirty=False,
        changes=[],
    )
    html = rp.write_study(cfg, rp.run_report(cfg), local).read_text()
    assert all(link.startswith("#") for link in Page(html).links)  # the contents line only
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in html
    assert "clean (the tracked sources are as committed)." in html


def test_without_a_commit_the_page_says_so_and_judges_no_tree(tmp_path):
    html = render([], study_sections(tmp_path, tmp_path, tmp_path / "x.png"),
                  sample_lineage(commit="unknown", dirty=False, changes=[]))  # fmt: skip
    assert "Commit unknown (not a git checkout, or nothing committed yet)" in html
    assert "clean" not in html


def test_absent_figures_are_reported_not_skipped(tmp_path):
    sections = study_sections(tmp_path / "none", tmp_path / "none", tmp_path / "none.png")
    html = render([], sections, sample_lineage(parent=None, runs=[], outputs={}))
    assert "<img" not in html
    assert "the evaluate stage has not run" in html and "the scaling stage has not run" in html
    assert "only the built-in world has a dataset card" in html
    assert "No MLflow pipeline run" in html and "No dvc.lock" in html


def test_scaling_figures_follow_the_task_order_with_known_captions(tmp_path):
    for name in ("pool_size", "er-vs_flops", "retrieval-pools-vs_flops", "zeroshot-narrow-vs_flops",
                 "linear_probe-diverse-vs_samples", "mystery"):  # fmt: skip
        png(tmp_path / f"{name}.png")
    (_, _, scaling, _) = study_sections(tmp_path / "x", tmp_path, tmp_path / "x.png")
    assert [f.path.stem for f in scaling.figures] == [
        "zeroshot-narrow-vs_flops", "retrieval-pools-vs_flops", "linear_probe-diverse-vs_samples",
        "er-vs_flops", "pool_size", "mystery",
    ]  # fmt: skip
    assert scaling.figures[1].caption.startswith("Retrieval error (1 − recall@5) against flops")
    assert scaling.figures[-1].caption == "mystery"


# --------------------------------------------------------------------------------------------
# lineage from the files and the MLflow store


def test_dvc_outputs_keep_the_defined_stages_in_pipeline_order(tmp_path):
    spec = {"stages": {
        "fetch": {"cmd": "a"},
        "pretrain": {"cmd": "b", "matrix": {"pool": ["a", "b"]}},
        "report": {"cmd": "c"},
    }}  # fmt: skip
    out = {"path": "x", "md5": "m", "hash": "md5"}
    lock = {"schema": "2.0", "stages": {
        "report": {"outs": [{**out, "path": "reports/study.html"}]},
        "pretrain@b": {"outs": [{**out, "path": "models/b", "md5": "b.dir", "nfiles": 3}]},
        "pretrain": {"outs": [out]},  # stale: pretrain is a matrix stage now
        "gone": {"outs": [out]},  # stale: no such stage any more
        "fetch": {"outs": [{**out, "path": "data/fetch"}]},
    }}  # fmt: skip
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    found = lin.dvc_outputs(tmp_path / "dvc.lock", tmp_path / "dvc.yaml", running="report")
    assert list(found) == ["fetch", "pretrain@b"]
    assert found["pretrain@b"] == [Output("models/b", "b.dir", 3)]
    everything = lin.dvc_outputs(tmp_path / "dvc.lock", tmp_path / "dvc.yaml")
    assert list(everything) == ["fetch", "pretrain@b", "report"]
    assert lin.dvc_outputs(tmp_path / "no.lock", tmp_path / "dvc.yaml") == {}


def test_git_state_of_the_working_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.txt").write_text("one")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m.json").write_text("{}")
    lock = {"schema": "2.0", "stages": {"s": {"cmd": "c", "outs": [{"path": "metrics"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    for cmd in (["init", "-q"], ["add", "."],
                ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c"]):  # fmt: skip
        subprocess.run(["git", *cmd], check=True, capture_output=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    clean = lin.collect_lineage()
    assert clean.commit == head.strip() and not clean.dirty and clean.changes == []
    # a run rewrites the pipeline's own outputs: still clean, and the page says they changed
    (tmp_path / "metrics" / "m.json").write_text('{"a": 1}')
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock) + "# rewritten\n")
    rerun = lin.collect_lineage()
    assert not rerun.dirty and rerun.changes == [] and rerun.rewritten == 2
    assert tracking.git_state()["git.dirty"] == "false"
    (tmp_path / "f.txt").write_text("two")
    (tmp_path / "untracked.txt").write_text("not part of the commit's tree")
    dirty = lin.collect_lineage()
    assert dirty.dirty and dirty.changes == [" M f.txt"] and dirty.rewritten == 2
    assert tracking.git_changes(outputs=True) == [" M dvc.lock", " M f.txt", " M metrics/m.json"]


def test_public_uri_drops_credentials():
    assert lin.public_uri("https://u:secret@ml.example:5000/x") == "https://ml.example:5000/x"
    assert lin.public_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_pipeline_runs_lists_each_stage_once_oldest_first(mlflow_store):
    from clipshift import tracking

    client = tracking.mlflow_client()
    exp = tracking.experiment_id(client)
    parent = client.create_run(exp, run_name="pipeline-x", tags={"prefect.flow_run_id": "pf"})
    pid = parent.info.run_id

    def child(name: str, flow_run: str, start: int) -> str:
        tags = {"mlflow.parentRunId": pid, "clipshift.stage": name.split("-")[0],
                "prefect.flow_run_id": flow_run}  # fmt: skip
        return client.create_run(exp, run_name=name, start_time=start, tags=tags).info.run_id

    child("fetch", "fr-1", 1000)
    refetch = child("fetch", "fr-2", 2000)  # re-run under the same parent: the latest counts
    pretrain = child("pretrain-diverse", "fr-3", 3000)
    own = child("report", "fr-4", 4000)
    client.create_run(exp, run_name="elsewhere", tags={"mlflow.parentRunId": "other"})
    found_parent, runs = lin.pipeline_runs(client, own, "sqlite:///x.db")
    assert found_parent is not None and found_parent.run_id == pid
    assert found_parent.flow_run_id == "pf" and found_parent.url is None
    assert [(r.name, r.run_id, r.flow_run_id) for r in runs] == [
        ("fetch", refetch, "fr-2"), ("pretrain-diverse", pretrain, "fr-3"), ("report", own, "fr-4")
    ]  # fmt: skip
    _, on_server = lin.pipeline_runs(client, own, "https://ml.example")
    assert on_server[-1].url == f"https://ml.example/#/experiments/{exp}/runs/{own}"


def test_report_flow_logs_the_page_to_the_pipeline_run(mlflow_store, prefect_harness, tmp_path):
    from clipshift import tracking
    from flows.report import report_flow

    cfg = study_inputs(tmp_path)
    report_flow(config=cfg)
    html = Path(cfg.study_html).read_text()
    client = tracking.mlflow_client()
    exp = tracking.experiment_id(client)
    (run,) = client.search_runs([exp], "tags.`clipshift.stage` = 'report'")
    parent = run.data.tags["mlflow.parentRunId"]
    for run_id in (parent, run.info.run_id):
        assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/study.html"]
    assert client.get_run(parent).data.tags["clipshift.study_report"] == "reports/study.html"
    doc = Page(html)
    flow_run = run.data.tags["prefect.flow_run_id"]
    assert doc.row("report")[3:] == [run.info.run_id, flow_run] and flow_run
    assert parent in html


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "key, folder, expected",
    [
        ("scatter_dir", "evaluate.plots_dir = 'plots/evaluate'", "plots/evaluate/scatter"),
        ("scaling_figures_dir", "scaling.plots_dir = 'plots/scaling'", "plots/scaling/figures"),
        ("contact_sheet", "fetch.out_dir = 'data/fetch'", "data/fetch/card/contact_sheet.png"),
    ],
)
def test_report_reads_where_the_stages_draw(tmp_path, key, folder, expected):
    msg = load_error(tmp_path, {"report": {key: "elsewhere/x"}})
    assert f"report.{key} = 'elsewhere/x' but {folder} puts it at '{expected}'" in msg
    assert f"set report.{key} to '{expected}'" in msg


# --------------------------------------------------------------------------------------------
# the page in a real browser (slow: starts headless Chromium, installs it when missing)

BROKEN_IMAGES = (
    "return [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt)"
)


def page_problems(driver, url: str, shots: Path, name: str) -> dict[str, object]:
    """Load ``url`` and say what a reader would see wrong: how flat the screenshot is (grey
    level's standard deviation; a blank page is 0), the images that did not load, and the
    console's SEVERE entries."""
    from PIL import ImageStat

    from tests.browser import screenshot, wait_for

    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", 30,
             f"{name} to load")  # fmt: skip
    shot = screenshot(driver, shots, name)
    with Image.open(shot) as image:
        stddev = ImageStat.Stat(image.convert("L")).stddev[0]
    return {
        "stddev": stddev,
        "images": driver.execute_script("return document.images.length"),
        "broken": driver.execute_script(BROKEN_IMAGES),
        "severe": [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"],
    }


@pytest.mark.slow
@pytest.mark.timeout(900)  # installing chromium with apt-get, when missing, takes minutes
def test_the_page_renders_in_headless_chromium(tmp_path):
    """Not blank, every image loaded, no console error; and the same checks catch a blank
    page, a broken image and a console error on control pages."""
    from tests.browser import start_chromium

    cfg = study_inputs(tmp_path)
    page = rp.write_study(cfg, rp.run_report(cfg), sample_lineage())
    html = page.read_text()
    first_image = re.search(r'src="(data:image/png;base64,[^"]+)"', html)[1]
    broken = tmp_path / "broken.html"
    broken.write_text(
        html.replace(first_image, "data:image/png;base64,iVBORw0KGgoAAAAN", 1).replace(
            "</body>", "<script>console.error('control error')</script></body>"
        )
    )
    blank = tmp_path / "blank.html"
    blank.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head></html>')
    shots = tmp_path / "shots"
    driver = start_chromium()
    try:
        seen = page_problems(driver, page.as_uri(), shots, "study")
        controls = {
            "broken": page_problems(driver, broken.as_uri(), shots, "broken"),
            "blank": page_problems(driver, blank.as_uri(), shots, "blank"),
        }
    finally:
        driver.quit()
    assert seen["stddev"] > 10, f"the page looks blank: {seen} ({shots / 'study.png'})"
    assert seen["images"] == 4 and seen["broken"] == [] and seen["severe"] == [], seen
    assert controls["blank"]["stddev"] < 1
    assert len(controls["broken"]["broken"]) == 1, controls["broken"]
    assert any("control error" in m for m in controls["broken"]["severe"]), controls
