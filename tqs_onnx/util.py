"""Small shared helpers: atomic writes, progress bars, one-line errors."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (ORT's messages run to pages), or its type when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file written by another stage; a missing or unreadable file is a one-line TqsError."""
    from tqs_onnx.errors import TqsError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TqsError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise TqsError(f"{path}: not a readable {what} JSON ({type(exc).__name__})") from None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp path beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, doc: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))


LOG_EVERY_S = 30.0  # progress lines in logs (stderr not a terminal): at most one per this many seconds


def progress(items: Iterable[T], desc: str, quiet: bool = False, **kw) -> Iterable[T]:
    """A tqdm bar on a terminal; in logs and CI a plain line at most every LOG_EVERY_S seconds;
    nothing with --quiet."""
    if quiet:
        return items
    if not sys.stderr.isatty():
        return _logged(items, desc, kw.get("total"), kw.get("unit", "it"))
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True, **kw)


def _logged(items: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    start = last = time.monotonic()
    for i, item in enumerate(items):
        yield item
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            done = f"{i + 1}/{total}" if total else f"{i + 1}"
            left = f", about {_duration((now - start) / (i + 1) * (total - i - 1))} left" if total else ""
            print(f"{desc}: {done} {unit}s done, {_duration(now - start)}{left}", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
