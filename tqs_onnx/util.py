"""Small shared helpers: atomic writes, progress bars, one-line errors."""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
FRONTIER_CHECKPOINT = "frontier.ckpt.jsonl"  # pareto's checkpoint in its output folder


# ORT puts the C++ source location and function signature before its message:
# "... failed:/onnxruntime_src/.../model.cc:181 onnxruntime::Model::Model(onnx::ModelProto&&, ...) Unsupported ..."
_ORT_SOURCE = re.compile(r"/\S+\.(?:cc|cpp|h):\d+ (?:[\w:~<>,*& ]+\((?:[^()]|\([^()]*\))*\)(?: const)? )?")


@contextlib.contextmanager
def silenced_output() -> Iterator[None]:
    """stdout and stderr of this process sent to /dev/null at the file-descriptor level, where C++
    libraries write too (onnxruntime-gpu's CUDA probe on a machine without a GPU prints to both)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (ORT's messages run to pages, and start with a C++ source location
    and signature, which are dropped), or its type when it has no text."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = _ORT_SOURCE.sub("", text.splitlines()[0])
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    return (cut[:cut.rfind(" ")] if " " in cut[limit // 2:] else cut) + "…"  # at a word, and says so


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file written by another stage; a missing or unreadable file is a one-line TqsError."""
    from tqs_onnx.errors import TqsError

    path = Path(path)
    try:
        text = path.read_text()
        if not text.strip():
            raise TqsError(f"{path}: empty file, not a {what} JSON (a run stopped before writing it?)")
        return json.loads(text)
    except FileNotFoundError:
        raise TqsError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        lines = exc.doc.count("\n") + 1
        raise TqsError(f"{path}: not a readable {what} JSON: {exc.msg.lower()} (line {exc.lineno} of {lines}, "
                       f"column {exc.colno})") from None
    except (OSError, ValueError) as exc:
        raise TqsError(f"{path}: not a readable {what} JSON ({type(exc).__name__})") from None


# Bytes a name may grow by in what is written beside it: a temporary (".NAME.<host>-<pid>.<8>.tmp"), a
# checkpoint ("NAME.ckpt.jsonl"), a plan's codes file ("STEM.<12 hex>.codes.npz") and that file's own temporary.
NAME_ROOM = 64
TEMP_ROOM = 32  # of which a temporary alone needs (an 8-character host tag, pids up to 7 digits)


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """8 hex characters naming this host and its process-id namespace (a container has its own): a pid
    in a temporary's name means something only where the tag is the same."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def temp_prefix(path: Path) -> str:
    """The start of the name of a temporary beside `path` (file or folder) made by this process: it names
    the host and the process, so a later run on the same host can tell a killed run's leftovers from a
    live run's work (and leaves another host's alone: it cannot see that host's processes)."""
    return f".{path.name}.{host_tag()}-{os.getpid()}."


def check_output_target(path: str | os.PathLike, room: int = NAME_ROOM) -> None:
    """Refuse, before any work, an output path whose temporaries the file system cannot name, or that
    exists but is not a regular file (a device such as /dev/null, a FIFO: the rename would replace it)."""
    from tqs_onnx.errors import TqsError

    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        raise TqsError(f"{path}: output exists and is not a regular file (a device, FIFO or socket); "
                       "give a file name")
    # An output folder (a report's) that exists is where its temporaries go: it may be writable where
    # its parent is not (a CI artifact folder).
    folder = path if path.is_dir() else next((q for q in path.parents if q.exists()), Path("."))
    try:  # a read-only folder is found now, not after the work (the temporary is made there)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tqs-onnx-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TqsError(f"{path}: cannot write in '{folder}' ({exc.strerror or exc})") from None
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(path.name.encode())
    if size + room > limit:
        raise TqsError(f"{path}: file name too long ({size} bytes): the temporaries and side files written "
                       f"beside it (checkpoint, codes file) need names of up to {room} bytes more; "
                       f"this file system takes {limit}")


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries beside `path` that a killed run on this host left (`temp_prefix` + mkstemp's
    or mkdtemp's 8 random characters; their process is gone). Those of another host or container are kept;
    so are those of tqs-onnx before the host tag (".NAME.<pid>.<8>"), unless their process is gone here."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:([0-9a-f]{8})-)?(\d+)\.[A-Za-z0-9_]{8}(\.tmp)?")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = pattern.fullmatch(leftover.name)
        if match and match.group(1) in (None, host_tag()) and not _alive(int(match.group(2))):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; no pid at all: keep it
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp path beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    check_output_target(path, TEMP_ROOM)  # the command checked its outputs with room for side files
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write (disk full) names no file: the output it was for
            exc.filename = str(path)
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def umask() -> int:
    """This process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(doc: Any) -> Any:
    """`doc` with every non-finite float as null: reports read by CI tools and other languages must be
    strict JSON (Python writes Infinity and NaN, which JSON.parse and most parsers reject). Stage files
    that tqs-onnx reads back itself (scores, plans) keep their infinities."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [json_safe(v) for v in doc]
    return doc


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


class slow_note:
    """`with slow_note(text, quiet):` prints `text` on stderr if the block is still running after
    `after` seconds (a set-up of minutes says what it does; a quick one, or one that fails at once with
    a one-line error, prints nothing more)."""

    def __init__(self, text: str, quiet: bool = False, after: float = 5.0):
        self.timer = None if quiet else threading.Timer(after, lambda: print(text, file=sys.stderr, flush=True))
        if self.timer:
            self.timer.daemon = True

    def __enter__(self):
        if self.timer:
            self.timer.start()
        return self

    def cancel(self) -> None:
        """The work the note is about is done (the block may go on with other work)."""
        if self.timer:
            self.timer.cancel()

    def __exit__(self, *exc):
        self.cancel()
        return False


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


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first not in `taken`, which it joins."""
    name, suffix = base, 0
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    taken.add(name)
    return name


CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what moves a terminal or a log


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes, line breaks) written as \\xNN: an error quoting
    a name from an untrusted file must not move the cursor or start a new log line."""
    return CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
