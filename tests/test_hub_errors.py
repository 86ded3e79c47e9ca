"""Loading errors say what to do: a repo id or registered weights name that is neither cached nor reachable
fails within seconds, naming the repo (or name), the revision, the offline mode and the three ways out."""

import socket
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from purifytf import hub
from purifytf.base import Purifier
from purifytf.models import AllConvNet, SmallCNN

REPO = "someorg/does-not-exist"
WAYS_OUT = ("connect to the internet", "pre-download it into the cache", "pass a local directory")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "hf-cache"


@pytest.fixture
def offline(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def silent_endpoint(empty_cache, monkeypatch):
    """HF_HUB_OFFLINE unset and the Hub endpoint a server that accepts connections but never answers
    (huggingface_hub alone would wait 10 s per request and retry 5 times)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    yield
    server.close()


def _fails_fast(load, *names: str) -> str:
    start = time.perf_counter()
    with pytest.raises(hub.WeightsUnavailableError) as error:
        load()
    assert time.perf_counter() - start < 5
    message = str(error.value)
    for text in (*names, *WAYS_OUT):
        assert text in message
    return message


def test_offline_repo_id(offline):
    message = _fails_fast(lambda: Purifier.from_pretrained(REPO), repr(REPO), "revision 'main'")
    assert "Offline mode is on" in message and "HF_HUB_OFFLINE" in message


def test_unreachable_repo_id_and_revision(silent_endpoint):
    message = _fails_fast(lambda: Purifier.from_pretrained(REPO, revision="v2"), repr(REPO), "revision 'v2'")
    assert "Offline mode is off" in message and "cannot be reached" in message


def test_unreachable_registered_weights(silent_endpoint):
    message = _fails_fast(lambda: hub.load_backbone("ddpm-cifar10-32"), "weights 'ddpm-cifar10-32'",
                          "'google/ddpm-cifar10-32'", "revision 'main'")
    assert "load_backbone('ddpm-cifar10-32', path=FILE)" in message


def test_unreachable_url_weights(silent_endpoint, monkeypatch, tmp_path):
    w = hub.Weights(name="tiny-url", config={}, url=f"{hub.constants.ENDPOINT}/tiny.pt", sha256="0" * 64)
    message = _fails_fast(lambda: hub.weights_file(w, cache_dir=tmp_path), "weights 'tiny-url'", "cannot be reached")
    assert f"put the file in {tmp_path}" in message and "HF_HUB_CACHE" not in message  # not a Hub cache


def test_a_failing_hub_request_is_not_reported_as_a_missing_file(empty_cache, monkeypatch):
    """Online, huggingface_hub raises LocalEntryNotFoundError when a request fails (a 5xx, a proxy): that is
    the Hub not answering, not the repo lacking the file."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_unreachable", lambda endpoint: None)  # the endpoint answered the probe

    def failing(*args, **kwargs):
        raise hub.LocalEntryNotFoundError("503 Service Unavailable")

    monkeypatch.setattr(hub, "hf_hub_download", failing)
    message = _fails_fast(lambda: hub.hub_download(REPO, ("a.safetensors", "b.bin")), repr(REPO))
    assert "could not be queried (503 Service Unavailable)" in message and "has none of these files" not in message


@pytest.mark.parametrize("model", [Purifier, SmallCNN, AllConvNet])
def test_a_missing_local_folder_is_not_taken_for_a_repo_id(tmp_path, model):
    for path in (tmp_path / "nope", "./nope", "runs/a/b"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            model.from_pretrained(path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        model.from_pretrained(tmp_path / "model.safetensors")


def test_a_saved_classifier_loads_strictly_from_safetensors(tmp_path):
    torch.manual_seed(0)
    saved = SmallCNN(width=4, hidden=8).eval()
    saved.save_pretrained(tmp_path)
    loaded = SmallCNN.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 1, 28, 28)
    assert loaded.head[1].in_features == saved.head[1].in_features and torch.equal(loaded(x), saved(x))
    state = safetensors.torch.load_file(tmp_path / "model.safetensors")
    safetensors.torch.save_file({**state, "extra": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="extra"):
        SmallCNN.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        SmallCNN.from_pretrained(tmp_path)


def test_torch_hub_entry_point(offline):
    repo = Path(__file__).resolve().parents[1]
    _fails_fast(lambda: torch.hub.load(str(repo), "diff_purify", source="local", pretrained=True,
                                       weights="ddpm-cifar10-32"), "'google/ddpm-cifar10-32'", "Offline mode is on")


def test_factory_create_and_load(offline):
    from purifytf.factory import create_purifier, load_purifier

    _fails_fast(lambda: create_purifier("diffpure.ddpm_cifar10", pretrained=True), "weights 'ddpm-cifar10-32'",
                "'google/ddpm-cifar10-32'", "revision 'main'", "Offline mode is on")
    _fails_fast(lambda: load_purifier(REPO, revision="abc"), repr(REPO), "revision 'abc'", "Offline mode is on")
