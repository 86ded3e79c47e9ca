"""Robustness evaluation: per-image records, resumable and shardable runs, the ``purifytf eval`` CLI.

Python use::

    from purifytf.defended import DefendedModel
    from purifytf.attacks import AttackSettings, parse_attacks
    from purifytf.evaluation import evaluate

    defended = DefendedModel(purifier, classifier, runs=10)
    summary = evaluate(defended, dataset, parse_attacks("lee-kim"), "results/run1",
                       settings=AttackSettings(eps=8 / 255, steps=200, eot=20), indices=range(512))
"""

from .batched import pgd_eot_accuracy
from .data import BUNDLED, load_dataset
from .harness import default_device, distributed, evaluate, evaluate_batch, load_records, summarize, summary_markdown

__all__ = ["BUNDLED", "default_device", "distributed", "evaluate", "evaluate_batch", "load_dataset", "load_records",
           "pgd_eot_accuracy", "summarize", "summary_markdown"]
