"""The dashboard in a real browser: Debian's headless Chromium driven through its ChromeDriver
(selenium), against `mailflow web` and the pipeline's real processes (relay, facts consumer,
queuer, worker) and a real SMTP server.

The second test takes the screenshot the README shows, during `mailflow demo`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from mailflow.outbound import sending, templates
from mailflow.outbound.senders import Sender
from mailflow.tenants import users
from mailflow.testing.sink import Sink, SinkServer

from .api_fixtures import make_tenant
from .conftest import mailflow_cmd, run_cli

pytestmark = pytest.mark.process
pytest_plugins = ["tests.api_fixtures"]

PASSWORD = "correct horse battery"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        raise AssertionError(f"{name} is not installed: run scripts/install-peers (Debian's chromium, chromium-driver)")
    return found


@pytest.fixture
def chrome() -> Iterator[Callable[..., WebDriver]]:
    drivers: list[WebDriver] = []

    def make(width: int = 1280, height: int = 900) -> WebDriver:
        opts = Options()
        opts.binary_location = _binary("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US"):
            opts.add_argument(arg)
        opts.add_argument(f"--window-size={width},{height}")
        driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=opts)
        drivers.append(driver)
        return driver

    yield make
    for d in drivers:
        d.quit()


def log_in(driver: WebDriver, url: str, workspace: str, email: str) -> None:
    driver.get(url + "/login?next=/dashboard")
    for name, value in (("workspace", workspace), ("email", email), ("password", PASSWORD)):
        field = driver.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith("/dashboard"))
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "open")
    driver.execute_script("window.__sameLoad = true")  # gone if the page is ever loaded again


def counter(driver: WebDriver, key: str) -> int:
    text = driver.find_element(By.CSS_SELECTOR, f'[data-counter="{key}"]').text
    return int(re.sub(r"\D", "", text) or 0)


def same_load(driver: WebDriver) -> bool:
    return bool(driver.execute_script("return window.__sameLoad === true"))


def test_a_sent_message_moves_the_delivered_counter_without_a_reload_and_another_tenant_sees_nothing(
    api, procs, chrome
):
    acme, rival = make_tenant(api, "acme"), make_tenant(api, "rival")
    users.add(acme.store, "ops@acme.example", PASSWORD, "owner")
    users.add(rival.store, "ops@rival.example", PASSWORD, "owner")
    with SinkServer(Sink()) as server:
        sending.save_sender(acme.store, Sender("tx", "noreply@acme.example", "Acme", server.url))
        templates.save(acme.store, templates.Template("hello", "Hello", "<p>Hello {{ name }}</p>"))
        for args in (["relay"], ["consume", "facts", "--consumer-id", "f1"], ["queuer"], ["worker", "--name", "w1"]):
            procs.start(*args)
        mine, theirs = chrome(), chrome()
        log_in(mine, api.url, "acme", "ops@acme.example")
        log_in(theirs, api.url, "rival", "ops@rival.example")
        assert counter(mine, "delivered") == 0 and counter(theirs, "delivered") == 0

        sending.send_transactional(
            acme.store, sender="tx", template="hello", to="ann@example.net", variables={"name": "Ann"}
        )
        WebDriverWait(mine, 60, poll_frequency=0.1).until(lambda d: counter(d, "delivered") == 1)
        assert same_load(mine), "the page was loaded again"
        assert counter(mine, "sent") == 1 and counter(mine, "sent_per_minute") >= 1
        assert len(server.sink.received) == 1

        time.sleep(2)  # what rival's page would have got by now, it got
        assert same_load(theirs)
        assert {k: counter(theirs, k) for k in ("sent", "delivered", "sent_per_minute")} == {
            "sent": 0,
            "delivered": 0,
            "sent_per_minute": 0,
        }


def test_the_dashboard_during_mailflow_demo_shows_its_numbers_and_is_saved_for_the_readme(api, env, chrome, tmp_path):
    users.add(api.rt.store.for_tenant("default"), "demo@mailflow.example", PASSWORD, "owner")
    driver = chrome(1280, 1700)
    log_in(driver, api.url, "default", "demo@mailflow.example")
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen(
        mailflow_cmd("demo", "--contacts", "400", "--transactional", "10", "--json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        WebDriverWait(driver, 180, poll_frequency=0.2).until(lambda d: counter(d, "delivered") >= 150)
        assert same_load(driver)  # the numbers moved by themselves
        driver.refresh()  # the breakdowns of the page's first snapshot were empty: the picture shows them
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "open")
        time.sleep(2)  # a few more deltas, drawn
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        out, _ = demo.communicate(timeout=300)
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
    assert demo.returncode == 0, (tmp_path / "demo.log").read_text()[-2000:]
    stats = json.loads(out)["stats"]["totals"]
    assert stats == json.loads(run_cli(env, "stats", "--json").stdout)["totals"]  # the demo printed `mailflow stats`
    driver.refresh()
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "live").get_attribute("data-state") == "open")
    assert {k: counter(driver, k) for k in ("sent", "delivered", "bounced")} == {
        k: stats[k] for k in ("sent", "delivered", "bounced")
    }
    assert SCREENSHOT.stat().st_size > 20_000
