"""``purifytf eval``: records and summaries, resuming after an interruption, loaders, clear errors."""

import argparse
import json
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.transforms import v2

from purifytf import DefendedModel, DiffPurify, create_purifier
from purifytf.attacks import AttackSettings, parse_attacks
from purifytf.evaluation import harness, load_dataset, load_records
from purifytf.evaluation.cli import add_arguments, defended_model, main
from purifytf.evaluation.loading import load_classifier, load_purifier

TOY_MODULE = textwrap.dedent('''
    """Toy defence for the evaluation tests: 1x4x4 images, brightness decides the class."""
    import torch
    from torch import nn

    from purifytf import DiffPurify, OracleBackbone


    def classifier():
        linear = nn.Linear(16, 3)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor([-1.0, 1.0, 0.0])[:, None].expand(3, 16) * 20 / 16)
            linear.bias.copy_(torch.tensor([10.0, -10.0, -20.0]))
        return nn.Sequential(nn.Flatten(), linear)


    def purifier(steps=2):
        prototypes = torch.tensor([0.3, 0.7])[:, None, None, None].expand(2, 1, 4, 4).clone()
        return DiffPurify(OracleBackbone(prototypes), t_star=0.2, steps=steps)
''')

NUM_IMAGES = 6
ATTACKS = ["pgd-eot-linf", "pgd-eot-linf@bpda", "autoattack-rand", "fgsm@transfer"]


def write_setup(directory: Path) -> list[str]:
    """Writes ``toy_eval.py`` and ``data.npz`` into ``directory``; returns the CLI arguments using them
    (``directory`` must be importable: on ``sys.path`` / ``PYTHONPATH``)."""
    (directory / "toy_eval.py").write_text(TOY_MODULE)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_IMAGES) % 2
    images = (0.4 + 0.2 * labels.float())[:, None, None, None] + 0.05 * torch.randn(NUM_IMAGES, 4, 4, 1, generator=g)
    np.savez(directory / "data.npz", images=(images.clamp(0, 1) * 255).round().byte().numpy(), labels=labels.numpy())
    return ["--purifier", "toy_eval:purifier", "--classifier", "toy_eval:classifier", "--normalize", "none",
            "--dataset", f"npz:{directory / 'data.npz'}", "--attacks", ",".join(ATTACKS), "--eps", "24/255",
            "--step", "0.03", "--steps", "3", "--apgd-steps", "3", "--eot", "2", "--runs", "3", "--seed", "5",
            "--batch-size", "2", "--no-progress"]


def comparable(records: dict[int, dict]) -> dict[int, dict]:
    """Records without their timings and memory (which vary from run to run)."""
    def strip(record: dict) -> dict:
        attacks = {k: {f: v for f, v in a.items() if f != "seconds"} for k, a in record["attacks"].items()}
        return {**{k: v for k, v in record.items() if k not in ("seconds", "peak_memory_mib")}, "attacks": attacks}
    return {i: strip(r) for i, r in records.items()}


@pytest.fixture
def setup(tmp_path, monkeypatch) -> list[str]:
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_setup(tmp_path)


def test_records_and_summary(setup, tmp_path):
    out = tmp_path / "out"
    assert main([*setup, "--output", str(out)]) == 0
    records = load_records(out)
    assert sorted(records) == list(range(NUM_IMAGES))
    assert [records[i]["seed"] for i in range(NUM_IMAGES)] == [5, 5, 7, 7, 9, 9]  # seed + first index of the batch
    summary = json.loads((out / "summary.json").read_text())
    names = ATTACKS
    assert list(summary["robust_accuracy"]) == names
    for record in records.values():
        assert record["nfe"] == 2 and record["nfe_total"] > 0 and record["seconds"] > 0
        assert all(a.get("skipped") for a in record["attacks"].values()) != record["clean_correct"]
        assert record["robust"] == (record["clean_correct"] and all(record["attacks"][n]["robust"] for n in names))
    assert summary["robust_accuracy_overall"] == np.mean([r["robust"] for r in records.values()])
    assert summary["robust_accuracy_overall"] <= min(summary["robust_accuracy"].values())
    assert "pgd-eot-linf@bpda" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["seed"] == 5


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    assert main([*setup, "--output", str(tmp_path / "full")]) == 0
    real, calls = harness.evaluate_batch, []

    def interrupted(*args, **kwargs):
        calls.append(args[5])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_batch", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        main([*setup, "--output", str(out)])
    assert len(load_records(out)) == 2 and not (out / "summary.json").exists()
    with (out / "images.jsonl").open("a") as file:
        file.write('{"index": 2, "label"')  # killed in the middle of a write
    assert main([*setup, "--output", str(out)]) == 0
    assert calls == [5, 7, 7, 9]  # batch seeds: one batch done, one interrupted, the rest on the rerun
    lines = (out / "images.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == list(range(NUM_IMAGES))
    assert comparable(load_records(out)) == comparable(load_records(tmp_path / "full"))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "full")]
    assert summaries[0]["robust_accuracy"] == summaries[1]["robust_accuracy"]


class _Noisy(nn.Module):
    """A stochastic purifier whose noise decides most predictions."""

    def forward(self, x):
        return x + torch.randn_like(x)


def test_the_vote_on_adversarial_images_never_replays_the_clean_vote():
    """A transfer FGSM draws no random numbers: the RNG it leaves is where the clean vote began, so a vote
    continuing from it would see the clean vote's noise and agree with it image for image."""
    torch.manual_seed(0)
    defended = DefendedModel(_Noisy(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), runs=1, normalize=None)
    x = torch.rand(64, 3, 8, 8)
    torch.manual_seed(7)
    y = defended.predict(x)  # labels: the clean vote of seed 7, so every image is correctly classified
    records = harness.evaluate_batch(defended, x, y, parse_attacks("fgsm@transfer"), AttackSettings(eps=1e-7), 7)
    assert all(r["clean_correct"] for r in records)
    judged = [r["attacks"]["fgsm@transfer"]["pred"] for r in records]
    torch.manual_seed(harness.judge_seed(7))
    assert judged == defended.predict(x).tolist() != y.tolist()  # x_adv is x to 1e-7: only the noise differs


def test_records_hold_the_perturbation_norms_of_either_threat_model():
    torch.manual_seed(0)
    undefended = DefendedModel(None, nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), normalize=None)
    x = torch.rand(16, 3, 8, 8)
    y = undefended.predict(x)
    settings = AttackSettings(eps=4 / 255, eps_l2=0.25, steps=5)
    records = harness.evaluate_batch(undefended, x, y, parse_attacks("pgd-eot-linf,pgd-eot-l2"), settings, 0)
    norms = torch.tensor([[r["attacks"][a][n] for r in records] for a in ("pgd-eot-linf", "pgd-eot-l2")
                         for n in ("linf", "l2")])
    assert torch.allclose(norms[0], torch.tensor(4 / 255)) and (norms[1] >= norms[0]).all()  # Linf: on the box
    assert (norms[3] <= 0.25 + 1e-6).all() and (norms[3] > 0.24).all()  # L2: in the ball (clipping to [0, 1]
    assert (norms[2] <= norms[3]).all()  # may pull an image inside)


def test_more_images_extend_a_run_as_a_fresh_run_but_another_configuration_is_refused(setup, tmp_path, capsys):
    """3 images (batches [0, 1], [2]) extended to all 6 ([0, 1], [2, 3], [4, 5]): image 2's batch is redone with its
    new batch-mate, so every record and the summary equal a fresh run's."""
    out = tmp_path / "out"
    assert main([*setup, "--output", str(out), "--num-images", "3"]) == 0
    assert load_records(out)[2]["batch"] == [2, 0, 1]
    assert main([*setup, "--output", str(out)]) == 0
    assert main([*setup, "--output", str(tmp_path / "fresh")]) == 0
    places = harness.batch_places(range(6), 2)
    extended, fresh = load_records(out, places), load_records(tmp_path / "fresh")
    assert extended[2]["batch"] == [2, 0, 2] and comparable(extended) == comparable(fresh)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (out, tmp_path / "fresh")]
    assert summaries[0]["robust_accuracy"] == summaries[1]["robust_accuracy"]
    assert main([*setup, "--output", str(out), "--eps", "8/255"]) == 2
    assert "another configuration" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"--attacks": "pgd-eot"}, "unknown attack 'pgd-eot'"),
    ({"--classifier": "no_such_model"}, "unknown classifier 'no_such_model'"),
    ({"--classifier": "test_resnet"}, "random weights"),
    ({"--classifier": "toy_eval:missing"}, "no callable 'missing'"),
    ({"--dataset": "npz:missing.npz"}, "no such file"),
    ({"--dataset": "cifar10"}, "KIND:ARGUMENT"),
    ({"--dataset": "bundled:mnist"}, "no bundled dataset"),
    ({"--num-images": "100"}, "--num-images"),
    ({"--normalize": "imagenet"}, "torchvision weights"),
    ({"--purifier": "none", "--purifier-seed": "1"}, "takes no"),
    ({"--purifier-option": "steps"}, "KEY=VALUE"),
    ({"--runs": "0"}, "runs must be"),
])
def test_bad_arguments(setup, tmp_path, capsys, change, message):
    args = list(setup)
    for key, value in change.items():
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_bad_number_is_an_argparse_error(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*setup, "--output", str(tmp_path / "out"), "--eps", "8/0"])
    assert exit_info.value.code == 2 and "fraction" in capsys.readouterr().err


@pytest.mark.parametrize("absent", ["torchattacks", "scipy"])  # torchattacks imports scipy on import
def test_a_missing_attack_library_is_refused_before_any_image(setup, tmp_path, monkeypatch, capsys, absent):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else real(name, *a))
    assert main([*setup, "--output", str(tmp_path / "out")]) == 2
    assert f"autoattack-rand needs {absent}, not installed: pip install" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_saved_purifier_loads_without_its_class_and_takes_options(setup, tmp_path):
    import toy_eval

    toy_eval.purifier().save_pretrained(tmp_path / "saved")
    assert isinstance(load_purifier(str(tmp_path / "saved")), DiffPurify)  # config.json names the class
    with pytest.raises(ValueError, match="holds a DiffPurify, not a SSNIPurify"):
        load_purifier(str(tmp_path / "saved"), "SSNIPurify")
    purifier = load_purifier(str(tmp_path / "saved"), "DiffPurify", {"steps": 1}, checkpoint=True, seed=3)
    assert isinstance(purifier, DiffPurify) and purifier.steps == 1 and purifier.checkpoint and purifier.seed == 3


def test_purifier_by_variant_name_is_pretrained():
    """A name of list_purifiers (shared with `purifytf purify`): the variant with its weights and the options."""
    purifier = load_purifier("diffpure.fashion_mnist", options={"steps": 2}, seed=1)
    expected = create_purifier("diffpure.fashion_mnist", pretrained=True)
    assert isinstance(purifier, DiffPurify) and purifier.steps == 2 and purifier.seed == 1
    torch.testing.assert_close(purifier.state_dict(), expected.state_dict())
    with pytest.raises(ValueError, match="unknown purifier 'diffpure'.*one of"):
        load_purifier("diffpure")
    with pytest.raises(ValueError, match="diffpure.fashion_mnist.*unexpected keyword argument 'step'"):
        load_purifier("diffpure.fashion_mnist", options={"step": 2})


def test_a_saved_saliency_purifier_gets_a_copy_of_the_classifier_architecture(tmp_path):
    """The CLI's classifier gives a saved SaliencyDiffPurify its architecture; the copy takes the saved weights
    and the classifier passed in is not changed. Purifiers without a classifier ignore it."""
    from purifytf.classifiers import fashion_mnist_cnn

    saved = create_purifier("saliency_diffpure.fashion_mnist", pretrained=True)
    saved.save_pretrained(tmp_path / "sdp")
    untrained = fashion_mnist_cnn(pretrained=False)
    before = {k: v.clone() for k, v in untrained.state_dict().items()}
    with pytest.raises(ValueError, match="needs classifier="):
        load_purifier(str(tmp_path / "sdp"))
    loaded = load_purifier(str(tmp_path / "sdp"), classifier=untrained)
    torch.testing.assert_close(loaded.state_dict(), saved.state_dict())
    torch.testing.assert_close(untrained.state_dict(), before)
    normalising = nn.Sequential(v2.Normalize([0.5], [0.25]), untrained)  # what `eval --normalize 0.5:0.25` gives
    with pytest.raises(ValueError, match="does not have the architecture given.*--normalize none"):
        load_purifier(str(tmp_path / "sdp"), classifier=normalising)
    create_purifier("diffpure.fashion_mnist", pretrained=True).save_pretrained(tmp_path / "dp")
    broken = create_purifier("diffpure.fashion_mnist", pretrained=True)
    broken.backbone.register_buffer("extra", torch.zeros(1))  # a damaged save: not the classifier's fault
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(RuntimeError, match="extra"):
        load_purifier(str(tmp_path / "broken"), classifier=untrained)
    assert isinstance(load_purifier(str(tmp_path / "dp"), classifier=untrained), DiffPurify)


def test_timm_classifier_with_safetensors_weights(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = load_classifier("test_resnet", str(tmp_path / "w.safetensors"), num_classes=3)
    assert not loaded.training
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def test_dataset_formats(tmp_path):
    from PIL import Image

    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    (tmp_path / "images.idx").write_bytes(_idx_bytes(images))
    (tmp_path / "labels.idx").write_bytes(_idx_bytes(np.array([4, 7])))
    idx = load_dataset(f"idx:{tmp_path / 'images.idx'},{tmp_path / 'labels.idx'}")
    image, label = idx[1]
    assert image.shape == (1, 3, 3) and label == 7 and torch.allclose(image[0] * 255, torch.tensor(images[1]).float())
    for name in ("a", "b"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (6, 5), (255, 0, 0)).save(tmp_path / "folder" / name / "0.png")
    image, label = load_dataset(f"folder:{tmp_path / 'folder'}", size=4)[1]
    assert image.shape == (3, 4, 4) and label == 1 and image[0].min() > 0.99 and image[1].max() < 0.01
    Image.new("L", (6, 5), 128).save(tmp_path / "folder" / "a" / "1.png")  # a grey file among colour ones
    mixed = load_dataset(f"folder:{tmp_path / 'folder'}")
    assert [mixed[i][0].shape for i in range(3)] == [(3, 5, 6)] * 3


def test_array_data_out_of_range_is_refused_and_every_byte_order_is_read(tmp_path):
    images = np.full((2, 3, 3), 200.0, np.float32)
    np.savez(tmp_path / "float255.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\], got values in \[200, 200\]"):
        load_dataset(f"npz:{tmp_path / 'float255.npz'}")
    np.savez(tmp_path / "u16.npz", images=np.full((2, 3, 3), 65535, np.uint16), labels=np.array([0, 1]))
    assert load_dataset(f"npz:{tmp_path / 'u16.npz'}")[0][0].max() == 1
    wide = np.array([[[0, 255], [7, 9]]], ">i2")  # IDX type 0x0B: big-endian int16
    (tmp_path / "wide.idx").write_bytes(bytes([0, 0, 0x0B, 3]) + np.array(wide.shape, ">u4").tobytes() + wide.tobytes())
    (tmp_path / "one.idx").write_bytes(_idx_bytes(np.array([3])))
    image, label = load_dataset(f"idx:{tmp_path / 'wide.idx'},{tmp_path / 'one.idx'}")[0]
    assert label == 3 and torch.equal(image[0] * 255, torch.tensor([[0.0, 255], [7, 9]]))


def test_reports_robustbench_model_info_and_hub_model_index(setup, tmp_path):
    import toy_eval
    import yaml
    from huggingface_hub import ModelCard

    from purifytf import hub

    out = tmp_path / "out"
    assert main([*setup, "--output", str(out), "--model-name", "toy defence"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    info = json.loads((out / "model_info.json").read_text())
    percent = lambda v: f"{100 * v:.2f}"  # noqa: E731
    assert {k: info[k] for k in ("name", "dataset", "threat_model", "eps", "number_forward_passes")} == {
        "name": "toy defence", "dataset": "data", "threat_model": "Linf", "eps": "24/255", "number_forward_passes": 3}
    assert info["clean_acc"] == percent(summary["clean_accuracy"])
    assert info["autoattack_acc"] == percent(summary["robust_accuracy"]["autoattack-rand"])
    assert info["external"] == percent(summary["robust_accuracy_overall"])  # every attack here is Linf
    ours = info["purifytf"]
    assert ours["images"] == NUM_IMAGES and ours["seed"] == 5 and ours["batch_size"] == 2
    assert ours["settings"]["steps"] == 3 and ours["settings"]["eot"] == 2 and ours["attacks"] == ATTACKS

    seeded = tmp_path / "seeded"  # a seeded defence predicts in one pass: RobustBench counts one
    assert main([*setup, "--output", str(seeded), "--attacks", "fgsm@transfer", "--purifier-seed", "1"]) == 0
    assert json.loads((seeded / "model_info.json").read_text())["number_forward_passes"] == 1

    index = yaml.safe_load((out / "model_index.yaml").read_text())["model-index"][0]
    assert index["name"] == "toy defence"

    purifier = toy_eval.purifier()
    hub.model_card(purifier, eval_run=out)
    purifier.save_pretrained(tmp_path / "saved")
    results = ModelCard.load(tmp_path / "saved" / "README.md").data.eval_results
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        ("data", "accuracy", float(info[k])) for k in ("clean_acc", "autoattack_acc", "external")]
    assert "AutoAttack" in results[1].metric_name and "pgd-eot-linf@bpda" in results[2].metric_name
    assert "Linf eps=24/255" in results[2].metric_name


def test_model_info_threat_model_and_eps():
    from purifytf.evaluation.report import eps_text, model_info, threat_model

    assert [eps_text(v) for v in (8 / 255, 4 / 255, 0.5, 0.031)] == ["8/255", "4/255", "0.5", "0.031"]
    assert [threat_model(a) for a in ("pgd-eot-l2-sign", "bpda-eot", "fgsm@transfer", "cw")] == [
        "L2", "Linf", "Linf", None]
    summary = {"images": 4, "clean_accuracy": 0.75, "robust_accuracy": {"pgd-eot-l2": 0.5, "cw": 0.0},
               "robust_accuracy_by_threat_model": {"L2": 0.5}, "nfe_per_purification": 2, "seeds": "",
               "passes_per_prediction": 1,
               "config": {"settings": {"eps": 8 / 255, "eps_l2": 0.5}, "runs": 1, "seed": 0, "batch_size": 4,
                          "vote": "majority"}}
    info = model_info(summary, "m", "cifar10")
    assert (info["threat_model"], info["eps"], info["external"]) == ("L2", "0.5", "50.00")
    assert "autoattack_acc" not in info
    transfer = {**summary, "robust_accuracy": {"fgsm@transfer": 1.0, "pgd-eot-linf@surrogate": 0.75},
                "robust_accuracy_by_threat_model": {"Linf": 0.75}}  # no attack on the defence itself
    info = model_info(transfer, "m", "cifar10")
    assert "external" not in info and "no attack on the defence itself" in info["footnote"]
    bpda = {**transfer, "robust_accuracy": {"pgd-eot-linf@bpda": 0.5}, "robust_accuracy_by_threat_model": {"Linf": 0.5}}
    assert model_info(bpda, "m", "cifar10")["external"] == "50.00"
    mixed = {**summary, "robust_accuracy": {"pgd-eot-l2": 0.5, "fgsm@transfer": 1.0},
             "robust_accuracy_by_threat_model": {"L2": 0.5, "Linf": 0.75}}  # the adaptive attack decides: L2
    assert (model_info(mixed, "m", "cifar10")["threat_model"], model_info(mixed, "m", "cifar10")["external"]) == (
        "L2", "50.00")
    assert "footnote" not in model_info({**summary, "robust_accuracy": {"cw": 0.0},
                                         "robust_accuracy_by_threat_model": {}}, "m", "cifar10")


@pytest.mark.parametrize("normalize", ["none", "0.5:0.25"])
def test_a_named_saliency_purifier_looks_at_the_defended_classifier(normalize):
    """``--classifier`` reaches a named saliency variant (not the bundled classifier); with ``--normalize`` the
    saliency reads that network behind the normalisation, on [0, 1] images, as the defended model does."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--purifier", "saliency_diffpure.fashion_mnist", "--classifier",
                              "purifytf:fashion_mnist_cnn", "--normalize", normalize, "--dataset", "bundled:x",
                              "--output", "out"])
    defended = defended_model(args, channels=1)
    reader = defended.purifier.classifier
    x = torch.rand(2, 1, 28, 28)
    if normalize == "none":
        assert defended.normalization is None and reader is defended.classifier
    else:
        assert defended.normalization == ((0.5,), (0.25,))
        assert isinstance(reader, nn.Sequential) and reader[1] is defended.classifier
        torch.testing.assert_close(reader(x), defended.classifier(defended.normalize(x)))


def test_three_value_statistics_fit_a_grey_classifier_without_convolutions(monkeypatch):
    """The data's channel count decides when the classifier names none (ImageNet's stats -> their means)."""
    module = types.ModuleType("toy_linear")
    module.classifier = lambda: nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    monkeypatch.setitem(sys.modules, "toy_linear", module)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--purifier", "none", "--classifier", "toy_linear:classifier",
                              "--normalize", "0.485,0.456,0.406:0.229,0.224,0.225", "--dataset", "bundled:x",
                              "--output", "out"])
    defended = defended_model(args, channels=1)
    assert defended.normalization == ((0.449,), (0.226,))
    assert defended(torch.rand(2, 1, 28, 28)).shape == (2, 10)
