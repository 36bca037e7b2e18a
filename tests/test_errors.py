"""Bad input and faults: every refusal is one line that says what to do, and no result is lost."""

import errno
import json
import os
import re
import shlex
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
from checkpoints import atomic_write, read_checkpoint
from config import CheckpointError, ConfigError, DataError, NonFiniteLossError, TrainConfig, make_config
from conftest import DATA_DIR, ROOT, SMALL_FLAGS, cli, refused, without_timings
from data import load_mnist
from model import Net, NetCompact
from utils import fit

# --- the output folder ------------------------------------------------------------------------

def no_training(*args, **kwargs):
    pytest.fail("training started")


def test_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(utils, "fit", no_training)
    (tmp_path / "file").write_text("mine")
    refused(capsys, "--out", tmp_path / "file", words="cannot be used (it is a file)")
    refused(capsys, "--out", tmp_path / "file" / "run",
            words=f"cannot be used ({tmp_path / 'file'} is a file)")
    refused(capsys, "--out", "", words="--out is empty: name the folder")
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
    monkeypatch.setattr(utils, "fit", no_training)
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
    code, out, _ = cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path, "--resume")
    assert code == 0 and "nothing left to do" in out
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
    assert code == 130 and "no epoch of the run had finished" in err and "--resume starts it again" in err
    assert not (tmp_path / "checkpoint.pt").exists()
    code, _, err = cli(capsys, "--out", tmp_path, "--resume", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert (config["lr"], config["seed"], config["epochs"], config["train_limit"]) == (0.05, 3, 2, 1000)
    refused(capsys, "--out", tmp_path, "--resume", "--lr", 0.3, words="lr 0.05 -> 0.3")


def ctrl_c_at_epoch(patch, number):
    """Make Ctrl-C arrive as the ``number``-th epoch trained under ``patch`` begins."""
    original, begun = utils.train_epoch, []

    def train_epoch(*args, **kwargs):
        begun.append(1)
        if len(begun) == number:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    patch.setattr(utils, "train_epoch", train_epoch)


def test_interrupt_after_an_epoch_says_the_checkpoint_is_kept(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)
        code, _, err = cli(capsys, *SMALL_FLAGS, "--out", tmp_path / "run")
    assert code == 130 and "the checkpoint of the run's last finished epoch is kept: continue with" in err
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    # The hint, followed word for word, ends as a run that was never interrupted.
    assert cli(capsys, *hinted_command(err))[0] == 0
    assert cli(capsys, *SMALL_FLAGS, "--out", tmp_path / "whole")[0] == 0
    finished = [json.loads((tmp_path / run / "metrics.json").read_text())["epochs"]
                for run in ("run", "whole")]
    assert without_timings(finished[0]) == without_timings(finished[1])


def hinted_command(message):
    """The arguments of the ``python train.py ...`` command that ``message`` tells the user to run."""
    command = re.search(r"python train\.py .*?(?= starts it|$)", message.strip()).group()
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    return words[2:]


@pytest.mark.slow  # three short runs, one of them killed by a full disk and resumed
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


@pytest.mark.slow  # a fresh process that loads torch and trains
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


# --- a start that fails changes nothing ----------------------------------------------------------

def run_files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name != ".lock"}


@pytest.mark.parametrize("mistake", ["data", "step", "device"])
def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys, monkeypatch, mistake):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path / "run")[0] == 0
    before = run_files(tmp_path / "run")
    monkeypatch.setattr(data.torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    if mistake == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    wrong = {"data": ["--data-dir", tmp_path / "elsewhere"], "step": ["--step", "graph", "--device", "cpu"],
             "device": ["--device", "cuda"]}[mistake]
    code, _, err = cli(capsys, *SMALL_FLAGS, "--dry-run", *wrong, "--out", tmp_path / "run", "--overwrite")
    assert code == 2 and err.count("\n") == 1, err
    assert run_files(tmp_path / "run") == before
    assert not (tmp_path / "elsewhere").exists()


def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data.torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run",
            words="the download failed")
    assert not (tmp_path / "run").exists()
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path / "run")[0] == 0


def test_overwrite_removes_only_the_files_a_run_writes(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".draft.tmp").write_text("mine too")
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--seed", 1, "--out", tmp_path, "--overwrite")[0] == 0
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / ".draft.tmp").read_text() == "mine too"


@pytest.mark.parametrize("args", [["--train-limit", 1000, "--epochs", 1, "--batch-size", 256],
                                  ["--dry-run", "--warmup", 0.5]])
def test_runs_of_a_few_steps_train(tmp_path, capsys, args):
    # Four steps at --warmup 0.25 (or two at 0.5): OneCycleLR divided by zero there.
    code, _, err = cli(capsys, "--quiet", "--test-limit", 200, *args, "--out", tmp_path)
    assert code == 0, err
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"]) == 1


def test_import_train_leaves_ctrl_c_alone():
    script = "import signal\nbefore = signal.getsignal(signal.SIGINT)\nimport train\n" \
             "print(signal.getsignal(signal.SIGINT) is before)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stdout.strip() == "True", result.stderr


# --- several seeds ------------------------------------------------------------------------------

def test_seeds_refuse_a_duplicate_seed_or_a_finished_seed_before_the_first_trains(tmp_path, capsys,
                                                                                  monkeypatch):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path / "seed2")[0] == 0
    monkeypatch.setattr(utils, "fit", no_training)
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0,1,0", "--out", tmp_path,
            words="names seed 0 twice")
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0-2", "--out", tmp_path,
            words=f"{tmp_path / 'seed2'} already holds a finished run")
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0-99999999999", "--out", tmp_path,
            words="names 100,000,000,000 seeds: at most 1,000")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["seed2"]


@pytest.mark.slow  # two seeds trained, interrupted and continued; one run is checked fast above
def test_ctrl_c_during_seeds_hints_a_command_that_continues_the_same_seeds(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)  # one epoch a seed: in seed 1
        code, _, err = cli(capsys, *SMALL_FLAGS, "--epochs", 1, "--model", "NetTiny", "--seeds", "0-2",
                           "--out", tmp_path)
    assert code == 130 and "no epoch of seed 1 had finished" in err, err
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0]
    assert cli(capsys, *hinted_command(err))[0] == 0
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["model"] == "NetTiny"
    for seed in range(3):
        config = json.loads((tmp_path / f"seed{seed}" / "metrics.json").read_text())["config"]
        assert config["train_limit"] == 1000


def test_seeds_json_describes_exactly_the_runs_in_the_folder(tmp_path, capsys, monkeypatch):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0-1", "--out", tmp_path)[0] == 0
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "2", "--out", tmp_path)[0] == 0
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    # Runs of other settings would be summarised with these: refused before anything trains.
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--lr", 0.1, "--seeds", "3", "--out", tmp_path,
            words="already holds seed0, made with other settings (lr 0.2 -> 0.1)")
    # An --overwrite cut short leaves no summary of the runs it was replacing.
    with monkeypatch.context() as patch:
        patch.setattr(utils, "train_epoch", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt))
        code, _, _ = cli(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0-2", "--out", tmp_path,
                         "--overwrite")
    assert code == 130
    assert not (tmp_path / "seeds.json").exists()


# --- inputs that gave raw tracebacks or wrong answers ---------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--pipeline", "torchvision", "--test-limit", 20000],
     "test limit must be from 0 (all) to 10,000, got 20000"),
    (["--train-limit", 70000], "train limit must be from 0 (all) to 60,000, got 70000"),
    (["--seed", 2**70], "seed must be in [0, 2**63)"),
    (["--seed", -1], "seed must be in [0, 2**63)"),
    (["--data-dir", ""], "data dir is empty"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
])
def test_settings_that_crashed_deep_inside_are_refused_in_one_line(capsys, args, words):
    refused(capsys, *args, words=words)


@pytest.mark.parametrize(("content", "words"), [
    ('{"lr": 0.1, "depth": 3}', "holds unknown settings depth"),
    ("[1, 2]", "holds a list where the settings belong"),
    ("null", "holds a NoneType where the settings belong"),
    ('{"epochs": 0}', "holds settings this version refuses (epochs must be at least 1, got 0)"),
    ("{not json", "is unreadable"),
])
def test_a_config_json_that_resume_cannot_read_is_refused_in_one_line(tmp_path, capsys, content, words):
    (tmp_path / "config.json").write_text(content)
    err = refused(capsys, "--out", tmp_path, "--resume", words=words)
    assert "--overwrite" in err


@pytest.mark.parametrize(("settings", "words"), [
    ({"epochs": "5"}, "setting epochs must be a int, got '5'"),
    ({"depth": 3}, "unknown setting(s) 'depth'"),
    ({"recipe": ["fast"]}, "unknown recipe ['fast']"),
    ({"model": None}, "setting model must be a str, got None"),
    ({"lr": True}, "setting lr must be a float, got True"),
    ({"seed": 2**64}, "seed must be in [0, 2**63)"),
])
def test_odd_values_given_to_make_config_get_a_config_error(settings, words):
    with pytest.raises(ConfigError) as caught:
        make_config(**settings)
    assert words in str(caught.value)


def test_fit_refuses_settings_that_are_not_a_train_config():
    with pytest.raises(ConfigError, match="fit needs a TrainConfig"):
        fit(Net(), [], [], {"epochs": 1})


def test_resume_of_a_finished_run_with_another_recipe_is_refused(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path)[0] == 0
    refused(capsys, "--out", tmp_path, "--resume", "--recipe", "NetTiny", words="rotate 7.0 -> 10.0")


def test_resume_reads_mnist_data_as_a_new_run_does(tmp_path, capsys, monkeypatch, raw_copy):
    moved = raw_copy.parent.parent  # a data folder that will move
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)
        assert cli(capsys, *SMALL_FLAGS, "--data-dir", moved, "--out", tmp_path / "run")[0] == 130
    for link in raw_copy.iterdir():
        link.unlink()
    monkeypatch.setenv("MNIST_DATA", DATA_DIR)
    code, _, err = cli(capsys, "--out", tmp_path / "run", "--resume", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["data_dir"] == DATA_DIR


def test_weights_files_that_are_not_weights_get_one_line(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--ema", 0.5, "--out", tmp_path)[0] == 0
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"^this is a training checkpoint \(checkpoint.pt\), not weights"):
        Net().load_state_dict(checkpoint)
    with pytest.raises(TypeError, match="expected a state dict .* got list"):
        Net().load_state_dict([1, 2])
    with pytest.raises(ValueError, match="'epoch' holds a int, where a state dict holds tensors"):
        Net().load_state_dict({"epoch": 3})
    # The weight average's state dict, as the checkpoint keeps it, loads as the weights it averages:
    # those of model.pt.
    averaged, kept = Net(), Net()
    averaged.load_state_dict(checkpoint["averaged"])
    kept.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(averaged.state_dict().values(), kept.state_dict().values()))


def test_predict_refuses_pixels_in_0_to_1_that_were_never_normalised(mnist):
    pixels = mnist["test"][0][:8].unsqueeze(1).float() / 255
    with pytest.raises(ValueError, match="image 0 has no value below 0, as pixels in \\[0, 1\\]"):
        Net().predict(pixels)
    assert Net().predict((pixels - 0.1307) / 0.3081).shape == (8,)


def test_a_write_that_fails_says_whether_an_older_file_is_kept(tmp_path):
    def fails(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match="no model.pt was written"):
        atomic_write(tmp_path / "model.pt", fails)
    (tmp_path / "model.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="the previous model.pt is unchanged"):
        atomic_write(tmp_path / "model.pt", fails)
    assert (tmp_path / "model.pt").read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]


def test_bench_refuses_a_bad_json_path_or_an_absent_device_before_it_runs(tmp_path, capsys):
    import bench

    with pytest.raises(SystemExit) as caught:
        bench.main(["--json", str(tmp_path / "no" / "such" / "folder.json")])
    assert caught.value.code == 2 and "--json" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "no usable CUDA GPU" in err


@pytest.mark.parametrize("content", ["[]", '{"epochs": []}',
                                     '{"epochs": [{"acc": 1}], "seed": 0, "config": {}}'])
def test_a_finished_run_whose_metrics_are_not_metrics_gets_one_line(tmp_path, capsys, content):
    assert cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path / "seed0")[0] == 0
    (tmp_path / "seed0" / "metrics.json").write_text(content)
    refused(capsys, "--out", tmp_path / "seed0", "--resume", words="is not the metrics of a finished run")
    refused(capsys, *SMALL_FLAGS, "--dry-run", "--seeds", "0", "--out", tmp_path, "--resume",
            words="is not the metrics of a finished run")


@pytest.mark.parametrize(("args", "words"), [(["--epochs", "1.5"], "argument --epochs: invalid int value"),
                                             (["--color"], "unrecognized arguments: --color")])
def test_flags_argparse_refuses_get_one_line_too(capsys, args, words):
    with pytest.raises(SystemExit) as caught:
        train.main(args)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err
