"""Fault injection on the real write path: a full disk, a process killed mid-write and an output folder removed
during a run never lose the last good checkpoint, and each is one line, not a traceback."""
import errno
import os
import pathlib
import shutil

import pytest
import torch

from dsnet.checkpoint import load_checkpoint, save_checkpoint
from dsnet.cli import run_main
from dsnet.errors import UserError
from dsnet.run_dir import check_output_dir
from dsnet.train import main as train_main
from dsnet.trainer import Trainer

from conftest import TINY, run_command

FAST = [*TINY, "--widths", "0.5", "1.0", "--no-ema", "--bn-recalibrate-batches", "1"]  # the later flag wins


def full_disk_after(monkeypatch, limit: int):
    """Every Path.write_bytes writes its first `limit` bytes, then the disk is full."""
    def write_bytes(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:limit])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_full_disk_is_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 0, "weights": torch.arange(1000.0)})
    full_disk_after(monkeypatch, 100)
    with pytest.raises(UserError, match="could not write .*last.pth.*: No space left on device"):
        save_checkpoint(path, {"epoch": 1, "weights": torch.zeros(1000)})
    assert load_checkpoint(path)["epoch"] == 0 and leftovers(tmp_path) == []


def test_a_write_killed_midway_keeps_the_previous_checkpoint_and_a_stale_temporary_trips_nothing(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"epoch": 0})

    def killed(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:10])
        raise KeyboardInterrupt  # the signal arrives while the bytes go out
    monkeypatch.setattr(pathlib.Path, "write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 1})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 0 and leftovers(tmp_path) == []
    # SIGKILL leaves its temporary behind: it is neither read nor in the way of the next write or run.
    (tmp_path / ".last.pth.dead.tmp").write_bytes(b"\0" * 10)
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / ".last.pth.dead.tmp").write_bytes(b"\0")
    check_output_dir(fresh, resuming=False, overwrite=False)  # not "holds another run"


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's thread too
@pytest.mark.parametrize("fault", ["full disk", "output removed"])
def test_a_fault_during_training_is_one_line_and_keeps_the_last_good_epoch(fault, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = Trainer.train_one_epoch

    def second_epoch_faults(self, epoch):
        if epoch == 1:
            if fault == "full disk":
                full_disk_after(monkeypatch, 1000)
            else:
                shutil.rmtree(out)
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", second_epoch_faults)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(train_main, [*FAST, "--epochs", "2", "--output", str(out)])
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after the progress bar's last redraw
    assert exit_info.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    if fault == "full disk":
        assert "No space left on device" in err
        monkeypatch.undo()
        assert load_checkpoint(out / "last.pth")["epoch"] == 0 and leftovers(out) == []
    else:
        assert err == f"error: output directory {str(out)!r} was removed during the run"


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from dsnet.run_dir import LOCK, run_lock

    with run_lock(tmp_path):
        with pytest.raises(UserError, match=f"is in use by another run \\(process {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
        code, _, err = run_command(train_main, [*FAST, "--output", tmp_path, "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and "is in use by another run" in err
    assert not (tmp_path / LOCK).exists()  # released

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {gone.stdout.strip()}")  # its process has ended
    with run_lock(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"
    (tmp_path / LOCK).write_text("another-host 1")  # cannot be checked from here: left to the user
    with pytest.raises(UserError, match="process 1 on another-host"):
        with run_lock(tmp_path):
            pass
