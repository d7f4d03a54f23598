"""Output folders: one writer at a time (a live holder refuses a second, a dead one's lock is
taken over) and one command per folder unless forced."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bayes_router.cli import main
from bayes_router.experiments.rundir import (
    LOCK_NAME,
    OutputBusy,
    prepare_output_dir,
    run_lock,
)

HOLDER = """
import sys, time
from pathlib import Path
from bayes_router.experiments.rundir import run_lock
folder, ready, release = map(Path, sys.argv[1:4])
with run_lock(folder):
    ready.write_text("locked")
    while not release.exists():
        time.sleep(0.02)
    (folder / "result.json").write_text('{"finished": true}')
"""


def _wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


def _holder(tmp_path, folder):
    ready, release = tmp_path / "ready", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready),
                             str(release)])
    _wait_for(ready)
    return proc, release


def test_a_second_writer_is_refused_while_the_first_finishes_intact(tmp_path, tiny_corpus,
                                                                    capsys):
    folder = tmp_path / "run"
    proc, release = _holder(tmp_path, folder)
    try:
        with pytest.raises(OutputBusy, match=rf"PID {proc.pid} on"):
            with run_lock(folder):
                pass
        # the real command: refused with exit status 1 and one line naming the holder
        code = main(["train", "--out", str(folder), "--corpus", str(tiny_corpus), "--steps",
                     "1", "--seq-len", "32", "--max-seq-len", "32", "--d-model", "16",
                     "--window", "4", "--chunk-size", "8", "--eval-batches", "1"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err
        assert f"is being written by PID {proc.pid}" in err and str(folder) in err
        assert not (folder / "config.json").exists()  # the refused writer wrote nothing
    finally:
        release.write_text("go")
        assert proc.wait(timeout=60) == 0
    assert json.loads((folder / "result.json").read_text()) == {"finished": True}
    assert not (folder / LOCK_NAME).exists()  # released on exit
    with run_lock(folder):  # and free again
        pass


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    proc, _ = _holder(tmp_path, folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (folder / LOCK_NAME).exists()  # left behind, but no longer locked
    with caplog.at_level("WARNING"), run_lock(folder) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid()
    assert f"taking over the stale lock of PID {proc.pid}" in caplog.text


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path / "run"):
        raise KeyError("boom")
    with run_lock(tmp_path / "run"):
        pass


def test_prepare_output_dir_refuses_bad_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="empty path"):
        prepare_output_dir("", "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        prepare_output_dir(tmp_path / "file", "train")
    with pytest.raises(ValueError, match="cannot be written"):
        prepare_output_dir(tmp_path / "file" / "below", "train")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "data.json").write_text("{}")
    with pytest.raises(ValueError, match=r"output of `bayes-router data` \(data.json\).*--force"):
        prepare_output_dir(data_dir, "train")
    assert prepare_output_dir(data_dir, "train", force=True) == data_dir
    assert prepare_output_dir(data_dir, "data") == data_dir  # its own command may rewrite it
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "calibration.json").write_text("{}")
    prepare_output_dir(tmp_path / "analysis", "report")  # report and calibrate share a folder
    with pytest.raises(ValueError, match="command must be one of"):
        prepare_output_dir(tmp_path / "x", "nope")


def test_a_decode_only_bench_folder_is_the_bench_s(tmp_path):
    """``bench --decode-only`` writes decode.json and no bench.json: the folder is still
    bench's own, and another command is refused there."""
    (tmp_path / "decode.json").write_text("{}")
    assert prepare_output_dir(tmp_path, "bench") == tmp_path
    with pytest.raises(ValueError, match=r"output of `bayes-router bench` \(decode.json\)"):
        prepare_output_dir(tmp_path, "train")
