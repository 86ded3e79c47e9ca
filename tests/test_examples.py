"""The examples run as documented (they are the README's promises)."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_nfe_table_matches_the_defaults(capsys):
    runpy.run_path(str(EXAMPLES[0].parent / "nfe_per_purifier.py"), run_name="__main__")
    rows = dict(line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[2:])
    assert rows["DiffPurify (t*=0.1, DDPM)"] == "100" and rows["IMPurify (tiny)"] == "1"
    assert rows["SaliencyDiffPurify (spacing 20)"] == "10" and rows["SSNIPurify (on DiffPurify, T'=20)"] == "120"
