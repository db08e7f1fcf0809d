"""The playground in a real browser: Debian's headless chromium driven by selenium through Debian's chromedriver
(never a browser download). The page loads, an image is uploaded, a question is sent and an answer appears.

The screenshot goes to the test's temp dir; `MEDM_UPDATE_SCREENSHOT=1` also writes it to assets/playground.png (the
README's picture), and `MEDM_PLAYGROUND_MODEL=DIR` serves that checkpoint instead of the tiny random one (the README
picture is taken with the demo model: `MEDM_UPDATE_SCREENSHOT=1 MEDM_PLAYGROUND_MODEL=runs/demo/finetune pytest
tests/playground/test_browser.py`).
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playground_helpers import REPO, start_server, stop_server

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1150"]
PACKAGES = ["chromium", "chromium-driver"]


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; installs Debian's packages when missing and apt-get can (root); else skips."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    browser, driver = found()
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", *PACKAGES]
        if subprocess.run(install, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        browser, driver = found()
        if browser and driver:
            return browser, driver
    pytest.skip(f"chromium / chromedriver not found and not installable here (apt-get install {' '.join(PACKAGES)} "
                "as root; `make test` tries)")


@pytest.fixture
def page_server(request, tmp_path_factory):
    """The session's tiny-model server, or one serving MEDM_PLAYGROUND_MODEL (with the demo's examples)."""
    model = os.environ.get("MEDM_PLAYGROUND_MODEL")
    if not model:
        yield request.getfixturevalue("server")
        return
    examples = Path(model).resolve().parent / "data" / "test.json"
    srv = start_server(Path(model), tmp_path_factory.mktemp("page_server"), examples if examples.is_file() else None)
    yield srv
    stop_server(srv)


def test_upload_ask_and_see_the_answer_in_chromium(page_server, phantom_records, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium skips Selenium Manager (which would try to download one).
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(page_server.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#medm-upload input[type=file]"))
        assert "medm playground" in driver.title
        assert "Not for clinical use" in driver.find_element(By.TAG_NAME, "body").text
        assert "Kind" in driver.find_element(By.ID, "medm-model").text  # the model panel

        image = phantom_records.parent / "images" / "phantom_00001.png"
        driver.find_element(By.CSS_SELECTOR, "#medm-upload input[type=file]").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#medm-preview img"))
        wait.until(lambda d: "phantom_00001.png" in d.find_element(By.ID, "medm-caption").text)

        question = "Is there a lesion?"
        driver.find_element(By.CSS_SELECTOR, "#medm-question textarea").send_keys(question)
        driver.find_element(By.ID, "medm-send").click()

        def answers(d):
            return [b.text.strip() for b in d.find_elements(By.CSS_SELECTOR, "#medm-chat .bot-row")]

        wait.until(lambda d: answers(d) and answers(d)[-1])
        assert question in driver.find_element(By.ID, "medm-chat").text
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#medm-chat .user-row img"))  # the picture it saw
        # Let the answer finish streaming: each streamed step also empties the question box, so an example clicked
        # before the end would be wiped by the next step (on a busy machine the stream takes seconds).
        seen = []
        wait.until(lambda d: seen.append(answers(d)[-1]) or (len(seen) > 4 and len(set(seen[-4:])) == 1))

        # An example case is one click away: it fills the upload and the question.
        rows = driver.find_elements(By.CSS_SELECTOR, "#medm-examples tr.tr-body")
        assert rows, "no example cases on the page"
        row_text = rows[1].text
        rows[1].click()
        box = driver.find_element(By.CSS_SELECTOR, "#medm-question textarea")
        wait.until(lambda d: box.get_attribute("value") and box.get_attribute("value") in row_text)
        wait.until(lambda d: d.find_element(By.ID, "medm-caption").text.split(":")[0] in row_text)
        driver.find_element(By.ID, "medm-send").click()
        wait.until(lambda d: len(answers(d)) == 2 and answers(d)[-1])
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "playground.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and np.unique(np.asarray(im.convert("L"))).size > 20  # a rendered page, not blank
    if os.environ.get("MEDM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "assets" / "playground.png")
