"""Browser tests against a real api-server (tests/airflow_stack.py): headless Debian Chromium
driven by Selenium through Debian's chromedriver (both installed by ``make setup``).

    with airflow_stack(tmp_path, lab.env) as stack, browser(tmp_path) as driver:
        login(driver, stack)                      # the real SimpleAuthManager login form
        driver.get(stack.base_url + "/dags")
        wait_testid(driver, "dag-id")
        screenshot(driver, tmp_path / "dags.png")
        assert page_errors(driver) == []

The Airflow 3.3 login page (``/auth/login?next=...``, SimpleAuthManager's own React app) is a
form with ``input[name=username]``, ``input[name=password]`` and ``button[type=submit]``
("Sign in", disabled until both are filled). It POSTs ``/auth/token`` and its script stores the
JWT in the ``_token`` cookie (path ``/``, not httpOnly), then replaces the location with
``next``; a refusal shows an error alert above the form ("401 Unauthorized" and "Invalid
credentials") and stays there.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1400, 1000)
TOKEN_COOKIE = "_token"
USERNAME_FIELD = (By.CSS_SELECTOR, "form input[name='username']")
PASSWORD_FIELD = (By.CSS_SELECTOR, "form input[name='password']")
SUBMIT = (By.CSS_SELECTOR, "form button[type='submit']")
# A refusal shows a Chakra alert above the form ("401 Unauthorized / Invalid credentials"); the
# "Simple auth manager enabled" notice is an alert below it.
LOGIN_ERROR = (By.XPATH, "//div[contains(concat(' ', @class, ' '), ' chakra-alert__root ')][following::form]")
UI_LOADED = "nav-sidebar"  # the Airflow UI's left navigation, there on every page once logged in
# Chromium may reach nothing but this machine (the proxy settings cover what the flags do not).
LOOPBACK_ONLY = ["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost;[::1]",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"]
QUIET = ["--no-first-run", "--no-default-browser-check", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--metrics-recording-only", "--disable-default-apps", "--mute-audio"]


class BrowserError(AssertionError):
    """The browser could not start, or a page did not reach the expected state."""


def require_chromium() -> None:
    """Fail (never skip) with the remedy when Debian's Chromium or chromedriver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise BrowserError(f"browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} "
                           "missing): run `make setup` (or apt-get install chromium chromium-driver)")


def chrome_options(profile: Path) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                *LOOPBACK_ONLY, *QUIET]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


@contextlib.contextmanager
def browser(tmp_dir: Path) -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile under ``tmp_dir``; quit (and its profile removed)
    after the block."""
    require_chromium()
    Path(tmp_dir).mkdir(parents=True, exist_ok=True)
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_dir))
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=chrome_options(profile))
    try:
        driver.set_window_size(*WINDOW)
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver: WebDriver, timeout: float, condition: Any, what: str) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        raise BrowserError(f"timed out after {timeout:.0f}s waiting for {what} at {driver.current_url}; "
                           f"page errors: {page_errors(driver)}") from None


def wait_testid(driver: WebDriver, testid: str, timeout: float = 30) -> WebElement:
    """The first visible ``[data-testid="<testid>"]``, waited for up to ``timeout`` seconds."""
    locator = (By.CSS_SELECTOR, f'[data-testid="{testid}"]')
    return _wait(driver, timeout, ec.visibility_of_element_located(locator), f'[data-testid="{testid}"]')


def submit_login(driver: WebDriver, base_url: str, user: str, password: str, timeout: float = 30) -> None:
    """Open the login page and submit the form, as a person would (returns once submitted)."""
    driver.delete_all_cookies()
    driver.get(f"{base_url}/auth/login?next=/")
    _wait(driver, timeout, ec.visibility_of_element_located(USERNAME_FIELD), "the login form")
    driver.find_element(*USERNAME_FIELD).send_keys(user)
    driver.find_element(*PASSWORD_FIELD).send_keys(password)
    _wait(driver, timeout, ec.element_to_be_clickable(SUBMIT), "the enabled Sign in button").click()


def token_cookie(driver: WebDriver) -> str | None:
    cookie = driver.get_cookie(TOKEN_COOKIE)
    return cookie["value"] if cookie else None


def login_error(driver: WebDriver, timeout: float = 30) -> str:
    """The error the login form shows after a refused submit (waited for)."""
    return _wait(driver, timeout, ec.visibility_of_element_located(LOGIN_ERROR), "the login error").text


def login(driver: WebDriver, stack: Any, timeout: float = 60) -> None:
    """Log into the Airflow UI of ``stack`` (``base_url``, ``user``, ``password``) through the
    real login form and wait until the UI is loaded (token cookie set, navigation shown)."""
    submit_login(driver, stack.base_url, stack.user, stack.password, timeout)
    outcome = _wait(driver, timeout, _login_outcome,
                    f"the {TOKEN_COOKIE} cookie and the redirect away from the login page")
    if outcome != "in":
        raise BrowserError(f"the login form refused user {stack.user!r}: {outcome}")
    wait_testid(driver, UI_LOADED, timeout)


def _login_outcome(driver: WebDriver) -> str | None:
    """``in`` once the token cookie is set and the page left the form; the error's text when the
    form shows one; None while neither."""
    if token_cookie(driver) and "/auth/login" not in driver.current_url:
        return "in"
    errors = [el.text for el in driver.find_elements(*LOGIN_ERROR) if el.is_displayed()]
    return " ".join(errors) or None


def screenshot(driver: WebDriver, path: Path) -> Path:
    """Save a PNG of the window at ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise BrowserError(f"Chromium could not write a screenshot to {path}")
    return path


def page_errors(driver: WebDriver) -> list[str]:
    """JavaScript console errors (level SEVERE) logged since the last call (reading clears them)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
