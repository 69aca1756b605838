"""The browser harness (tests/browser.py) against a real api-server (tests/airflow_stack.py)
with a lab of its own (octet 61, ``LIFTOFF_BROWSER_LAB_OCTET``): log in through the real
SimpleAuthManager form, see deploy_canary in the DAG list, take a screenshot; a wrong password
does not log in. Then liftoff's fleet view (issue #12) in the same browser: the versions after a
deploy, a halted stage's drained host with its record, a lock holder, a drain record whose
``<script>`` reason is shown as text, the canary weight after a change; its routes refuse
strangers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests.airflow_stack import Stack, airflow_stack
from tests.browser import (
    TOKEN_COOKIE,
    USERNAME_FIELD,
    BrowserError,
    browser,
    login,
    login_error,
    page_errors,
    screenshot,
    submit_login,
    token_cookie,
    wait_testid,
)
from tests.labkit import Lab, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_BROWSER_LAB_OCTET", "61"))
DAG = "deploy_canary"
WRONG = "not-the-password-42"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def lab_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Stack]]:
    with running_lab(tmp_path_factory.mktemp("browser-lab"), OCTET, "--install-seconds", "0.2") as lab:
        with airflow_stack(tmp_path_factory.mktemp("browser-airflow"), lab.env) as running:
            running.wait_until_dag_parsed(DAG)
            yield lab, running
        assert running.leftovers() == [], "the airflow stack left something behind"


@pytest.fixture(scope="module")
def stack(lab_stack: tuple[Lab, Stack]) -> Stack:
    return lab_stack[1]


def dag_ids_shown(driver: WebDriver) -> list[str]:
    return [el.text for el in driver.find_elements(By.CSS_SELECTOR, '[data-testid="dag-id"]')]


def wait_until(driver: WebDriver, what: str, check, timeout: float = 30) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.2).until(check, f"timed out waiting for {what}")


def test_login_then_dag_list_and_screenshot(stack: Stack, tmp_path: Path):
    with browser(tmp_path) as driver:
        login(driver, stack)
        assert token_cookie(driver), f"no {TOKEN_COOKIE} cookie after logging in"
        page_errors(driver)  # drop what the login page logged (the UI's pre-login 401 on /ui/config)
        driver.get(f"{stack.base_url}/dags")
        wait_testid(driver, "dag-id")
        wait_until(driver, f"{DAG} in the DAG list", lambda d: DAG in dag_ids_shown(d))
        shot = screenshot(driver, tmp_path / "dags.png")
        assert page_errors(driver) == []
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{shot} is not a PNG"
    assert len(data) > 20_000, f"{shot} is only {len(data)} bytes: a blank page?"


def test_wrong_password_does_not_log_in(stack: Stack, tmp_path: Path):
    with browser(tmp_path) as driver:
        submit_login(driver, stack.base_url, stack.user, WRONG)
        error = login_error(driver)
        assert "401" in error and "Invalid credentials" in error, error
        assert "/auth/login" in driver.current_url and token_cookie(driver) is None
        driver.get(f"{stack.base_url}/dags")  # the UI sends a stranger back to the form
        wait_until(driver, "the login page", lambda d: "/auth/login" in d.current_url
                   and d.find_elements(*USERNAME_FIELD))
        assert driver.find_elements(By.CSS_SELECTOR, '[data-testid="nav-sidebar"]') == []
        assert token_cookie(driver) is None


def test_login_helper_reports_a_refusal(stack: Stack, tmp_path: Path):
    impostor = dataclasses.replace(stack, password=WRONG)
    with browser(tmp_path) as driver, pytest.raises(BrowserError, match="refused user 'admin'") as refused:
        login(driver, impostor, timeout=30)
    assert "401" in str(refused.value) and WRONG not in str(refused.value)


# -- liftoff's fleet view (issue #12) --------------------------------------------------------------

FIRST = "17.6.0+rnightly.6101.a61a61a-0"  # fast_deploy to gstg: the versions shown
HALTED = "17.6.1+rnightly.6102.b61b61b-0"  # deploy_canary: staging's fleet stage halts on FAULTY
FAULTY = "web-01-sv-gstg"
XSS = "<script>alert(1)</script>"
LIFTOFF = str(Path(sys.executable).parent / "liftoff")


def fleet_page(driver: WebDriver, stack: Stack, shot: Path) -> WebElement:
    """Open the fleet view, wait for its first load of the JSON, screenshot it; the page's own
    error element and the browser console must be empty."""
    driver.get(f"{stack.base_url}/liftoff/fleet")
    root = wait_testid(driver, "fleet-root")
    wait_until(driver, "the fleet JSON", lambda d: root.get_attribute("data-state") in ("ok", "error"), 60)
    screenshot(driver, shot)
    assert root.get_attribute("data-state") == "ok", wait_testid(driver, "fleet-error").text
    assert page_errors(driver) == []
    return root


def body_text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def text_of(driver: WebDriver, testid: str) -> str:
    return wait_testid(driver, testid).text


def run_to_end(stack: Stack, dag_id: str, conf: dict) -> str:
    run_id = stack.trigger(dag_id, conf)["dag_run_id"]
    stack.wait_run(dag_id, run_id, timeout=600)
    return run_id


def gstg_web(lab: Lab) -> list[str]:
    hosts = lab.status()["environments"]["gstg"]["hosts"]
    return sorted(h["name"] for h in hosts if h["name"].startswith("web-"))


def test_the_fleet_view_refuses_strangers(stack: Stack):
    url = f"{stack.base_url}/liftoff/api/fleet"
    assert requests.get(url, timeout=30).status_code == 401
    forged = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmVkLWJ5LW5vYm9keQ"
    assert requests.get(url, headers={"Authorization": f"Bearer {forged}"}, timeout=30).status_code == 403
    page = requests.get(f"{stack.base_url}/liftoff/fleet", timeout=30, allow_redirects=False)
    assert page.status_code in (302, 303, 307) and "/auth/login" in page.headers["location"], page.status_code
    owner = {"Authorization": f"Bearer {stack.token()}"}
    assert requests.post(url, headers=owner, timeout=30).status_code == 405


def test_the_fleet_view_shows_versions_a_halted_stage_a_lock_and_the_canary_weight(lab_stack, tmp_path: Path):
    lab, stack = lab_stack
    from liftoff.store import Store

    for dag_id in ("fast_deploy", "canary_weight"):
        stack.wait_until_dag_parsed(dag_id)
    lab.build_add(FIRST, nightly=True)
    first = run_to_end(stack, "fast_deploy",
                       {"environment": "gstg", "version": FIRST, "reason": "browser test"})
    assert stack.dag_run("fast_deploy", first)["state"] == "success", stack.task_states("fast_deploy", first)
    web = gstg_web(lab)
    with browser(tmp_path) as driver:
        login(driver, stack)
        page_errors(driver)  # what the login page logged
        fleet_page(driver, stack, tmp_path / "1-deployed.png")
        assert text_of(driver, "env-gstg-version") == FIRST
        assert f"{len(web)}x {FIRST}" in text_of(driver, "role-gstg-web")

        # a halted stage: the failed host stays drained with its record; someone locks staging
        lab.build_add(HALTED, nightly=True, install_fails_on=[FAULTY])
        halted = run_to_end(stack, DAG, {"version": HALTED, "on_failure": "halt", "quiet_period_seconds": 4})
        state = json.loads(lab.env["AIRFLOW_CONN_LIFTOFF_STATE"])["extra"]["url"]
        store = Store(state)
        store.acquire("gstg", "manual-mallory", "mallory", "locked by hand: incident 4242")
        other = next(h for h in web if h != FAULTY)  # a drain reason is free text: HTML in it
        store.record_drained("gstg", other, "manual-mallory", XSS)
        now = datetime.now(UTC)  # and freezes it: the page says so, in force, with the reason
        store.add_freeze("gstg", "mallory", "incident 4242: no changes", now, now + timedelta(hours=2))
        fleet_page(driver, stack, tmp_path / "2-halted.png")
        frozen = wait_testid(driver, "freeze-gstg")
        assert frozen.text.startswith("gstg: FROZEN until ") and "by mallory" in frozen.text, frozen.text
        assert "incident 4242: no changes" in frozen.text and frozen.get_attribute("class") == "bad"
        drained = text_of(driver, f"oos-gstg-{FAULTY}")
        assert halted in drained and "NO RECORD" not in drained, drained
        assert FAULTY in text_of(driver, f"failed-gstg-{FAULTY}")
        assert FAULTY in text_of(driver, "chef-gstg")
        lock = text_of(driver, "lock-gstg")
        assert "mallory" in lock and "incident 4242" in lock, lock
        shown = wait_testid(driver, f"oos-gstg-{other}")
        assert XSS in shown.text and "&lt;script&gt;" in shown.get_attribute("innerHTML"), shown.text
        assert driver.find_elements(By.CSS_SELECTOR, f'[data-testid="oos-gstg-{other}"] script') == []
        assert f"run-{DAG}-{halted}" in driver.page_source
        # the Airflow UI's own run page shows the run's note: why it failed, not only task names
        note = stack.dag_run(DAG, halted)["note"]
        assert note.startswith(f"{DAG} failed at stage_3_staging_fleet.deploy (first): "), note
        driver.get(f"{stack.base_url}/dags/{DAG}/runs/{quote(halted, safe='')}")
        why = "failed at stage_3_staging_fleet.deploy"
        wait_until(driver, "the run's note on its page",
                   lambda d: why in body_text(d) and FAULTY in body_text(d), 60)
        screenshot(driver, tmp_path / "2b-run-note.png")
        store.clear_drained("gstg", other)
        store.force_release("gstg", "browser-test", "done looking")
        store.lift_freezes("gstg", "browser-test", "done looking", datetime.now(UTC))

        # the canary weight after a change, on every production LB
        out = subprocess.run([LIFTOFF, "canary", "weight", "25", "--watch", "--interval", "1"],
                             env=stack.cli_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        fleet_page(driver, stack, tmp_path / "3-canary.png")
        weights = [e for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid^="canary-gprd-cny-"]')
                   if e.get_attribute("data-testid") != "canary-agree-gprd-cny"]
        assert len(weights) >= 2 and {e.text for e in weights} == {"25"}, [e.text for e in weights]
        assert text_of(driver, "canary-agree-gprd-cny") == "yes"
    for shot in ("1-deployed.png", "2-halted.png", "3-canary.png"):
        assert (tmp_path / shot).read_bytes().startswith(PNG_MAGIC)
