"""runs.py through train.py: the run folder and its rules (nothing written before the start, one run at a
time, a finished run never lost), resuming, and several seeds."""

import errno
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runs
from checkpoints import read_checkpoint
from config import CheckpointError
from conftest import DATA_DIR, DRY_FLAGS, ROOT, SMALL_FLAGS, cli, ctrl_c_at_epoch, refused, without_timings


def files(folder):
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())
            if path.is_file() and path.name != ".lock"}


def hinted_command(message):
    """The arguments of the ``python train.py ...`` command that ``message`` tells the user to run."""
    words = shlex.split(re.search(r"python \S*train\.py .*?(?= starts| replaces|$)", message.strip()).group())
    return words[2:]


def epochs_of(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())["epochs"]


@pytest.mark.parametrize(("out", "words"), [
    ("file", "cannot be used (it is a file)"), ("file/run", "file is a file)"),
    ("x" * 300, "File name too long"), ("", "--out is empty: name the folder"),
    ("loop/run", "Too many levels of symbolic links"),
    *[(code, f"cannot be used ({os.strerror(code)}): choose a folder you can write")
      for code in (errno.EROFS, errno.EACCES, errno.ENOSPC)],
])
def test_an_out_that_cannot_be_a_folder_or_written_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                              no_training, out, words):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    if isinstance(out, int):  # an errno: tests run as root, whom permissions do not stop
        def unwritable(self, *args, code=out, **kwargs):
            raise OSError(code, os.strerror(code), str(self))

        monkeypatch.setattr(Path, "mkdir", unwritable)
        out = "run"
    refused(capsys, *DRY_FLAGS, "--out", tmp_path / out if out else "", words=words)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    holder = runs.RunFolder(tmp_path)
    holder.hold()  # as a running train.py holds it
    try:
        refused(capsys, *DRY_FLAGS, "--out", tmp_path, words=f"another run (pid {os.getpid()}) is writing")
    finally:
        holder.release()
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path)[0] == 0


def test_a_finished_run_is_kept_unless_overwrite_and_resumes_to_itself(tmp_path, capsys):
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path)[0] == 0
    before = files(tmp_path)
    refused(capsys, *DRY_FLAGS, "--out", tmp_path,
            words="already holds a finished run (metrics.json): pass --resume")
    code, out, _ = cli(capsys, "--out", tmp_path, "--resume")
    assert code == 0 and "nothing left to do" in out and files(tmp_path) == before  # nothing trained again
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".draft.tmp").write_text("mine too")
    assert cli(capsys, *DRY_FLAGS, "--seed", 1, "--out", tmp_path, "--overwrite")[0] == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["seed"] == 1
    assert (tmp_path / "notes.txt").read_text() + (tmp_path / ".draft.tmp").read_text() == "mine" + "mine too"
    assert not (tmp_path / runs.REPLACED).exists()


def test_a_finished_runs_lost_model_pt_is_written_again_from_its_checkpoint(tmp_path, capsys):
    assert cli(capsys, *DRY_FLAGS, "--ema", 0.5, "--out", tmp_path)[0] == 0
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    (tmp_path / "model.pt").unlink()  # as a kill between metrics.json and model.pt once left it
    code, out, _ = cli(capsys, "--out", tmp_path, "--resume")
    assert code == 0 and "model.pt was missing" in out
    again = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(weights[name], again[name]) for name in weights) and weights.keys() == again.keys()
    (tmp_path / "checkpoint.pt").unlink()
    (tmp_path / "model.pt").unlink()
    refused(capsys, "--out", tmp_path, "--resume", words="both model.pt and checkpoint.pt are gone")


@pytest.mark.parametrize("mistake", ["data", "step", "device", "training", "ctrl-c"])
def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, capsys, monkeypatch,
                                                                        offline, mistake):
    if mistake == "device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path / "run")[0] == 0
    before = files(tmp_path / "run")
    wrong = {"data": ["--data-dir", tmp_path / "elsewhere"], "step": ["--step", "graph", "--device", "cpu"],
             "device": ["--device", "cuda"], "training": ["--lr", "1e30"], "ctrl-c": []}[mistake]
    if mistake == "ctrl-c":
        ctrl_c_at_epoch(monkeypatch, 1)
    code, _, err = cli(capsys, *DRY_FLAGS, *wrong, "--out", tmp_path / "run", "--overwrite")
    assert code == (130 if mistake == "ctrl-c" else 2) and err.count("\n") == 1, err
    assert files(tmp_path / "run") == before and not (tmp_path / "elsewhere").exists()
    if mistake in ("training", "ctrl-c"):
        assert f"the run it was to replace is back in {tmp_path / 'run'}" in err


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_by_the_next_command(tmp_path, capsys):
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path)[0] == 0
    before = files(tmp_path)
    folder = runs.RunFolder(tmp_path)
    folder.start({"seed": 1}, overwrite=True)  # then killed: the lock goes with the process
    folder.release()
    assert "metrics.json" not in files(tmp_path)
    code, out, _ = cli(capsys, "--out", tmp_path, "--resume")
    assert code == 0 and "nothing left to do" in out and files(tmp_path) == before


def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys, offline):
    refused(capsys, *DRY_FLAGS, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "run",
            words="the download failed")
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".checkpoint.pt.k2j4.tmp").write_bytes(b"half a checkpoint")  # a killed write
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path / "run")[0] == 0
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_tilde_in_out_is_the_home_folder_and_run_files_follow_the_users_umask(tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(runs, "UMASK", 0o027)  # read once, when runs.py loads
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, _ = cli(capsys, *DRY_FLAGS, "--out=~/runs/x")
    assert code == 0 and f"files in {tmp_path}/runs/x/" in out
    run = tmp_path / "runs" / "x"
    assert {oct((run / name).stat().st_mode & 0o777) for name in runs.RUN_FILES} == {"0o640"}


def test_resume_after_a_run_died_before_its_first_checkpoint_keeps_its_settings(tmp_path, capsys,
                                                                                monkeypatch):
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 1)
        code, _, err = cli(capsys, *SMALL_FLAGS, "--lr", 0.05, "--seed", 3, "--out", tmp_path)
    assert code == 130 and "no epoch had finished" in err
    assert err.strip().endswith("--resume starts it again with its settings")
    assert cli(capsys, *hinted_command(err))[0] == 0
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert (config["lr"], config["seed"], config["epochs"], config["train_limit"]) == (0.05, 3, 2, 1000)
    refused(capsys, "--out", tmp_path, "--resume", "--lr", 0.3,
            words="other settings (lr 0.05 -> 0.3): resume without those flags")


@pytest.mark.parametrize("step", ["eager", "static"])
def test_an_interrupted_run_continued_as_its_hint_says_ends_as_one_never_interrupted(tmp_path, capsys,
                                                                                    monkeypatch, step):
    # With all the state a checkpoint must carry: the weight average (20 steps of 0.7 leave nothing of the
    # start, so it is used), augmentation, and BatchNorm re-estimated at the end of the resumed epoch.
    flags = [*SMALL_FLAGS, "--ema", 0.7, "--clean-bn", "--rotate", 10, "--shift", 2, "--scale", 0.1,
             "--step", step]
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)
        code, _, err = cli(capsys, *flags, "--out", tmp_path / "run")
    assert code == 130 and "the checkpoint of the last finished epoch is kept in" in err
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    assert cli(capsys, *hinted_command(err))[0] == 0
    assert cli(capsys, *flags, "--out", tmp_path / "whole")[0] == 0
    assert without_timings(epochs_of(tmp_path / "run")) == without_timings(epochs_of(tmp_path / "whole"))
    assert "test_acc_before_clean_bn" in epochs_of(tmp_path / "whole")[-1]
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("run", "whole")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])


@pytest.mark.slow  # two real runs of three epochs: about 18 s
def test_run_killed_at_any_moment_resumes_to_identical_weights_and_history(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "--data-dir", DATA_DIR, "--epochs", "3", "--seed", "3",
            "--train-limit", "8000", "--test-limit", "1000", "--quiet"]
    subprocess.run([*args, "--out", tmp_path / "whole"], check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", killed], stdout=subprocess.DEVNULL)
    while not (killed / "checkpoint.pt").exists():  # epoch 1 has ended
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)  # well into epoch 2, which takes about a second
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert not (killed / "metrics.json").exists()
    assert read_checkpoint(killed / "checkpoint.pt")["epoch"] in (1, 2)
    resumed = subprocess.run([*args[:2], "--out", killed, "--resume", "--quiet"], capture_output=True,
                             text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert without_timings(epochs_of(killed)) == without_timings(epochs_of(tmp_path / "whole"))
    for (name, a), b in zip(torch.load(tmp_path / "whole" / "model.pt").items(),
                            torch.load(killed / "model.pt").values()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # a short run stopped by a full disk and resumed
def test_a_full_disk_mid_run_loses_nothing_and_resumes(tmp_path, capsys, monkeypatch):
    # That a resumed run ends as one never stopped: the two tests above.
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
    assert sorted(files(full)) == ["checkpoint.pt", "config.json"]
    assert cli(capsys, "--out", full, "--resume", "--quiet")[0] == 0 and len(epochs_of(full)) == 3


def test_a_write_that_fails_says_whether_an_older_file_is_kept(tmp_path):
    def fails(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match="no model.pt was written"):
        runs.atomic_write(tmp_path / "model.pt", fails)
    (tmp_path / "model.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="the previous model.pt is unchanged"):
        runs.atomic_write(tmp_path / "model.pt", fails)
    assert [path.name for path in tmp_path.iterdir()] == ["model.pt"]
    assert (tmp_path / "model.pt").read_bytes() == b"old"


@pytest.mark.parametrize(("file", "content", "words"), [
    ("config.json", '{"lr": 0.1, "depth": 3}', "holds unknown settings depth"),
    ("config.json", "[1, 2]", "holds a list where the settings belong"),
    ("config.json", '{"epochs": 0}',
     "holds settings this version refuses (epochs must be at least 1, got 0)"),
    ("config.json", "{not json", "is unreadable"),
    ("config.json", None, ("config.json no longer holds the settings the run trained with (lr 0.2 -> 0.3: "
                           "checkpoint.pt's -> config.json's): put config.json back")),
    ("metrics.json", '{"epochs": []}', "is not the metrics of a finished run"),
])
def test_run_files_that_resume_cannot_use_are_refused_in_one_line(tmp_path, capsys, file, content, words):
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path)[0] == 0
    if file == "config.json":
        (tmp_path / "metrics.json").unlink()  # as a run interrupted after its last checkpoint leaves it
    if content is None:  # config.json edited by hand
        saved = json.loads((tmp_path / file).read_text())
        content = json.dumps({**saved, "lr": 0.3})
    (tmp_path / file).write_text(content)
    err = refused(capsys, "--out", tmp_path, "--resume", words=words)
    assert "--overwrite" in err


def test_resume_refuses_other_settings_and_reads_mnist_data_as_a_new_run_does(tmp_path, capsys, monkeypatch,
                                                                            raw_copy):
    moved = raw_copy.parent.parent  # a data folder that will move
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)
        assert cli(capsys, *SMALL_FLAGS, "--data-dir", moved, "--out", tmp_path / "run")[0] == 130
    refused(capsys, "--out", tmp_path / "run", "--resume", "--recipe", "NetTiny", words="rotate 7.0 -> 10.0")
    for link in raw_copy.iterdir():
        link.unlink()
    monkeypatch.setenv("MNIST_DATA", DATA_DIR)
    code, _, err = cli(capsys, "--out", tmp_path / "run", "--resume", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["config"]["data_dir"] == DATA_DIR


# --- several seeds ------------------------------------------------------------------------------

def test_seeds_run_each_seed_and_summarise_in_seeds_json(tmp_path, capsys):
    code, out, err = cli(capsys, *DRY_FLAGS, "--seeds", "0-2", "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "seeds.json").read_text())
    finals = [epochs_of(tmp_path / f"seed{seed}")[-1]["test_acc"] for seed in range(3)]
    assert summary["final_test_acc"] == {str(seed): acc for seed, acc in enumerate(finals)}
    assert summary["last3_min_test_acc"] == summary["final_test_acc"]  # one epoch each
    assert summary["mean"] == statistics.mean(finals) and summary["std"] == statistics.stdev(finals)
    assert summary["min"] == min(finals)
    assert f"final test accuracy over seeds 0-2: mean {summary['mean']:.3f}%" in out
    assert cli(capsys, *DRY_FLAGS, "--seeds", "3", "--out", tmp_path)[0] == 0
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2, 3]
    # Runs of other settings would be summarised with these: refused before anything trains.
    refused(capsys, *DRY_FLAGS, "--lr", 0.1, "--seeds", "4", "--out", tmp_path,
            words="already holds seed0, made with other settings (lr 0.2 -> 0.1)")
    refused(capsys, "--out", tmp_path, "--resume",
            words="holds the runs of --seeds (seed0, seed1, seed2, ...): "
                                                         "continue them with --seeds")


def test_seeds_refuse_a_duplicate_or_a_finished_seed_before_the_first_trains(tmp_path, capsys, no_training):
    (tmp_path / "seed2").mkdir()
    (tmp_path / "seed2" / "metrics.json").write_text("{}")
    refused(capsys, *DRY_FLAGS, "--seeds", "0,1,0", "--out", tmp_path, words="names seed 0 twice")
    refused(capsys, *DRY_FLAGS, "--seeds", "0-2", "--out", tmp_path,
            words=f"{tmp_path / 'seed2'} already holds a finished run")
    refused(capsys, *DRY_FLAGS, "--seeds", "0-99999999999", "--out", tmp_path,
            words="names 100,000,000,000 seeds")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["seed2"]


@pytest.mark.slow  # seeds trained, interrupted and continued; one run is checked fast above
@pytest.mark.parametrize("overwrite", [False, True])
def test_ctrl_c_during_seeds_hints_a_command_that_continues_the_same_seeds(tmp_path, capsys, monkeypatch,
                                                                          overwrite):
    if overwrite:  # an older set of seeds, of other settings, to be replaced
        assert cli(capsys, *DRY_FLAGS, "--lr", 0.1, "--seeds", "0-2", "--out", tmp_path)[0] == 0
    with monkeypatch.context() as patch:
        ctrl_c_at_epoch(patch, 2)  # one epoch a seed: in seed 1
        code, _, err = cli(capsys, *SMALL_FLAGS, "--epochs", 1, "--model", "NetTiny", "--seeds", "0-2",
                           "--out",
                           tmp_path, *(["--overwrite"] if overwrite else []))
    assert code == 130 and err.startswith("interrupted: seed1: "), err
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0]  # the runs of these settings
    assert cli(capsys, *hinted_command(err))[0] == 0
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["model"] == "NetTiny"
    assert all(epochs_of(tmp_path / f"seed{seed}")[0]["epoch"] == 1 for seed in range(3))
    assert {json.loads((tmp_path / f"seed{seed}" / "config.json").read_text())["lr"]
            for seed in range(3)} == {0.2}
