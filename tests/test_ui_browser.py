"""The Dagster and MLflow UIs as a person sees them, in headless Chromium.

The whole graph is materialized on the tiny model into a temporary Dagster instance and MLflow store; then
dagster-webserver and the MLflow UI serve them on loopback, and Debian's Chromium, driven by selenium through
Debian's chromedriver, looks at the asset graph, the adapter's metadata, the MLflow run and its loss chart.
Screenshots go to $PERSONA_SCREENSHOTS (default tests/artifacts/). Every process started here is stopped at the end.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from processes import stop
from dagster import DagsterInstance, materialize
from dagster._core.storage.defs_state.base import set_defs_state_storage

from pipeline import ASSETS, run_config

CHROMIUM = os.environ.get("PERSONA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PERSONA_CHROMEDRIVER", "/usr/bin/chromedriver")
MISSING = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
if MISSING:
    pytest.skip(f"no {' or '.join(MISSING)}: apt-get install chromium chromium-driver (.ci/run does)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHOTS = Path(os.environ.get("PERSONA_SCREENSHOTS", REPO / "tests" / "artifacts"))
STAGES = ["base_model", "curated_dataset", "lora_adapter", "evaluation_report", "champion"]
LINEAGE = list(zip(STAGES, STAGES[1:]))  # the chain a reader follows; the graph draws more edges than these
# Chromium as root on this closed network: no sandbox, no GPU, no calls home, a fresh profile each time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1100"]

# The drawn asset graph, read back: each node's name and text, and each edge as (upstream, downstream),
# matched by where the edge starts (a node's right side) and ends (a node's left side).
GRAPH_JS = """
const svg = document.querySelector('svg[class*=svgContainer]');
if (!svg) return null;
const nodes = [...svg.querySelectorAll('foreignObject')].map(f => ({
  name: (f.querySelector('[class*=assetName]') || f).textContent.trim(), text: f.textContent,
  x: +f.getAttribute('x'), y: +f.getAttribute('y'), w: +f.getAttribute('width'), h: +f.getAttribute('height')}));
const at = (px, py, side) => {
  const hits = nodes.filter(n => py >= n.y - 2 && py <= n.y + n.h + 2)
    .map(n => [Math.abs((side === 'right' ? n.x + n.w : n.x) - px), n.name]).sort((a, b) => a[0] - b[0]);
  return hits.length && hits[0][0] < 30 ? hits[0][1] : null;
};
const edges = [...svg.querySelectorAll('path')].filter(p => !p.closest('marker, foreignObject')).map(p => {
  const v = (p.getAttribute('d').match(/-?[0-9.]+/g) || []).map(Number);
  return v.length < 4 ? null : [at(v[0], v[1], 'right'), at(v[v.length - 2], v[v.length - 1], 'left')];
}).filter(e => e && e[0] && e[1]);
return {nodes: Object.fromEntries(nodes.map(n => [n.name, n.text])), edges};
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list, log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """A server in a session of its own, so that stop() reaches every process it starts (workers, code servers)."""
    with log.open("w") as out:
        return subprocess.Popen([str(a) for a in argv], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)



def wait_until_up(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: the server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer in time; its log ends with:\n{log.read_text(errors='replace')[-3000:]}")


def chromium(profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)


def until(driver, what: str, condition, timeout: float = 30):
    """Wait for `condition(driver)` to be truthy; on timeout keep a screenshot of what the page showed instead."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / f"FAILED-{what.replace(' ', '_')}.png"))
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"timed out after {timeout} s waiting for {what} at {driver.current_url}; the page says:\n"
                    f"{body[:2000]}")


def shot(driver, name: str) -> None:
    time.sleep(0.5)  # let charts and fonts settle
    driver.save_screenshot(str(SHOTS / name))


def click_if_present(driver, xpath: str) -> None:
    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            element.click()


SKIP_NEWSLETTER = "//button[normalize-space()='Skip']"


def dismiss_newsletter_dialog(driver) -> None:
    """Dagster's first-visit newsletter dialog can open a moment after the page has drawn: wait for it briefly, skip
    it, and make sure it is gone, so that it does not cover the screenshot."""
    def showing(d) -> bool:
        return any(e.is_displayed() for e in d.find_elements(By.XPATH, SKIP_NEWSLETTER))

    try:
        WebDriverWait(driver, 5, poll_frequency=0.3).until(showing)
    except TimeoutException:
        return
    click_if_present(driver, SKIP_NEWSLETTER)
    until(driver, "the newsletter dialog to close", lambda d: not showing(d))


def text(driver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def check_dagster(driver, dagster_url: str, adapter_path: str, mlflow_run_url: str) -> None:
    """The persona group's lineage graph: every stage materialized, edges along the workflow; then the adapter."""
    driver.get(f"{dagster_url}/locations/orchestration.definitions/asset-groups/persona")
    graph = until(driver, "the asset graph", lambda d: (g := d.execute_script(GRAPH_JS)) and set(STAGES) <= set(
        g["nodes"]) and all("Materialized" in g["nodes"][s] for s in STAGES) and g)
    dismiss_newsletter_dialog(driver)
    edges = {tuple(e) for e in graph["edges"]}
    assert set(LINEAGE) <= edges, f"drawn edges: {sorted(edges)}"
    shot(driver, "dagster_asset_graph.png")

    # The adapter's page: its metadata (path, MLflow link, loss curve picture and table) and its lineage.
    driver.get(f"{dagster_url}/assets/lora_adapter")
    until(driver, "the lora_adapter metadata", lambda d: "loss_curve" in text(d) and adapter_path in text(d))
    page = text(driver)
    assert "Upstream assets\nbase_model\ncurated_dataset" in page
    assert "Downstream assets\nchampion\nevaluation_report" in page
    assert driver.find_elements(By.XPATH, "//th[normalize-space()='train/loss']"), "no loss table"
    assert driver.find_elements(By.XPATH, f"//a[@href='{mlflow_run_url}']"), "no MLflow link"
    picture = driver.find_element(By.CSS_SELECTOR, "img[alt='loss curve']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});"  # and keep the key column in view
                          "for (let e = arguments[0]; e; e = e.parentElement) e.scrollLeft = 0;", picture)
    until(driver, "the loss curve picture, served by the MLflow UI",
          lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", picture))
    shot(driver, "dagster_lora_adapter_metadata.png")


def check_mlflow(driver, mlflow_url: str, experiment_id: str, run_id: str, run_name: str) -> None:
    """The training view (the toggle is remembered), the run in the experiment, its loss chart and picture."""
    driver.get(f"{mlflow_url}/")
    toggle = until(driver, "the Model training toggle", lambda d: d.find_elements(
        By.XPATH, "//*[@role='button'][normalize-space()='Model training']"))
    toggle[0].click()
    click_if_present(driver, "//button[@aria-label='Close']")  # the assistant panel opens on first visit
    driver.get(f"{mlflow_url}/#/experiments/{experiment_id}/runs")
    until(driver, "the run in the experiment's list", lambda d: run_name in text(d))
    click_if_present(driver, "//button[@aria-label='Close']")
    shot(driver, "mlflow_runs.png")

    driver.get(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics")
    search = until(driver, "the metric search box", lambda d: d.find_elements(
        By.CSS_SELECTOR, "input[placeholder='Search metric charts']"))
    search[0].send_keys("train/loss")
    until(driver, "the train/loss chart", lambda d: f"{run_name} (train/loss)" in text(d) and d.execute_script(
        "return [...document.querySelectorAll('.js-plotly-plot .scatterlayer path.js-line')]"
        ".some(p => (p.getAttribute('d') || '').length > 20)"))
    shot(driver, "mlflow_train_loss_chart.png")

    driver.get(f"{mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/plots/loss_curve.png")
    until(driver, "the loss-curve artifact", lambda d: d.execute_script(
        "return [...document.images].some(i => i.alt === 'plots/loss_curve.png' && i.complete && i.naturalWidth)"))
    shot(driver, "mlflow_loss_curve_artifact.png")


def test_dagster_and_mlflow_uis_show_the_trained_adapter(tiny_model, home, resources, tmp_path, monkeypatch):
    from orchestration.resources import MlflowTracker

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("")  # an instance of local SQLite files, as `make ui` has
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    dagster_url, mlflow_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    base = resources["mlflow_tracker"]
    tracker = MlflowTracker(tracking_uri=base.tracking_uri, artifact_root=base.artifact_root, ui_url=mlflow_url)
    experiment_id = tracker.experiment_id()  # the store exists before the MLflow UI opens it
    instance = DagsterInstance.get()  # and the Dagster instance before the webserver does

    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PERSONA_HOME": str(home), "TQDM_DISABLE": "1",
           "PERSONA_DATASET_SENSOR": "off", "PERSONA_RETRAIN_SCHEDULE": "off",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: 2 cores are shared
    logs = {"dagster": tmp_path / "dagster-webserver.log", "mlflow": tmp_path / "mlflow-ui.log"}
    servers, driver = {}, None
    try:
        servers["dagster"] = serve([BIN / "dagster-webserver", "-w", REPO / "workspace.yaml", "-h", "127.0.0.1",
                                    "-p", dagster_url.rsplit(":", 1)[1]], logs["dagster"], REPO, env)
        servers["mlflow"] = serve([BIN / "mlflow", "ui", "--backend-store-uri", tracker.tracking_uri,
                                   "--default-artifact-root", tracker.artifact_root, "-h", "127.0.0.1",
                                   "-p", mlflow_url.rsplit(":", 1)[1], "--workers", "1"], logs["mlflow"], home, env)

        # While both start: the whole graph, recorded in the instance the webserver reads.
        config = run_config(tiny_model)  # as the end-to-end test, shorter: no replay data, one epoch
        config["ops"]["curated_dataset"] = {"config": {"general_mix": "none"}}
        config["ops"]["lora_adapter"]["config"]["num_train_epochs"] = 1
        # Earlier tests' instances may linger as Dagster's current defs-state storage; use this one's.
        with set_defs_state_storage(instance.defs_state_storage):
            result = materialize(ASSETS, resources={**resources, "mlflow_tracker": tracker}, run_config=config,
                                 instance=instance)
        assert result.success
        adapter = result.output_for_node("lora_adapter")
        run = tracker.client().get_run(adapter.mlflow_run_id)

        deadline = time.time() + 90
        wait_until_up(f"{dagster_url}/server_info", servers["dagster"], logs["dagster"], deadline)
        wait_until_up(f"{mlflow_url}/health", servers["mlflow"], logs["mlflow"], deadline)
        driver = chromium(tmp_path / "chromium-profile")

        check_dagster(driver, dagster_url, adapter.path, tracker.run_url(run.info.run_id))
        check_mlflow(driver, mlflow_url, experiment_id, run.info.run_id, run.info.run_name)
    finally:
        if driver is not None:
            driver.quit()
        for proc in servers.values():
            stop(proc, grace=10)
        instance.dispose()
