"""Output folders that cannot be silently clobbered: one writer at a time, one command per folder.

:func:`run_lock` takes an exclusive lock on a folder for as long as a command writes into it: a
lock file ``.lock`` that holds the writer's PID and host, locked with ``flock`` so that the
kernel releases it when the writer dies (a stale lock file left by a killed run is taken over,
with a log line naming the dead writer). A second writer is refused with
:class:`OutputBusy` naming the first one.

:func:`prepare_output_dir` checks an output path before a command starts: not empty, not a
file, creatable and writable, and not a folder another command wrote (each command leaves its
marker file, :data:`OUTPUT_MARKERS`) unless ``force``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"

#: The file each command writes into its output folder, by which the folder is recognised.
OUTPUT_MARKERS = {
    "train": "config.json",
    "data": "data.json",
    "phase1": "phase1.json",
    "sweep-beta0": "sweep.json",
    "bench": ("bench.json", "decode.json"),  # --decode-only writes only the second
    "variance": "variance.json",
    "fit-beta0": "beta0.json",
    "calibrate": "calibration.json",
    "report": "analysis.json",
    "evidence": "evidence.json",
    "generate": "generate.json",
    "gate-sweep": "gate_sweep.json",
}
#: Commands that share a folder by design (``report`` writes the calibration too, both into
#: ``RUN_DIR/analysis`` by default).
SHARED_OUTPUT = {frozenset({"report", "calibrate"})}


class OutputBusy(RuntimeError):
    """Another live process is writing into the folder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[Path]:
    """Hold the exclusive write lock of ``folder`` (created if missing) inside the block.

    :raises OutputBusy: if a live process holds it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"{folder} is being written by {_holder(path)} (lock file "
                             f"{path}); wait for it to finish or choose another folder"
                             ) from None
        # the holder we waited on may have removed the file it locked: lock the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = os.fstat(fd).st_size > 0
    if stale:  # a writer died without removing its lock file: the kernel released its lock
        logger.warning("%s: taking over the stale lock of %s", folder, _holder(path))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def prepare_output_dir(path: str | Path, command: str, force: bool = False) -> Path:
    """Check an output folder before ``command`` writes into it; nothing is created here (a
    command that then refuses its other input leaves no empty folder behind).

    :raises ValueError: for an empty path, a path that is a file or cannot be created or
        written (its nearest existing folder refuses a file), or a folder holding another
        command's output (its marker file) unless ``force``.
    """
    if command not in OUTPUT_MARKERS:
        raise ValueError(f"command must be one of {sorted(OUTPUT_MARKERS)}, got {command!r}")
    if str(path).strip() == "":
        raise ValueError("--out must name a folder, got an empty path")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(f"--out {folder} cannot be written: {error.strerror or error}"
                         ) from None
    others = [(name, marker) for name, markers in OUTPUT_MARKERS.items()
              for marker in ((markers,) if isinstance(markers, str) else markers)
              if name != command and frozenset({name, command}) not in SHARED_OUTPUT
              and (folder / marker).exists()]
    if others and not force:
        name, marker = others[0]
        raise ValueError(f"--out {folder} holds the output of `bayes-router {name}` ({marker}); "
                         f"choose another folder or pass --force to write into it anyway")
    return folder
