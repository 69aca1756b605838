"""The browser harness (tests/browser.py) against a real api-server (tests/airflow_stack.py)
with a lab of its own (octet 61, ``LIFTOFF_BROWSER_LAB_OCTET``): log in through the real
SimpleAuthManager form, see deploy_canary in the DAG list, take a screenshot; a wrong password
does not log in."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
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
from tests.labkit import running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_BROWSER_LAB_OCTET", "61"))
DAG = "deploy_canary"
WRONG = "not-the-password-42"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_lab(tmp_path_factory.mktemp("browser-lab"), OCTET, "--install-seconds", "0.2") as lab:
        with airflow_stack(tmp_path_factory.mktemp("browser-airflow"), lab.env) as running:
            running.wait_until_dag_parsed(DAG)
            yield running
        assert running.leftovers() == [], "the airflow stack left something behind"


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
