"""In a real browser: headless Chromium (Debian's chromium and chromium-driver, driven
by Selenium) runs clients/js/example.html with niki.js against a real server over
WebSocket, through a server restart; and watches the status page's counts change.

Skipped when Chromium, its driver or Selenium is missing; with CI=true that fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator, List

import pytest

from messaging_server import Enqueuer
from tests.helpers import ServerProcess, port_with_free_neighbours, query, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CLIENTS_JS = Path(__file__).resolve().parent.parent / "clients" / "js"
IN_CI = os.environ.get("CI", "").lower() == "true"
SEEN_WITHIN = 20.0  # seconds: a reconnect waits up to 1 s (maxBackoff=1) after each try

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - reported by the fixture
    webdriver = None

pytestmark = pytest.mark.usefixtures("no_niki_environment")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                        ("selenium", webdriver)) if not found]
    if missing:
        reason = f"needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def pages() -> Iterator[str]:
    """clients/js served over HTTP on a free port of its own (another origin than Niki's)."""
    handler = functools.partial(QuietHandler, directory=str(CLIENTS_JS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def items(driver: webdriver.Chrome) -> List[str]:
    return [element.text for element in driver.find_elements(By.CSS_SELECTOR, "#messages li")]


def text(driver: webdriver.Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def test_niki_js_receives_acknowledges_and_survives_a_restart(browser, pages: str, sqlite_url: str) -> None:
    port = port_with_free_neighbours()
    args = ("--ws-origins", pages, "--workers", "1")
    server = ServerProcess(sqlite_url, *args, port=port, event_port=port + 1,
                           http_follows_port=True).start()
    try:
        browser.get(f"{pages}/example.html?server=ws://127.0.0.1:{port + 2}/v1/ws&maxBackoff=1")
        wait_until(lambda: text(browser, "status") == "connected", SEEN_WITHIN, "the page to connect")
        client_id = int(text(browser, "client"))
        with Enqueuer(sqlite_url) as enq:
            assert enq.enqueue(client_id, "while the page is open")
            wait_until(lambda: items(browser) == ["while the page is open"], SEEN_WITHIN,
                       "the first message on the page")
            server.stop()
            wait_until(lambda: text(browser, "status") == "reconnecting", SEEN_WITHIN,
                       "the page to see the server gone")
            assert enq.enqueue(client_id, "queued while the server was down")
            server = ServerProcess(sqlite_url, *args, port=port, event_port=port + 1,
                                   http_follows_port=True).start()
            wait_until(lambda: len(items(browser)) == 2, SEEN_WITHIN, "the backlog after the restart")
            assert text(browser, "client") == str(client_id)  # the credential from localStorage
            assert enq.enqueue(client_id, "after the restart")
            wait_until(lambda: len(items(browser)) == 3, SEEN_WITHIN, "the last message")
        assert items(browser) == ["while the page is open", "queued while the server was down",
                                  "after the restart"]
        wait_until(lambda: all(row[0] == "delivered" and row[1] for row in query(
            sqlite_url, "SELECT status, acknowledged_at FROM messages WHERE client_id = %s",
            (client_id,))), SEEN_WITHIN, "every message acknowledged by the page")
    finally:
        server.stop()
    assert "Traceback" not in server.log


def test_the_status_page_shows_the_counts_change(browser, sqlite_url: str) -> None:
    with ServerProcess(sqlite_url) as server, Enqueuer(sqlite_url) as enq:
        with open_client(server) as credential:
            pass
        browser.get(f"http://127.0.0.1:{server.http_port}/")
        wait_until(lambda: text(browser, "pending") == "0", SEEN_WITHIN, "the page's first figures")
        assert "(this one)" in browser.find_element(By.ID, "servers").text
        for n in range(3):
            assert enq.enqueue(credential, f"for later {n}")
        wait_until(lambda: text(browser, "pending") == "3", SEEN_WITHIN, "the page to count them")


class open_client:
    """A client made over TCP and gone again: its messages stay pending."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server

    def __enter__(self) -> str:
        from messaging_server.client.sdk import Client

        self.client = Client("127.0.0.1", self.server.port)
        return self.client.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.client.close()


def test_two_tabs_share_one_client_without_taking_each_other_over(browser, pages: str,
                                                                  sqlite_url: str) -> None:
    """Tabs of one site share the credential in localStorage: one connects, the other
    waits for its Web Lock and takes over when the first is closed."""
    with ServerProcess(sqlite_url, "--ws-origins", pages) as server:
        url = f"{pages}/example.html?server=ws://127.0.0.1:{server.http_port}/v1/ws&maxBackoff=1"
        browser.switch_to.new_window("tab")
        first = browser.current_window_handle
        browser.get(url)
        wait_until(lambda: text(browser, "status") == "connected", SEEN_WITHIN, "the first tab")
        client_id = text(browser, "client")
        browser.switch_to.new_window("tab")
        second = browser.current_window_handle
        browser.get(url)
        wait_until(lambda: text(browser, "status") == "waiting", SEEN_WITHIN, "the second tab to wait")
        with Enqueuer(sqlite_url) as enq:
            assert enq.enqueue(int(client_id), "to the tab that holds the client")
            browser.switch_to.window(first)
            wait_until(lambda: items(browser) == ["to the tab that holds the client"], SEEN_WITHIN,
                       "the message in the first tab")
            browser.close()  # the first tab goes: the second takes the client over
            browser.switch_to.window(second)
            wait_until(lambda: text(browser, "status") == "connected", SEEN_WITHIN,
                       "the second tab to connect")
            assert text(browser, "client") == client_id
            assert enq.enqueue(int(client_id), "to the second tab")
            wait_until(lambda: items(browser) == ["to the second tab"], SEEN_WITHIN,
                       "the message in the second tab")
        assert "taken over" not in server.log, server.log
        browser.close()
        browser.switch_to.window(browser.window_handles[0])
