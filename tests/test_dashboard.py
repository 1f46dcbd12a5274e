"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): the page loads
without console errors, lists the shipped policies, a running job's curve grows while it
trains, and its cancel button cancels it. Served by a real uvicorn with the embedded worker."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.helpers import FAST, LiveServer

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODELS = Path(__file__).resolve().parent.parent / "models"
SHIPPED = sorted(p.name for p in MODELS.iterdir() if p.is_dir())
WAIT_MS = 180_000  # events, not speed: generous bounds for a loaded machine

playwright = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (make test installs it)"
)
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no chromium at {CHROMIUM}: install Debian's chromium (.ci/run does)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    shutil.copytree(MODELS, root / "models")
    server = LiveServer.serving(root / "models", root, embedded_worker="true", registry_poll_s="1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def open_page(browser, url: str):
    # Playwright's wait_for_function evaluates strings, which the page's CSP (no eval) forbids;
    # the requests the page makes are checked below instead, and the header by HTTP
    page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    return page, errors, requests


def test_the_dashboard_lists_the_shipped_policies_without_console_errors(live, browser, tmp_path):
    page, errors, requests = open_page(browser, live.url + "/")
    page.wait_for_selector("#policies tbody tr", timeout=WAIT_MS)
    names = [t.strip() for t in page.locator("#policies tbody tr td:first-child").all_inner_texts()]
    assert set(SHIPPED) <= set(names), names
    page.wait_for_function(
        "document.getElementById('sessions').textContent.includes('live')", timeout=WAIT_MS
    )
    page.wait_for_selector("#env-select option", state="attached", timeout=WAIT_MS)
    assert page.locator("#env-select option").count() >= 5
    row = page.locator("#policies tbody tr", has_text="taxi-dqn")
    assert "discrete(500)" in row.inner_text() and "v1: 7.8" in row.inner_text()
    assert errors == []
    assert all(u.startswith(live.url) or u.startswith("data:") for u in requests), (
        requests
    )  # same origin only
    shot = (
        Path(os.environ["DASHBOARD_SCREENSHOT"])
        if os.environ.get("DASHBOARD_SCREENSHOT")
        else tmp_path / "dashboard.png"
    )
    page.screenshot(path=str(shot), full_page=True)
    page.close()


def test_a_running_jobs_curve_grows_and_cancel_stops_it(live, browser):
    hp = {**FAST, "eval_every_frames": 0}
    body = {
        "algorithm": "dqn",
        "env_id": "CartPole-v1",
        "policy_name": "ui-job",
        "total_frames": 500_000,
        "seed": 0,
        "hyperparameters": hp,
    }
    job_id = httpx.post(live.url + "/v1/jobs", json=body).raise_for_status().json()["job_id"]
    page, errors, _ = open_page(browser, f"{live.url}/ui/jobs/{job_id}")
    count = "Number(document.getElementById('chart-return').dataset.points || 0)"
    page.wait_for_function(f"{count} >= 2", timeout=WAIT_MS)
    first = page.evaluate(count)
    page.wait_for_function(f"{count} > {first}", timeout=WAIT_MS)  # it grows while the job trains
    assert page.locator("#chart-return polyline").count() == 1
    assert page.inner_text("#status") == "running"
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'cancelled'", timeout=WAIT_MS)
    assert page.locator("#cancel").is_disabled()
    assert errors == []
    page.goto(live.url + "/")  # the index lists the job, with its curve
    page.wait_for_selector(f"a[href='/ui/jobs/{job_id}']", timeout=WAIT_MS)
    page.close()


def test_a_job_started_from_the_form_opens_its_page(live, browser):
    page, errors, _ = open_page(browser, live.url + "/")
    page.wait_for_selector("#env-select option", state="attached", timeout=WAIT_MS)
    page.select_option("#env-select", "CartPole-v1")
    page.fill("input[name=total_frames]", "100000")
    page.fill("input[name=policy_name]", "from-form")
    page.click("#new-job button[type=submit]")
    page.wait_for_url("**/ui/jobs/*", timeout=WAIT_MS)
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_function(
        "['queued', 'running'].includes(document.getElementById('status').textContent)", timeout=WAIT_MS
    )
    job = httpx.get(f"{live.url}/v1/jobs/{job_id}").json()
    assert job["request"]["policy_name"] == "from-form" and job["request"]["total_frames"] == 100000
    httpx.post(f"{live.url}/v1/jobs/{job_id}/cancel")
    assert errors == []
    page.close()


def test_assets_are_an_allow_list_and_pages_forbid_other_origins(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(live.url + "/ui/static/chart.js").status_code == 200
    assert httpx.get(live.url + "/ui/static/..%2F..%2Fconfig.py").status_code == 404
    assert httpx.get(live.url + "/ui/static/index.html").status_code == 404


def test_versions_that_served_clients_are_shown_side_by_side_with_their_intervals(live, browser):
    name = "cartpole-dqn"
    sid = httpx.post(f"{live.url}/v1/sessions", json={"policy": name}).json()["session_id"]
    obs = [0.01, 0.0, 0.02, 0.0]
    httpx.post(f"{live.url}/v1/sessions/{sid}/act", json={"observation": obs, "reset": True})
    for ret in (10.0, 20.0, 30.0):  # three episodes with these returns
        r = httpx.post(
            f"{live.url}/v1/sessions/{sid}/act", json={"observation": obs, "reward": ret, "terminated": True}
        )
        assert r.status_code == 200, r.text
    page, errors, _ = open_page(browser, live.url + "/")
    row = page.locator("#version-stats tbody tr", has_text=name)
    row.first.wait_for(timeout=WAIT_MS)
    text = row.first.inner_text()
    assert "v1" in text and "20.0 [" in text, text  # the mean and its interval
    assert row.first.locator("svg.interval line").count() == 1
    assert errors == []
    page.close()
