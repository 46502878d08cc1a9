"""The chat page at / in a real headless browser (Debian's chromium + chromium-driver through Selenium):
it streams an answer through the API, shows the finish reason and the safety verdicts, and its stop
button ends a stream. Skips cleanly where no browser or driver is installed (.ci/run installs both)."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_fixtures import running_server, tiny_model_and_tokenizer  # noqa: E402

from tinygrad_llm.moderation import Blocklist, Moderator  # noqa: E402
from tinygrad_llm.serve.app import create_app  # noqa: E402

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
               None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(BROWSER is None or DRIVER is None,
                                reason="no Chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def _wait_for_verdict(browser, count, timeout=20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(
        lambda b: len([v for v in b.find_elements(By.CSS_SELECTOR, ".assistant .verdict") if v.text]) >= count)
    return browser.find_elements(By.CSS_SELECTOR, ".assistant")


def _send(browser, text):
    from selenium.webdriver.common.by import By
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def test_the_page_streams_an_answer_and_shows_the_verdicts(browser):
    from selenium.webdriver.common.by import By
    model, tokenizer = tiny_model_and_tokenizer(max_seq_len=256)
    moderator = Moderator(Blocklist(["frobnicate"]), "block")
    with running_server(create_app(model, tokenizer, "tiny", max_batch=2, moderator=moderator)) as url:
        browser.get(url + "/")
        assert browser.find_element(By.ID, "model").text in ("tiny", "…")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("0")
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")
        _send(browser, "Hello there")
        answers = _wait_for_verdict(browser, 1)
        verdict = answers[0].find_element(By.CLASS_NAME, "verdict")
        assert verdict.get_attribute("data-finish") in ("stop", "length")
        assert "input: allow" in verdict.text
        assert "output: allow" in verdict.text or "output: none" in verdict.text    # none: nothing was written
        assert browser.find_element(By.ID, "model").text == "tiny"

        _send(browser, "please frobnicate")
        answers = _wait_for_verdict(browser, 2)
        verdict = answers[1].find_element(By.CLASS_NAME, "verdict")
        assert verdict.get_attribute("data-finish") == "content_filter"
        assert "input: block (blocklist:1)" in verdict.text and "output: none" in verdict.text
        assert "flagged" in verdict.get_attribute("class")
        assert answers[1].find_element(By.CLASS_NAME, "text").text == ""

        # the stop button: a long answer (up to the whole context) is aborted by the page
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("240")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("1")
        browser.execute_script("""
            const stop = document.getElementById('stop');
            new MutationObserver(() => { if (!stop.disabled) stop.click(); }).observe(stop, {attributes: true});""")
        _send(browser, "Tell me a long story")
        answers = _wait_for_verdict(browser, 3)
        finish = answers[2].find_element(By.CLASS_NAME, "verdict").get_attribute("data-finish")
        assert finish == "stopped"
        assert browser.find_element(By.ID, "send").is_enabled()
