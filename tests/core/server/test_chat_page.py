"""The chat page at ``GET /`` of a real ``cnllm serve`` (the tiny GGUF), driven in headless Chromium with selenium.

Skips with the reason where Debian's ``chromium`` / ``chromium-driver`` or selenium are absent (``.ci/run`` installs
them where it can). ``CNLLM_CHAT_SCREENSHOT=PATH`` also saves a screenshot there (docs/images/chat-page.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.core.server.conftest import http_request, spawn_serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "sk-page-test"

# Records every request body the page sends, so a test can read what the page asked the server for.
RECORD_FETCH = """
window.sentBodies = [];
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
  return realFetch(url, options);
};
"""


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)"
    if not Path(CHROMEDRIVER).exists():
        return "chromedriver is missing (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, part of the test extra)"
    return None


pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")


@pytest.fixture(scope="module")
def server(tiny_gguf):
    env = {**os.environ, "CNLLM_API_KEY": KEY}
    process, port = spawn_serve(tiny_gguf, "--model-name", "tiny", "--template", "chatml", "--n-ctx", "4096", env=env)
    yield port
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,700", "--lang=zh-CN"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, port: int):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{port}/")
    browser.execute_script(RECORD_FETCH)
    return lambda element_id: browser.find_element(By.ID, element_id)


def enter_key(browser, element) -> None:
    """Type the key the way a user does: into the field, then the change event the page stores it on."""
    element.clear()
    element.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", element)


def answers(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('.msg.assistant')].map(n => n.textContent)")


def idle(find) -> bool:
    return find("send").is_enabled() and not find("stop").is_enabled()


def test_the_page_loads_without_the_key_and_is_self_contained(server):
    status, body = http_request(server, "GET", "/")
    assert status == 200
    page = body.decode()
    assert "<script>" in page and "src=" not in page and "https://" not in page and "http://" not in page
    status, _ = http_request(server, "GET", "/", headers={"Host": "evil.example"})
    assert status == 403  # the Host allow-list covers the page too


def test_chat_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    find = open_page(browser, server)
    wait_for(lambda: "401" in find("error").text, what="the missing-key error from /v1/models")
    enter_key(browser, find("api-key"))
    wait_for(lambda: find("model").text == "tiny", what="the model name")
    assert find("error").text == ""
    assert browser.execute_script("return localStorage.getItem('cnllm.apiKey')") == KEY

    find("max-tokens").send_keys("12")
    box = find("input")
    box.send_keys("你好，请介绍一下自己")
    box.send_keys(Keys.SHIFT, Keys.ENTER)  # Shift+Enter: a new line, nothing sent
    assert box.get_attribute("value") == "你好，请介绍一下自己\n"
    assert browser.execute_script("return window.sentBodies.length") == 0
    box.send_keys("谢谢", Keys.ENTER)
    wait_for(lambda: answers(browser) and answers(browser)[0], what="the first streamed answer")
    wait_for(lambda: idle(find), what="the first answer to end")
    assert "tokens/s" in find("speed").text

    box.send_keys("再说一遍", Keys.ENTER)
    wait_for(lambda: len(answers(browser)) == 2 and answers(browser)[1] and idle(find), what="the second answer")
    bodies = browser.execute_script("return window.sentBodies")
    assert len(bodies) == 2 and bodies[1]["stream"] is True and bodies[1]["model"] == "tiny" and bodies[1]["max_tokens"] == 12
    assert [(m["role"], m["content"]) for m in bodies[1]["messages"]] == [
        ("user", "你好，请介绍一下自己\n谢谢"),
        ("assistant", answers(browser)[0]),
        ("user", "再说一遍"),
    ]
    shot = tmp_path / "chat-page.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("CNLLM_CHAT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CNLLM_CHAT_SCREENSHOT"])

    # An Enter that confirms an IME composition (pinyin → 汉字) must not send.
    box.send_keys("ni")
    for init in ("{key: 'Enter', code: 'Enter', isComposing: true, bubbles: true, cancelable: true}", "{key: 'Enter', keyCode: 229, bubbles: true, cancelable: true}"):
        browser.execute_script(f"arguments[0].dispatchEvent(new KeyboardEvent('keydown', {init}))", box)
    time.sleep(0.5)
    assert browser.execute_script("return window.sentBodies.length") == 2
    assert box.get_attribute("value") == "ni"
    box.clear()

    # A server error is shown in the page, and the message goes back to the input to be sent again.
    browser.execute_script("arguments[0].value = 'wrong-key'", find("api-key"))
    box.send_keys("第三个问题", Keys.ENTER)
    wait_for(lambda: "incorrect API key" in find("error").text, what="the server's error")
    assert box.get_attribute("value") == "第三个问题" and len(answers(browser)) == 2 and idle(find)
    box.clear()


def test_stop_aborts_a_stream(server, browser):
    from selenium.webdriver.common.keys import Keys

    find = open_page(browser, server)  # the key is in localStorage from the test before, or typed here
    if find("api-key").get_attribute("value") != KEY:
        enter_key(browser, find("api-key"))
    wait_for(lambda: find("model").text == "tiny", what="the model name")
    find("max-tokens").clear()
    find("max-tokens").send_keys("4000")
    # The tiny model answers in well under a second: a slow network (Chrome's own throttling) keeps the stream open.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 1000, "uploadThroughput": -1})
    try:
        find("input").send_keys("写一篇很长的文章", Keys.ENTER)
        wait_for(lambda: answers(browser) and len(answers(browser)[0]) > 0, what="streamed text")
        find("stop").click()
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    wait_for(lambda: idle(find), timeout=10, what="the stream to stop")
    assert "(stopped)" in answers(browser)[0]
    assert find("error").text == ""
    # the server notices the hang-up and frees its slot
    wait_for(lambda: json.loads(http_request(server, "GET", "/health")[1])["slots"]["busy"] == 0, timeout=30, what="the slot to be freed")
