"""The server's page (`/`) in headless Chromium: its form makes the same image as the Python API, server errors show
in the page, and PNG info reads a generated PNG back into the form.

Needs Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`) and selenium; skipped without.
Selenium is given both binaries, so it never downloads a browser or a driver.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_jax.images import png_info
from sd_jax.server.a1111 import sampler_and_schedule
from tests.serving import tiny_server

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(
        "the page tests need Debian's chromium and chromedriver at /usr/bin (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
if webdriver is None:
    pytest.skip("the page tests need selenium (pip install selenium)", allow_module_level=True)

# The first generation compiles the model's sampling loop; later ones take a second or two on the tiny model.
GENERATION_TIMEOUT = 120
PAGE_TIMEOUT = 30
SIZE, STEPS, SEED = 32, 2, 7


@pytest.fixture(scope="module")
def served():
    with tiny_server() as (server, worker, pipe):
        yield server, worker, pipe


@pytest.fixture(scope="module")
def driver():
    profile = tempfile.mkdtemp(prefix="sd_jax_chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, url: str) -> None:
    """Loads the page and waits until its lists and defaults have come from the server."""
    driver.get(url)
    WebDriverWait(driver, PAGE_TIMEOUT).until(
        lambda d: (
            d.find_element(By.ID, "generate").is_enabled()
            and Select(d.find_element(By.ID, "sampler")).options
            and d.find_element(By.ID, "model").text != "loading…"
        )
    )


def fill(driver, **values) -> None:
    """Types each value into the form field of that id."""
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(str(value))


def generate(driver) -> None:
    """Clicks Generate and waits until the request has been answered (the button is enabled again)."""
    button = driver.find_element(By.ID, "generate")
    button.click()
    WebDriverWait(driver, GENERATION_TIMEOUT).until(lambda d: button.is_enabled())


def gallery_png(driver, index: int = 0) -> bytes:
    """The bytes of the gallery's image `index`, read from its data URL."""
    images = driver.find_elements(By.CSS_SELECTOR, "#gallery img")
    src = driver.execute_script("return arguments[0].src", images[index])
    head, _, data = src.partition(",")
    assert head == "data:image/png;base64"
    return base64.b64decode(data)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=GENERATION_TIMEOUT) as response:
        return json.loads(response.read())


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=PAGE_TIMEOUT) as response:
        return json.loads(response.read())


def test_page_generates_the_python_apis_image(served, driver):
    server, worker, pipe = served
    open_page(driver, server.url)
    samplers = [s["name"] for s in get_json(f"{server.url}/sdapi/v1/samplers")]
    sampler = Select(driver.find_element(By.ID, "sampler"))
    assert [o.get_attribute("value") for o in sampler.options] == samplers
    assert sampler.first_selected_option.get_attribute("value") == "Euler a"
    schedulers = [s["name"] for s in get_json(f"{server.url}/sdapi/v1/schedulers")]
    scheduler = Select(driver.find_element(By.ID, "scheduler"))
    assert [o.get_attribute("value") for o in scheduler.options] == schedulers
    options = get_json(f"{server.url}/sdapi/v1/options")
    assert driver.find_element(By.ID, "model").text == options["sd_model_checkpoint"]
    assert driver.find_element(By.ID, "width").get_attribute("value") == str(options["sd_jax_native_size"])
    assert driver.find_element(By.ID, "steps").get_attribute("value") == "20"

    prompt = "a red fox in the snow"
    fill(driver, prompt=prompt, width=SIZE, height=SIZE, steps=STEPS, seed=SEED)
    generate(driver)
    assert driver.find_element(By.ID, "error").text == ""
    png = gallery_png(driver)
    name, schedule = sampler_and_schedule("Euler a", "Euler", scheduler.first_selected_option.get_attribute("value"))
    (expected,) = pipe.txt2img(
        prompt,
        steps=STEPS,
        width=SIZE,
        height=SIZE,
        seed=SEED,
        sampler=name,
        schedule=schedule,
        guidance_scale=7.0,
        progress=lambda done, total: None,  # as the server's calls: the same executable, no second compile
    )
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), np.asarray(expected))

    caption = driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert f"Seed: {SEED}" in caption
    assert prompt in caption and f"Steps: {STEPS}" in caption
    # While it ran the page polled the progress route, and now it is idle again.
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert any(url.endswith("/sdapi/v1/progress") for url in fetched)
    assert not driver.find_element(By.ID, "progress").is_displayed()
    assert not driver.find_element(By.ID, "interrupt").is_enabled()


def test_server_errors_show_in_the_page(served, driver):
    server, _, _ = served
    open_page(driver, server.url)
    fill(driver, prompt="a lighthouse", width=30, height=SIZE, steps=STEPS, seed=SEED)
    generate(driver)
    error = driver.find_element(By.ID, "error")
    assert error.text == "width: must be a positive multiple of 8, got 30"
    assert driver.find_elements(By.CSS_SELECTOR, "#gallery img") == []

    fill(driver, steps="")  # a field left empty is the server's to refuse, by name
    generate(driver)
    assert error.text.startswith("steps: ")

    fill(driver, width=SIZE, steps=STEPS)
    generate(driver)
    assert error.text == ""
    assert len(driver.find_elements(By.CSS_SELECTOR, "#gallery img")) == 1
    assert f"Seed: {SEED}" in driver.find_element(By.CSS_SELECTOR, "#gallery figcaption").text


def test_png_info_reads_a_generated_png_into_the_form(served, driver, tmp_path):
    server, _, _ = served
    prompt = "a lighthouse at dusk, oil painting"
    # The size and sampler of the first test's image, so nothing compiles anew; the page's defaults differ.
    body = dict(prompt=prompt, negative_prompt="fog", steps=3, cfg_scale=5.5, seed=11, width=SIZE, height=SIZE)
    response = post_json(f"{server.url}/sdapi/v1/txt2img", {**body, "sampler_name": "Euler a"})
    path = tmp_path / "generated.png"
    path.write_bytes(base64.b64decode(response["images"][0]))

    open_page(driver, server.url)
    use = driver.find_element(By.ID, "use_parameters")
    assert not use.is_enabled()
    driver.find_element(By.ID, "png_file").send_keys(str(path))
    WebDriverWait(driver, PAGE_TIMEOUT).until(lambda d: prompt in d.find_element(By.ID, "png_info").text)
    info = driver.find_element(By.ID, "png_info")
    assert json.loads(response["info"])["infotexts"][0] in info.text
    cells = {
        row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
        for row in info.find_elements(By.CSS_SELECTOR, "tr")
    }
    assert cells["Prompt"] == prompt and cells["Seed"] == "11" and cells["Sampler"] == "Euler a"

    sampler = Select(driver.find_element(By.ID, "sampler"))
    sampler.select_by_value("DPM++ 2M")
    use.click()
    form = {name: driver.find_element(By.ID, name).get_attribute("value") for name in body}
    assert form == {name: str(value) for name, value in body.items()}
    assert sampler.first_selected_option.get_attribute("value") == "Euler a"


def test_dropping_a_png_shows_its_text_as_text(served, driver, tmp_path):
    """A PNG dropped on the drop zone: its parameters fill the form, and markup in its text stays text."""
    server, _, _ = served
    prompt = 'a <b id="injected">bold</b> fox'
    text = f"{prompt}\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, "
    text += "Seed: 1234, Size: 48x40"
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG", pnginfo=png_info({"parameters": text}))

    open_page(driver, server.url)
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("dropzone");
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """,
        base64.b64encode(out.getvalue()).decode(),
    )
    WebDriverWait(driver, PAGE_TIMEOUT).until(lambda d: prompt in d.find_element(By.ID, "png_info").text)
    assert driver.find_elements(By.ID, "injected") == []
    driver.find_element(By.ID, "use_parameters").click()
    values = ("prompt", "negative_prompt", "steps", "cfg_scale", "seed", "width", "height", "sampler", "scheduler")
    form = {name: driver.find_element(By.ID, name).get_attribute("value") for name in values}
    assert form == {
        "prompt": prompt,
        "negative_prompt": "blurry",
        "steps": "12",
        "cfg_scale": "4.5",
        "seed": "1234",
        "width": "48",
        "height": "40",
        "sampler": "DPM++ 2M",
        "scheduler": "karras",
    }
