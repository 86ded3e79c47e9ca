"""Hugging Face Space entry point: ``python app.py`` serves ``purifytf app`` (see purifytf/app/)."""

import sys

from purifytf.__main__ import main
from purifytf.app import build_page, launch

__all__ = ["build_page", "launch"]

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
