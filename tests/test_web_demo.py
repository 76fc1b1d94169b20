"""
web_demo.py: the page's action (streamed answer, frame strip, what ran, messages for bad input) and the page itself
in a real browser (headless Chromium driven by Playwright: upload, ask, read the streamed answer; a corrupt upload
shows a message and the server keeps serving).
    python -m pytest tests/test_web_demo.py -q
    WEB_DEMO_SCREENSHOT=assets/web_demo.png python -m pytest tests/test_web_demo.py -q -k browser   # README picture
The browser test needs `pip install gradio playwright` and Debian's chromium (/usr/bin/chromium); .ci/run installs
them, and the test says what is missing when it is skipped elsewhere.
"""
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import web_demo as W
from data.tiny import make_tiny_model
from data.video import write_video
from rollout import hf_generate, load_for_inference
from vlm import build_prompt, family, load_video

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "What colour was the flash?"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny model, an example folder with one generated clip, and a corrupt file named like a video."""
    d = tmp_path_factory.mktemp("web")
    make_tiny_model(str(d / "model"), "qwen2_5_vl", seed=0)
    rng = np.random.default_rng(0)
    os.makedirs(d / "examples")
    write_video(str(d / "examples" / "clip.mp4"), rng.integers(0, 255, (40, 56, 56, 3), dtype=np.uint8), fps=8)
    (d / "corrupt.mp4").write_bytes(rng.bytes(5000))
    cfg = W.WebConfig(model=str(d / "model"), num_frames=8, max_pixels=56 * 56, think=False, max_new_tokens=12,
                      examples=str(d / "examples"), port=0)
    model, processor, engine = load_for_inference(cfg)
    return d, cfg, model, processor, engine


def cli_answer(model, processor, cfg, video_path, frames=8, max_new_tokens=12) -> str:
    """What rollout.py's CLI answers with the same settings (greedy)."""
    sampling = W.WebConfig(**{**cfg.__dict__, "num_frames": frames})
    prompt = build_prompt(model, processor, QUESTION, load_video(video_path, sampling, family(model)), False)
    return hf_generate(model, processor, [prompt], n=1, temperature=0.0, max_new_tokens=max_new_tokens)[0].text


def test_answer_streams_the_clis_answer_with_frames_and_counts(demo):
    d, cfg, model, processor, engine = demo
    clip = str(d / "examples" / "clip.mp4")
    steps = list(W.answer(model, processor, engine, cfg, clip, QUESTION, "count", 8, False, 12, 0.0))
    texts = [text for text, _, _ in steps]
    final, strip, status = steps[-1]
    assert final == cli_answer(model, processor, cfg, clip)   # the same answer as the command line
    assert len(steps) >= 5 and texts[0] == ""                  # frames first, then the answer grows token by token
    assert all(final.startswith(t) or "\ufffd" in t for t in texts)  # prefixes (a split UTF-8 byte shows as U+FFFD)
    assert len(strip) == 8 and [c for _, c in strip] == sorted((c for _, c in strip), key=lambda c: float(c[:-2]))
    assert strip[0][0].shape == (56, 56, 3)
    assert "8 frames of 56x56 -> 16 video tokens" in status and "answer" in status
    by_rate = list(W.answer(model, processor, engine, cfg, clip, QUESTION, "fps", 2, False, 4, 0.0))[-1]
    assert by_rate[2].startswith("10 frames")                  # 5 s at 2 fps


def test_frame_strip_spreads_over_the_video():
    class Video:
        frames = np.zeros((100, 4, 4, 3), np.uint8)
        timestamps = np.arange(100) * 0.5
    strip = W.frame_strip(Video(), 4)
    assert [c for _, c in strip] == ["0.0 s", "16.5 s", "33.0 s", "49.5 s"]   # frames 0, 33, 66, 99


@pytest.mark.parametrize("video, question, frames_by, frames, message", [
    ("corrupt.mp4", QUESTION, "count", 8, "Could not read the video corrupt.mp4"),
    (None, QUESTION, "count", 8, "Upload a video"),
    ("examples/clip.mp4", " ", "count", 8, "Ask a question"),
    ("examples/clip.mp4", QUESTION, "count", 9000, "give 1-8192 frames"),
    ("examples/clip.mp4", QUESTION, "count", 0.5, "frames 0.5: give 1-8192 frames"),  # int(0.5) frames = 0
    ("examples/clip.mp4", QUESTION, "fps", 0, "a rate above 0 and up to 60 fps"),
])
def test_bad_input_gives_a_message_not_an_error(demo, video, question, frames_by, frames, message):
    d, cfg, model, processor, engine = demo
    steps = list(W.answer(model, processor, engine, cfg, str(d / video) if video else None, question, frames_by,
                          frames, False, 4, 0.0))
    assert len(steps) == 1 and steps[0][0] == "" and message in steps[0][2]


def wait_for_server(proc, timeout=120) -> str:
    """The URL the demo prints once it has loaded the model, when the server answers there."""
    t0, url = time.time(), None
    while url is None:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "web_demo.py exited before it served"
        if line.startswith("web demo on "):
            url = line.split()[-1]
        assert time.time() - t0 < timeout, "web_demo.py did not start"
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return url
        except OSError:
            assert time.time() - t0 < timeout and proc.poll() is None, "web_demo.py did not serve"
            time.sleep(0.5)


def ask(page, video: str, expect: str, timeout=60_000) -> tuple:
    """Upload `video`, ask, wait until the status box shows `expect`; returns (answer, status) as the page has them."""
    clear = page.locator("#video button[aria-label='Clear']")
    if clear.count():  # a video is loaded: its upload box comes back once it is cleared
        clear.first.click()
    page.set_input_files("#video input[type=file]", video)
    page.fill("#question textarea", QUESTION)
    page.wait_for_timeout(1000)  # the upload reaches the server before the click
    page.click("#ask")
    page.wait_for_function(f"document.querySelector('#status textarea').value.includes({expect!r})", timeout=timeout)
    return page.input_value("#answer textarea"), page.input_value("#status textarea")


def test_in_a_real_browser(demo, tmp_path):
    pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio; .ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (.ci/run installs it)")
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run installs it)")
    d, cfg, model, processor, _ = demo
    clip = str(d / "examples" / "clip.mp4")
    proc = subprocess.Popen([sys.executable, "web_demo.py", f"--model={cfg.model}", "--port=0", "--num_frames=8",
                             "--max_pixels=3136", "--think=False", "--max_new_tokens=12", f"--examples={cfg.examples}"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_for_server(proc)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="networkidle")
            answer, status = ask(page, clip, "answer ")
            assert answer == cli_answer(model, processor, cfg, clip) and answer
            assert "8 frames of 56x56 -> 16 video tokens" in status
            assert page.locator("#strip img").count() == 8
            if os.environ.get("WEB_DEMO_SCREENSHOT"):
                page.wait_for_timeout(1000)  # the strip's images drawn
                page.screenshot(path=os.environ["WEB_DEMO_SCREENSHOT"], full_page=True)
            _, status = ask(page, str(d / "corrupt.mp4"), "Could not read")
            assert "Could not read the video corrupt.mp4" in status
            answer, status = ask(page, clip, "answer ")                 # still serving, same answer
            assert answer == cli_answer(model, processor, cfg, clip) and "16 video tokens" in status
            browser.close()
    finally:
        proc.kill()
        proc.wait()
