"""The live dashboard (GET /dashboard) in a real headless browser: Chromium from Debian
driven by selenium through the system chromedriver (/usr/bin/chromedriver; tools/dev.sh
installs both), against a real daemon relaying to tools/sink.py.

- the page and its assets need no token, the data does (GET /live 401 without one);
- signing in keeps the token in sessionStorage, never in the URL; the page loads with no
  console errors; its numbers move while mail flows, a deferral shows among the recent
  errors; screenshots are kept in tmp_path;
- suspending a site from the page shows in GET /shaping (paused_until), and resuming it
  clears that; the page shows the state;
- a wrong token is refused and no data is shown.
"""
from __future__ import annotations

import http.client
import os
import shutil
import smtplib
import subprocess
import sys
import threading
import time

import orjson
import pytest
from conftest import ROOT, free_port, missing_tool

CHROMEDRIVER = "/usr/bin/chromedriver"


class Flow:
    """A thread sending messages through the daemon's SMTP listener until stopped."""

    def __init__(self, port: int):
        self.port, self.sent, self.error = port, 0, None
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
                while not self.stop_event.is_set():
                    s.sendmail("s@sender.test", [f"u{self.sent}@a.test"],
                               b"From: <s@sender.test>\r\nSubject: dash\r\n\r\nhello\r\n")
                    self.sent += 1
                    time.sleep(0.01)
        except Exception as exc:  # noqa: BLE001  (the test reports it)
            self.error = exc

    def __enter__(self) -> Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert self.error is None, f"sending failed: {self.error!r}"


@pytest.fixture
def relay(daemon_factory):
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert sink.stdout is not None and b"ready" in sink.stdout.readline()
        d = daemon_factory(extra=f'[delivery]\nsmarthost = "127.0.0.1:{port}"\n')
        d.site = f"[127.0.0.1]:{port}"
        d.token = (d.spool_dir / "admin.token").read_text().strip()
        yield d
    finally:
        sink.terminate()
        sink.wait(30)


def _get(d, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.admin_port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    if not os.access(CHROMEDRIVER, os.X_OK) or shutil.which("chromium") is None:
        missing_tool("chromium and chromium-driver are not installed (tools/dev.sh installs them)")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1300", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the system chromedriver: selenium-manager never downloads one
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(what, timeout: float = 30.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what.__doc__ or what}")
        time.sleep(step)


def test_static_pages_open_data_needs_a_token(relay):
    status, headers, body = _get(relay, "/dashboard")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"<canvas" in body and b"/dashboard/app.js" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    status, headers, body = _get(relay, "/dashboard/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"sessionStorage" in body and b"Authorization" in body
    status, headers, _ = _get(relay, "/dashboard/style.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    assert _get(relay, "/live")[0] == 401
    with Flow(relay.port) as flow:
        _wait(lambda: flow.sent >= 5)
    status, _, body = _get(relay, "/live", relay.token)
    assert status == 200
    # the answer is what /openapi.json says it is (the schema from the LiveView dataclass)
    jsonschema = pytest.importorskip("jsonschema")
    from mta.control import openapi, views
    jsonschema.validate(orjson.loads(body), openapi.schema_of(views.LiveView))
    live = views.LiveView.from_json(orjson.loads(body))
    assert live.received >= 5 and live.rows[0].site == relay.site
    status, _, body = _get(relay, "/openapi.json", relay.token)
    assert "/live" in orjson.loads(body)["paths"]
    # nothing external: no scheme://host in the page or its script
    for path in ("/dashboard", "/dashboard/app.js", "/dashboard/style.css"):
        assert b"://" not in _get(relay, path)[2], path


def _shaping_paused(d) -> float | None:
    status, _, body = _get(d, "/shaping", d.token)
    assert status == 200
    rows = [r for r in orjson.loads(body) if r["site"] == d.site]
    assert rows, body
    return rows[0]["paused_until"]


def test_dashboard_live_numbers_and_suspend_round_trip(relay, browser, tmp_path):
    from selenium.webdriver.common.by import By
    drv = browser
    drv.get(f"http://127.0.0.1:{relay.admin_port}/dashboard")
    assert drv.find_element(By.ID, "login").is_displayed()
    assert not drv.find_element(By.ID, "main").is_displayed()
    drv.find_element(By.ID, "token").send_keys(relay.token)
    drv.find_element(By.ID, "signin").click()
    _wait(lambda: drv.find_element(By.ID, "main").is_displayed())
    assert relay.token not in drv.current_url
    assert drv.execute_script("return sessionStorage.getItem('mta-admin-token')") == relay.token
    text = lambda i: drv.find_element(By.ID, i).text  # noqa: E731

    # one recipient the sink defers: a recent error (451, the sink's text) on the page
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as s:
        s.sendmail("s@sender.test", ["defer1@a.test"], b"Subject: d\r\n\r\nhi\r\n")
    _wait(lambda: "451" in text("errors") and "try again later" in text("errors"))
    before = int(_wait(lambda: text("t-delivered-total") not in ("", "-")
                       and text("t-delivered-total")))
    with Flow(relay.port):
        _wait(lambda: int(text("t-delivered-total")) >= before + 20)
        _wait(lambda: float(text("t-delivered") or 0) > 0)    # a rate, from two snapshots
        row = _wait(lambda: drv.find_elements(By.CSS_SELECTOR, f'tr[data-site="{relay.site}"]'))
        assert "running" in row[0].text
        # the provider plot's legend names the site (no provider table matched) with its rate
        _wait(lambda: relay.site in text("l-providers") and "default" in text("l-sources")
              and relay.site in text("l-failing"))
        time.sleep(4)          # a few more points on the plots for the screenshot
        drv.save_screenshot(str(tmp_path / "dashboard.png"))
    assert "live, updated" in text("status")

    severe = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not severe, severe

    assert _shaping_paused(relay) is None
    drv.find_element(By.CSS_SELECTOR, f'button.suspend[data-site="{relay.site}"]').click()
    until = _wait(lambda: _shaping_paused(relay))
    assert until > time.time() + 500                 # the page asks for 10 minutes
    _wait(lambda: drv.find_elements(By.CSS_SELECTOR, f'button.resume[data-site="{relay.site}"]'))
    assert "suspended" in drv.find_element(By.CSS_SELECTOR, f'tr[data-site="{relay.site}"]').text
    _wait(lambda: "site" in text("holds") and relay.site in text("holds"))
    drv.save_screenshot(str(tmp_path / "dashboard-suspended.png"))
    drv.find_element(By.CSS_SELECTOR, f'button.resume[data-site="{relay.site}"]').click()
    _wait(lambda: _shaping_paused(relay) is None)
    _wait(lambda: drv.find_elements(By.CSS_SELECTOR, f'button.suspend[data-site="{relay.site}"]'))
    assert text("action-result") == f"resume {relay.site}: done"
    severe = [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert not severe, severe
    print(f"screenshots: {tmp_path / 'dashboard.png'} {tmp_path / 'dashboard-suspended.png'}")


def test_wrong_token_is_refused(relay, browser):
    from selenium.webdriver.common.by import By
    drv = browser
    drv.get(f"http://127.0.0.1:{relay.admin_port}/dashboard")
    drv.find_element(By.ID, "token").send_keys("not-the-token-" + "x" * 40)
    drv.find_element(By.ID, "signin").click()
    _wait(lambda: "refused" in drv.find_element(By.ID, "login-error").text)
    assert not drv.find_element(By.ID, "main").is_displayed()
    assert drv.execute_script("return sessionStorage.getItem('mta-admin-token')") is None
