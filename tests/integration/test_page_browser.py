"""The page at ``/`` in a real browser: Debian's headless Chromium driven by Playwright, against a
server process with API keys. Upload a generated WAV; the tags, timeline, events and spectrogram appear.

Chromium is a system package (``apt-get install chromium``, done by ``.ci/run``); Playwright never
downloads a browser here. Without it this test fails rather than skips, so CI cannot pass without it.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from playwright.sync_api import sync_playwright

KEY = "page-key"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `apt-get install chromium` (Debian), as .ci/run does")
    return path


def toy_module():
    path = Path(__file__).resolve().parents[1] / "unit" / "service" / "svc_toy_model.py"
    spec = importlib.util.spec_from_file_location("svc_toy_model_page", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def detector_server(tmp_path_factory: pytest.TempPathFactory, start_server):
    folder = tmp_path_factory.mktemp("page")
    model = toy_module().build_toy_model(folder / "detector.onnx", target_frames=192, detector=True,
                                         name="toy-detector")
    env = {"EAT_MODEL_PATH": str(model), "EAT_API_KEYS": KEY, "EAT_MAX_BATCH": "4", "EAT_BATCH_BUCKETS": "1,2,4"}
    with start_server(["-m", "service.server"], env, folder) as running:
        yield running


def siren_wav(path: Path) -> Path:
    sf.write(path, toy_module().siren_scene(10.0, 3.0, 6.0), 16_000, subtype="PCM_16")
    return path


def test_upload_shows_tags_timeline_events_and_spectrogram(detector_server, tmp_path: Path) -> None:
    wav = siren_wav(tmp_path / "siren.wav")
    expected = httpx.post(f"{detector_server.url}/predict?top_k=5&hop=0.5", content=wav.read_bytes(),
                          headers={"content-type": "audio/wav", "authorization": f"Bearer {KEY}"},
                          timeout=30).json()["results"][0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(f"{detector_server.url}/")
            page.wait_for_function("document.getElementById('model').textContent.includes('not available')")
            assert "API key" in page.inner_text("#model")  # the server asked for a key
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('toy-detector')")
            page.fill("#hop", "0.5")
            page.set_input_files("#file", str(wav))
            page.wait_for_selector("#tags .tag", timeout=30_000)
            page.wait_for_function("document.getElementById('status').textContent.includes('windows')")
            names = page.eval_on_selector_all("#tags .tag", "items => items.map(i => i.dataset.name)")
            assert names == [t["name"] for t in expected["tags"]] == ["Siren", "Silence"]
            assert page.locator("#timeline .lane").count() == 2
            assert page.locator("#timeline .lane").first.locator(".cell").count() == expected["num_windows"] == 18
            siren = page.locator("#events .lane[data-name='Siren'] .event")
            assert siren.count() == 1
            assert abs(float(siren.get_attribute("data-onset")) - 3.0) <= 0.5
            assert abs(float(siren.get_attribute("data-offset")) - 6.0) <= 0.5
            width, spread = page.evaluate("""() => {
                const c = document.getElementById('spectrogram');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let lo = 255, hi = 0;
                for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
                return [c.width, hi - lo];
            }""")
            assert width == 998 and spread > 100  # one column per 10 ms frame of 10 s; not a blank image
            assert page.is_hidden("#error")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            page.fill("#key", "wrong")
            page.set_input_files("#file", str(wav))
            page.wait_for_selector("#error:not([hidden])")
            assert "API key" in page.inner_text("#error")
        finally:
            browser.close()


def test_recording_from_the_microphone(detector_server) -> None:
    """Chromium's fake microphone (a beep) -> MediaRecorder (WebM/Opus) -> /predict decodes it with PyAV."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        try:
            page = browser.new_page()
            page.goto(f"{detector_server.url}/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('toy-detector')")
            page.click("#record")
            page.wait_for_function("Number(document.getElementById('record').dataset.chunks || 0) >= 8", timeout=30_000)
            page.click("#record")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('recording.webm')",
                                   timeout=30_000)
            assert page.is_hidden("#error")
            assert page.locator("#tags .tag").count() == 2  # both classes of the detector, scored
        finally:
            browser.close()


def test_static_files_are_served_by_name_only(detector_server) -> None:
    assert httpx.get(f"{detector_server.url}/").headers["content-type"].startswith("text/html")
    assert httpx.get(f"{detector_server.url}/static/app.js").status_code == 200
    for path in ("/static/..%2Fapp.py", "/static/nothing.js", "/static/../settings.py"):
        assert httpx.get(f"{detector_server.url}{path}").status_code == 404, path
