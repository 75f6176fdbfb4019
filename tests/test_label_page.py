"""The labelling page in a real browser (headless Chromium driven by Selenium): a job queues
two tasks, a person opens /label, types their id, ranks three responses with the arrow
buttons, picks the better of two, and both comparisons are in the store."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from client import RewardClient
from server import in_process_server
from service.app import create_app
from service.registry import load_model
from service.settings import ServiceSettings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Chromium's own background traffic (updates, sync, QUIC probes) misbehaves on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,1600"]


@pytest.fixture
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -r requirements.lock)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="reward-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    # The Debian driver by path: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
def test_a_person_ranks_three_responses_and_picks_one_of_two_on_the_label_page(browser, model_dirs, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    settings = ServiceSettings(models=[f"bert={model_dirs['bert']}"], store=f"sqlite:///{tmp_path}/c.db", shutdown_drain_s=0)
    model = load_model("bert", model_dirs["bert"], settings)
    with in_process_server(create_app(settings, [replace(model, batcher=None)]), settings) as url, RewardClient(url) as client:
        ids = client.add_label_tasks([
            {"prompt": "Name a yellow fruit.", "responses": ["A cherry.", "A plum.", "A banana."], "category": "helpfulness"},
            {"prompt": "Say hi", "responses": ["Go away.", "Hi! How can I help?"]},
        ])
        wait = WebDriverWait(browser, 30)
        browser.get(f"{url}/label")
        browser.find_element(By.ID, "labeller").send_keys("ann")
        browser.find_element(By.ID, "start").click()

        # Three candidates in the order given; move "A banana." (response 2) to the top.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#candidates li")) == 3)
        assert browser.find_element(By.ID, "prompt").text == "Name a yellow fruit."
        browser.find_element(By.ID, "up-2").click()
        browser.find_element(By.ID, "up-2").click()
        shown = [li.find_element(By.CLASS_NAME, "text").text for li in browser.find_elements(By.CSS_SELECTOR, "#candidates li")]
        assert shown == ["A banana.", "A cherry.", "A plum."]
        browser.find_element(By.ID, "reason").send_keys("the only yellow one")
        browser.find_element(By.ID, "submit-ranking").click()

        # The next task is the pair: pick the second response.
        wait.until(seen.text_to_be_present_in_element((By.ID, "prompt"), "Say hi"))
        assert "Saved comparison #" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "pick-1").is_displayed() and not browser.find_element(By.ID, "submit-ranking").is_displayed()
        browser.find_element(By.ID, "pick-1").click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "status"), "No tasks are waiting"))

        stored = client.list_comparisons(labeller="ann").data

    assert [(c.task_id, c.ranking, c.kind) for c in stored] == [(ids[0], [2, 0, 1], "ranking"), (ids[1], [1, 0], "pairwise")]
    assert stored[0].reason == "the only yellow one" and stored[0].category == "helpfulness"
    assert stored[1].responses == ["Go away.", "Hi! How can I help?"]
