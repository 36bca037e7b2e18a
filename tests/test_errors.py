"""Bad input and faults: every refusal is one line that says what to do, and no result is lost."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import train
import utils
from config import DataError, NonFiniteLossError, TrainConfig
from conftest import DATA_DIR, ROOT, SMALL_FLAGS, cli, refused
from data import load_mnist
from model import Net, NetCompact
from utils import fit, read_checkpoint

# --- the output folder ------------------------------------------------------------------------

def test_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    (tmp_path / "file").write_text("mine")
    refused(capsys, "--out", tmp_path / "file", words="cannot be used (File exists)")
    refused(capsys, "--out", tmp_path / "file" / "run", words="cannot be used (Not a directory)")
    refused(capsys, "--out", tmp_path / ("x" * 300), words="cannot be used (File name too long)")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "Read-only file system"),
                                             (errno.EACCES, "Permission denied"),
                                             (errno.ENOSPC, "No space left on device")])
def test_an_unwritable_out_is_refused_before_training(tmp_path, capsys, monkeypatch, code, words):
    # Tests run as root, whom permissions do not stop: the file system's answer is simulated.
    def unwritable(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "mkdir", unwritable)
    monkeypatch.setattr(train, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    refused(capsys, "--out", tmp_path / "run",
            words=f"cannot be used ({words}): choose a folder you can write")


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    holder = train.open_run_folder(tmp_path)  # as a running train.py holds it
    try:
        refused(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path,
                words=f"another run (pid {os.getpid()}) is writing")
    finally:
        holder.close()
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0


def test_a_finished_run_is_kept_unless_overwrite_is_asked_for(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0
    (tmp_path / "checkpoint.pt").unlink()  # a finished run whose checkpoint was cleaned away
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.json", "model.pt")}
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path,
            words="already holds a finished run (metrics.json)")
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path, "--resume",
            words="no checkpoint.pt to continue")
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    code, _, err = cli(capsys, *SMALL_FLAGS, "--dry-run", "--seed", 1, "--out", tmp_path, "--overwrite")
    assert code == 0, err
    assert json.loads((tmp_path / "metrics.json").read_text())["seed"] == 1


def test_resume_after_a_run_died_before_its_first_checkpoint_keeps_its_settings(tmp_path, capsys,
                                                                                  monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(utils, "train_epoch", interrupted)
        code, _, err = cli(capsys, *SMALL_FLAGS, "--lr", 0.05, "--seed", 3, "--out", tmp_path)
    assert code == 130 and "no epoch had finished" in err and "--resume starts the run again" in err
    assert not (tmp_path / "checkpoint.pt").exists()
    code, _, err = cli(capsys, "--out", tmp_path, "--resume", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert (config["lr"], config["seed"], config["epochs"], config["train_limit"]) == (0.05, 3, 2, 1000)
    refused(capsys, "--out", tmp_path, "--resume", "--lr", 0.3, words="lr 0.05 -> 0.3")


def test_interrupt_after_an_epoch_says_the_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    original, epochs_begun = utils.train_epoch, []

    def ctrl_c_in_epoch_2(*args, **kwargs):
        epochs_begun.append(1)
        if len(epochs_begun) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(utils, "train_epoch", ctrl_c_in_epoch_2)
    code, _, err = cli(capsys, *SMALL_FLAGS, "--out", tmp_path)
    assert code == 130 and "the checkpoint of the last finished epoch is kept" in err
    assert read_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_a_full_disk_mid_run_loses_nothing_and_resumes_to_the_same_result(tmp_path, capsys, monkeypatch):
    assert cli(capsys, *SMALL_FLAGS, "--epochs", 3, "--out", tmp_path / "whole")[0] == 0
    save, saves = torch.save, []

    def disk_fills_at_the_second_checkpoint(state, file):
        saves.append(file)
        if len(saves) == 2:
            file.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(state, file)

    full = tmp_path / "full"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_fills_at_the_second_checkpoint)
        refused(capsys, *SMALL_FLAGS, "--epochs", 3, "--out", full,
                words="(No space left on device): free some space")
    assert read_checkpoint(full / "checkpoint.pt")["epoch"] == 1
    assert sorted(path.name for path in full.iterdir()) == [".lock", "checkpoint.pt", "config.json"]
    assert cli(capsys, "--out", full, "--resume", "--quiet")[0] == 0
    whole, again = (json.loads((tmp_path / run / "metrics.json").read_text())["epochs"]
                    for run in ("whole", "full"))
    assert [row["test_loss"] for row in again] == [row["test_loss"] for row in whole]


def test_temporary_files_of_a_killed_write_are_cleaned_up(tmp_path, capsys):
    (tmp_path / ".checkpoint.pt.k2j4.tmp").write_bytes(b"half a checkpoint")
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


# --- checkpoints and weights ------------------------------------------------------------------

@pytest.mark.parametrize(("change", "words"), [
    (lambda state: state.pop("optimizer"), "lacks optimizer"),
    (lambda state: state["config"].update(depth=3), "has unknown settings depth"),
])
def test_a_checkpoint_missing_a_part_or_with_unknown_settings_is_refused(tmp_path, capsys, change, words):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0
    (tmp_path / "metrics.json").unlink()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "checkpoint.pt")
    refused(capsys, "--out", tmp_path, "--resume", words=words)


def test_weights_of_another_model_get_one_line_naming_the_right_class():
    with pytest.raises(ValueError, match=r"^these weights do not fit Net: they are weights of NetCompact: "
                                         r"load them into NetCompact\(\)$"):
        Net().load_state_dict(NetCompact().state_dict())
    with pytest.raises(ValueError, match="load them into the model class they were trained with"):
        Net().load_state_dict({"weight": torch.zeros(3)})


@pytest.mark.parametrize(("images", "words"), [
    (torch.full((2, 1, 28, 28), float("nan")), "NaN or infinite"),
    (torch.full((1, 28, 28), float("inf")), "NaN or infinite"),
    (torch.randint(0, 256, (3, 1, 28, 28)).float(),
     "normalise 0-255 pixels with (x / 255 - 0.1307) / 0.3081"),
])
def test_predict_refuses_images_that_would_give_a_meaningless_answer(images, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("/", r"\/")):
        Net().predict(images)


def test_a_non_finite_loss_says_no_checkpoint_exists_when_none_does(tmp_path):
    config = TrainConfig(train_limit=300, test_limit=100, batch_size=100, epochs=1, lr=1e30)
    loaders = data.make_loaders(config, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match="no epoch had finished, so there is no checkpoint yet"):
        fit(Net(), *loaders, config, checkpoint=tmp_path / "checkpoint.pt", progress=False,
            log=lambda line: None)
    with pytest.raises(NonFiniteLossError, match="nothing was saved"):
        fit(Net(), *loaders, config, progress=False, log=lambda line: None)


# --- data files -------------------------------------------------------------------------------

def replace(raw, name, change):
    genuine = (raw / name).read_bytes()
    (raw / name).unlink()
    (raw / name).write_bytes(change(genuine))


def test_labels_outside_0_to_9_are_refused_before_training(raw_copy):
    replace(raw_copy, "t10k-labels-idx1-ubyte", lambda genuine: genuine[:8] + bytes([10]) + genuine[9:])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte holds label values outside 0-9 \(from 0 to "
                                        r"10\)"):
        load_mnist(raw_copy.parent.parent, train=False)


def test_a_header_with_wrong_dimensions_is_named_not_called_a_failed_download(raw_copy):
    # The same size and magic number, but a header that says 28 x 28 x 10,000.
    replace(raw_copy, "t10k-images-idx3-ubyte", lambda genuine: genuine[:4] + (28).to_bytes(4, "big")
            + (28).to_bytes(4, "big") + (10_000).to_bytes(4, "big") + genuine[16:])
    words = r"has an IDX header of 28 x 28 x 10,000, expected 10,000 x 28 x 28"
    with pytest.raises(DataError, match=words) as caught:
        load_mnist(raw_copy.parent.parent, train=False)
    assert "download" not in str(caught.value).split(":")[0]


def test_one_missing_file_is_named(raw_copy, monkeypatch):
    (raw_copy / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"MNIST file\(s\) t10k-labels-idx1-ubyte are missing from"):
        load_mnist(raw_copy.parent.parent, train=False, download=False)
    monkeypatch.setattr(data.torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte are missing .* the download failed"):
        load_mnist(raw_copy.parent.parent, train=False)
    assert raw_copy.is_dir(), "folders that were there before stay"


def test_an_unreadable_data_file_says_so(raw_copy, monkeypatch):
    def no_permission(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", no_permission, raising=False)  # root ignores file modes
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte cannot be read \(permission denied\): "):
        load_mnist(raw_copy.parent.parent, train=False)


# --- the process ------------------------------------------------------------------------------

def script(*args):
    return [sys.executable, str(ROOT / "train.py"), "--data-dir", DATA_DIR, *map(str, args)]


def test_a_closed_output_pipe_stops_quietly(tmp_path):
    process = subprocess.Popen(script(*SMALL_FLAGS, "--epochs", 3, "--out", tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.stdout.readline()  # as `| head -1` does
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 141 and "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "the output pipe was closed" in stderr and "--resume" in stderr


def test_ctrl_c_while_starting_up_prints_no_traceback():
    process = subprocess.Popen(script("--dry-run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside `import torch`, which takes seconds
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr == "interrupted while starting: nothing was written\n"
