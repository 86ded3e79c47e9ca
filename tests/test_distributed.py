"""``torchrun`` scale-out: 2 gloo processes give exactly the per-image results of 1 process."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from purifytf.evaluation import load_records
from purifytf.evaluation.cli import main

_spec = importlib.util.spec_from_file_location("eval_cli_tests", Path(__file__).with_name("test_eval_cli.py"))
eval_cli_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli_tests)

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_workers_match_one_process_and_resume_its_partial_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    args = eval_cli_tests.write_setup(tmp_path)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main([*args, "--output", str(single)]) == 0
    assert main([*args, "--output", str(sharded), "--num-images", "2"]) == 0  # a 1-process start to resume

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "purifytf.evaluation.cli", *args, "--output", str(sharded), "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    files = {path.name: path.read_text().splitlines() for path in sharded.glob("images*.jsonl")}
    assert set(files) == {"images.jsonl", "images.rank1.jsonl"}
    indices = [json.loads(line)["index"] for lines in files.values() for line in lines]
    assert sorted(indices) == list(range(eval_cli_tests.NUM_IMAGES))  # each image once, no padding duplicates
    assert eval_cli_tests.comparable(load_records(sharded)) == eval_cli_tests.comparable(load_records(single))
    summaries = [json.loads((d / "summary.json").read_text()) for d in (single, sharded)]
    for key in ("images", "clean_accuracy", "robust_accuracy", "robust_accuracy_overall"):
        assert summaries[0][key] == summaries[1][key]
    assert "robust: all attacks" in result.stdout


def test_default_device_gives_each_rank_a_gpu_and_shares_them_when_ranks_outnumber_gpus(monkeypatch):
    import torch

    from purifytf.evaluation import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert default_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_device() == torch.device("cuda", 0)  # 8 ranks on the one H200
