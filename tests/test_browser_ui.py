"""The Prefect and MLflow UIs in a real browser, as the README's "Runs from the Prefect UI"
tells a user to use them (slow: minutes).

A checkout of the repository with the tiny params, its `dvc repro` baseline committed (a copy
of the session's tiny study, conftest.tiny_study); in it,
`bash infra/local/up.sh`, `. infra/local/endpoints.env` and `clipshift deploy`. Then headless
Chromium (Debian's chromium + chromium-driver, selenium):
  1. the Prefect UI lists the project's deployments;
  2. the pipeline deployment's custom-run form shows its pydantic parameters (a nested
     section, a typed field);
  3. a negative batch size is refused by the form and starts nothing; one changed value is
     submitted, the worker completes the flow run, and `dvc exp show` lists the experiment
     with that value, only the affected stages having run;
  4. the flow run's page shows its artifacts and the link to its MLflow run; following it,
     MLflow's UI shows the run with the changed parameter, its metrics and its plots;
  5. every step saves a screenshot in the test's output folder and asserts on page content.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import page_text, screenshot, start_chromium, wait_for, wait_for_text
from tests.conftest import BIN
from tests.study import exp_show, study_checkout
from tests.test_platform import free_ports, read_env, recorded_pids, run_script

# the first step builds the tiny study and starts the platform: minutes on 2 cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

# evaluate.bootstrap_seed: a field no other section has (its label is unique on the form),
# read by evaluate only, so evaluate, scaling (which reads evaluate's metrics) and report re-run
CHANGED_LABEL = "Bootstrap Seed"
CHANGED_VALUE = 3
AFFECTED = ["evaluate", "scaling", "report"]
UNAFFECTED = {"fetch", "validate", "pretrain", "supervised@diverse", "finetune", "interpolate"}
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots in {folder}")
    return folder


@pytest.fixture(scope="module")
def lab(tiny_study, tmp_path_factory) -> Any:
    """The user's checkout (tiny params, baseline committed) with the platform up and the
    flows deployed, exactly as the README says."""
    repo, _ = study_checkout(tiny_study[0], tmp_path_factory.mktemp("checkout") / "repo")
    state = tmp_path_factory.mktemp("platform")
    s3_port, mlflow_port, prefect_port = free_ports(3)
    env = {
        **os.environ,
        # the checkout's own code, as in a checkout with its editable install
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",
        "CLIPSHIFT_VENV_BIN": str(BIN),
        "CLIPSHIFT_PLATFORM_DIR": str(state),
        "CLIPSHIFT_S3_PORT": str(s3_port),
        "CLIPSHIFT_MLFLOW_PORT": str(mlflow_port),
        "CLIPSHIFT_PREFECT_PORT": str(prefect_port),
        "CLIPSHIFT_START_TIMEOUT": "240",
        "CLIPSHIFT_STOP_TIMEOUT": "10",
        "OMP_NUM_THREADS": "1",
    }
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CLIPSHIFT_PIPELINE_RUN_ID"):
        env.pop(name, None)
    env.pop("CLIPSHIFT_WORKERS", None)  # the study's own defaults, as for a user
    up = repo / "infra" / "local" / "up.sh"
    try:
        run_script(up, env, timeout=600)
        endpoints = read_env(state / "endpoints.env")
        deployed = subprocess.run(
            ["bash", "-c", f". '{state / 'endpoints.env'}' && clipshift deploy"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield {
            "repo": repo,
            "env": {**env, **endpoints},
            "api": endpoints["PREFECT_API_URL"],
            "ui": f"http://127.0.0.1:{prefect_port}",
            "mlflow": endpoints["MLFLOW_TRACKING_URI"],
        }
    finally:
        if (state / "run").exists() and recorded_pids(state):
            subprocess.run(
                ["bash", str(repo / "infra" / "local" / "down.sh")],
                env=env,
                capture_output=True,
                timeout=180,
            )


@pytest.fixture(scope="module")
def browser() -> Any:
    driver = start_chromium()
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _deployment(api: str, flow: str) -> dict[str, Any]:
    return httpx.get(f"{api}/deployments/name/{flow}/local", timeout=10).json()


def _flow_runs(api: str, deployment_id: str) -> list[dict[str, Any]]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()


def _wait_for_run(api: str, run_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()
        done = run["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
        return run if done else None

    return wait_for(finished, RUN_TIMEOUT_S, f"flow run {run_id} to finish", every_s=2)


# --------------------------------------------------------------------------------------------
# the steps, in order (each depends on the one before)


@pytest.fixture(scope="module")
def ui_base(lab, browser) -> str:
    """Where the UI lives: the README's address redirects a new browser to the UI version
    Prefect serves by default."""
    browser.get(lab["ui"])
    wait_for(lambda: "Prefect" in browser.title or page_text(browser), 60, "the Prefect UI")
    current = browser.current_url
    return lab["ui"] + ("/v2" if "/v2" in current else "")


def test_1_ui_lists_the_deployments(lab, browser, ui_base, shots):
    browser.get(f"{ui_base}/deployments")
    names = ["pipeline", "fetch", "validate", "pretrain", "finetune", "evaluate", "report"]
    text = wait_for_text(browser, names, timeout_s=90)
    screenshot(browser, shots, "1-deployments")
    assert "Can't connect to Server API" not in text
    assert "Create a deployment to get started" not in text


def _field(browser: Any, label: str) -> Any:
    """The input a form label names (optional fields are labelled '<Title> (Optional)')."""
    from selenium.webdriver.common.by import By

    xpath = f"//label[normalize-space()='{label}' or normalize-space()='{label} (Optional)']"
    element = browser.find_element(By.XPATH, xpath)
    field = browser.find_element(By.ID, element.get_attribute("for"))
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    return field


def _type(field: Any, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    field.send_keys(Keys.CONTROL, "a")  # replace the value the way a person does
    field.send_keys(text)


def _submit(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    submit = "//button[@type='submit' and normalize-space()='Submit']"
    browser.find_element(By.XPATH, submit).click()


@pytest.fixture(scope="module")
def run_form(lab, browser, ui_base) -> dict[str, Any]:
    deployment = _deployment(lab["api"], "pipeline")
    browser.get(f"{ui_base}/deployments/deployment/{deployment['id']}/run")
    text = wait_for_text(browser, ["Parameters", "Submit", "EvaluateConfig"], timeout_s=90)
    return {"deployment": deployment, "text": text}


def test_2_custom_run_form_shows_the_pydantic_fields(run_form, browser, shots):
    from clipshift.config import EvaluateConfig, PipelineConfig

    text = run_form["text"]
    # one nested section per params.yaml section, with the pydantic descriptions
    for section in ("FetchConfig", "WorldConfig", "PretrainConfig", "ScalingConfig"):
        assert section in text
    assert EvaluateConfig.model_fields["bootstrap_seed"].description in text
    # a typed field: a number input carrying the pydantic bound, filled from params.yaml
    field = _field(browser, CHANGED_LABEL)
    assert field.get_attribute("type") == "number"
    assert field.get_attribute("min") == "0"
    deployed = run_form["deployment"]["parameters"]["params"]
    assert field.get_attribute("value") == str(deployed["evaluate"]["bootstrap_seed"])
    assert PipelineConfig.model_validate(deployed).evaluate.bootstrap == 1000
    screenshot(browser, shots, "2-custom-run-form")


def test_3_bad_value_is_refused_and_starts_nothing(run_form, browser, lab, shots):
    deployment_id = run_form["deployment"]["id"]
    field = _field(browser, CHANGED_LABEL)
    _type(field, "-1")
    _submit(browser)
    # the form's check from the pydantic bound (ge=0): the browser refuses to submit
    message = wait_for(lambda: field.get_attribute("validationMessage"), 10, "the form's refusal")
    assert "greater than or equal to 0" in message
    screenshot(browser, shots, "3a-bad-value-refused")
    time.sleep(2)
    assert "/run" in browser.current_url and _flow_runs(lab["api"], deployment_id) == []
    # the server refuses it too (a client that skips the form): the pydantic bound, by field
    params = json.loads(json.dumps(run_form["deployment"]["parameters"]))
    params["params"]["pretrain"]["batch_size"] = -8
    refused = httpx.post(
        f"{lab['api']}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": params},
        timeout=10,
    )
    assert refused.status_code == 409, refused.text
    assert "params.pretrain.batch_size" in refused.text and "minimum of 1" in refused.text
    assert _flow_runs(lab["api"], deployment_id) == []
    # settings that pass each field's bounds but disagree across sections: the flow run fails
    # at its start with the pydantic message, and no experiment starts
    params = json.loads(json.dumps(run_form["deployment"]["parameters"]))
    params["params"]["finetune"]["pool"] = "nowhere"
    created = httpx.post(
        f"{lab['api']}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": params},
        timeout=10,
    )
    created.raise_for_status()
    failed = _wait_for_run(lab["api"], created.json()["id"])
    assert failed["state"]["type"] == "FAILED", failed["state"]
    assert "finetune.pool = 'nowhere' is not in pretrain.pools" in failed["state"]["message"]
    listed = subprocess.run(
        ["git", "for-each-ref", "refs/exps/"], cwd=lab["repo"], capture_output=True, text=True
    )
    assert listed.stdout == ""


@pytest.fixture(scope="module")
def ui_run(run_form, browser, lab, shots) -> dict[str, Any]:
    """One changed value submitted from the form; the worker runs it to the end."""
    field = _field(browser, CHANGED_LABEL)
    _type(field, str(CHANGED_VALUE))
    assert field.get_attribute("value") == str(CHANGED_VALUE)
    assert field.get_attribute("validationMessage") == ""
    deployment_id = run_form["deployment"]["id"]
    before = {r["id"] for r in _flow_runs(lab["api"], deployment_id)}  # before it can start
    _submit(browser)

    def new_runs() -> list[dict[str, Any]]:
        return [r for r in _flow_runs(lab["api"], deployment_id) if r["id"] not in before]

    # the UI confirms it (a toast naming the run) and the API lists exactly one new run
    toast = wait_for_text(browser, ["scheduled to start"], timeout_s=60)
    screenshot(browser, shots, "3b-submitted")
    runs = wait_for(new_runs, 30, "the flow run the form started")
    assert len(runs) == 1
    assert f"{runs[0]['name']} scheduled to start" in toast
    t0 = time.monotonic()
    run = _wait_for_run(lab["api"], runs[0]["id"])
    print(f"\nUI-triggered pipeline run: {time.monotonic() - t0:.0f} s")
    return run


def test_3_form_run_is_a_dvc_experiment(ui_run, lab):
    assert ui_run["state"]["type"] == "COMPLETED", ui_run["state"]
    assert ui_run["parameters"]["params"]["evaluate"]["bootstrap_seed"] == CHANGED_VALUE
    name = ui_run["name"]
    listed = exp_show(lab["repo"], lab["env"])
    assert listed[name]["params"]["evaluate"]["bootstrap_seed"] == CHANGED_VALUE
    assert "metrics/evaluate.json" in listed[name]["metrics"]
    # only the affected stages re-ran: the run's table of DVC's stages says which
    rows = _artifact(lab["api"], ui_run["id"], "dvc-stages")["data"]
    ran = [r["stage"] for r in rows if r["status"] == "ran"]
    assert ran == AFFECTED
    assert UNAFFECTED <= {r["stage"] for r in rows if r["status"].startswith("skipped")}


def _artifact(api: str, flow_run_id: str, key: str) -> dict[str, Any]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}}
    found = httpx.post(f"{api}/artifacts/filter", json=body, timeout=10).json()
    assert len(found) == 1, found
    data = found[0]["data"]
    if found[0]["type"] == "table" and isinstance(data, str):
        data = json.loads(data)  # a table's rows are stored as a JSON string
    return {**found[0], "data": data}


def _click(browser: Any, xpath: str, what: str) -> None:
    from selenium.webdriver.common.by import By

    element = wait_for(lambda: browser.find_element(By.XPATH, xpath), 60, what)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def test_4_flow_run_page_links_to_mlflow(ui_run, browser, ui_base, lab, shots):
    from selenium.webdriver.common.by import By

    # the flow run's page, Artifacts tab: the summary, the stages table, the MLflow link
    browser.get(f"{ui_base}/runs/flow-run/{ui_run['id']}")
    wait_for_text(browser, [ui_run["name"], "Completed", "Artifacts"], timeout_s=60)
    _click(browser, "//*[@role='tab' and normalize-space()='Artifacts']", "the Artifacts tab")
    wait_for_text(browser, ["mlflow-pipeline", "dvc-stages", "dvc-experiment"], timeout_s=60)
    screenshot(browser, shots, "4a-flow-run-artifacts")
    # the link artifact, as a person reaches it: its card, then this run's version of it
    _click(browser, "//*[normalize-space()='mlflow-pipeline']", "the mlflow-pipeline card")
    link = _artifact(lab["api"], ui_run["id"], "mlflow-pipeline")
    _click(browser, f"//a[normalize-space()='{link['id'][:8]}']", "this run's MLflow link")
    anchor = wait_for(
        lambda: browser.find_element(By.XPATH, "//a[contains(@href, '#/experiments/')]"),
        60,
        "the MLflow link",
    )
    href = anchor.get_attribute("href")
    assert href.startswith(lab["mlflow"] + "/#/experiments/")
    screenshot(browser, shots, "4b-mlflow-link")
    anchor.click()  # a plain link: it opens in this tab
    wait_for(lambda: browser.current_url.startswith(lab["mlflow"]), 30, "MLflow's UI")

    # MLflow: the pipeline run, named after the experiment, with the changed parameter
    name = ui_run["name"]
    wanted = [f"pipeline-{name}", "Parameters (", "Metrics (", "Child runs", "dvc.stages_ran"]
    text = wait_for_text(browser, [*wanted, "evaluate.bootstrap_seed"], timeout_s=90)
    screenshot(browser, shots, "4c-mlflow-run")
    lines = text.splitlines()
    assert _cell(lines, "evaluate.bootstrap_seed") == str(CHANGED_VALUE)  # parameter table
    # its metrics: the experiment's DVC metrics, evaluate's showing the seed it ran with
    count = re.search(r"Metrics \((\d+)\)", text)
    assert count and int(count.group(1)) > 100, count
    assert _cell(lines, "evaluate/bootstrap.seed") == str(CHANGED_VALUE)
    assert any(line.startswith("findings/findings.") for line in lines)
    # its tags and child runs: the experiment's name, the stages that ran (and only those)
    assert _cell(lines, "dvc.exp_name") == f": {name}"
    assert _cell(lines, "dvc.stages_ran") == ": " + ",".join(AFFECTED)
    children = lines[lines.index("Child runs") + 1 : lines.index("Source")]
    assert sorted(c.strip(", ") for c in children) == sorted(AFFECTED)

    # its plots: a figure of each plotting stage, opened in the run's artifact tree
    from mlflow import MlflowClient

    run_id = href.rstrip("/").rsplit("/", 1)[-1]
    client = MlflowClient(tracking_uri=lab["mlflow"])
    for stage, step in (("evaluate", "4d"), ("scaling", "4e")):
        figure = _first_png(client, run_id, f"plots/{stage}")
        assert figure, f"no figure under plots/{stage} of MLflow run {run_id}"
        size = _png_size(Path(client.download_artifacts(run_id, figure, str(shots))))
        browser.get("about:blank")  # a fresh load: a change of the hash alone keeps the tree
        browser.get(f"{href.rstrip('/')}/artifacts/{figure}")
        # the tree open down to the figure, its path as the preview's title, and the image
        wait_for_text(browser, ["plots", "evaluate", "scaling", figure], timeout_s=60)

        def previewed(size: tuple[int, int] = size) -> bool:
            return size in _loaded_images(browser)

        wait_for(previewed, 60, f"the preview of {figure} {size}")
        screenshot(browser, shots, f"{step}-mlflow-plot-{stage}")


def _cell(lines: list[str], key: str) -> str:
    """The value MLflow's run page shows next to ``key`` (a table row is key, then value)."""
    return lines[lines.index(key) + 1]


def _first_png(client: Any, run_id: str, folder: str) -> str:
    """The first figure under ``folder`` of the run's artifacts (depth-first)."""
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            if found := _first_png(client, run_id, item.path):
                return found
        elif item.path.endswith(".png"):
            return str(item.path)
    return ""


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _loaded_images(browser: Any) -> set[tuple[int, int]]:
    """Pixel sizes of the images the page has finished loading."""
    sizes = browser.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => [i.naturalWidth, i.naturalHeight]);"
    )
    return {(int(w), int(h)) for w, h in sizes}
