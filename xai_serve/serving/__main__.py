"""``python -m xai_serve.serving [flags]``: the same as ``xai-serve serve [flags]``."""

from __future__ import annotations

import sys

from xai_serve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
