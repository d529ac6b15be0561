"""Run a tool's main() the way the CLI runs a command: an error in the user's input (TqsError, a
missing or unreadable file) is one line on stderr and exit code 2, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from tqs_onnx.errors import TqsError


def run(main: Callable[[], int | None]) -> int:
    tool = Path(sys.argv[0]).name
    try:
        return main() or 0
    except TqsError as exc:
        print(f"{tool}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    except OSError as exc:
        print(f"{tool}: error: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
    return 2
