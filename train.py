"""Train a compact CNN on MNIST: one line per epoch, metrics.json and model.pt in --out.

    python train.py                                  # Net, 20 epochs, data in ./data (downloaded)
    python train.py --model NetCompact               # another model, with its measured recipe
    python train.py --out runs/net --seed 0          # checkpoint every epoch into runs/net
    python train.py --out runs/net --resume          # continue after an interruption, exactly
    python train.py --seeds 0-4 --out runs/seeds     # one run per seed and a summary (seeds.json)
"""

import os
import signal

# Until main() starts nothing has been written, so Ctrl-C may end the process at once. Left to
# Python, Ctrl-C while torch loads (seconds) ends in a traceback from deep inside an import.
signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"interrupted while starting: nothing was written\n"),
                                         os._exit(130)))

import argparse
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from config import RECIPES, ConfigError, TrainingError, default_setting, make_config
from data import make_loaders
from model import MODELS
from utils import (
    atomic_write,
    fit,
    keep_freed_memory,
    pick_device,
    prepare_model,
    read_checkpoint,
    runtime_info,
    seed_everything,
    settings_changes,
)

try:
    import fcntl
except ImportError:  # Windows: runs into one --out are not locked against each other
    fcntl = None

RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json", "model.pt")


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    out, resume, overwrite, seeds, quiet = (args.pop(key, default) for key, default in (
        ("out", None), ("resume", False), ("overwrite", False), ("seeds", None), ("quiet", False)))
    progress = not quiet and sys.stderr.isatty()
    try:
        if resume and out is None:
            raise ConfigError("--resume needs --out DIR, the folder holding the run to continue")
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one")
        if seeds is None:
            train_once(args, out, resume=resume, overwrite=overwrite, progress=progress)
            return 0
        if out is None:
            raise ConfigError("--seeds needs --out DIR to hold one folder per seed and seeds.json")
        runs = [train_once({**args, "seed": seed}, out / f"seed{seed}", resume=resume, overwrite=overwrite,
                           progress=progress)
                for seed in parse_seeds(seeds)]
        summary = summarise_seeds(runs)
        write_json(out / "seeds.json", summary)
        print(f"final test accuracy over seeds {seeds}: mean {summary['mean']:.3f}%  "
              f"std {summary['std']:.3f}  min {summary['min']:.2f}%  max {summary['max']:.2f}%")
        return 0
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {what_is_kept(out)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output (such as head) has gone; further prints would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"stopped: the output pipe was closed; {what_is_kept(out)}", file=sys.stderr)
        return 141


def train_once(given, out=None, *, resume=False, overwrite=False, progress=True):
    """Train one model with the ``given`` settings (TrainConfig fields and ``recipe``; those not given
    come from the recipe, or with ``resume`` from the run in ``out``). With ``out``, the run's settings,
    a checkpoint every epoch, metrics.json and model.pt go there. Returns the metrics dict."""
    make_config(**given)  # impossible settings are refused before anything is touched
    lock = None if out is None else open_run_folder(out)  # so are problems with --out
    try:
        if out is not None:
            given = settings_for(out, given, resume=resume, overwrite=overwrite)
        config = make_config(**given)
        if out is not None:
            write_json(out / "config.json", asdict(config))
        device = pick_device(config.device)
        if device.type == "cpu":
            keep_freed_memory()
        seed_everything(config.seed, device, config.deterministic)
        model = prepare_model(MODELS[config.model](), device)
        params = sum(p.numel() for p in model.parameters())
        train_loader, test_loader = make_loaders(config, device)
        print(f"{config.model}: {params:,} parameters, seed {config.seed}, device {device}, "
              f"{config.pipeline} pipeline")
        checkpoint = None if out is None else out / "checkpoint.pt"
        history = fit(model, train_loader, test_loader, config, checkpoint=checkpoint, resume=resume,
                      progress=progress)
        # The layers as printed, so that a run says what it trained even when model.py has changed since.
        metrics = {"model": config.model, "params": params, "layers": repr(model), "seed": config.seed,
                   "device": str(device), "config": asdict(config), "runtime": runtime_info(device),
                   "epochs": history}
        if out is not None:
            write_json(out / "metrics.json", metrics)
            atomic_write(out / "model.pt", lambda file: torch.save(model.state_dict(), file))
        return metrics
    finally:
        if lock is not None:
            lock.close()


def open_run_folder(out):
    """Make ``out`` and lock it for this process (released when the process ends, however it ends).
    ConfigError if it cannot be written or another run holds it. Returns the open lock file."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")  # noqa: SIM115 (held until the run ends; train_once closes it)
    except OSError as error:
        raise ConfigError(f"--out {out} cannot be used ({error.strerror}): choose a folder you can write "
                          "to") from None
    if fcntl is not None:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(f"another run ({holder}) is writing into {out}: wait for it to end, or choose "
                              "another --out") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}")
        lock.flush()
    # Temporary files of writes cut short by a kill; nobody else can be writing them now.
    for temporary in out.glob(".*.tmp"):
        temporary.unlink(missing_ok=True)
    return lock


def settings_for(out, given, *, resume, overwrite):
    """The settings to run with in ``out``: the run there continued (``resume``), or replaced
    (``overwrite``), or a new one where none is. Refuses anything that would lose a result."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if overwrite:
        for name in existing:
            (out / name).unlink()
        return given
    if not existing:
        if resume:
            print(f"no run in {out} yet: starting from scratch", file=sys.stderr)
        return given
    if not resume:
        what = "a finished run (metrics.json)" if "metrics.json" in existing else "a run"
        raise ConfigError(f"{out} already holds {what}: pass --resume to continue it, --overwrite to "
                          "replace it, or choose another --out")
    if "checkpoint.pt" in existing:
        saved = read_checkpoint(out / "checkpoint.pt")["config"]
    elif "metrics.json" in existing:
        raise ConfigError(f"{out} holds a finished run but no checkpoint.pt to continue from: pass "
                          "--overwrite to train it again, or choose another --out")
    else:  # started, but killed before its first checkpoint
        saved = read_json(out / "config.json")
    settings = {**saved, **{key: value for key, value in given.items() if key != "recipe"}}
    if changed := settings_changes(saved, make_config(**settings)):
        raise ConfigError(f"the run in {out} was made with other settings ({'; '.join(changed)}): resume "
                          "with the same settings, or choose another --out")
    return settings


def write_json(path, data):
    atomic_write(path, lambda file: file.write(json.dumps(data, indent=1).encode()))


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): pass --overwrite to start over, or choose "
                          "another --out") from None


def what_is_kept(out):
    if out is None:
        return "nothing was saved (pass --out to keep a checkpoint every epoch)"
    if any(out.glob("**/checkpoint.pt")):
        return f"the checkpoint of the last finished epoch is kept: continue with --out {out} --resume"
    return f"no epoch had finished; --out {out} --resume starts the run again with its settings"


def parse_args(argv):
    # Flags left out stay out of the namespace, so that a resumed run can tell which were given.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("--recipe", choices=list(RECIPES), help="measured settings to start from (default: "
                        "the recipe of --model); flags given override it")
    for spec in fields(make_config()):
        flag = "--" + spec.name.replace("_", "-")
        if spec.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=spec.metadata["help"])
        else:
            # A help that explains its own default (--data-dir's) is not given a second one.
            text = spec.metadata["help"]
            if "(default:" not in text:
                text += f" (default: {default_setting(spec.name)})"
            parser.add_argument(flag, type=spec.type, metavar=spec.name.split("_")[-1].upper(), help=text)
    parser.add_argument("--out", type=Path,
                        help="folder for config.json, checkpoint.pt, metrics.json, model.pt")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--seeds", help="run each seed of a range such as 0-4 or 0,3,7 into --out/seedN "
                        "and summarise them in --out/seeds.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return vars(parser.parse_args(argv))


def parse_seeds(text):
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-"))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a range such as 0-4 or a list such as 0,3,7") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed: write the range low-high, such as 0-4")
    return seeds


def summarise_seeds(runs):
    finals = [run["epochs"][-1]["test_acc"] for run in runs]
    return {"model": runs[0]["model"], "params": runs[0]["params"], "epochs": len(runs[0]["epochs"]),
            "final_test_acc": {str(run["seed"]): run["epochs"][-1]["test_acc"] for run in runs},
            # A run that ends well by luck shows it here: the worst of its last three epochs.
            "last3_min_test_acc": {str(run["seed"]): min(row["test_acc"] for row in run["epochs"][-3:])
                                   for run in runs},
            "mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "min": min(finals), "max": max(finals),
            "config": {key: value for key, value in runs[0]["config"].items() if key != "seed"}}


if __name__ == "__main__":
    sys.exit(main())
