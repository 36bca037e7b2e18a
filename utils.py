"""Training: every setting of a run (TrainConfig), the errors a user can fix, fit with its optimizer
and schedule, the train and test loops, checkpoints, device choice and the curves. Used by train.py,
bench.py and S6.ipynb; the data pipelines are in data.py, the models in model.py.

    config = TrainConfig(epochs=20)
    history = fit(model, *make_loaders(config, device), config)
"""

import itertools
import math
import os
import pickle
import platform
import subprocess
import tempfile
import time
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from model import MODELS


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
    clean_bn: bool = setting(False, "after the last epoch, re-estimate the tested model's BatchNorm statistics "
                                    "on the training images without augmentation, which the test images resemble")
    seed: int = setting(0, "random seed (weights, shuffling, augmentation, dropout)")
    pipeline: str = setting("tensor", "tensor: dataset on the device, batched augmentation; "
                                      "torchvision: the classic DataLoader (the reference)")
    # Read when a config is made, so that setting MNIST_DATA in a notebook takes effect.
    data_dir: str = field(default_factory=lambda: os.environ.get("MNIST_DATA", "./data"),
                          metadata={"help": "folder holding MNIST/raw; downloaded there when missing "
                                            "(default: env MNIST_DATA, else ./data)"})
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    step: str = setting("eager", "training step: eager (torch.optim, op by op), static (the same as fixed "
                                 "tensors and tensor ops) or graph (static, captured in a CUDA graph; CUDA only)")
    deterministic: bool = setting(True, "on CUDA, deterministic kernels: one seed, one result (the CPU's "
                                        "kernels are deterministic already)")
    train_limit: int = setting(0, "train on the first N images only (0: all)")
    test_limit: int = setting(0, "test on the first N images only (0: all)")
    dry_run: bool = setting(False, "one epoch of two batches, for smoke tests")

    def __post_init__(self):
        for spec in fields(self):
            value = getattr(self, spec.name)
            expected = (int, float) if spec.type is float else spec.type
            if not isinstance(value, expected) or (isinstance(value, bool) and spec.type is not bool):
                raise ConfigError(f"setting {spec.name} must be a {spec.type.__name__}, got {value!r}")
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr}"),
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
            (self.train_limit >= 0, f"train limit must be >= 0 (0 means all), got {self.train_limit}"),
            (self.test_limit >= 0, f"test limit must be >= 0 (0 means all), got {self.test_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# Measured recipes: the settings in which each differs from TrainConfig's defaults (see RESULTS.md).
# A model trains with the recipe of its name unless another is named; settings given override both.
# The smaller models were measured with the stronger augmentation that Net had before its weight
# average: rotation 10 degrees, shift 2 pixels, zoom 10%.
STRONGER_AUGMENTATION = {"rotate": 10.0, "shift": 2.0, "scale": 0.1}
RECIPES = {
    "Net": {"model": "Net"},
    "NetCompact": {"model": "NetCompact", "epochs": 15, **STRONGER_AUGMENTATION},
    "NetTiny": {"model": "NetTiny", "epochs": 20, **STRONGER_AUGMENTATION, "clean_bn": True},
    # The least training time to >= 99.4% on every seed of those measured: Net's recipe, one-cycle over
    # 8 epochs (over 6, seed 2 ended at 99.39%; without the weight average 10 epochs were needed).
    "speedrun": {"model": "Net", "epochs": 8},
}


def make_config(recipe=None, **settings):
    """A TrainConfig of the named recipe (default: the recipe of ``settings["model"]``, else Net's),
    with ``settings`` on top."""
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return TrainConfig(**{**RECIPES.get(recipe or settings.get("model", "Net"), {}), **settings})


def default_setting(name):
    """The default of a TrainConfig field, as a config made now would have it."""
    spec = TrainConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default is MISSING else spec.default


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
# Training


def fit(model, train_loader, test_loader, config, *, checkpoint=None, resume=False, progress=True,
        log=print):
    """Train for ``config.epochs`` with SGD under a one-cycle schedule (see make_optimizer).

    Returns the history, a list of per-epoch dicts. With ``checkpoint`` (a path), saves everything
    needed to continue after every epoch, atomically; with ``resume`` also, continues from it.
    """
    batches = 2 if config.dry_run else len(train_loader)
    epochs = 1 if config.dry_run else config.epochs
    steps = epochs * batches
    optimizer, scheduler = make_optimizer(model, config, steps)
    averaged = average_of(model, config.ema)
    # The average starts at the initial weights and forgets them slowly: in a short run (a dry run, one
    # epoch of a few images) it would test far worse than the model, which looks like a broken run.
    if averaged is not None and (share := config.ema ** steps) > 0.01:
        log(f"note: after {steps} steps the weight average (--ema {config.ema:g}) still holds "
            f"{share:.0%} of the initial weights, so it tests worse than the model; pass --ema 0 for runs "
            "this short")
    tested = model if averaged is None else averaged.module
    history = []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        history = restore_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, averaged)
        log(f"resumed from {checkpoint} after epoch {len(history)}")
    step = make_step(model, optimizer, scheduler, config, averaged)  # after the restore: it holds the buffers
    for epoch in range(len(history) + 1, epochs + 1):
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        try:
            train_metrics = train_epoch(model, train_loader, step, epoch=epoch, max_batches=batches,
                                        progress=progress)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {kept(checkpoint, history)}") from None
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        test_batches = 2 if config.dry_run else None
        row = {}
        if config.clean_bn and epoch == epochs:
            before = evaluate(tested, test_loader, max_batches=test_batches)
            row = {"test_loss_before_clean_bn": before["loss"], "test_acc_before_clean_bn": before["acc"]}
            # The statistics were gathered on augmented images, which are rotated, shifted and zoomed
            # where the test images are not; measured on NetTiny, statistics of clean images test better.
            update_bn(itertools.islice(train_loader.unaugmented(), batches), tested)
        test_metrics = evaluate(tested, test_loader, max_batches=test_batches)
        history.append({"epoch": epoch, "lr": lr, **train_metrics, "test_loss": test_metrics["loss"],
                        "test_acc": test_metrics["acc"], **row, "seconds": train_seconds,
                        "test_seconds": time.perf_counter() - started})
        # Saved before the line is printed, so that a closed pipe or Ctrl-C there loses nothing.
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, history, averaged)
        log(format_epoch(history[-1]))
        if row:
            log(f"BatchNorm statistics re-estimated on the unaugmented training images: test accuracy "
                f"{row['test_acc_before_clean_bn']:.2f}% -> {history[-1]['test_acc']:.2f}%")
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())  # the caller gets the weights that were tested
    return history


def kept(checkpoint, history):
    """What a run that stops now leaves to resume from, for the end of an error message."""
    if checkpoint is None:
        return "nothing was saved (pass --out to keep a checkpoint every epoch)"
    if not history:
        return "no epoch had finished, so there is no checkpoint yet"
    return f"the checkpoint of epoch {len(history)} is kept in {checkpoint}"


def make_optimizer(model, config, total_steps):
    """SGD with Nesterov momentum and weight decay, under a one-cycle schedule: the learning rate rises
    from lr/25 to ``config.lr`` over the first ``config.warmup`` of the steps, then anneals (cosine)
    to almost zero, while the momentum moves the other way between ``config.momentum`` -/+ 0.05. The
    scheduler steps once per batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup,
        cycle_momentum=config.momentum > 0, base_momentum=max(config.momentum - 0.05, 0),
        max_momentum=config.momentum + 0.05)
    return optimizer, scheduler


def make_step(model, optimizer, scheduler, config, averaged=None):
    """The training step that ``config.step`` names: eager, static, or static captured in a CUDA graph."""
    device = next(model.parameters()).device
    if config.step == "graph" and device.type != "cuda":
        raise ConfigError(f"step 'graph' captures CUDA graphs, and the device is {device}: use --step eager "
                          "or static there")
    if config.step == "eager":
        return EagerStep(model, optimizer, scheduler, config, averaged)
    return StaticStep(model, optimizer, scheduler, config, averaged, capture=config.step == "graph")


def average_of(model, decay):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, starting from its
    current weights (None for a decay of 0: no average). Late in training the raw weights still jump from
    batch to batch; their average does not, so it is the better model to test and keep."""
    if not decay:
        return None
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    averaged.update_parameters(model)  # the first call copies: the average starts at the initial weights
    return averaged


def train_epoch(model, loader, step, *, epoch=1, max_batches=None, progress=True):
    """One pass over ``loader``, calling ``step`` (an EagerStep or a StaticStep) on each batch; returns
    {"train_loss", "train_acc"} (mean loss, percent correct).

    Raises NonFiniteLossError naming the epoch and batch where the loss stopped being finite.
    """
    model.train()
    step.tally.zero_()
    seen = 0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(itertools.islice(loader, total), total=total, desc=f"epoch {epoch} train", leave=False,
               disable=not progress)
    for batch, (images, labels) in enumerate(bar):
        step(images, labels)
        seen += len(labels)
        if batch % 50 == 0 or batch + 1 == total:  # reading the tally waits for the device: not every batch
            loss_sum, correct, last_loss, first_bad, _ = step.tally.tolist()
            if first_bad:
                raise NonFiniteLossError(f"training loss became non-finite at epoch {epoch}, batch "
                                         f"{int(first_bad)} of {len(loader)}: lower --lr or check the input data")
            bar.set_postfix(loss=f"{last_loss:.4f}")
    return {"train_loss": loss_sum / seen, "train_acc": 100 * correct / seen}


class EagerStep:
    """A training step with torch.optim's SGD and scheduler, run op by op: the default everywhere.

    ``tally`` holds, on the device so that no step waits for it: the epoch's loss sum, correct count,
    the last loss and the first batch (counted from 1; 0: none) whose loss was not finite.
    """

    def __init__(self, model, optimizer, scheduler, config, averaged=None):
        self.model, self.optimizer, self.scheduler, self.averaged = model, optimizer, scheduler, averaged
        self.label_smoothing = config.label_smoothing
        self.tally = torch.zeros(5, device=next(model.parameters()).device)

    def __call__(self, images, labels):
        log_probs = self.model(images)
        loss = F.cross_entropy(log_probs, labels, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.model)
        count(self.tally, loss.detach(), log_probs.detach(), labels)


def count(tally, loss, log_probs, labels):
    """Add a batch to ``tally`` (see EagerStep) with tensor ops only, so that a CUDA graph can hold it."""
    loss_sum, correct, last_loss, first_bad, batches = tally.unbind()
    batches += 1
    loss_sum += loss * len(labels)
    correct += (log_probs.argmax(dim=1) == labels).sum()
    last_loss.copy_(loss)
    first_bad.copy_(torch.where(torch.isfinite(loss) | (first_bad > 0), first_bad, batches))


class StaticStep:
    """The same step as EagerStep, as fixed tensors and tensor ops only, so that on CUDA it can be
    captured once in a CUDA graph and replayed for every batch (PyTorch's whole-network capture: the
    GPU then no longer waits on Python and kernel launches between a step's ~100 small kernels).

    Each batch is copied into a fixed input buffer; the learning rate and the momentum are 0-dim tensors
    that the one-cycle schedule writes before each step; the SGD update (Nesterov momentum, weight decay) is
    written out with foreach ops that read it, on the optimizer's own momentum buffers, so that
    checkpoints are the same as EagerStep's; the tally and the weight average are updated inside.
    With ``capture`` (CUDA only), one graph per batch size is captured the first time that size comes;
    without, the same ops run one by one, which is how the CPU tests check it against EagerStep.
    """

    def __init__(self, model, optimizer, scheduler, config, averaged=None, capture=False):
        self.model, self.scheduler, self.averaged, self.capture = model, scheduler, averaged, capture
        self.label_smoothing = config.label_smoothing
        device = next(model.parameters()).device
        self.group = optimizer.param_groups[0]  # the scheduler writes its lr and momentum
        self.weight_decay, self.nesterov = self.group["weight_decay"], self.group["nesterov"]
        self.uses_momentum = self.group["momentum"] > 0
        self.params = list(model.parameters())
        for param in self.params:  # a zero buffer gives torch's first step exactly: 0.9 * 0 + g = g
            if optimizer.state[param].get("momentum_buffer") is None:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        self.momentum_buffers = [optimizer.state[param]["momentum_buffer"] for param in self.params]
        # The scheduler warns unless optimizer.step() ran first; here step() below does its work.
        optimizer._opt_called = True
        self.lr, self.momentum = torch.zeros((), device=device), torch.zeros((), device=device)
        self.tally = torch.zeros(5, device=device)
        self.inputs, self.graphs = {}, {}
        if averaged is not None:  # (average's tensors, model's tensors), floating and integer apart
            pairs = list(zip(itertools.chain(averaged.module.parameters(), averaged.module.buffers()),
                             itertools.chain(model.parameters(), model.buffers())))
            groups = ([pair for pair in pairs if pair[0].is_floating_point() == floating]
                      for floating in (True, False))
            self.average_pairs = [tuple(map(list, zip(*group))) for group in groups if group]

    def __call__(self, images, labels):
        size = len(labels)
        if size not in self.inputs:
            self.inputs[size] = (torch.empty_like(images), torch.empty_like(labels))
        static_images, static_labels = self.inputs[size]
        static_images.copy_(images)
        static_labels.copy_(labels)
        self.lr.fill_(self.group["lr"])
        self.momentum.fill_(self.group["momentum"])
        if self.capture and size not in self.graphs:
            self.graphs[size] = self.capture_graph(static_images, static_labels)
        if self.capture:
            self.graphs[size].replay()
        else:
            self.step(static_images, static_labels)
        self.scheduler.step()

    def step(self, images, labels):
        self.model.zero_grad(set_to_none=True)
        log_probs = self.model(images)
        loss = F.cross_entropy(log_probs, labels, label_smoothing=self.label_smoothing)
        loss.backward()
        with torch.no_grad():
            grads = [param.grad for param in self.params]
            if self.weight_decay:
                torch._foreach_add_(grads, self.params, alpha=self.weight_decay)
            if self.uses_momentum:
                torch._foreach_mul_(self.momentum_buffers, self.momentum)
                torch._foreach_add_(self.momentum_buffers, grads)
                if self.nesterov:
                    torch._foreach_add_(grads, torch._foreach_mul(self.momentum_buffers, self.momentum))
                else:
                    grads = self.momentum_buffers
            torch._foreach_add_(self.params, torch._foreach_mul(grads, -self.lr))
            if self.averaged is not None:
                self.update_average()
            count(self.tally, loss.detach(), log_probs.detach(), labels)

    def update_average(self):
        # AveragedModel.update_parameters without its Python branch on n_averaged, which a graph cannot
        # hold: average_of() made the first, copying call, so every later call averages.
        for mine, theirs in self.average_pairs:
            self.averaged.multi_avg_fn(mine, theirs, self.averaged.n_averaged)
        self.averaged.n_averaged += 1

    def capture_graph(self, images, labels):
        """Capture one step on these input buffers, following PyTorch's documented whole-network capture:
        a few warm-up steps on a side stream, then the capture. Both run the step for real, so every
        tensor they change (weights, statistics, buffers, the tally, the random state) is put back."""
        device = images.device
        state = [*self.model.state_dict().values(), *self.momentum_buffers, self.tally]
        if self.averaged is not None:
            state += [*self.averaged.state_dict().values()]
        saved, rng = [tensor.clone() for tensor in state], torch.cuda.get_rng_state(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step(images, labels)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.model.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self.step(images, labels)
        with torch.no_grad():
            for tensor, before in zip(state, saved):
                tensor.copy_(before)
        torch.cuda.set_rng_state(rng, device)
        return graph


@torch.inference_mode()
def evaluate(model, loader, *, max_batches=None, progress=False):
    """{"loss": mean NLL over all images, "acc": percent correct, "predictions": int64 CPU tensor}."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    predictions, labels_seen = [], []
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for images, labels in tqdm(itertools.islice(loader, total), total=total, desc="test", leave=False,
                               disable=not progress):
        log_probs = model(images)
        loss_sum += F.nll_loss(log_probs.float(), labels, reduction="sum").double()
        predictions.append(log_probs.argmax(dim=1))
        labels_seen.append(labels)
    predictions, labels = torch.cat(predictions), torch.cat(labels_seen)
    return {"loss": loss_sum.item() / len(labels),
            "acc": 100 * (predictions == labels).sum().item() / len(labels),
            "predictions": predictions.cpu()}


def format_epoch(row):
    return (f"epoch {row['epoch']:2d}  lr {row['lr']:.4f}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
            f"{row['seconds']:.1f}s")


# ---------------------------------------------------------------------------------------------
# Checkpoints

# Settings that may differ between a run and its resumption: where data lives and what runs it.
RESUMABLE_CHANGES = {"data_dir", "device"}
CHECKPOINT_KEYS = {"config", "epoch", "history", "model", "averaged", "optimizer", "scheduler", "rng_cpu",
                   "rng_cuda", "rng_data"}


def save_checkpoint(path, model, optimizer, scheduler, train_loader, config, history, averaged=None):
    """Write everything needed to continue exactly, to a temporary file renamed over ``path``."""
    state = {
        "config": asdict(config),
        "epoch": len(history),
        "history": history,
        "model": model.state_dict(),
        "averaged": None if averaged is None else averaged.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_data": train_loader.generator.get_state(),
    }
    atomic_write(path, lambda file: torch.save(state, file))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one. CheckpointError if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise CheckpointError(f"cannot write {path} ({error.strerror}): choose another --out") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if not isinstance(error, (OSError, RuntimeError)):  # Ctrl-C and bugs go on as they are
            raise
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:200]
        raise CheckpointError(f"cannot write {path} ({reason}): free some space or make the folder "
                              f"writable, then continue with --resume; the previous {path.name} is "
                              "unchanged") from None


def read_checkpoint(path):
    """The checkpoint at ``path`` as a dict; CheckpointError if it is unreadable or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: truncated or "
                              "corrupt): delete it to start over, or use another --out") from None
    if not isinstance(state, dict) or not {"config", "model", "history"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project: delete it or use another --out")
    missing = sorted(CHECKPOINT_KEYS - state.keys())
    unknown = sorted(set(state["config"]) - TrainConfig.__dataclass_fields__.keys())
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown settings {', '.join(unknown)}"
        raise CheckpointError(f"checkpoint {path} {what} (another version of this project?): delete it to "
                              "start over, or use another --out")
    return state


def settings_changes(saved, config):
    """The settings of ``config`` that differ from a run's ``saved`` ones, as 'name old -> new' strings.
    A setting added after the run was saved counts as its default."""
    return [f"{spec.name} {saved.get(spec.name, default_setting(spec.name))!r} -> {getattr(config, spec.name)!r}"
            for spec in fields(config)
            if spec.name not in RESUMABLE_CHANGES
            and saved.get(spec.name, default_setting(spec.name)) != getattr(config, spec.name)]


def restore_checkpoint(path, model, optimizer, scheduler, train_loader, config, averaged=None):
    """Load ``path`` into the given objects and return its history; CheckpointError if unusable."""
    state = read_checkpoint(path)
    if changed := settings_changes(state["config"], config):
        raise CheckpointError(f"checkpoint {path} was made with other settings ({'; '.join(changed)}): "
                              "resume with the same settings, or use another --out")
    try:
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
    except (RuntimeError, ValueError):
        raise CheckpointError(f"checkpoint {path} holds weights of another model than "
                              f"{type(model).__name__}: use another --out") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    train_loader.generator.set_state(state["rng_data"])
    return state["history"]


# ---------------------------------------------------------------------------------------------
# Devices, reproducibility and what a run ran on


def pick_device(name="auto"):
    """CUDA, then Apple MPS, then CPU for "auto"; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but this machine has no usable CUDA GPU: "
                              "use --device auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but Apple MPS is not available here: "
                          "use --device auto or cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed, device=None, deterministic=True):
    """Seed torch's CPU and CUDA generators; on CUDA with ``deterministic``, also choose deterministic
    kernels. Two runs with one seed and the same settings then train identically on one machine."""
    torch.manual_seed(seed)
    if deterministic and device is not None and torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def prepare_model(model, device):
    """Move to the device in the layout measured fastest there (channels_last)."""
    return model.to(device, memory_format=torch.channels_last)


def keep_freed_memory():
    """Stop glibc returning freed activation buffers to the kernel after every step.

    By default glibc unmaps large freed blocks and maps them again on the next step: millions of
    page faults per epoch. Raising its thresholds keeps the memory for reuse. No-op off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    import ctypes

    libc = ctypes.CDLL(None)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)


def runtime_info(device):
    """What a run ran on, and which code: versions, device, threads, the git commit."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        **git_state(),
    }


def git_state():
    """{"git_commit": the checkout's HEAD, "git_dirty": whether tracked files differ from it}; None for
    both outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True)

    try:
        commit = git("rev-parse", "HEAD").stdout.strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def cpu_name():
    # platform.processor() says only "x86_64" on Linux; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Results


def confusion_matrix(predictions, labels, classes=10):
    """counts[true, predicted] as an int64 (classes, classes) tensor."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def plot_history(history):
    """A matplotlib figure of the train and test loss and accuracy per epoch."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "o-"), ("test", "s-")):
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], style, ms=3, label=split)
        acc_axes.plot(epochs, [row[f"{split}_acc"] for row in history], style, ms=3, label=split)
    loss_axes.set(title="loss", xlabel="epoch", yscale="log")
    final = history[-1]["test_acc"]
    acc_axes.set(title=f"accuracy (final test {final:.2f}%)", xlabel="epoch", ylabel="%",
                 ylim=(min(97.0, history[-1]["train_acc"] - 1, final - 1), 100))
    acc_axes.axhline(99.4, color="grey", lw=0.8, ls="--", label="99.4%")
    for axes in (loss_axes, acc_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure
