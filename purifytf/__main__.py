"""``purifytf`` command line: ``python -m purifytf {app,demo,eval,purify,train} ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "app": ("purifytf.app", "web page: attack an image and watch each purifier clean it (the app extra)"),
    "demo": ("purifytf.demo", "run every purifier on the embedded default models"),
    "eval": ("purifytf.evaluation.cli", "robust accuracy under adaptive attacks"),
    "purify": ("purifytf.purify", "purify PNG/JPEG files or folders"),
    "train": ("purifytf.train.cli", "train a purifier's network"),
}


def main(argv: list[str] | None = None) -> int:
    description = ("Adversarial purification: purify images, run the demo on the embedded models, evaluate "
                   "robustness under adaptive attacks, train networks, or open the web page.")
    parser = argparse.ArgumentParser(prog="purifytf", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
