"""The web console in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
selenium; nothing downloads a browser) against a real uvicorn process on the real stack: sign in,
watch a job pushed through the real worker turn succeeded without reloading, retry a failed job
with a reason after fixing its credential (by hand, and by an admin replacing it in the console),
an auditor refused by the server, an XSS payload inert, a POST without its CSRF token refused.
Screenshots of each page go to docs/console/."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from harness.stack import ROOT
from tests.e2e.conftest import E2E, HARBOR_ID, _current_password, password_of, wait_for_job
from tests.e2e.test_api import start_api
from worker.producer import enqueue_push
from worker.store.models import JobStatus
from worker.tokens import create_token

SHOTS = ROOT / "docs" / "console"
XSS = '<script>window.pwned=1</script><img src=x onerror="window.pwned=1">'
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,800",
)  # fmt: skip


@dataclass
class Console:
    url: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def console(e2e: E2E) -> Iterator[Console]:
    suffix = uuid.uuid4().hex[:6]
    tokens = {
        role: create_token(f"console-{role}-{suffix}", role, actor="operator:e2e")[0]
        for role in ("operator", "auditor", "admin")
    }
    url, process = start_api(e2e.env, e2e.workdir / f"console-api-{suffix}.log")
    try:
        yield Console(url, tokens)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _binary(*names: str) -> str:
    for name in names:
        found = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/bin") / name, Path("/usr/lib/chromium") / name)
             if p.exists()), None,
        )  # fmt: skip
        if found:
            return found
    raise AssertionError(
        f"{names[0]} is missing: scripts/bootstrap installs it as root on Debian "
        "(apt-get install chromium chromium-driver)"
    )


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    profile = tempfile.mkdtemp(prefix="pushworker-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = _binary("chromium", "chromium-browser")
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=_binary("chromedriver"))
    )
    # The page's viewport itself at 1280x800 (a window of that size has less room for it).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver: WebDriver, seconds: float) -> WebDriverWait[WebDriver]:
    """A wait that reads the page while it changes: htmx swaps the live parts every second and a
    job that ends reloads its page, so an element found a moment ago may be gone when read."""
    return WebDriverWait(
        driver, seconds,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    )  # fmt: skip


def sign_in(driver: WebDriver, console: Console, role: str) -> None:
    driver.get(f"{console.url}/console/signin")
    driver.find_element(By.ID, "token").send_keys(console.tokens[role])
    driver.find_element(By.CSS_SELECTOR, "#signin button").click()
    wait(driver, 20).until(lambda d: d.find_elements(By.ID, "who"))
    cookie = driver.get_cookie("pushworker_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert console.tokens[role] not in cookie["value"]


def shot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def post(driver: WebDriver, path: str, fields: dict[str, str]) -> int:
    """A hand-made POST from the signed-in page (the session cookie goes with it)."""
    status: int = driver.execute_async_script(
        """const [path, fields, done] = arguments;
        fetch(path, {method: "POST", credentials: "same-origin", redirect: "manual",
                     headers: {"Content-Type": "application/x-www-form-urlencoded"},
                     body: new URLSearchParams(fields).toString()})
          .then(r => done(r.status), e => done(-1));""",
        path, fields,
    )  # fmt: skip
    return status


def page_csrf(driver: WebDriver) -> str:
    value = driver.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    assert value
    return value


def push(image: str, requested_by: str) -> str:
    return enqueue_push(
        source_image=image, registry_id=HARBOR_ID, repository=f"e2e/console-{uuid.uuid4().hex[:8]}",
        tag="v1", requested_by=requested_by,
    )  # fmt: skip


def test_a_pushed_job_appears_and_turns_succeeded_without_reloading(
    console: Console, browser: WebDriver, image: str
) -> None:
    sign_in(browser, console, "operator")
    shot(browser, "overview")
    requester = f"platform:console-{uuid.uuid4().hex[:6]}"
    browser.get(f"{console.url}/console/jobs?requester={requester}")
    browser.execute_script("window.notReloaded = true;")
    job_id = push(image, requester)
    try:
        wait(browser, 120).until(lambda d: "succeeded" in d.find_element(By.ID, "job-table").text)
    except TimeoutException:
        shown = browser.find_element(By.ID, "job-table").text
        raise AssertionError(
            f"job {wait_for_job(job_id, 1).status}; the page shows {shown!r}"
        ) from None
    assert job_id[:8] in browser.find_element(By.ID, "job-table").text
    assert browser.execute_script("return window.notReloaded === true;")
    shot(browser, "jobs")
    browser.get(f"{console.url}/console/jobs/{job_id}")
    assert "job.succeeded" in browser.find_element(By.ID, "timeline").text
    shot(browser, "job")
    browser.get(f"{console.url}/console/registries")
    shot(browser, "registries")
    browser.get(f"{console.url}/console/events?job={job_id}")
    shot(browser, "events")


def test_a_failed_job_is_retried_with_a_reason_after_its_credential_is_fixed(
    console: Console, browser: WebDriver, image: str
) -> None:
    with password_of(HARBOR_ID, "not-the-password"):
        job_id = push(image, "platform:console")
        assert wait_for_job(job_id).status == JobStatus.FAILED.value
    sign_in(browser, console, "operator")
    browser.get(f"{console.url}/console/jobs/{job_id}")
    assert browser.find_element(By.ID, "job-status").text == "failed"
    browser.find_element(By.ID, "retry-reason").send_keys("Harbor password fixed")
    browser.find_element(By.CSS_SELECTOR, "#retry button").click()
    wait(browser, 120).until(lambda d: d.find_element(By.ID, "job-status").text == "succeeded")
    timeline = browser.find_element(By.ID, "timeline").text
    assert "job.retried" in timeline and "console:console-operator-" in timeline


def test_an_auditor_cannot_retry_even_with_a_hand_made_post(
    console: Console, browser: WebDriver, image: str
) -> None:
    with password_of(HARBOR_ID, "not-the-password"):
        job_id = push(image, "platform:console")
        assert wait_for_job(job_id).status == JobStatus.FAILED.value
    sign_in(browser, console, "auditor")
    browser.get(f"{console.url}/console/jobs/{job_id}")
    assert not browser.find_elements(By.ID, "retry")  # not shown, and not allowed either:
    status = post(browser, f"/console/jobs/{job_id}/retry",
                  {"csrf": page_csrf(browser), "reason": "hand-made"})  # fmt: skip
    assert status == 403
    assert wait_for_job(job_id).status == JobStatus.FAILED.value


def test_an_xss_payload_renders_inert_and_a_post_without_csrf_is_refused(
    console: Console, browser: WebDriver, image: str
) -> None:
    job_id = push(image, XSS)
    sign_in(browser, console, "operator")
    for path in (f"/console/jobs/{job_id}", "/console/jobs", f"/console/events?job={job_id}"):
        browser.get(f"{console.url}{path}")
        assert XSS in browser.find_element(By.TAG_NAME, "main").text
        assert browser.execute_script("return window.pwned === undefined;")
    assert post(browser, "/console/events/verify", {}) == 403
    assert post(browser, "/console/events/verify", {"csrf": "forged"}) == 403
    assert post(browser, "/console/events/verify", {"csrf": page_csrf(browser)}) == 200
    browser.delete_all_cookies()
    browser.get(f"{console.url}/console/signin")
    shot(browser, "signin")


def test_an_admin_replaces_a_broken_credential_in_the_console_then_a_retry_succeeds(
    console: Console, browser: WebDriver, image: str
) -> None:
    good = _current_password(HARBOR_ID)
    with password_of(HARBOR_ID, "not-the-password"):
        job_id = push(image, "platform:console")
        assert wait_for_job(job_id).status == JobStatus.FAILED.value
        sign_in(browser, console, "admin")
        browser.get(f"{console.url}/console/registries/{HARBOR_ID}")
        page = browser.page_source
        assert good not in page and "not-the-password" not in page  # never shown
        browser.find_element(By.ID, "new-password").send_keys(good)
        browser.find_element(By.CSS_SELECTOR, "#credential-form button").click()
        wait(browser, 60).until(
            lambda d: "by console:console-admin-" in d.find_element(By.ID, "last-test").text
        )
        last_test = browser.find_element(By.ID, "last-test").text
        assert "FAILED" not in last_test and "credentials ok" in last_test, last_test
        assert good not in browser.page_source
        shot(browser, "registry")
        browser.get(f"{console.url}/console/jobs/{job_id}")
        browser.find_element(By.ID, "retry-reason").send_keys("credential replaced in the console")
        browser.find_element(By.CSS_SELECTOR, "#retry button").click()
        wait(browser, 120).until(lambda d: d.find_element(By.ID, "job-status").text == "succeeded")
    browser.get(f"{console.url}/console/events?registry={HARBOR_ID}&type=registry.updated")
    events_text = browser.find_element(By.TAG_NAME, "main").text
    assert "console:console-admin-" in events_text and good not in browser.page_source
