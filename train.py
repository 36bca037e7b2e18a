"""Train a compact CNN on MNIST: one line per epoch, metrics.json and model.pt in --out.

    python train.py                                  # Net, 20 epochs, data in ./data (downloaded)
    python train.py --data-dir ../shared/data --out runs/net --seed 0
    python train.py --out runs/net --resume          # continue after an interruption
    python train.py --seeds 0-4 --out runs/seeds     # one run per seed and a summary (seeds.json)
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from model import MODELS
from utils import (
    ConfigError,
    TrainConfig,
    TrainingError,
    atomic_write,
    fit,
    keep_freed_memory,
    make_loaders,
    pick_device,
    prepare_model,
    read_checkpoint,
    runtime_info,
    seed_everything,
)

HELP = {
    "model": "model class in model.py",
    "epochs": "epochs to train",
    "batch_size": "training and test batch size",
    "lr": "peak learning rate of the one-cycle schedule",
    "momentum": "SGD momentum (Nesterov)",
    "weight_decay": "L2 weight decay",
    "label_smoothing": "label smoothing of the training loss",
    "rotate": "training augmentation: random rotation in degrees",
    "shift": "training augmentation: random shift in pixels",
    "scale": "training augmentation: random zoom by a factor in [1 - scale, 1 + scale]",
    "ema": "test and keep an exponential moving average of the weights with this per-step decay (0: off)",
    "seed": "random seed (weights, shuffling, augmentation, dropout)",
    "pipeline": "tensor: dataset on the device, batched augmentation; torchvision: DataLoader reference",
    "data_dir": "folder holding MNIST/raw; downloaded there when missing (env MNIST_DATA)",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    "train_limit": "train on the first N images only (0: all)",
    "test_limit": "test on the first N images only (0: all)",
    "dry_run": "one epoch of two batches, for smoke tests",
}


def parse_args(argv):
    # Flags left out stay out of the namespace, so a resumed run can tell which were given.
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS)
    for field in fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP[field.name])
        else:
            parser.add_argument(flag, type=type(field.default), metavar=field.name.split("_")[-1].upper(),
                                help=f"{HELP[field.name]} (default: {field.default})")
    parser.add_argument("--out", type=Path, help="folder for metrics.json, model.pt and checkpoint.pt")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
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


def train_once(settings, out=None, resume=False, progress=True):
    """Train one model with the given settings (TrainConfig fields; with ``resume``, the others come
    from the checkpoint). With ``out``, write checkpoint.pt, metrics.json and model.pt there.
    Returns the metrics dict."""
    checkpoint = None if out is None else out / "checkpoint.pt"
    if checkpoint is not None and checkpoint.exists():
        if not resume:
            raise TrainingError(f"{checkpoint} already exists: pass --resume to continue it, or choose "
                                "another --out")
        settings = {**read_checkpoint(checkpoint)["config"], **settings}
    elif resume:
        print(f"no checkpoint in {out} yet: starting from scratch", file=sys.stderr)
    config = TrainConfig(**settings)
    device = pick_device(config.device)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(config.seed)
    model = prepare_model(MODELS[config.model](), device)
    train_loader, test_loader = make_loaders(config, device)
    print(f"{config.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"seed {config.seed}, device {device}, {config.pipeline} pipeline")
    history = fit(model, train_loader, test_loader, config, checkpoint=checkpoint, resume=resume,
                  progress=progress)
    metrics = {"model": config.model, "params": sum(p.numel() for p in model.parameters()),
               "seed": config.seed, "device": str(device), "config": asdict(config),
               "runtime": runtime_info(device), "epochs": history}
    if out is not None:
        atomic_write(out / "metrics.json", lambda file: file.write(json.dumps(metrics, indent=1).encode()))
        atomic_write(out / "model.pt", lambda file: torch.save(model.state_dict(), file))
    return metrics


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


def main(argv=None):
    args = parse_args(argv)
    out, resume, seeds, quiet = (args.pop(key, default) for key, default in
                                 (("out", None), ("resume", False), ("seeds", None), ("quiet", False)))
    progress = not quiet and sys.stderr.isatty()
    try:
        if resume and out is None:
            raise ConfigError("--resume needs --out DIR, the folder holding the checkpoint")
        if seeds is None:
            train_once(args, out, resume, progress)
            return 0
        if out is None:
            raise ConfigError("--seeds needs --out DIR to hold one folder per seed and seeds.json")
        runs = [train_once({**args, "seed": seed}, out / f"seed{seed}", resume, progress)
                for seed in parse_seeds(seeds)]
        summary = summarise_seeds(runs)
        atomic_write(out / "seeds.json", lambda file: file.write(json.dumps(summary, indent=1).encode()))
        print(f"final test accuracy over seeds {seeds}: mean {summary['mean']:.3f}%  "
              f"std {summary['std']:.3f}  min {summary['min']:.2f}%  max {summary['max']:.2f}%")
        return 0
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the checkpoint of the last finished epoch is kept; continue with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
