"""``python -m slimgpt ...``: the same as the ``slimgpt`` command (slimgpt.cli)."""

import sys

from slimgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
