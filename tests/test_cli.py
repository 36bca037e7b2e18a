"""train.py: the command line, its flags, refusals and messages, and what a process sees (pipes, signals,
full disks). The run folder's rules are in test_runs.py."""

import dataclasses
import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

import train
from config import TrainConfig, make_config
from conftest import DATA_DIR, DRY_FLAGS, ROOT, SMALL, SMALL_FLAGS, cli, project_copy, refused, run
from model import NetCompact


def test_every_setting_has_its_flag_with_help_and_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in dataclasses.fields(TrainConfig):
        assert spec.metadata["help"] and " ".join(spec.metadata["help"].split()) in text, spec.name
        assert "--" + spec.name.replace("_", "-") in text
    assert "(default: 0.25)" in text and "--recipe" in text and "--overwrite" in text and "speedrun" in text
    assert "--model MODEL" in text and "Net, NetCompact, NetTiny" in text
    # --data-dir's help explains its default itself, so it gets no second one.
    assert "(default: env MNIST_DATA, else ./data)" in text and "else ./data) (default" not in text
    assert "S7, under 8,000 parameters, 15 epochs or fewer, 99.4% test accuracy in each of the last 3" in text


def test_a_run_says_its_recipe_and_writes_its_settings_metrics_runtime_and_weights(tmp_path, capsys):
    code, out, err = cli(capsys, *SMALL_FLAGS, "--epochs", 3, "--model", "NetCompact", "--seed", 4,
                         "--lr", 0.05, "--device", "cpu", "--out", tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == ("NetCompact: 7,986 parameters, seed 4, on cpu; settings other than the "
                                   "defaults: brief S7, epochs 3, batch-size 100, lr 0.05, rotate 10, "
                                   "shift 2, scale 0.1, ema 0, train-limit 1000, test-limit 500")
    assert [line[:10] for line in out.splitlines() if line.startswith("epoch")] == [
        "epoch  1/3", "epoch  2/3", "epoch  3/3"]
    assert out.splitlines()[-1].startswith(f"files in {tmp_path}/: metrics.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    settings = {**SMALL, "epochs": 3, "model": "NetCompact", "seed": 4, "lr": 0.05, "device": "cpu"}
    assert metrics["config"] == dataclasses.asdict(make_config(**settings))
    assert (metrics["model"], metrics["seed"], metrics["device"]) == ("NetCompact", 4, "cpu")
    assert (metrics["params"], metrics["layers"]) == (7_986, repr(NetCompact()))
    assert len(metrics["epochs"]) == 3 and set(metrics["epochs"][0]) >= {
        "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"}
    runtime = metrics["runtime"]
    assert (runtime["torch"], runtime["torchvision"]) == (torch.__version__, torchvision.__version__)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert runtime["git_commit"] == head.stdout.strip() and isinstance(runtime["git_dirty"], bool)
    NetCompact().load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))


def test_a_brief_caps_the_recipes_epochs_and_a_model_over_its_budget_is_noted(capsys):
    code, out, _ = cli(capsys, *DRY_FLAGS, "--brief", "S7", "--model", "Net")
    assert code == 0 and "note: Net has 19,130 parameters, over the S7 budget of 8,000" in out
    assert out.splitlines()[-1].startswith("nothing was saved: pass --out DIR")  # no --out
    assert "a dry run checks that every part runs; the test accuracy of this run says little" in out
    assert train.parse_args(["--brief", "S7"]).settings == {"brief": "S7"}
    assert make_config(brief="S7").epochs == 15 and make_config(brief="S7", model="NetMicro").epochs == 15


@pytest.mark.parametrize(("args", "words"), [
    (["--epochs", "0"], "epochs must be at least 1, got 0"),
    (["--batch-size", "-8"], "batch size must be at least 1, got -8"),
    (["--lr", "nan"], "learning rate must be a positive number, got nan"),
    (["--model", "ResNet"], "unknown model 'ResNet': choose one of Net, NetCompact, NetTiny"),
    (["--brief", "S9"], "unknown brief 'S9': choose one of S6, S7"),
    (["--step", "jit"], "unknown step 'jit': choose eager, static or graph"),
    (["--warmup", "1.5"], "warmup must be a fraction in (0, 1), got 1.5"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
    (["--pipeline", "dali"], "unknown pipeline 'dali'"),
    (["--pipeline", "torchvision", "--test-limit", "20000"], "test limit must be from 0 (all) to 10,000"),
    (["--train-limit", "70000"], "train limit must be from 0 (all) to 60,000, got 70000"),
    (["--seed", str(2**70)], "seed must be in [0, 2**63)"),
    (["--data-dir", ""], "data dir is empty"),
    (["--resume"], "--resume needs --out DIR"),
    (["--out", "x", "--resume", "--overwrite"],
     "--resume continues the run in --out and --overwrite replaces it"),
    (["--seeds", "a-b", "--out", "x"], "--seeds 'a-b' is not a range"),
    (["--seeds", "0-2"], "--seeds needs --out DIR"),
    (["--seeds", "0-2", "--seed", "3", "--out", "x"], "--seed and --seeds both name seeds: pass one"),
    (["--dry-run", "--epochs", "5"],
     "a dry run trains one epoch of two batches: leave out the epochs (--epochs)"),
    (["--find-lr", "--resume", "--out", "x"], "--find-lr trains nothing to resume or repeat"),
    (["--epochs", "1.5"], "argument --epochs: invalid int value"),
    (["--color"], "unrecognized arguments: --color"),
])
def test_impossible_arguments_get_one_line_and_exit_2(capsys, no_training, args, words):
    try:
        refused(capsys, *args, words=words)
    except SystemExit as caught:  # argparse's own refusals exit from inside it
        err = capsys.readouterr().err
        assert caught.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def test_a_model_py_that_does_not_parse_is_one_line_even_for_help(tmp_path, capsys, monkeypatch):
    import config

    (tmp_path / "model.py").write_text("class Net(nn.Module)\n")
    monkeypatch.setattr(config, "MODEL_FILE", tmp_path / "model.py")
    for args in (["--help"], ["--dry-run"]):
        refused(capsys, *args, words="model.py does not parse (expected ':', line 1): fix it")


@pytest.mark.parametrize("args", [["--help"], ["--epochs", "0"], ["--model", "ResNet"], ["--lr", "x"],
                                  ["--out", "", "--dry-run"]])
def test_help_and_mistakes_are_answered_before_torch_is_imported(args):
    # train.py imports runs.py and config.py first: they need no torch either.
    script = ("import sys, train\ntry:\n    train.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.stdout.strip().endswith("torch not loaded"), result.stdout + result.stderr


@pytest.mark.slow  # a fresh Python process that loads torch and predicts 10,000 images
def test_the_readme_python_snippet_runs_in_a_fresh_process(tmp_path, capsys):
    snippet = (ROOT / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert 'load_weights(Net(), "runs/first")' in snippet and "load_mnist(make_config().data_dir" in snippet
    assert cli(capsys, *DRY_FLAGS, "--out", tmp_path / "runs" / "first")[0] == 0
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "MNIST_DATA": DATA_DIR},
                            check=False)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\d+\.\d\d% of the test images", result.stdout.strip()), result.stdout


@pytest.mark.slow  # one epoch on all 60,000 images: about 20-30 s on 2 cores
def test_the_readme_first_try_ends_well_above_chance(tmp_path, capsys):
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^python train\.py (--epochs 1 .*?)\s+#", readme, re.MULTILINE).group(1).split()
    command[command.index("--out") + 1] = str(tmp_path / "first")
    assert cli(capsys, *command, "--quiet")[0] == 0
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["epochs"][-1]["test_acc"] > 97


@pytest.mark.slow  # 300 batches of a range test: the range test itself is tested fast in test_training
def test_find_lr_suggests_a_peak_and_plots_the_range_test(tmp_path, capsys):
    code, out, err = cli(capsys, "--find-lr", "--model", "NetTiny", "--batch-size", 32, "--quiet", "--out",
                         tmp_path)
    assert code == 0, err
    assert (tmp_path / "lr_range.png").stat().st_size > 10_000
    suggested = float(re.search(r"suggested peak learning rate ([0-9.e-]+)", out).group(1))
    assert 1e-4 < suggested < 10 and f"--lr {suggested:.3g}" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lr_range.png"]


def test_find_lr_checks_where_its_plot_goes_before_the_work(tmp_path, capsys, monkeypatch):
    import utils

    monkeypatch.setattr(utils, "lr_range_test", lambda *args, **kwargs: pytest.fail("the range test ran"))
    # The same check as a run's --out (test_runs.py), and the only --out that os.access finds read-only.
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: False)  # read-only; root writes anywhere
        refused(capsys, "--find-lr", "--out", tmp_path / "plots",
                words="is read-only): choose a folder you can write to")
    # A disk that fills during the test: the suggestion is printed before the plot is written.
    monkeypatch.setattr(utils, "lr_range_test", lambda *args, **kwargs: {
        "lr": [1e-3, 1e-2], "loss": [2.0, 1.0], "suggested_lr": 0.05, "rule": "a rule"})
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    code, out, err = cli(capsys, "--find-lr", "--quiet", "--train-limit", 200, "--out", tmp_path / "full")
    assert code == 2 and "suggested peak learning rate 0.05" in out
    plot = tmp_path / "full" / "lr_range.png"
    assert err == f"error: the plot cannot be written to {plot} (No space left on device); the suggestion " \
                  "above stands\n"


def script(*args):
    return [sys.executable, str(ROOT / "train.py"), "--data-dir", DATA_DIR, *map(str, args)]


@pytest.mark.slow  # a fresh process that loads torch and trains
def test_a_closed_output_pipe_or_a_full_disk_stops_in_one_line(tmp_path):
    process = subprocess.Popen(script(*SMALL_FLAGS, "--epochs", 3, "--out", tmp_path / "pipe"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process.stdout.readline()  # as `| head -1` does
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert process.returncode == 141 and "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "the output pipe was closed" in stderr and "--resume" in stderr
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        result = subprocess.run(script(*DRY_FLAGS, "--out", tmp_path / "full"), stdout=full,
                                stderr=subprocess.PIPE,
                                text=True, timeout=120, check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: the output cannot be written (No space left on device)")


def test_ctrl_c_while_starting_up_prints_no_traceback():
    process = subprocess.Popen(script("--dry-run"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside `import torch`, which takes seconds
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr == "interrupted while starting: nothing was written\n", stderr


@pytest.mark.slow  # a copy of the project run from another folder
def test_the_hint_of_an_interrupted_run_works_word_for_word_from_another_folder(tmp_path):
    project = project_copy(tmp_path / "s6")
    (project / "sitecustomize.py").write_text(
        "import utils, os\nif os.environ.get('STOP_AT'):\n    original = utils.train_epoch\n"
        "    def train_epoch(*args, epoch=1, **kwargs):\n"
        "        if epoch == int(os.environ['STOP_AT']):\n            raise KeyboardInterrupt\n"
        "        return original(*args, epoch=epoch, **kwargs)\n    utils.train_epoch = train_epoch\n")
    env = {**os.environ, "PYTHONPATH": str(project), "STOP_AT": "2", "MNIST_DATA": DATA_DIR}
    # Abbreviated flags, train.py named from another folder.
    stopped = subprocess.run([sys.executable, "s6/train.py", *SMALL_FLAGS, "--overw", "--ou", "runs/a"],
                             cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert stopped.returncode == 130, stopped.stderr
    hint = re.search(r"continue with (python .*)$", stopped.stderr.strip()).group(1)
    assert "s6/train.py" in hint and "--overw " not in hint and hint.endswith("--out runs/a --resume")
    resumed = subprocess.run([sys.executable, *shlex.split(hint)[1:]], cwd=tmp_path, capture_output=True,
                             text=True, env={**env, "STOP_AT": ""}, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((tmp_path / "runs" / "a" / "metrics.json").read_text())["epochs"]) == 2
    assert run(project, "train.py", "--help").returncode == 0
