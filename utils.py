"""Training: fit with its train and test loops, the optimizer, schedule and weight average, the range
test, the device and the model's checks before training; in the order a run uses them. Used by train.py,
bench.py and S6.ipynb; the settings are in config.py, the data pipelines in data.py, the models in
model.py, checkpoints in checkpoints.py, the figures in report.py.

    config = make_config(epochs=20)
    history = fit(model, *make_loaders(config, device), config)
"""

import math
import os
import platform
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from architecture import output_problem
from checkpoints import restore_checkpoint, save_checkpoint
from config import (
    TRAIN_IMAGES,
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    changed_settings,
    error_text,
    model_names,
)
from runs import kept

READ_EVERY = 20  # batches between reads of the running sums (the progress bar's loss, the non-finite check)

# ---------------------------------------------------------------------------------------------
# Training: fit, one epoch, the test pass


def fit(model, train_loader, test_loader, config, *, checkpoint=None, resume=False, progress=True,
        log=print):
    """Train for ``config.epochs`` with SGD under a one-cycle schedule (see make_optimizer).

    Returns the history, a list of per-epoch dicts. With ``checkpoint`` (a file, or a folder, such as
    runs/s6, for its checkpoint.pt), saves everything needed to continue after every epoch, atomically;
    with ``resume`` also, continues from it.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"fit needs a TrainConfig (config.make_config(...)), got {type(config).__name__}")
    config = replace(config)  # checked again, as edits after make_config are not: epochs = 0, a dry run
    name = type(model).__name__
    if name != config.model and name in model_names():
        raise ConfigError(f"the model is a {name} and the settings are for {config.model}: make the "
                          f"settings with make_config(model={name!r}), or the model with "
                          "build_model(config.model)")
    if checkpoint is not None:
        if not str(checkpoint).strip():
            raise ConfigError("checkpoint is empty: give a path such as runs/s6/checkpoint.pt, or None to "
                              "keep none")
        checkpoint = Path(checkpoint).expanduser()
        if checkpoint.is_dir() or not checkpoint.suffix:  # a run folder, such as runs/s6
            checkpoint = checkpoint / "checkpoint.pt"
    params = sum(p.numel() for p in model.parameters())
    changed = ", ".join(changed_settings(config)) or "none"
    log(f"{name}: {params:,} parameters, seed {config.seed}, on {next(model.parameters()).device}; "
        f"settings other than the defaults: {changed}")
    steps = config.epochs * len(train_loader)
    optimizer, scheduler = make_optimizer(model, config, steps)
    # The average starts at the initial weights: in a run too short to forget them (a dry run, one epoch)
    # it would test far worse than the model, which looks like a broken run.
    forget = steps_to_forget(config.ema) if config.ema else 0
    averaged = average_of(model, config.ema if steps >= forget else 0.0)
    if config.ema and averaged is None:
        log(f"note: no weight average in this run: after {steps} steps it would still hold "
            f"{config.ema ** steps:.0%} of the initial weights and test worse than the model (a decay of "
            f"{config.ema:g} needs {forget:,} steps); the model is tested and kept")
    if steps < (full_epoch := math.ceil(TRAIN_IMAGES / config.batch_size)):
        what = "a dry run checks that every part runs; " if config.dry_run else ""
        log(f"note: {steps} training steps are too few to learn much (one epoch of all {TRAIN_IMAGES:,} "
            f"images is {full_epoch}): {what}the test accuracy of this run says little about the model")
    tested = model if averaged is None else averaged.module
    log(f"each line: epoch, learning rate at its start -> end, training loss and accuracy (augmented "
        f"images), test loss and accuracy ({'model' if averaged is None else 'weight average'}), seconds of "
        "training + test")
    history = []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        history = restore_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, averaged)
        log(f"resumed from {checkpoint} after epoch {len(history)}")
    # Made after the restore: the static step holds the restored momentum buffers and average.
    static_step = make_static_step(model, optimizer, scheduler, config, averaged)
    for epoch in range(len(history) + 1, config.epochs + 1):
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        try:
            train_metrics = train_epoch(model, train_loader, optimizer, scheduler, averaged=averaged,
                                        label_smoothing=config.label_smoothing, static_step=static_step,
                                        epoch=epoch, progress=progress)
        except NonFiniteLossError as error:
            raise NonFiniteLossError(f"{error}; {kept(checkpoint, len(history))}") from None
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        row = {}
        if config.clean_bn and epoch == config.epochs:
            before = evaluate(tested, test_loader)
            row = {"test_loss_before_clean_bn": before["loss"], "test_acc_before_clean_bn": before["acc"]}
            # The statistics were gathered on augmented images, which are rotated, shifted and zoomed
            # where the test images are not; measured on NetTiny, statistics of clean images test better.
            update_bn(train_loader.unaugmented(), tested)
        if (validation := getattr(train_loader, "validation", None)) is not None:
            val_metrics = evaluate(tested, validation)
            row = {"val_loss": val_metrics["loss"], "val_acc": val_metrics["acc"], **row}
        test_metrics = evaluate(tested, test_loader, progress=progress)
        history.append({"epoch": epoch, "lr": lr, "lr_end": scheduler.get_last_lr()[0], **train_metrics,
                        "test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"], **row,
                        "seconds": train_seconds, "test_seconds": time.perf_counter() - started})
        # Saved before the line is printed, so that a closed pipe or Ctrl-C there loses nothing.
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, history, averaged)
        log(format_epoch(history[-1], config.epochs))
        if "test_acc_before_clean_bn" in row:
            log(f"BatchNorm statistics re-estimated on the unaugmented training images: test accuracy "
                f"{row['test_acc_before_clean_bn']:.2f}% -> {history[-1]['test_acc']:.2f}%")
    if averaged is not None:
        model.load_state_dict(averaged.module.state_dict())  # the caller gets the weights that were tested
    return history


def train_epoch(model, loader, optimizer, scheduler, *, averaged=None, label_smoothing=0.0, static_step=None,
                epoch=1, progress=True):
    """One pass over ``loader``: for each batch, the step written out (forward, loss, backward, an
    optimizer and a scheduler step, the weight average), unless ``static_step`` takes it. Returns
    {"train_loss", "train_acc"} (mean loss, percent correct).

    Raises NonFiniteLossError naming the epoch and batch where the loss stopped being finite.
    """
    model.train()
    device = next(model.parameters()).device
    # Running sums stay on the device and are read every few dozen batches: reading waits for the device.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad_batch = torch.zeros((), device=device, dtype=torch.int64)  # the first non-finite loss; 0: none
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for batch, (images, labels) in enumerate(bar, start=1):
        if static_step is None:
            log_probs = model(images)
            # cross_entropy takes the log_softmax of its input: of log-probabilities that is themselves (they
            # already sum to 1), so this is nll_loss, with the label smoothing that nll_loss lacks.
            loss = F.cross_entropy(log_probs, labels, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
        else:  # --step static or graph: the same step on fixed tensors (static_step.py)
            loss, log_probs = static_step(images, labels)
        loss = loss.detach()
        loss_sum += loss * len(labels)
        correct += (log_probs.argmax(dim=1) == labels).sum()
        first_bad_batch = torch.where((first_bad_batch == 0) & ~torch.isfinite(loss), batch, first_bad_batch)
        seen += len(labels)
        if batch % READ_EVERY == 0 or batch == len(loader):
            if first_bad_batch.item():
                raise NonFiniteLossError(f"training loss became non-finite at epoch {epoch}, batch "
                                         f"{first_bad_batch.item()} of {len(loader)}: lower --lr or check "
                                         "the input data")
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
    return {"train_loss": loss_sum.item() / seen, "train_acc": 100 * correct.item() / seen}


@torch.inference_mode()
def evaluate(model, loader, *, progress=False):
    """{"loss": mean NLL over all images, "acc": percent correct, "predictions": int64 CPU tensor}."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    predictions, labels_seen = [], []
    for images, labels in tqdm(loader, desc="test", leave=False, disable=not progress):
        log_probs = model(images)
        loss_sum += F.nll_loss(log_probs.float(), labels, reduction="sum").double()
        predictions.append(log_probs.argmax(dim=1))
        labels_seen.append(labels)
    predictions, labels = torch.cat(predictions), torch.cat(labels_seen)
    return {"loss": loss_sum.item() / len(labels),
            "acc": 100 * (predictions == labels).sum().item() / len(labels),
            "predictions": predictions.cpu()}


def format_epoch(row, epochs):
    validation = f"val acc {row['val_acc']:.2f}%  " if "val_acc" in row else ""
    return (f"epoch {row['epoch']:2d}/{epochs}  lr {row['lr']:.4f} -> {row['lr_end']:.4f}  train loss "
            f"{row['train_loss']:.4f} acc {row['train_acc']:.2f}%  {validation}test loss "
            f"{row['test_loss']:.4f} acc {row['test_acc']:.2f}%  {row['seconds']:.1f} + "
            f"{row['test_seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------
# Optimizer, schedule and weight average


def make_optimizer(model, config, total_steps):
    """SGD with Nesterov momentum and weight decay, under a one-cycle schedule: the learning rate rises
    from lr/25 to ``config.lr`` over the first ``config.warmup`` of the steps, then anneals (cosine)
    to almost zero, while the momentum moves the other way between ``config.momentum`` -/+ 0.05. The
    scheduler steps once per batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    # OneCycleLR divides by (warm-up steps - 1), which is zero when the warm-up is exactly one step (four
    # steps at --warmup 0.25): a hair more gives the same schedule without the division by zero.
    warmup = config.warmup * (1 + 1e-6) if config.warmup * total_steps == 1 else config.warmup
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=warmup,
        cycle_momentum=config.momentum > 0, base_momentum=max(config.momentum - 0.05, 0),
        max_momentum=config.momentum + 0.05)
    return optimizer, scheduler


def average_of(model, decay):
    """An exponential moving average of ``model``'s weights and BatchNorm statistics, starting from its
    current weights (None for a decay of 0: no average). Late in training the raw weights still jump from
    batch to batch; their average does not, so it is the better model to test and keep."""
    if not decay:
        return None
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    averaged.update_parameters(model)  # the first call copies: the average starts at the initial weights
    return averaged


def steps_to_forget(decay):
    """The steps after which an average of this per-step decay holds under 1% of its initial weights."""
    return math.ceil(math.log(0.01) / math.log(decay))


def make_static_step(model, optimizer, scheduler, config, averaged=None):
    """None for ``--step eager`` (the step written out in train_epoch); else static_step.py's step."""
    if config.step == "eager":
        return None
    check_step(config.step, next(model.parameters()).device)
    from static_step import StaticStep  # imported only when asked for

    return StaticStep(model, optimizer, scheduler, config, averaged, capture=config.step == "graph")


# ---------------------------------------------------------------------------------------------
# Learning-rate range test


def lr_range_test(model, train_loader, config, *, iterations=300, start_lr=1e-4, end_lr=10.0, progress=True):
    """Train ``model`` from its present (fresh) weights for up to ``iterations`` batches while the
    learning rate grows exponentially from ``start_lr`` to ``end_lr``, with the recipe's SGD (momentum,
    Nesterov, weight decay), stopping once the loss has diverged. The model's weights are put back after.

    Returns {"lr": [...], "loss": [...] (smoothed), "suggested_lr", "rule"}. The suggestion is the
    learning rate where the smoothed loss falls fastest before its lowest point, as a peak for the
    one-cycle schedule: about where training makes the most progress per step.
    """
    import contextlib
    import functools
    import io
    from unittest import mock

    import torch_lr_finder.lr_finder
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    class Batches(TrainDataLoaderIter):  # our loaders yield (images, labels) on the device already
        def inputs_labels_from_batch(self, batch):
            return batch

    optimizer = torch.optim.SGD(model.parameters(), lr=start_lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    finder = LRFinder(model, optimizer, torch.nn.NLLLoss(), device=next(model.parameters()).device)
    # torch-lr-finder prints its own lines (one with a template it never fills in), ours say what matters.
    # It has no switch for its progress bar, a widget in a notebook: without progress, its module's tqdm is
    # a silent one for the call.
    quiet = mock.patch.object(torch_lr_finder.lr_finder, "tqdm", functools.partial(tqdm, disable=True))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.nullcontext() if progress else quiet:
        finder.range_test(Batches(train_loader), start_lr=start_lr, end_lr=end_lr, num_iter=iterations,
                          step_mode="exp")
    finder.reset()
    rates, losses = finder.history["lr"], finder.history["loss"]
    # torch-lr-finder's rule (LRFinder.plot) is the steepest fall of the loss, leaving out the first 10
    # steps. Searched only up to the loss's lowest point: after it a steep fall is a recovery from a
    # spike, not a rate to train at (without this bound NetCompact's seed 2 suggested 1.98; RESULTS.md).
    lowest = min(range(len(losses)), key=losses.__getitem__)
    start = 10 if lowest > 11 else 0
    window = torch.tensor(losses[start:lowest + 1])
    steepest = start + (torch.gradient(window)[0].argmin().item() if len(window) > 1 else 0)
    return {"lr": rates, "loss": losses, "suggested_lr": rates[steepest],
            "rule": "the learning rate where the smoothed loss falls fastest, before its lowest point"}


# ---------------------------------------------------------------------------------------------
# Device and runtime


def pick_device(name="auto"):
    """CUDA, then Apple MPS, then CPU for "auto"; otherwise the named device, checked to exist."""
    if name == "auto":
        # torch.accelerator (torch 2.6 and later) names the accelerator this build of torch drives;
        # older torch is asked for each kind in turn. Kinds other than these two stay on the CPU, as
        # the recipes were measured on them.
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and accelerator.is_available():
            kind = accelerator.current_accelerator().type
            return torch.device(kind if kind in ("cuda", "mps") else "cpu")
        if accelerator is None and torch.cuda.is_available():
            return torch.device("cuda")
        if accelerator is None and torch.backends.mps.is_available():
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


def check_step(step, device):
    """ConfigError for a training step the device cannot run."""
    if step == "graph" and torch.device(device).type != "cuda":
        raise ConfigError(f"step 'graph' captures CUDA graphs, and the device is {device}: use --step eager "
                          "or static there")


def prepare_model(model, device, log=print):
    """``model`` on ``device``, checked on two images: in the memory layout measured fastest
    (channels_last) where its forward allows it, else in the standard one, with a note. On the CPU, the
    allocator keeps freed memory (keep_freed_memory). ConfigError, in one line, for a model that cannot
    train here: no parameters, weights not float32, a forward that fails, an output that is not
    log-probabilities of shape (N, 10)."""
    name = type(model).__name__
    if torch.device(device).type == "cpu":
        keep_freed_memory()
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"{name} has no parameters to train: create its layers in __init__ as attributes "
                          "(self.conv1 = nn.Conv2d(...)); layers kept in a list need nn.ModuleList")
    if (dtype := next(model.parameters()).dtype) != torch.float32:
        raise ConfigError(f"{name}'s weights are {str(dtype).removeprefix('torch.')}, and training here is "
                          "in float32: build it without .double() or .half(), under the default dtype "
                          "(torch.set_default_dtype(torch.float32))")
    # Eval mode and fixed images: the check draws no random numbers and changes no BatchNorm statistics,
    # so a run trains exactly as without it.
    images = torch.linspace(-0.42, 2.82, 2 * 28 * 28, device=device).reshape(2, 1, 28, 28)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                output = model.to(device, memory_format=torch.channels_last)(images)
            except Exception as error:  # noqa: BLE001 (a learner's forward may raise anything)
                model.to(memory_format=torch.contiguous_format)
                try:
                    output = model(images)
                except Exception as again:  # noqa: BLE001
                    raise ConfigError(f"{name}'s forward fails on a batch shaped (2, 1, 28, 28) "
                                      f"({error_text(again)}): fix it in model.py (python architecture.py "
                                      f"{name} shows each layer's output)") from None
                log(f"note: {name} trains in the standard memory layout: in channels_last, the faster one "
                    f"here, its forward fails ({error_text(error)}); x.flatten(1) instead of "
                    "x.view(x.size(0), -1) works in both")
    finally:
        model.train(was_training)
    if problem := output_problem(output, 2):
        raise ConfigError(f"{name} {problem}")
    return model


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
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True)

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
