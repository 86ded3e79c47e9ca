"""``purifytf app``: the page logic (no browser), the Gradio page, and the served page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from purifytf.app import logic

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs" / "app"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
BROWSER_IMAGE = 19  # a T-shirt that 2 PGD steps turn into a Shirt for the bare classifier: an instructive screenshot


def _missing(reason: str) -> None:
    """Skip with ``reason``, except in CI (``CI=true``), where the browser test must run: fail instead."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the browser test: {reason} (.ci/run installs chromium, chromium-driver and "
                    f"the app extra)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def models():
    return logic.Models("cpu")


def _inputs(**changes):
    """The page's inputs in order (a bundled image, a 2-step Linf attack on the bare classifier, JPEG)."""
    inputs = dict(source=logic.SOURCES[0], index=3, upload=None, attack="PGD-EOT Linf", eps=8 / 255, steps=2, eot=1,
                  target=logic.BARE_CLASSIFIER, purifiers=["JPEGPurify (q=75)"], seed=0)
    inputs.update(changes)
    return list(inputs.values())


def _save(path: Path, array: np.ndarray) -> Path:
    PIL.Image.fromarray(array).save(path)
    return path


# --- the core package does not need Gradio -------------------------------------------------------------

def test_core_package_does_not_import_gradio():
    """``import purifytf`` and the command line (``purifytf app --help``) work without loading Gradio."""
    code = ("import sys, purifytf\n"
            "assert 'gradio' not in sys.modules, 'import purifytf loaded gradio'\n"
            "from purifytf.__main__ import main\n"
            "try:\n    main(['app', '--help'])\nexcept SystemExit as done:\n    assert done.code == 0\n"
            "assert 'gradio' not in sys.modules, 'the command line loaded gradio'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--port" in done.stdout and "--host" in done.stdout


# --- images --------------------------------------------------------------------------------------------

def test_bundled_image_has_its_label(models):
    prepared = logic.bundled_image(models, 3)
    assert torch.equal(prepared.image, models.images[3:4])
    assert prepared.label == int(models.labels[3])
    assert logic.CLASS_NAMES[prepared.label] in prepared.note
    for bad in (-1, len(models.images), 2.5, None):
        with pytest.raises(logic.AppInputError, match="bundled test image number"):
            logic.bundled_image(models, bad)


def test_upload_rgb_any_size_becomes_grey_28(tmp_path):
    rgb = np.zeros((60, 100, 3), np.uint8)
    rgb[:, :, 0] = 255  # pure red: luma 0.299 * 255 = 76
    prepared = logic.read_upload(_save(tmp_path / "red.png", rgb), 1, (28, 28))
    assert prepared.image.shape == (1, 1, 28, 28) and prepared.label is None
    torch.testing.assert_close(prepared.image, torch.full((1, 1, 28, 28), 76 / 255))
    assert "100x60 RGB" in prepared.note and "grey" in prepared.note and "60x60" in prepared.note
    assert "28x28" in prepared.note


def test_upload_grey_to_rgb_and_centre_crop(tmp_path):
    grey = np.zeros((10, 30), np.uint8)
    grey[:, 10:20] = 200  # the centre square is uniform
    prepared = logic.read_upload(_save(tmp_path / "grey.png", grey), 3, (5, 5))
    torch.testing.assert_close(prepared.image, torch.full((1, 3, 5, 5), 200 / 255))
    assert "RGB" in prepared.note


@pytest.mark.parametrize("content, message", [
    (None, "no file uploaded"),
    (b"", "is empty"),
    (b"%PDF-1.4 not an image", "not an image"),
])
def test_bad_uploads_get_a_message(tmp_path, content, message):
    path = None
    if content is not None:
        path = tmp_path / "upload.png"
        path.write_bytes(content)
    with pytest.raises(logic.AppInputError, match=message):
        logic.read_upload(path, 1, (28, 28))


def test_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", np.zeros((300, 200), np.uint8))
    monkeypatch.setattr(logic, "MAX_UPLOAD_PIXELS", 200 * 300 - 1)
    with pytest.raises(logic.AppInputError, match="200x300 pixels; the limit"):
        logic.read_upload(path, 1, (28, 28))
    monkeypatch.setattr(logic, "MAX_UPLOAD_BYTES", path.stat().st_size - 1)
    with pytest.raises(logic.AppInputError, match="MB; the limit"):
        logic.read_upload(path, 1, (28, 28))


# --- the attack ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, eps", [("PGD-EOT Linf", 0), ("PGD-EOT Linf", 0.3), ("PGD-EOT L2", -1),
                                       ("PGD-EOT L2", 11), ("PGD-EOT Linf", None)])
def test_eps_out_of_range(kind, eps):
    with pytest.raises(logic.AppInputError, match="eps for"):
        logic.AttackRequest(kind, eps)


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must"), ({"steps": 1.5}, "steps must"), ({"eot": logic.EOT_MAX + 1}, "EOT samples"),
    ({"steps": float("nan")}, "steps must be an integer"), ({"eot": float("inf")}, "EOT samples must be an integer"),
    ({"steps": "3"}, "steps must be an integer from 1 to 100, got '3'"), ({"eps": float("nan")}, "eps for"),
    ({"target": "nope"}, "attack target"), ({"kind": "fgsm"}, "attack must"),
])
def test_attack_settings_checked(changes, message):
    with pytest.raises(logic.AppInputError, match=message):
        logic.AttackRequest(**{"kind": "PGD-EOT Linf", **changes})


def test_attack_stays_in_the_ball_and_reports_progress(models):
    x, label = models.images[:1], int(models.labels[0])
    calls = []
    for kind, eps in (("PGD-EOT Linf", 8 / 255), ("PGD-EOT L2", 0.5)):
        request = logic.AttackRequest(kind, eps, steps=3, target="JPEGPurify (q=75)")
        adversarial = logic.run_attack(models, x, label, request, seed=0,
                                       progress=lambda f, desc: calls.append((f, desc)))
        delta = adversarial - x
        norm = delta.abs().max() if kind.endswith("Linf") else delta.norm()
        assert 0 < norm <= eps + 1e-6 and 0 <= adversarial.min() and adversarial.max() <= 1
    assert [f for f, _ in calls[:3]] == [0, 1 / 3, 2 / 3] and calls[0][1] == "attack: step 1 of 3"
    none = logic.run_attack(models, x, label, logic.AttackRequest("none"), seed=0)
    assert torch.equal(none, x)


def test_attack_on_the_bare_classifier_lowers_the_true_class(models):
    x, label = models.images[:1], int(models.labels[0])
    request = logic.AttackRequest("PGD-EOT Linf", 16 / 255, steps=5)
    adversarial = logic.run_attack(models, x, label, request, seed=0)
    with torch.no_grad():
        before, after = (models.classifier(v).softmax(-1)[0, label] for v in (x, adversarial))
    assert after < before


# --- the page ------------------------------------------------------------------------------------------

def test_page_shows_every_column_and_is_seeded(models):
    names = ["SaliencyDiffPurify", "SSNIPurify (on DiffPurify)", "JPEGPurify (q=75)"]
    inputs = _inputs(purifiers=names, target="SaliencyDiffPurify")
    results, notes = logic.run_page(models, *inputs)
    assert [r.title for r in results] == ["clean", "adversarial", *names]
    for r in results:
        assert r.image.shape == (1, 1, 28, 28) and len(r.top3) == 3
        probabilities = [p for _, p in r.top3]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    saliency, ssni, jpeg = results[2:]
    assert saliency.mask is not None and saliency.mask.shape == (1, 1, 28, 28) and saliency.facts["NFE"] == "10"
    assert ssni.facts["SSNI t"].endswith("steps") and ssni.facts["NFE"] == "30"
    assert jpeg.facts["NFE"] == "0" and jpeg.mask is None
    assert results[0].facts["label"] == logic.CLASS_NAMES[int(models.labels[3])]
    assert any("adaptive, through SaliencyDiffPurify" in n for n in notes)

    again, _ = logic.run_page(models, *inputs)
    for first, second in zip(results, again, strict=True):
        assert torch.equal(first.image, second.image) and first.top3 == second.top3
        assert {k: v for k, v in first.facts.items() if k != "seconds"} == \
               {k: v for k, v in second.facts.items() if k != "seconds"}
    other, _ = logic.run_page(models, *_inputs(purifiers=names, target="SaliencyDiffPurify", seed=1))
    assert not torch.equal(other[1].image, results[1].image)

    page = logic.format_results(results, notes)
    assert page.count('class="purify-card"') == 5 and page.count("<img") == 6  # 5 images and the mask
    assert "SSNI t" in page and "NFE" in page and "seconds" in page and "saliency mask" in page


def test_upload_is_attacked_with_the_clean_prediction(models, tmp_path):
    path = _save(tmp_path / "item.png", (models.images[5, 0] * 255).round().byte().numpy())
    results, notes = logic.run_page(models, *_inputs(source="upload", upload=str(path)))
    assert results[0].facts["label"] == "unknown"
    assert any("uploaded 28x28 L image" in n for n in notes)


@pytest.mark.parametrize("changes, message", [
    ({"source": "upload", "upload": None}, "no file uploaded"),
    ({"eps": 5.0}, "eps for PGD-EOT Linf must be in"),
    ({"purifiers": []}, "at least one purifier"),
    ({"seed": -1}, "seed must"),
    ({"seed": float("nan")}, "seed must be an integer"),
    ({"index": float("inf")}, "bundled test image number must be an integer"),
    ({"attack": "PGD-EOT Linf", "target": "DiffPurify ref (t*=0.1, 100 steps)", "steps": 100, "eot": 1},
     "this attack makes 10,000 network calls (100 steps x 1 EOT samples x 100 of DiffPurify ref"),
])
def test_bad_input_is_a_message_not_a_traceback(models, changes, message):
    page = logic.handle(models, *_inputs(**changes))
    assert 'class="app-error"' in page and message in page and "Traceback" not in page


def test_unknown_purifiers_are_refused_before_the_attack(models, monkeypatch):
    attacked = []
    monkeypatch.setattr(logic, "run_attack", lambda *args, **kwargs: attacked.append(1))
    page = logic.handle(models, *_inputs(purifiers=["JPEGPurify (q=75)", "nope"]))
    assert "unknown purifiers [&#x27;nope&#x27;]" in page and not attacked


def test_progress_keeps_a_deterministic_model_at_one_pass(models, monkeypatch):
    """The page's progress wrapper passes on that the bare classifier is deterministic: one pass per step,
    whatever the EOT samples."""
    batches = []
    monkeypatch.setattr(models, "classifier", _Recording(models.classifier, batches))
    request = logic.AttackRequest("PGD-EOT Linf", 8 / 255, steps=2, eot=8)
    logic.run_attack(models, models.images[:1], int(models.labels[0]), request, seed=0, progress=lambda *a, **k: None)
    assert batches == [1, 1]


class _Recording(torch.nn.Module):
    def __init__(self, model, batches):
        super().__init__()
        self.model, self.batches = model, batches

    def forward(self, x):
        self.batches.append(len(x))
        return self.model(x)


def test_unexpected_failure_is_a_message(models, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(logic, "run_attack", broken)
    page = logic.handle(models, *_inputs())
    assert 'class="app-error"' in page and "RuntimeError: boom" in page and "Traceback" not in page


def test_gradio_page_builds_offline(models, monkeypatch):
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing('Gradio is not installed (pip install "purifytf[app]")')
    from purifytf.app import build_page
    from purifytf.app.page import OFFLINE_ENVIRONMENT

    for key in OFFLINE_ENVIRONMENT:  # restored after the test
        monkeypatch.delenv(key, raising=False)
    page = build_page(models)
    assert page.analytics_enabled is False
    assert all(os.environ[k] == v for k, v in OFFLINE_ENVIRONMENT.items())
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"source", "bundled-index", "upload", "attack", "eps", "steps", "eot", "target", "purifiers", "seed", "run",
            "results"} <= ids


# --- the served page in headless Chromium ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models):
    """The page served on a free local port, in a thread of this process (what ``purifytf app`` runs)."""
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        _missing(f"{error.name} is not installed (pip install -e '.[test,app]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        _missing("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    from purifytf.app import launch
    from purifytf.app.page import OFFLINE_ENVIRONMENT

    with pytest.MonkeyPatch.context() as patch:
        for key in OFFLINE_ENVIRONMENT:  # launch sets them; restored for the other tests
            patch.delenv(key, raising=False)
        port = _free_port()
        page = launch("127.0.0.1", port, models, block=False)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            page.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1500",
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # offline: only the app resolves
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def test_browser_attack_and_purify(models, server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 240)
    browser.get(server)
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#run")))

    def type_into(elem_id: str, value: str) -> None:
        field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(value, Keys.TAB)

    type_into("bundled-index", str(BROWSER_IMAGE))
    type_into("steps", "2")
    keep = {"SaliencyDiffPurify", "SSNIPurify (on DiffPurify)"}
    for box in browser.find_elements(By.CSS_SELECTOR, "#purifiers input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("name") in keep):
            box.click()
    checked = {b.get_attribute("name") for b in browser.find_elements(By.CSS_SELECTOR, "#purifiers input:checked")}
    assert checked == keep
    browser.find_element(By.CSS_SELECTOR, "#run").click()

    progress = set()  # the progress bar's messages seen while waiting (SSNI's 30 NFE alone last > 0.3 s on a CPU)

    def done(driver) -> bool:
        progress.update(driver.execute_script(  # in one script: the bar's elements come and go while polled
            "return [...document.querySelectorAll('#results .progress-level-inner')].map(e => e.textContent.trim())"))
        return (len(driver.find_elements(By.CSS_SELECTOR, "#results .purify-card")) == 4
                or bool(driver.find_elements(By.CSS_SELECTOR, "#results .app-error")))

    WebDriverWait(browser, 240, poll_frequency=0.05).until(done)
    assert any(t.startswith(("attack: step", "purifying: ")) for t in progress), progress
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .app-error")
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .purify-card")
    titles = [c.find_element(By.CSS_SELECTOR, ".title").text for c in cards]
    assert titles == ["clean", "adversarial", "SaliencyDiffPurify", "SSNIPurify (on DiffPurify)"]
    assert f"label: {logic.CLASS_NAMES[int(models.labels[BROWSER_IMAGE])]}" in cards[0].text
    for card in cards:
        assert len(card.find_elements(By.CSS_SELECTOR, ".top3 li")) == 3
        assert all(label.text in logic.CLASS_NAMES for label in card.find_elements(By.CSS_SELECTOR, ".label"))
    images = browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert len(images) == 5  # 4 columns and SaliencyDiffPurify's mask
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) == 28
               for i in images)
    assert "SSNI t" in cards[3].text and "NFE: 30" in cards[3].text and "seconds" in cards[2].text
    assert "against the bare classifier" in browser.find_element(By.CSS_SELECTOR, "#results").text
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server) or r.startswith("data:") for r in resources), resources

    OUTPUTS.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1280, browser.execute_script("return document.body.scrollHeight") + 40)  # the whole page
    assert browser.save_screenshot(str(OUTPUTS / "screenshot.png"))
