"""The co-composer page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium, against a real musenet-serve over the small test export (tests/serve/conftest.py `server`).

Simple mode: four candidates with progress bars, then four piano rolls; one plays (its cursor moves, it stops by
itself and on a click); one downloads as MIDI that the project's reader parses. Step-by-step mode: extend twice,
pick a take each time, go back to the first take, branch from it, download the branch; the tree shows both
branches and the downloaded branch continues the first take; rewrite a span of a take and keep the rewrite. Errors
are one line in the page.

A screenshot of each mode is saved under $MUSENET_TEST_ARTEFACTS (default: the test's tmp_path).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
import re
import shutil
import time

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from data_pipeline import encoding
from data_pipeline.vocab import Vocab
from tests.serve.conftest import serve

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The flags a root, display-less CI machine needs, and none of the browser's own network traffic.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1440,1000")
GENERATE_TIMEOUT_S = 420  # the first job compiles the decode loop, on a 2-core machine beside other tests
SEED = 7  # fixed, so that the pieces (and the notes the checks need) are the same on every run
SECONDS = 2.0
PRIMER = "bach_bwv1.6.mid"  # piano only


@dataclasses.dataclass
class Browser:
    driver: webdriver.Chrome
    downloads: pathlib.Path


@pytest.fixture(scope="module")
def vocab(trained_run) -> Vocab:
    return Vocab.load(str(trained_run.export / "vocab.json"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Browser:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs a headless Chromium and its driver: apt-get install chromium chromium-driver")
    profile = tmp_path_factory.mktemp("chromium-profile")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "profile.default_content_setting_values.automatic_downloads": 1})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        yield Browser(driver, downloads)
    finally:
        driver.quit()


@pytest.fixture
def artefacts(tmp_path) -> pathlib.Path:
    folder = pathlib.Path(os.environ.get("MUSENET_TEST_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- helpers ---------------------------------------------------------------------------------------------
def page_error(driver) -> str | None:
    """The page's one-line error, or None when it shows none."""
    return driver.execute_script("const e = document.getElementById('error'); "
                                 "return e.hidden ? null : document.getElementById('error-text').textContent;")


def wait_for(driver, condition, timeout: float = 30, what: str = "the page", errors_fail: bool = True) -> object:
    """Waits for `condition(driver)` to be truthy; fails early, naming it, when the page shows an error (unless
    `errors_fail` is off: waiting for an error)."""

    def check(d):
        value = condition(d)
        if not value and errors_fail and (error := page_error(d)):
            raise AssertionError(f"waiting for {what}, the page showed an error: {error}")
        return value

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(check)
    except WebDriverException as e:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                             f"page error: {page_error(driver)!r}") from e


def open_page(browser: Browser, server, mode: str) -> None:
    driver = browser.driver
    driver.get(f"{server.url}/")
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"),
             what="the model's description")
    driver.find_element(By.ID, f"tab-{mode}").click()
    assert driver.find_element(By.ID, f"panel-{mode}").is_displayed()


def set_value(element: WebElement, value) -> None:
    element.clear()
    element.send_keys(str(value))


def choose_settings(driver, label: str, instruments: list[str]) -> None:
    Select(driver.find_element(By.ID, "style")).select_by_value(label)
    for box in driver.find_elements(By.CSS_SELECTOR, "#instrument-list input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("value") in instruments):
            box.find_element(By.XPATH, "..").click()  # the chip's label, as a user clicks it
    more = driver.find_element(By.CSS_SELECTOR, "details.more")
    if more.get_attribute("open") is None:
        more.find_element(By.TAG_NAME, "summary").click()
    set_value(driver.find_element(By.ID, "seed"), SEED)


def finished_cards(driver, results_id: str, count: int) -> list[WebElement]:
    """Waits for the request in `results_id` to finish and returns its `count` candidate cards."""
    wait_for(driver, lambda d: d.find_element(By.ID, results_id).get_attribute("data-state") in
             ("done", "failed", "cancelled"), GENERATE_TIMEOUT_S, f"candidates in #{results_id}")
    assert driver.find_element(By.ID, results_id).get_attribute("data-state") == "done", page_error(driver)
    cards = driver.find_elements(By.CSS_SELECTOR, f"#{results_id} article.candidate")
    assert len(cards) == count and all(c.get_attribute("data-state") == "done" for c in cards)
    return cards


def note_count(card: WebElement) -> int:
    match = re.search(r"(\d+) notes", card.find_element(By.CSS_SELECTOR, ".card-meta").text)
    assert match, card.text
    return int(match.group(1))


def canvas_colours(driver, canvas: WebElement) -> int:
    """How many different colours a canvas shows (a drawn piano roll has its grid and notes)."""
    return driver.execute_script("""
        const c = arguments[0], data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const seen = new Set();
        for (let i = 0; i < data.length; i += 4 * 7) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        return seen.size;""", canvas)


def wait_for_roll(driver, container: WebElement) -> None:
    """Waits for the piano roll in `container` to be drawn (rolls draw at their laid-out size, a frame later)."""
    wait_for(driver, lambda d: canvas_colours(d, container.find_element(By.CSS_SELECTOR, "canvas.roll-canvas")) > 4,
             5, "a piano roll to be drawn")


def check_playback(driver, card_or_box: WebElement) -> None:
    """Plays the piece: the button turns to Stop and the cursor moves; it stops by itself at the end, and at
    once when the button is clicked again."""
    button = card_or_box.find_element(By.CSS_SELECTOR, "button.play")
    cursor = card_or_box.find_element(By.CSS_SELECTOR, ".roll-cursor")
    button.click()
    assert button.get_attribute("aria-pressed") == "true" and "Stop" in button.text
    wait_for(driver, lambda d: float(cursor.get_attribute("data-time") or 0) > 0.2, 10, "the playback cursor to move")
    assert driver.execute_script("return document.querySelector('.roll-cursor:not([hidden])') !== null")
    wait_for(driver, lambda d: button.get_attribute("aria-pressed") == "false", 15, "the piece to end")
    assert not cursor.is_displayed()
    button.click()
    assert button.get_attribute("aria-pressed") == "true"
    button.click()
    assert button.get_attribute("aria-pressed") == "false" and "Play" in button.text


def download(browser: Browser, link: WebElement, timeout: float = 30) -> pathlib.Path:
    """Clicks a download link and returns the file once the browser has finished writing it."""
    name = link.get_attribute("download")
    assert name and name.endswith(".mid"), name
    target = browser.downloads / name
    target.unlink(missing_ok=True)
    link.click()
    deadline = time.monotonic() + timeout
    while not (target.exists() and not any(browser.downloads.glob("*.crdownload"))):
        assert time.monotonic() < deadline, f"{name} was not downloaded: {sorted(browser.downloads.iterdir())}"
        time.sleep(0.1)
    return target


def job_result(server, midi_url: str) -> dict:
    """The API's result behind a /v1/jobs/ID/samples/I.mid link."""
    match = re.fullmatch(r"/v1/jobs/(\w+)/samples/(\d+)\.mid", midi_url)
    assert match, midi_url
    status, job = server.json("GET", f"/v1/jobs/{match.group(1)}")
    assert status == 200 and job["status"] == "done", job
    return job["results"][int(match.group(2))]


def screenshot(driver, path: pathlib.Path) -> None:
    """The whole page, however tall (Chromium draws beyond the window for it)."""
    driver.execute_script("window.scrollTo(0, 0)")
    width, height = driver.execute_script("return [document.documentElement.scrollWidth, "
                                          "document.documentElement.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))


def script_errors(driver) -> list[str]:
    """Errors the page's scripts logged (the API's refusals of the test's bad requests are network entries)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]


# -- the tests -------------------------------------------------------------------------------------------
def test_the_page_and_its_modules_are_served_with_their_types(server):
    """The page's scripts are ES modules: a browser runs one only when it comes as JavaScript, and each of its
    imports (relative paths) must be there too."""
    status, headers, page = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert '<script type="module" src="/static/app.js">' in html
    status, headers, _ = server.request("GET", "/static/app.css")
    assert status == 200 and headers["content-type"].startswith("text/css"), headers
    todo, seen = ["app.js"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        status, headers, body = server.request("GET", f"/static/{name}")
        assert status == 200, name
        assert headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript"), (name, headers)
        todo += re.findall(r'^import [^;]*? from "\./([\w-]+\.js)";', body.decode(), re.M)
    assert {"app.js", "api.js", "roll.js", "synth.js", "tree.js"} <= seen, seen


def test_simple_mode_generates_plays_and_downloads_candidates(browser, server, vocab, artefacts):
    driver = browser.driver
    open_page(browser, server, "simple")
    labels = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#style option")]
    assert labels == ["none", "classical", "freedoom"]
    offered = [b.get_attribute("value") for b in driver.find_elements(By.CSS_SELECTOR, "#instrument-list input")]
    assert offered == list(vocab.instruments.names)

    # Mistakes are one line in the page: one the page catches, and one the server refuses.
    choose_settings(driver, "freedoom", [])
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, page_error, 10, "the error line", errors_fail=False)
    assert page_error(driver) == "Choose at least one instrument."
    choose_settings(driver, "freedoom", ["piano", "bass", "drums"])
    set_value(driver.find_element(By.ID, "length"), SECONDS)
    set_value(driver.find_element(By.ID, "top-k"), 1 << 20)
    driver.find_element(By.ID, "generate").click()
    wait_for(driver, page_error, 30, "the server's error", errors_fail=False)
    assert "top_k" in page_error(driver) and "\n" not in page_error(driver)
    set_value(driver.find_element(By.ID, "top-k"), 0)

    driver.find_element(By.ID, "generate").click()
    progress = driver.find_elements(By.CSS_SELECTOR, "#simple-results article.candidate progress")
    assert len(progress) == 4  # a bar per candidate while the job runs
    cards = finished_cards(driver, "simple-results", 4)
    assert page_error(driver) is None

    for card in cards:
        wait_for_roll(driver, card)
        canvas = card.find_element(By.CSS_SELECTOR, "canvas.roll-canvas")
        assert canvas.size["width"] > 300 and canvas.size["height"] > 100
        assert not card.find_element(By.CSS_SELECTOR, ".progress-row").is_displayed()
    counts = [note_count(card) for card in cards]
    assert max(counts) > 0, counts
    legend = driver.find_element(By.ID, "simple-legend").text
    assert any(prettified in legend for prettified in ("Piano", "Bass", "Drums")), legend

    best = cards[counts.index(max(counts))]
    check_playback(driver, best)

    link = best.find_element(By.CSS_SELECTOR, "a[download$='.mid']")
    midi_url = link.get_attribute("href").removeprefix(server.url)
    index = int(best.get_attribute("data-index"))
    assert re.fullmatch(rf"musenet-freedoom-seed{SEED}-{index + 1}\.mid", link.get_attribute("download"))
    path = download(browser, link)
    status, _, served = server.request("GET", midi_url)
    assert status == 200 and path.read_bytes() == served
    piece = encoding.encode_midi(str(path), vocab)
    result = job_result(server, midi_url)
    assert piece.num_notes == len(result["notes"]) == max(counts) and result["seconds"] <= SECONDS + 0.05

    assert page_error(driver) is None
    screenshot(driver, artefacts / "browser-simple-mode.png")
    assert not script_errors(driver)


def extend_and_keep(driver, by: float, candidate: int) -> None:
    set_value(driver.find_element(By.ID, "extend-by"), by)
    driver.find_element(By.ID, "extend").click()
    cards = finished_cards(driver, "advanced-results", 4)
    cards[candidate].find_element(By.CSS_SELECTOR, "button.keep").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#advanced-results .kept-note"), 10, "the kept take")


def tree_shape(driver) -> dict:
    """The tree as the page shows it: {node name: [child names]}, the current node and each node's length."""
    return driver.execute_script("""
        const shape = {}, lengths = {};
        let current = null;
        for (const item of document.querySelectorAll('#tree li.tree-item')) {
          const button = item.querySelector(':scope > button.node');
          const name = button.querySelector('.node-name').textContent;
          shape[name] = [...item.querySelectorAll(':scope > ul > li > button.node .node-name')]
            .map((e) => e.textContent);
          lengths[name] = button.querySelector('.node-len').textContent;
          if (button.getAttribute('aria-current') === 'true') current = name;
        }
        return {shape, lengths, current};""")


def test_step_by_step_mode_extends_picks_branches_and_downloads(browser, server, vocab, artefacts, midi_fixtures):
    driver = browser.driver
    open_page(browser, server, "advanced")
    choose_settings(driver, "classical", ["violin"])
    assert tree_shape(driver)["current"] == "Start"

    # The piece starts from the first second of the user's MIDI file (piano only: the page ticks piano for it).
    Select(driver.find_element(By.ID, "opening")).select_by_value("upload")
    driver.find_element(By.ID, "upload").send_keys(str(midi_fixtures / PRIMER))
    set_value(driver.find_element(By.ID, "primer-seconds"), 1)
    root = f"My file: {PRIMER}"
    wait_for(driver, lambda d: tree_shape(d)["lengths"].get(root) == "1.0 s", 10, "the uploaded opening")
    assert driver.find_element(By.ID, "inst-piano").is_selected()
    box = driver.find_element(By.CSS_SELECTOR, ".current-box")
    wait_for_roll(driver, box)

    extend_and_keep(driver, SECONDS, 0)  # Take 1: the opening and two seconds more
    assert driver.find_element(By.ID, "opening-fields").get_attribute("disabled") is not None  # the piece began
    extend_and_keep(driver, SECONDS, 1)  # Take 2 continues Take 1
    tree = tree_shape(driver)
    assert tree["shape"] == {root: ["Take 1"], "Take 1": ["Take 2"], "Take 2": []}, tree
    assert tree["current"] == "Take 2"

    # Back to Take 1, and a branch from there.
    driver.find_element(By.CSS_SELECTOR, "#tree button.node[data-node='1']").click()
    assert tree_shape(driver)["current"] == "Take 1"
    assert driver.find_element(By.ID, "current-name").text == "Take 1"
    take1_link = driver.find_element(By.CSS_SELECTOR, "#current-actions a[download$='.mid']")
    take1 = job_result(server, take1_link.get_attribute("href").removeprefix(server.url))
    extend_and_keep(driver, SECONDS, 2)  # Take 3: a second continuation of Take 1
    tree = tree_shape(driver)
    assert tree["shape"] == {root: ["Take 1"], "Take 1": ["Take 2", "Take 3"], "Take 2": [], "Take 3": []}, tree
    assert tree["current"] == "Take 3"
    take3_link = driver.find_element(By.CSS_SELECTOR, "#current-actions a[download$='.mid']")
    take3 = job_result(server, take3_link.get_attribute("href").removeprefix(server.url))
    assert take1["primer_tokens"] > 0 and tree["lengths"]["Take 1"] == f"{take1['seconds']:.1f} s"
    assert tree["lengths"]["Take 3"] == f"{take3['seconds']:.1f} s"
    # The branch is Take 1's music, then its own: Take 1's tokens are the given start of Take 3's.
    assert take3["tokens"][:len(take1["tokens"])] == take1["tokens"]
    assert take3["primer_tokens"] == len(take1["tokens"]) and take3["seconds"] > take1["seconds"]

    wait_for_roll(driver, box)
    check_playback(driver, box)
    path = download(browser, take3_link)
    assert re.fullmatch(r"musenet-classical-take3-\d+s\.mid", path.name)
    piece = encoding.encode_midi(str(path), vocab)
    assert piece.num_notes == len(take3["notes"]) > 0

    assert page_error(driver) is None
    screenshot(driver, artefacts / "browser-step-by-step-mode.png")
    assert not script_errors(driver)


def test_step_by_step_mode_rewrites_a_span_of_a_take(browser, server, vocab, artefacts, midi_fixtures):
    """A take's span rewritten: four candidates of the same length, the music outside the span kept; the kept one
    is a child take marked with its span, and it can be extended like any take."""
    driver = browser.driver
    open_page(browser, server, "advanced")
    choose_settings(driver, "classical", ["piano"])
    Select(driver.find_element(By.ID, "opening")).select_by_value("upload")
    driver.find_element(By.ID, "upload").send_keys(str(midi_fixtures / PRIMER))
    set_value(driver.find_element(By.ID, "primer-seconds"), 3)
    root = f"My file: {PRIMER}"
    wait_for(driver, lambda d: tree_shape(d)["lengths"].get(root) == "3.0 s", 10, "the uploaded opening")
    assert driver.find_element(By.ID, "span-form").get_attribute("hidden") is not None  # nothing to rewrite yet
    extend_and_keep(driver, SECONDS, 0)  # Take 1: three seconds of Bach and two more
    take1 = job_result(server, driver.find_element(By.CSS_SELECTOR, "#current-actions a[download$='.mid']")
                       .get_attribute("href").removeprefix(server.url))

    form = driver.find_element(By.ID, "span-form")
    assert form.is_displayed()
    parts = [o.get_attribute("value") for o in form.find_elements(By.CSS_SELECTOR, "#span-parts option")]
    assert parts[0] == "" and set(parts[1:]) == {n["instrument"] for n in take1["notes"]}
    set_value(driver.find_element(By.ID, "span-from"), 1)
    set_value(driver.find_element(By.ID, "span-to"), 2.5)
    driver.find_element(By.ID, "regenerate").click()
    cards = finished_cards(driver, "advanced-results", 4)
    heading = driver.find_element(By.CSS_SELECTOR, "#advanced-results .candidates-title").text
    assert heading == "Rewrites of Take 1, 1.0 s to 2.5 s"
    cards[1].find_element(By.CSS_SELECTOR, "button.keep").click()
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#advanced-results .kept-note"), 10, "the kept take")
    tree = tree_shape(driver)
    assert tree["shape"] == {root: ["Take 1"], "Take 1": ["Take 2"], "Take 2": []} and tree["current"] == "Take 2"
    assert tree["lengths"]["Take 2"] == tree["lengths"]["Take 1"]
    delta = driver.find_element(By.CSS_SELECTOR, "#tree button.node[data-node='2'] .node-delta").text
    assert delta == "↻ 1.0–2.5 s"
    take2 = job_result(server, driver.find_element(By.CSS_SELECTOR, "#current-actions a[download$='.mid']")
                       .get_attribute("href").removeprefix(server.url))

    def outside(result):
        return sorted((n["instrument"], n["pitch"], n["start"], n["end"]) for n in result["notes"]
                      if not 1.0 <= n["start"] < 2.5)

    assert take2["span"] == [1.0, 2.5] and outside(take2) == outside(take1)
    assert take2["seconds"] == pytest.approx(take1["seconds"])
    box = driver.find_element(By.CSS_SELECTOR, ".current-box")
    wait_for_roll(driver, box)
    assert page_error(driver) is None
    screenshot(driver, artefacts / "browser-span-rewrite.png")
    extend_and_keep(driver, SECONDS, 0)  # the rewritten take goes on like any other
    assert tree_shape(driver)["shape"]["Take 2"] == ["Take 3"]
    assert not script_errors(driver)


def test_the_page_sends_the_token_from_its_address(browser, trained_run):
    """With --token, the page takes the token from its address (?token=...), keeps it for the session and sends
    it with every call: the model, the job and its event stream, the downloads."""
    driver = browser.driver
    token = "page-test-token-1234"
    with serve(str(trained_run.export), f"--token={token}", "--max_batch=4", token=token) as server:
        driver.get(f"{server.url}/")
        wait_for(driver, page_error, 30, "the missing token's error", errors_fail=False)
        assert "token" in page_error(driver)

        driver.get(f"{server.url}/?token={token}")
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"),
                 what="the model's description")
        assert token not in driver.current_url  # out of the address bar, so a copied link does not carry it
        driver.get(f"{server.url}/")  # the session remembers it
        wait_for(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"),
                 what="the model's description")
        choose_settings(driver, "freedoom", ["piano"])
        set_value(driver.find_element(By.ID, "length"), SECONDS)
        driver.find_element(By.ID, "generate").click()
        cards = finished_cards(driver, "simple-results", 4)
        link = cards[0].find_element(By.CSS_SELECTOR, "a[download$='.mid']")
        path = download(browser, link)
        status, _, served = server.request("GET", link.get_attribute("href").removeprefix(server.url))
        assert status == 200 and path.read_bytes() == served
        assert page_error(driver) is None and not script_errors(driver)
