import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import train
from checkpoints import read_checkpoint
from config import NonFiniteLossError, TrainConfig
from conftest import CPU, DATA_DIR, ROOT, SMALL_FLAGS, cli, without_timings
from data import make_loaders
from model import Net
from utils import fit, pick_device


def test_dry_run_writes_metrics_and_weights(tmp_path, capsys):
    code, _, err = cli(capsys, "--dry-run", "--out", tmp_path, "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "Net" and metrics["seed"] == 0
    assert metrics["device"] == str(pick_device("auto"))
    assert metrics["params"] == sum(p.numel() for p in Net().parameters())
    assert metrics["layers"] == repr(Net())
    assert len(metrics["epochs"]) == 1
    assert set(metrics["epochs"][0]) >= {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                                         "seconds"}
    assert metrics["config"] == dataclasses.asdict(TrainConfig(dry_run=True))
    assert metrics["runtime"]["torch"] == torch.__version__
    assert metrics["runtime"]["torchvision"] == torchvision.__version__
    Net().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert metrics["runtime"]["git_commit"] == head.stdout.strip()
        assert isinstance(metrics["runtime"]["git_dirty"], bool)


def test_every_setting_has_its_flag_with_help_and_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in dataclasses.fields(TrainConfig):
        assert spec.metadata["help"] and " ".join(spec.metadata["help"].split()) in text, spec.name
        assert "--" + spec.name.replace("_", "-") in text
    assert "(default: 0.25)" in text and "--recipe" in text and "--overwrite" in text
    # --data-dir's help explains its default itself, so it gets no second one.
    assert "(default: env MNIST_DATA, else ./data)" in text and "else ./data) (default" not in text


def test_limits_and_flags_reach_the_run(tmp_path, capsys):
    code, _, err = cli(capsys, *SMALL_FLAGS, "--epochs", 3, "--model", "NetCompact", "--seed", 4,
                       "--lr", 0.05, "--out", tmp_path)
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 3
    assert metrics["model"] == "NetCompact" and metrics["seed"] == 4
    assert metrics["config"]["lr"] == 0.05 and metrics["config"]["test_limit"] == 500
    for row in metrics["epochs"]:
        assert row["test_acc"] * 5 == pytest.approx(round(row["test_acc"] * 5))  # a count out of 500


@pytest.mark.parametrize(("args", "words"), [
    (["--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--batch-size", "-8"], "batch size must be at least 1, got -8"),
    (["--lr", "0"], "learning rate must be a positive number, got 0.0"),
    (["--lr", "nan"], "learning rate must be a positive number, got nan"),
    (["--model", "ResNet"], "unknown model 'ResNet': choose one of Net, NetCompact, NetTiny"),
    (["--step", "jit"], "unknown step 'jit': choose eager, static or graph"),
    (["--warmup", "1.5"], "warmup must be a fraction in (0, 1), got 1.5"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    (["--pipeline", "dali"], "unknown pipeline 'dali'"),
    (["--resume"], "--resume needs --out DIR"),
    (["--seeds", "a-b", "--out", "x"], "--seeds 'a-b' is not a range"),
])
def test_impossible_arguments_get_one_line_and_exit_2(capsys, args, words):
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert "Traceback" not in err


def test_missing_data_without_internet_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    code, _, err = cli(capsys, "--data-dir", tmp_path / "empty", "--dry-run")
    assert code == 2
    assert err.count("\n") == 1 and "the download failed" in err and "--data-dir" in err
    assert not (tmp_path / "empty").exists(), "the failed download left folders behind"


def test_an_existing_checkpoint_is_never_overwritten_without_resume(tmp_path, capsys):
    assert cli(capsys, "--dry-run", "--out", tmp_path)[0] == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    code, _, err = cli(capsys, "--dry-run", "--out", tmp_path)
    assert code == 2 and "already holds a finished run (metrics.json): pass --resume" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_truncated_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--out", tmp_path)[0] == 0
    (tmp_path / "metrics.json").unlink()  # as a run interrupted after its last checkpoint leaves it
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    truncated = checkpoint.read_bytes()
    code, _, err = cli(capsys, *SMALL_FLAGS, "--out", tmp_path, "--resume")
    assert code == 2 and err.count("\n") == 1 and "unreadable" in err and "truncated" in err
    assert checkpoint.read_bytes() == truncated


def test_checkpoint_of_another_model_or_settings_is_refused(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--model", "NetCompact", "--out", tmp_path)[0] == 0
    code, _, err = cli(capsys, *SMALL_FLAGS, "--model", "Net", "--out", tmp_path, "--resume")
    assert code == 2 and "model 'NetCompact' -> 'Net'" in err
    code, _, err = cli(capsys, "--lr", 0.3, "--out", tmp_path, "--resume")
    assert code == 2 and "lr 0.2 -> 0.3" in err
    torch.save({"weights": Net().state_dict()}, tmp_path / "checkpoint.pt")
    (tmp_path / "metrics.json").unlink()
    code, _, err = cli(capsys, "--out", tmp_path, "--resume")
    assert code == 2 and "not a checkpoint of this project" in err


def test_a_finished_run_resumes_to_the_same_result(tmp_path, capsys):
    assert cli(capsys, *SMALL_FLAGS, "--out", tmp_path)[0] == 0
    first = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert cli(capsys, "--out", tmp_path, "--resume", "--quiet")[0] == 0
    # Timings included: nothing was trained again.
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == first


@pytest.mark.slow  # two real runs of three epochs: about 18 s
def test_run_killed_at_any_moment_resumes_to_identical_weights_and_history(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "--data-dir", DATA_DIR, "--epochs", "3", "--seed", "3",
            "--train-limit", "8000", "--test-limit", "1000", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*args, "--out", tmp_path / "whole"], check=True, env=env, capture_output=True,
                   timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, "--out", killed], env=env, stdout=subprocess.DEVNULL)
    while not (killed / "checkpoint.pt").exists():  # epoch 1 has ended
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.02)
    time.sleep(0.3)  # well into epoch 2, which takes about a second
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    assert read_checkpoint(killed / "checkpoint.pt")["epoch"] in (1, 2)

    resumed = subprocess.run([*args[:2], "--out", killed, "--resume", "--quiet"], env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    whole, again = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "killed"))
    assert without_timings(again["epochs"]) == without_timings(whole["epochs"])
    for (name, a), b in zip(torch.load(tmp_path / "whole" / "model.pt").items(),
                            torch.load(killed / "model.pt").values()):
        assert torch.equal(a, b), name


class PoisonedLoader:
    """Yields the real batches, but NaN images in one batch of one epoch."""

    def __init__(self, loader, epoch, batch):
        self.loader, self.poison, self.epoch = loader, (epoch, batch), 0
        self.generator = loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for batch, (images, labels) in enumerate(self.loader, start=1):
            yield (images * float("nan") if (self.epoch, batch) == self.poison else images), labels


def test_non_finite_loss_stops_naming_epoch_and_batch_and_keeps_the_last_checkpoint(tmp_path):
    config = TrainConfig(train_limit=1000, test_limit=200, batch_size=100, epochs=3)
    train_loader, test_loader = make_loaders(config, CPU)
    checkpoint = tmp_path / "not-yet-made" / "checkpoint.pt"  # fit makes the folder
    with pytest.raises(NonFiniteLossError, match="at epoch 2, batch 3 of 10") as caught:
        fit(Net(), PoisonedLoader(train_loader, epoch=2, batch=3), test_loader, config,
            checkpoint=checkpoint, progress=False, log=lambda line: None)
    assert "\n" not in str(caught.value)
    state = read_checkpoint(checkpoint)
    assert state["epoch"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values()
               if tensor.is_floating_point())


def test_seeds_run_each_seed_and_summarise(tmp_path, capsys):
    code, _, err = cli(capsys, *SMALL_FLAGS, "--seeds", "0-2", "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "seeds.json").read_text())
    histories = [json.loads((tmp_path / f"seed{s}" / "metrics.json").read_text())["epochs"] for s in range(3)]
    finals = [history[-1]["test_acc"] for history in histories]
    assert summary["final_test_acc"] == {str(s): acc for s, acc in enumerate(finals)}
    assert summary["last3_min_test_acc"] == {
        str(s): min(history[0]["test_acc"], history[1]["test_acc"]) for s, history in enumerate(histories)}
    assert summary["mean"] == pytest.approx(sum(finals) / 3)
    assert summary["min"] == min(finals)
    assert summary["std"] == pytest.approx(torch.tensor(finals).std().item())


@pytest.mark.slow  # a fresh Python process that loads torch and predicts 10,000 images
def test_the_readme_python_snippet_runs_in_a_fresh_process(tmp_path, capsys):
    snippet = (ROOT / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert 'torch.load("runs/first/model.pt")' in snippet and "load_mnist(make_config().data_dir" in snippet
    assert cli(capsys, "--dry-run", "--quiet", "--out", tmp_path / "runs" / "first")[0] == 0
    # From another folder with the project on the path, and the data where MNIST_DATA says.
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "MNIST_DATA": DATA_DIR},
                            check=False)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+\.\d\d% of the test images", result.stdout.strip()), result.stdout


@pytest.mark.parametrize("args", [["--help"], ["--epochs", "0"], ["--model", "ResNet"], ["--lr", "x"],
                                  ["--out", "", "--dry-run"]])
def test_help_and_mistakes_are_answered_before_torch_is_imported(args):
    script = ("import sys, train\ntry:\n    train.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip().endswith("torch not loaded"), result.stdout + result.stderr
    if args == ["--help"]:
        assert "--model MODEL" in result.stdout and "Net, NetCompact, NetTiny" in result.stdout
        assert "speedrun" in result.stdout


def test_the_last_line_says_where_the_files_are(tmp_path, capsys):
    code, out, _ = cli(capsys, *SMALL_FLAGS, "--dry-run", "--out", tmp_path / "run")
    assert code == 0 and out.splitlines()[-1].startswith(f"files in {tmp_path / 'run'}/: metrics.json")
    code, out, _ = cli(capsys, *SMALL_FLAGS, "--dry-run")
    assert code == 0 and out.splitlines()[-1].startswith("nothing was saved: pass --out DIR")
    # A dry run's accuracy means nothing, and it says so.
    assert "a dry run checks that every part runs; the test accuracy of this run says little" in out


@pytest.mark.slow  # one epoch on all 60,000 images: about 20-30 s on 2 cores
def test_the_readme_first_try_ends_well_above_chance(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^python train\.py (--epochs 1 .*?)\s+#", readme, re.MULTILINE).group(1).split()
    assert "--out" in command
    command[command.index("--out") + 1] = str(tmp_path / "first")
    assert cli(capsys, *command, "--quiet")[0] == 0
    final = json.loads((tmp_path / "first" / "metrics.json").read_text())["epochs"][-1]
    assert final["test_acc"] > 97


@pytest.mark.slow  # 300 batches of a range test: the range test itself is tested fast in test_training
def test_find_lr_plots_the_range_test_and_suggests_a_peak(tmp_path, capsys):
    code, out, err = cli(capsys, "--find-lr", "--model", "NetTiny", "--batch-size", 32, "--quiet",
                         "--out", tmp_path)
    assert code == 0, err
    assert (tmp_path / "lr_range.png").stat().st_size > 10_000
    suggested = float(re.search(r"suggested peak learning rate ([0-9.e-]+)", out).group(1))
    assert 1e-4 < suggested < 10 and f"--lr {suggested:.3g}" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lr_range.png"]
