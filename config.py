"""Every setting of a training run (TrainConfig), the measured recipes, and the errors a user can fix.

Imports only the standard library, so that train.py answers --help and refuses impossible settings
before it loads torch (seconds). The model names are read from model.py's source for the same reason.

    config = make_config(model="NetTiny", epochs=5)   # NetTiny's recipe, 5 epochs
"""

import ast
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000  # the MNIST splits

# ---------------------------------------------------------------------------------------------
# Errors: each message says what is wrong and what to do


class TrainingError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ConfigError(TrainingError, ValueError):
    """Impossible settings, an unusable device or output folder."""


class DataError(TrainingError):
    """MNIST files missing, undownloadable, unreadable, truncated or foreign."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be resumed from, or cannot be written."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# The models, by name


@cache
def model_names():
    """The model classes of model.py, in the order they are defined: every class that derives from
    nn.Module (directly or through another class of the file) and can be built without arguments.
    Read from the source, as model.MODELS finds them by import; a test checks that the two agree."""
    tree = ast.parse((Path(__file__).resolve().parent / "model.py").read_text())
    buildable = {}  # class name -> whether it builds without arguments, for each module class of the file
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = [ast.unparse(base) for base in node.bases]
        in_file = [base for base in bases if base in buildable]
        torch_modules = [base for base in bases if base.startswith(("nn.", "torch.nn.")) or base == "Module"]
        if not in_file and not torch_modules:  # not a module: a helper class, say
            continue
        init = next((item for item in node.body
                     if isinstance(item, ast.FunctionDef) and item.name == "__init__"), None)
        if init is None:  # inherited: from classes of the file, or from torch's, of which only these two
            # build without arguments
            buildable[node.name] = (all(buildable[base] for base in in_file)
                                    and all(base.rpartition(".")[2] in ("Module", "Sequential")
                                            for base in torch_modules))
        else:
            arguments = init.args
            positional = len(arguments.posonlyargs) + len(arguments.args) - 1  # less self
            buildable[node.name] = positional == len(arguments.defaults) and None not in arguments.kw_defaults
    return tuple(name for name, ok in buildable.items() if ok)


# ---------------------------------------------------------------------------------------------
# Settings


def setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default and its help; train.py makes a flag of each."""

    model: str = setting("Net", "model class in model.py")
    epochs: int = setting(20, "epochs to train")
    batch_size: int = setting(256, "training and test batch size")
    lr: float = setting(0.2, "peak learning rate of the one-cycle schedule")
    warmup: float = setting(0.25, "fraction of the steps over which the learning rate rises to its peak")
    momentum: float = setting(0.9, "SGD momentum (Nesterov), cycled 0.05 either side of this, against the "
                                   "learning rate (0: none)")
    weight_decay: float = setting(5e-4, "L2 weight decay")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss")
    rotate: float = setting(7.0, "training augmentation: random rotation in degrees, uniform in [-r, r]")
    shift: float = setting(1.0, "training augmentation: random shift in pixels along each axis")
    scale: float = setting(0.05, "training augmentation: random zoom by a factor in [1 - s, 1 + s]")
    ema: float = setting(0.99, "test and keep an exponential moving average of the weights with this "
                              "per-step decay (0: off)")
    clean_bn: bool = setting(False, "after the last epoch, re-estimate the tested model's BatchNorm "
                                    "statistics on the training images without augmentation, which the test "
                                    "images resemble")
    seed: int = setting(0, "random seed (weights, shuffling, augmentation, dropout)")
    pipeline: str = setting("tensor", "tensor: dataset on the device, batched augmentation; "
                                      "torchvision: the classic DataLoader (the reference)")
    # Read when a config is made, so that setting MNIST_DATA in a notebook takes effect. Empty is unset.
    data_dir: str = field(default_factory=lambda: os.environ.get("MNIST_DATA") or "./data",
                          metadata={"help": "folder holding MNIST/raw (or that folder itself, or MNIST/); "
                                            "downloaded there when missing (default: env MNIST_DATA, else "
                                            "./data)"})
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    step: str = setting("eager", "training step: eager (torch.optim, op by op), static (the same as fixed "
                                 "tensors and tensor ops) or graph (static, captured in a CUDA graph; CUDA "
                                 "only)")
    deterministic: bool = setting(True, "on CUDA, deterministic kernels: one seed, one result (the CPU's "
                                        "kernels are deterministic already)")
    train_limit: int = setting(0, f"train on the first N of the {TRAIN_IMAGES:,} images only (0: all)")
    test_limit: int = setting(0, f"test on the first N of the {TEST_IMAGES:,} images only (0: all)")
    dry_run: bool = setting(False, "a smoke test: one epoch on at most two batches of training and of test "
                                   "images (sets --epochs and the limits)")

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = (int, float) if spec.type is float else spec.type
            if not isinstance(value, expected) or (isinstance(value, bool) and spec.type is not bool):
                raise ConfigError(f"setting {spec.name} must be a {spec.type.__name__}, got {value!r}")
        checks = [
            (self.model in model_names(),
             f"unknown model {self.model!r}: choose one of {', '.join(model_names())}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0,
             f"learning rate must be a positive number, got {self.lr}"),
            (0 < self.warmup < 1, f"warmup must be a fraction in (0, 1), got {self.warmup}"),
            (self.momentum == 0 or 0.05 <= self.momentum < 0.95,
             f"momentum must be 0 or in [0.05, 0.95) (it cycles 0.05 either side), got {self.momentum}"),
            (0 <= self.weight_decay < 1, f"weight decay must be in [0, 1), got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.rotate <= 180, f"rotation must be between 0 and 180 degrees, got {self.rotate}"),
            (0 <= self.shift < 14, f"shift must be between 0 and 14 pixels, got {self.shift}"),
            (0 <= self.scale < 1, f"scale must be in [0, 1), got {self.scale}"),
            (0 <= self.ema < 1, f"ema decay must be in [0, 1) (0 turns it off), got {self.ema}"),
            (self.step in ("eager", "static", "graph"),
             f"unknown step {self.step!r}: choose eager, static or graph"),
            (self.pipeline in ("tensor", "torchvision"),
             f"unknown pipeline {self.pipeline!r}: choose tensor or torchvision"),
            (0 <= self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed}"),
            (0 <= self.train_limit <= TRAIN_IMAGES,
             f"train limit must be from 0 (all) to {TRAIN_IMAGES:,}, got {self.train_limit}"),
            (0 <= self.test_limit <= TEST_IMAGES,
             f"test limit must be from 0 (all) to {TEST_IMAGES:,}, got {self.test_limit}"),
            (self.data_dir.strip() != "",
             "data dir is empty: name the folder holding MNIST, or leave it out for ./data"),
            (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
             f"unknown device {self.device!r}: use auto, cpu, cuda, cuda:N or mps"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.dry_run:
            # A preset of the limits, so that the loops know nothing of dry runs.
            self.epochs = 1
            self.train_limit = min(self.train_limit or math.inf, 2 * self.batch_size)
            self.test_limit = min(self.test_limit or math.inf, 2 * self.batch_size)


def default_setting(name):
    """The default of a TrainConfig field, as a config made now would have it."""
    spec = TrainConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


# ---------------------------------------------------------------------------------------------
# Measured recipes: the settings in which each differs from TrainConfig's defaults (see RESULTS.md).
# A model trains with the recipe of its name unless another is named; settings given override both.
# The smaller models were measured with the stronger augmentation that Net had before its weight
# average: rotation 10 degrees, shift 2 pixels, zoom 10%.

STRONGER_AUGMENTATION = {"rotate": 10.0, "shift": 2.0, "scale": 0.1}
RECIPES = {
    "Net": {"model": "Net"},
    "NetCompact": {"model": "NetCompact", "epochs": 15, **STRONGER_AUGMENTATION},
    "NetTiny": {"model": "NetTiny", "epochs": 20, **STRONGER_AUGMENTATION, "clean_bn": True},
    # Net's augmentation and schedule, with BatchNorm statistics of clean images at the end.
    "NetMicro": {"model": "NetMicro", "epochs": 20, "clean_bn": True},
    # The least training time to >= 99.4% on every seed of those measured: Net's recipe, one-cycle over
    # 8 epochs (over 6, seed 2 ended at 99.39%; without the weight average 10 epochs were needed).
    "speedrun": {"model": "Net", "epochs": 8},
}


def make_config(recipe=None, **settings):
    """A TrainConfig of the named recipe (default: the recipe of ``settings["model"]``, else Net's),
    with ``settings`` on top."""
    if recipe is not None and (not isinstance(recipe, str) or recipe not in RECIPES):
        raise ConfigError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if unknown := sorted(set(settings) - TrainConfig.__dataclass_fields__.keys(), key=str):
        raise ConfigError(f"unknown setting(s) {', '.join(map(repr, unknown))}: the settings are "
                          f"{', '.join(TrainConfig.__dataclass_fields__)}")
    model = settings.get("model", "Net")
    base = RECIPES.get(recipe or (model if isinstance(model, str) else "Net"), {})
    return TrainConfig(**{**base, **settings})


# ---------------------------------------------------------------------------------------------
# Resuming: which settings a resumed run may change

# Settings that may differ between a run and its resumption: where data lives and what runs it.
RESUMABLE_CHANGES = {"data_dir", "device"}


def settings_changes(saved, config):
    """The settings of ``config`` that differ from a run's ``saved`` ones, as 'name old -> new' strings.
    A setting added after the run was saved counts as its default."""
    changes = []
    for spec in fields(config):
        old, new = saved.get(spec.name, default_setting(spec.name)), getattr(config, spec.name)
        if spec.name not in RESUMABLE_CHANGES and old != new:
            changes.append(f"{spec.name} {old!r} -> {new!r}")
    return changes
