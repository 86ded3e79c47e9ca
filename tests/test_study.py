"""benchmarks/study.py: a tiny study end to end, resuming after an interruption, tables that agree with stats.py."""

import functools
import importlib.util
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from purifytf.classifiers import fashion_mnist_cnn
from purifytf.evaluation import harness, load_dataset, load_records
from purifytf.evaluation.stats import paired_comparison, wilson_interval
from purifytf.models import AllConvNet

_STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"
if not _STUDY.exists():
    pytest.skip("benchmarks/ is not in the source distribution: run these tests from a clone", allow_module_level=True)
_SPEC = importlib.util.spec_from_file_location("study", _STUDY)
study = sys.modules["study"] = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

TINY = study.Budget(images=4, large_images=2, large_nfe=2, steps=1, eot=1, runs=1, batch_size=2, seed=0)
ROWS = [study.Row("no defence", None),
        study.Row("DiffPurify 2 steps", "diffpure.fashion_mnist", {"steps": 2}),
        study.Row("JPEG, attacked twice", "jpeg", {"quality": 75}, attacked=({}, {"quality": 75}),
                  baselines=("DiffPurify 2 steps", "no defence"))]
TIMING = {"seconds", "peak_memory_mib"}


@pytest.fixture(scope="module")
def classifier():
    return fashion_mnist_cnn(pretrained=True)


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("bundled:fashion-mnist")


def _without_timing(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k not in TIMING}
    record["attacks"] = {name: {k: v for k, v in r.items() if k not in TIMING} for name, r in record["attacks"].items()}
    return record


def _all_records(folder: Path) -> dict[str, dict]:
    return {str(path.parent.relative_to(folder)): {i: _without_timing(r) for i, r in load_records(path.parent).items()}
            for path in sorted(folder.rglob("images.jsonl"))}


def test_tiny_study_end_to_end(tmp_path, classifier, dataset):
    result = study.run_study(ROWS, {"cnn": classifier}, ["linf"], dataset, TINY, tmp_path, progress=False)
    (table,) = result["tables"]
    rows = {r["name"]: r for r in table["rows"]}
    assert (rows["no defence"]["n"], rows["DiffPurify 2 steps"]["n"], rows["JPEG, attacked twice"]["n"]) == (4, 2, 4)
    assert rows["DiffPurify 2 steps"]["nfe"] == 2 and rows["no defence"]["nfe"] == 0
    jpeg = rows["JPEG, attacked twice"]
    assert [c["vs"] for c in jpeg["comparisons"]] == ["DiffPurify 2 steps", "no defence"]
    assert [c["n"] for c in jpeg["comparisons"]] == [2, 4]  # a 2-NFE row ran on the first large_images only
    folders = _all_records(tmp_path)
    assert set(folders) == {"cnn/linf/no-defence", "cnn/linf/diffpurify-2-steps",
                            "cnn/linf/jpeg-attacked-twice/attacked-0", "cnn/linf/jpeg-attacked-twice/attacked-1"}
    for name, expected in (("robust", jpeg["robust"]), ("clean", jpeg["clean"])):
        outcomes = [r[f"{name}_correct" if name == "clean" else name] for r in
                    folders["cnn/linf/jpeg-attacked-twice/attacked-0"].values()]
        if name == "robust":  # the per-image minimum over both attacked versions
            outcomes = [a and b["robust"] for a, b in
                        zip(outcomes, folders["cnn/linf/jpeg-attacked-twice/attacked-1"].values(), strict=True)]
        assert expected["accuracy"] == sum(outcomes) / 4
        assert tuple(expected["interval"]) == wilson_interval(sum(outcomes), 4)
    assert set(jpeg["robust_per_attack"]) == {"pgd-eot-linf", "autoattack-rand"}


def test_records_only_reports_the_records_there_are_without_attacking(tmp_path, classifier, dataset):
    """--records-only: the same tables as the run that made the records; a row part-run is reported on the images
    all its attacked versions have, marked partial; a row with an attacked version never run is reported on the
    other one, marked an upper bound; a row never run is left out; no record is added."""
    run = functools.partial(study.run_study, classifiers={"cnn": classifier}, threats=["linf"], dataset=dataset,
                            budget=TINY, records=tmp_path, progress=False)
    full = run(ROWS[1:])
    assert run(ROWS, attack=False) == full  # "no defence" never ran: left out
    version = tmp_path / "cnn/linf/jpeg-attacked-twice/attacked-1/images.jsonl"
    lines = version.read_text().splitlines(keepends=True)
    version.write_text("".join(lines[:-2]) + lines[-2][:10])  # a sitting ended in the last batch, a line torn
    (table,) = run(ROWS, attack=False)["tables"]
    jpeg = {r["name"]: r for r in table["rows"]}["JPEG, attacked twice"]
    assert (jpeg["n"], jpeg["planned"], jpeg["upper_bound"]) == (2, 4, False)
    versions = [load_records(tmp_path / f"cnn/linf/jpeg-attacked-twice/attacked-{k}") for k in (0, 1)]
    assert jpeg["robust"]["accuracy"] == sum(versions[0][i]["robust"] and versions[1][i]["robust"]
                                             for i in range(2)) / 2
    assert "| JPEG, attacked twice (partial: 2 of 4 images so far) | 2 |" in study.markdown(
        {"tables": [table], "budget": asdict(TINY), "machine": ""})
    version.unlink()
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    (table,) = run(ROWS, attack=False)["tables"]
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before  # nothing written
    jpeg = {r["name"]: r for r in table["rows"]}["JPEG, attacked twice"]
    assert jpeg["upper_bound"] and jpeg["attacked"] == [{}]
    first = load_records(tmp_path / "cnn/linf/jpeg-attacked-twice/attacked-0")
    assert jpeg["robust"]["accuracy"] == sum(first[i]["robust"] for i in range(4)) / 4
    assert [r["upper_bound"] for r in table["rows"]] == [False, True]
    assert "upper bound" not in study.markdown({**full, "budget": asdict(TINY), "machine": ""})
    text = study.markdown({"tables": [table], "budget": asdict(TINY), "machine": ""})
    assert "| JPEG, attacked twice (upper bound: attacked with the row's settings only) | 4 |" in text
    assert "| JPEG, attacked twice (upper bound) | DiffPurify 2 steps (n 2) |" in text  # the differences say so too


def test_paired_numbers_of_the_table_agree_with_stats(tmp_path, classifier, dataset):
    result = study.run_study(ROWS, {"cnn": classifier}, ["linf"], dataset, TINY, tmp_path, progress=False)
    result |= {"budget": TINY.__dict__, "machine": "test"}
    text = study.markdown(result)
    jpeg = next(r for r in result["tables"][0]["rows"] if r["name"] == "JPEG, attacked twice")
    versions = [load_records(tmp_path / "cnn/linf/jpeg-attacked-twice" / f"attacked-{k}") for k in (0, 1)]
    for comparison in jpeg["comparisons"]:
        base = load_records(tmp_path / "cnn/linf" / study._slug(comparison["vs"]))
        indices = sorted(base)[:comparison["n"]]
        robust = [all(v[i]["robust"] for v in versions) for i in indices]
        expected = paired_comparison(robust, [base[i]["robust"] for i in indices])
        assert comparison["robust"] == expected
        expected_clean = paired_comparison([versions[0][i]["clean_correct"] for i in indices],
                                           [base[i]["clean_correct"] for i in indices])
        assert comparison["clean"] == expected_clean
        assert f"{study._difference(expected)} | {study._difference(expected_clean)} |" in text
        alone = [c for c in jpeg["version_comparisons"] if c["vs"] == comparison["vs"]]
        for version, records, overrides, label in zip(alone, versions, ({}, {"quality": 75}),
                                                      ("the row's settings", "quality=75"), strict=True):
            expected = paired_comparison([records[i]["robust"] for i in indices], [base[i]["robust"] for i in indices])
            assert version == {**comparison, "attacked": overrides, "robust": expected}
            assert (f"| {comparison['vs']} (n {comparison['n']}; attacked with {label} only) | "
                    f"{study._difference(expected)} |") in text
    assert [v["accuracy"] for v in jpeg["robust_per_version"]] == [
        sum(v[i]["robust"] for i in range(4)) / 4 for v in versions]


def test_resume_after_an_interruption_gives_identical_records(tmp_path, classifier, dataset, monkeypatch):
    rows = ROWS[:2]
    study.run_study(rows, {"cnn": classifier}, ["linf"], dataset, TINY, tmp_path / "whole", progress=False)
    calls = {"n": 0}
    evaluate_batch = harness.evaluate_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate_batch(*args, **kwargs)

    monkeypatch.setattr(harness, "evaluate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(rows, {"cnn": classifier}, ["linf"], dataset, TINY, tmp_path / "resumed", progress=False)
    assert len(load_records(tmp_path / "resumed/cnn/linf/no-defence")) == 2  # one batch was written
    monkeypatch.setattr(harness, "evaluate_batch", evaluate_batch)
    study.run_study(rows, {"cnn": classifier}, ["linf"], dataset, TINY, tmp_path / "resumed", progress=False)
    assert _all_records(tmp_path / "resumed") == _all_records(tmp_path / "whole")


def test_convergence_doubles_steps_and_eot(tmp_path, classifier, dataset):
    (report,) = study.convergence(ROWS[:1], classifier, "cnn", "linf", dataset, TINY, tmp_path, images=2,
                                  progress=False)
    assert report["n"] == 2 and report["converged"] == (abs(report["robust_doubled"] - report["robust"]) <= 0.01)
    run = json.loads((tmp_path / "cnn/linf-x2/no-defence/run.json").read_text())
    assert (run["settings"]["steps"], run["settings"]["eot"]) == (2 * TINY.steps, 2 * TINY.eot)
    assert len(load_records(tmp_path / "cnn/linf-x2/no-defence")) == 2
    row = json.loads((tmp_path / "cnn/linf/no-defence/summary.json").read_text())
    assert row["images"] == TINY.images  # the study's row stays whole: its summary is not the subset's


def test_convergence_ladder_compares_each_budget_with_half_of_it(tmp_path, classifier, dataset):
    check = functools.partial(study.convergence, ROWS[:1], classifier, "cnn", "linf", dataset, TINY, tmp_path,
                              images=2, progress=False)
    (x4,) = check(scales=(4,))
    assert (x4["budget"], x4["budget_doubled"]) == ([2 * TINY.steps, 2 * TINY.eot], [4 * TINY.steps, 4 * TINY.eot])
    run = json.loads((tmp_path / "cnn/linf-x4/no-defence/run.json").read_text())
    assert (run["settings"]["steps"], run["settings"]["eot"]) == (4 * TINY.steps, 4 * TINY.eot)
    assert not (tmp_path / "cnn/linf/no-defence").exists()  # x4 against x2: the study's row is not needed
    x2, again = check(scales=(2, 4))  # x2 and x4 are reused from their records; the study row runs
    assert again == x4 and x2["budget"] == [TINY.steps, TINY.eot]
    with pytest.raises(SystemExit):
        study.main(["--convergence-scales", "3"])


def test_convergence_compares_only_the_same_attacked_versions(tmp_path, classifier, dataset):
    """A doubled run missing one of the row's attacked versions is not compared with the full row (its
    per-image minimum would be over fewer attacks: a spurious gain)."""
    check = functools.partial(study.convergence, ROWS[2:], classifier, "cnn", "linf", dataset, TINY, tmp_path,
                              images=2, progress=False)
    assert len(check()) == 1
    version = tmp_path / "cnn/linf-x2/jpeg-attacked-twice/attacked-1/images.jsonl"
    version.write_text("".join(version.read_text().splitlines(keepends=True)[:-1]))
    (part,) = check(attack=False)  # compared on the image both versions have
    assert (part["n"], part["planned"]) == (1, 2)
    table = study.markdown({"budget": asdict(TINY), "machine": "", "tables": [],
                            "convergence": [part]})
    assert "| 1 of 2 so far |" in table
    version.unlink()
    assert check(attack=False) == []


def test_cli_convergence_checks_the_rows_named(tmp_path):
    rows = ["DiffPurify DDPM t*=0.1", "DiffPurify DDIM t*=0.1"]
    result = study.main(["--rows", *rows, "--convergence", rows[0], "--convergence-images", "2", "--classifiers",
                         "cnn", "--threats", "linf", "--images", "2", "--steps", "1", "--eot", "1", "--runs", "1",
                         "--batch-size", "2", "--records", str(tmp_path / "records"), "--output",
                         str(tmp_path / "study.json"), "--no-progress", "--cache", str(tmp_path / "unused")])
    assert [c["name"] for c in result["convergence"]] == rows[:1]
    assert not (tmp_path / "records/cnn/linf-x2/diffpurify-ddim-t-0-1").exists()


def test_records_refuse_a_changed_default(tmp_path, classifier, dataset, monkeypatch):
    row, budget = ROWS[1], study.Budget(images=2, large_images=2, steps=1, eot=1, runs=1, batch_size=2)
    study.run_row(row, classifier, "cnn", "linf", dataset, budget, tmp_path, progress=False)
    run = json.loads((tmp_path / "cnn/linf/diffpurify-2-steps/run.json").read_text())
    assert run["row_settings"] == {"steps": 2} and run["purifier"] == "t_star=0.1, steps=2, sampler='ddpm'"
    build = study.make_purifier  # the same row, as if the shipped t_star had changed since its records ran
    monkeypatch.setattr(study, "make_purifier", lambda *args, **kw: build(*args, **kw, t_star=0.2))
    with pytest.raises(ValueError, match="another configuration.*purifier"):
        study.run_row(row, classifier, "cnn", "linf", dataset, budget, tmp_path, progress=False)


def test_committed_records_were_run_with_the_shipped_settings(classifier):
    """Every record folder under benchmarks/results/study/ belongs to a row of ROWS, at that row's folder, and was
    run with the purifier the row builds today: a changed shipped default (weights' config) shows here, not as a
    refused rerun."""
    rows = {row.name: row for row in study.ROWS}
    classifiers = {"cnn": classifier, "heldout": AllConvNet.from_pretrained(study.HELDOUT_CLASSIFIER)}
    digests = {name: study.weights_digest(network) for name, network in classifiers.items()}
    purifier_digests = {}
    runs = sorted((study.RESULTS / "study").rglob("run.json"))
    assert runs
    for path in runs:
        run = json.loads(path.read_text())
        row = rows[run["row"]]
        folder = path.parent.parent if path.parent.name.startswith("attacked-") else path.parent
        assert folder.name == study._slug(row.name), path
        k = int(path.parent.name.split("-")[1]) if folder != path.parent else 0
        settings = {**row.settings, **row.attacked[k]}
        assert run["row_settings"] == settings and run["view"] == row.view, path
        assert run["purifier"] == study._resolved(study.make_purifier(row.variant, classifier, **settings)), path
        assert run["classifier_weights"] == digests[run["classifier"]], path
        key = (row.name, k, run["classifier"])
        if key not in purifier_digests:
            purifier = study.make_purifier(row.variant, classifiers[run["classifier"]], **settings)
            purifier_digests[key] = None if purifier is None else study.weights_digest(purifier)
        assert run["purifier_weights"] == purifier_digests[key], path  # e.g. records of a previous IMPurify network


def test_records_of_another_purifier_network_are_refused(tmp_path, classifier, dataset, monkeypatch):
    """A retrained purifier network (same settings, other weights) never reuses the records of the previous one."""
    row, budget = ROWS[1], study.Budget(images=2, large_images=2, steps=1, eot=1, runs=1, batch_size=2)
    study.run_row(row, classifier, "cnn", "linf", dataset, budget, tmp_path, progress=False)
    build = study.make_purifier

    def retrained(*args, **kw):
        purifier = build(*args, **kw)
        with torch.no_grad():
            next(purifier.parameters()).view(-1)[0] += 1e-6
        return purifier

    monkeypatch.setattr(study, "make_purifier", retrained)
    with pytest.raises(ValueError, match="another configuration.*purifier_weights"):
        study.run_row(row, classifier, "cnn", "linf", dataset, budget, tmp_path, progress=False)


def test_records_of_another_classifier_network_are_refused(tmp_path, classifier, dataset):
    """Two networks under one classifier name (a held-out classifier retrained on another machine) never pair."""
    row = study.Row("no defence", None)
    study.run_row(row, classifier, "cnn", "linf", dataset, TINY, tmp_path, limit=2, progress=False)
    retrained = fashion_mnist_cnn(pretrained=True)
    with torch.no_grad():
        next(retrained.parameters()).view(-1)[0] += 1e-6
    assert study.weights_digest(retrained) != study.weights_digest(classifier)
    with pytest.raises(ValueError, match="another configuration"):
        study.run_row(row, retrained, "cnn", "linf", dataset, TINY, tmp_path, limit=2, progress=False)


def test_row_info_states_the_saliency_mask_density(classifier, dataset):
    images = torch.stack([dataset[i][0] for i in range(8)])
    purifier = study.make_purifier("saliency_diffpure.fashion_mnist", classifier, mask="topk", fraction=0.25)
    info = study._row_info(purifier, images)
    assert info == {"mask_density": pytest.approx(0.25, abs=1 / 784)}  # top-k: a quarter of the pixels
    assert study._row_info(None, images) == {}
    accuracy = {"accuracy": 1.0, "interval": (0.6, 1.0)}
    alone = {"accuracy": 0.875, "interval": (0.5, 1.0)}
    row = {"name": "S", "n": 8, "nfe": 10, "seconds_per_image": 1.0, "comparisons": [], "mask_density": 0.02,
           "clean": accuracy, "robust": accuracy, "robust_per_attack": {"a": accuracy, "b": alone}}
    table = study.markdown({"budget": asdict(TINY), "machine": "m",
                            "tables": [{"title": "T", "classifier": "cnn", "attacks": "a,b", "rows": [row]}]})
    assert "| defence | n | NFE | s / image | clean % [95 % CI] | robust % [95 % CI] | a only | b only |" in table
    assert "| S (mask 2.0 %) | 8 | 10 | 1.00 | 100.0 [60.0, 100.0] | 100.0 [60.0, 100.0] | 100.0 | 87.5 |" in table
    assert "Paired differences" not in table  # no row is compared with another


def test_cli_writes_json_and_markdown(tmp_path):
    args = ["--rows", "no defence", "JPEG q=75", "--classifiers", "cnn", "--threats", "linf", "l2", "--images", "2",
            "--steps", "1", "--eot", "1", "--runs", "1", "--batch-size", "2", "--records", str(tmp_path / "records"),
            "--output", str(tmp_path / "study.json"), "--no-progress", "--cache", str(tmp_path / "unused")]
    result = study.main(args)
    assert json.loads((tmp_path / "study.json").read_text()) == json.loads(json.dumps(result))
    text = (tmp_path / "study.md").read_text()
    assert "### Linf 8/255, classifier cnn" in text and "pgd-eot-l2,pgd-eot-l2-sign" in text
    assert [t["threat"] for t in result["tables"]] == ["linf", "l2"]
    regenerated = study.main([*args, "--records-only"])  # the same tables, stated as regenerated from the records
    assert regenerated["tables"] == result["tables"]
    assert regenerated["machine"].startswith("tables regenerated from the per-image records without attacking (on ")
    assert not result["machine"].startswith("tables regenerated")


def test_compare_pairs_the_images_both_rows_ran():
    row = {"name": "method", "indices": [0, 1, 2, 3], "robust": [True, True, False, True],
           "clean": [True, True, True, False]}
    baseline = {"name": "DiffPure", "indices": [0, 1, 2], "robust": [False, True, True], "clean": [True, True, True]}
    comparison = study.compare(row, baseline)
    assert comparison["n"] == 3 and comparison["vs"] == "DiffPure"
    assert comparison["robust"] == paired_comparison([True, True, False], [False, True, True])
    assert comparison["clean"] == paired_comparison([True, True, True], [True, True, True])
    with pytest.raises(ValueError, match="same images"):
        study.compare(row, {**baseline, "indices": [0, 2, 1]})


def test_torchrun_ranks_share_the_batches_and_match_one_process(tmp_path):
    import os
    import subprocess

    args = ["--rows", "no defence", "JPEG q=75", "--classifiers", "cnn", "--threats", "linf", "--images", "4",
            "--steps", "1", "--eot", "1", "--runs", "1", "--batch-size", "1", "--no-progress",
            "--cache", str(tmp_path / "unused")]
    single = study.main([*args, "--records", str(tmp_path / "single"), "--output", str(tmp_path / "single.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(study.__file__)), *args, "--device", "cpu", "--records", str(tmp_path / "sharded"),
               "--output", str(tmp_path / "sharded.json")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in (tmp_path / "sharded/cnn/linf/jpeg-q-75").glob("images*.jsonl")} == {
        "images.jsonl", "images.rank1.jsonl"}
    assert _all_records(tmp_path / "sharded") == _all_records(tmp_path / "single")
    sharded, single = json.loads((tmp_path / "sharded.json").read_text()), json.loads(json.dumps(single))
    for a, b in zip(sharded["tables"][0]["rows"], single["tables"][0]["rows"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds_per_image"} == {
            k: v for k, v in b.items() if k != "seconds_per_image"}
    assert sharded["machine"].split(", ")[2].startswith("2 x ")


def test_model_card_shows_the_committed_study_tables():
    """MODEL_CARD.md's study tables are the accuracy tables of the committed ``study*.md``, verbatim: regenerated by
    the command beside them, not retyped."""
    card = (study.RESULTS.parent.parent / "MODEL_CARD.md").read_text()
    for name in ("study.md", "study-heldout.md"):
        found = re.findall(r"\n(\| defence \| n \| NFE \| s / image \| clean .*?)\n\n",
                           (study.RESULTS / name).read_text() + "\n", re.S)
        assert found, name
        for table in found:
            assert table in card, f"MODEL_CARD.md lacks {name}'s table starting {table.splitlines()[2]!r}"
