"""python -m progan.serve: the page in a real headless browser (Debian's chromium driven by
selenium through Debian's chromedriver; nothing is downloaded), and its JSON/PNG API.
The server runs as its own process on a free port of 127.0.0.1 and is stopped after the module."""
import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from checkpoints import make_checkpoint
from base.ports import free_port

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server on a checkpoint at 16x16, fading in; yields its base URL."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint_000001", resolution=16, alpha=0.5)
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "progan.serve", "--checkpoint", str(checkpoint),
                                 "--port", str(port), "--device", "cpu"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if get(base + "/api/info")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.time() < deadline, f"the server did not answer in 90 s: {log.read_text()}"
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    image.load()
    return image


# ---------------------------------------------------------------- the API

def test_api_draws_grids_at_each_trained_resolution(server):
    status, _, body = get(server + "/api/info")
    info = json.loads(body)
    assert info["resolutions"] == [4, 8, 16] and info["resolution"] == 16 and info["alpha"] == 0.5
    for resolution in (4, 8, 16):
        status, headers, body = get(f"{server}/api/grid.png?resolution={resolution}&seed=3&num=9")
        assert status == 200 and headers["content-type"] == "image/png"
        assert png(body).size == (3 * resolution, 3 * resolution)
    assert get(f"{server}/api/grid.png?seed=3&num=9")[2] == get(f"{server}/api/grid.png?seed=3&num=9")[2]
    assert get(f"{server}/api/grid.png?seed=3&num=9")[2] != get(f"{server}/api/grid.png?seed=4&num=9")[2]


def test_interpolation_ends_at_the_grid_images(server):
    grid = png(get(f"{server}/api/grid.png?seed=5&num=4")[2])  # 2 x 2 tiles of 16 px
    start = png(get(f"{server}/api/interpolate.png?seed=5&num=4&a=1&b=4&t=0")[2])
    end = png(get(f"{server}/api/interpolate.png?seed=5&num=4&a=1&b=4&t=1")[2])
    middle = png(get(f"{server}/api/interpolate.png?seed=5&num=4&a=1&b=4&t=0.5")[2])
    assert start.size == (16, 16)
    # slerp at t=0 / 1 reproduces the endpoint latents up to rounding: pixels within 1 level
    assert max(abs(a - b) for a, b in zip(start.tobytes(), grid.crop((0, 0, 16, 16)).tobytes())) <= 1
    assert max(abs(a - b) for a, b in zip(end.tobytes(), grid.crop((16, 16, 32, 32)).tobytes())) <= 1
    assert middle.tobytes() not in (start.tobytes(), end.tobytes())


@pytest.mark.parametrize("query, status, words", [
    ("/api/grid.png?resolution=32", 400, "resolution 32: this checkpoint has trained 4, 8, 16"),
    ("/api/grid.png?resolution=12", 400, "resolution 12"),
    ("/api/grid.png?seed=abc", 422, "seed: Input should be a valid integer"),
    ("/api/grid.png?num=0", 422, "num:"),
    ("/api/grid.png?truncation=nan", 422, "truncation:"),
    ("/api/interpolate.png?num=4&b=9", 400, "image 9: the grid has 4 images"),
    ("/api/interpolate.png?t=2", 422, "t:"),
])
def test_bad_requests_get_a_readable_4xx(server, query, status, words):
    got, headers, body = get(server + query)
    assert got == status and headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    assert words in message and "\n" not in message


# ---------------------------------------------------------------- the page in a browser

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waited for {what}")


def shown_url(driver, image_id: str) -> str:
    """The API address whose answer the image shows (the page sets it once the image has loaded)."""
    return driver.execute_script(f"return document.getElementById('{image_id}').dataset.url || ''")


def shown_pixels(driver, image_id: str) -> str:
    """The image as the page shows it, as a data: URL of its pixels."""
    return driver.execute_script("""
        const img = document.getElementById(arguments[0]);
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0);
        return c.toDataURL('image/png');""", image_id)


def query_of(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_page_in_a_browser(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server + "/")
    # loads: the resolutions of the run, the grid of 16 images at 16 px (4 x 4), the interpolation
    wait_for(d, lambda d: shown_url(d, "grid") and shown_url(d, "lerp"), "the first grid and interpolation")
    assert [o.get_attribute("value") for o in Select(d.find_element(By.ID, "resolution")).options] == ["4", "8", "16"]
    assert "trained to 16" in d.find_element(By.ID, "meta").text
    grid = d.find_element(By.ID, "grid")
    assert grid.get_property("naturalWidth") == 64 and grid.size["width"] > 200  # shown enlarged

    # changing the resolution changes the image size
    Select(d.find_element(By.ID, "resolution")).select_by_value("8")
    wait_for(d, lambda d: query_of(shown_url(d, "grid")).get("resolution") == "8", "the 8x8 grid")
    assert grid.get_property("naturalWidth") == 32
    assert d.find_element(By.ID, "lerp").get_property("naturalWidth") == 8

    # moving the slider (keyboard: Home = 0, End = 1) changes the image
    slider = d.find_element(By.ID, "t")
    slider.send_keys(Keys.HOME)
    wait_for(d, lambda d: query_of(shown_url(d, "lerp")).get("t") == "0", "the slider at 0")
    at_start = shown_pixels(d, "lerp")
    slider.send_keys(Keys.END)
    wait_for(d, lambda d: query_of(shown_url(d, "lerp")).get("t") == "1", "the slider at 1")
    assert shown_pixels(d, "lerp") != at_start
    assert d.find_element(By.ID, "t-value").text == "1.00"

    # a new seed gives a new grid; the download is a valid PNG of that grid
    before = shown_pixels(d, "grid")
    seed = d.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("42", Keys.ENTER)
    wait_for(d, lambda d: query_of(shown_url(d, "grid")).get("seed") == "42", "the grid of seed 42")
    assert shown_pixels(d, "grid") != before
    link = d.find_element(By.ID, "download").get_attribute("href")
    assert query_of(link)["seed"] == "42" and link.startswith(server)
    status, headers, body = get(link)
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert png(body).size == (32, 32)
    assert d.find_element(By.ID, "message").get_attribute("hidden")

    # bad requests show the server's message in the page
    seed.clear()
    seed.send_keys("not a seed")
    d.find_element(By.ID, "generate").click()
    message = d.find_element(By.ID, "message")
    wait_for(d, lambda d: message.is_displayed(), "the error message")
    assert "seed: Input should be a valid integer" in message.text
    d.execute_script("document.getElementById('resolution').add(new Option('32', '32'))")  # beyond the run
    seed.clear()
    seed.send_keys("1")
    Select(d.find_element(By.ID, "resolution")).select_by_value("32")
    wait_for(d, lambda d: "resolution 32" in message.text, "the resolution message")
    assert message.text == "resolution 32: this checkpoint has trained 4, 8, 16"
    Select(d.find_element(By.ID, "resolution")).select_by_value("16")
    wait_for(d, lambda d: not message.is_displayed(), "the message to go after a good request")


def test_serve_mistakes_give_one_line_and_exit_2(tmp_path, capsys):
    from progan.serve import main

    assert main(["--checkpoint", str(tmp_path / "none"), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip().endswith("not found")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["--checkpoint", str(tmp_path / "none"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"cannot listen on 127.0.0.1:{port}" in err


# ---------------------------------------------------------------- the Host header (DNS rebinding)

def asgi_get(app, path: str, host: str) -> tuple[int, bytes]:
    """One GET through the ASGI app in this process (no server, no client library)."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", host.encode())], "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    sent, requests = [], [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():  # the request once, then waits (the client never goes away) until cancelled
        if requests:
            return requests.pop()
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("bound, host, status", [
    ("127.0.0.1", "127.0.0.1:8000", 200), ("127.0.0.1", "localhost:8000", 200),
    ("127.0.0.1", "evil.example:8000", 400), ("127.0.0.1", "127.0.0.1.evil.example:8000", 400),
    ("::1", "[::1]:8000", 200), ("::1", "localhost:8000", 200), ("::1", "evil.example:8000", 400),
    ("0.0.0.0", "my-machine:8000", 200),  # opened to the network on purpose: any name
])
def test_only_requests_addressed_to_the_server_are_answered(bound, host, status):
    from progan.serve import create_app

    code, body = asgi_get(create_app(studio=None, host=bound), "/", host)  # "/" is the page: no generator needed
    assert code == status, body
    if status == 400:
        assert len(body.decode().strip().splitlines()) == 1
