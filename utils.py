"""Devices, MNIST data pipelines, the train/test loops and checkpoints, shared by train.py, bench.py
and S6.ipynb."""

import copy
import ctypes
import math
import os
import pickle
import platform
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from model import MODELS

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default. train.py exposes each as a flag."""

    model: str = "Net"
    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.2  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    shift: float = 2.0  # pixels, uniform in [-shift, shift] along each axis
    scale: float = 0.1  # zoom by a factor uniform in [1 - scale, 1 + scale]
    ema: float = 0.0  # per-step decay of an average of the weights that is tested and kept; 0: off
    seed: int = 0
    pipeline: str = "tensor"  # "tensor" (fast, on the device) or "torchvision" (DataLoader reference)
    data_dir: str = os.environ.get("MNIST_DATA", "./data")
    device: str = "auto"
    train_limit: int = 0  # 0: all 60,000 images
    test_limit: int = 0  # 0: all 10,000 images
    dry_run: bool = False  # two batches per epoch, one epoch

    def __post_init__(self):
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}"),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"learning rate must be a positive number, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.rotate <= 180, f"rotation must be between 0 and 180 degrees, got {self.rotate}"),
            (0 <= self.shift < 14, f"shift must be between 0 and 14 pixels, got {self.shift}"),
            (0 <= self.scale < 1, f"scale must be in [0, 1), got {self.scale}"),
            (0 <= self.ema < 1, f"ema decay must be in [0, 1) (0 turns it off), got {self.ema}"),
            (self.pipeline in ("tensor", "torchvision"),
             f"unknown pipeline {self.pipeline!r}: choose tensor or torchvision"),
            (self.train_limit >= 0, f"train limit must be >= 0 (0 means all), got {self.train_limit}"),
            (self.test_limit >= 0, f"test limit must be >= 0 (0 means all), got {self.test_limit}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class TrainingError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ConfigError(TrainingError, ValueError):
    """Impossible settings or an unusable device."""


class DataError(TrainingError):
    """MNIST files missing, undownloadable, truncated or foreign."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be resumed from."""


class NonFiniteLossError(TrainingError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# Device and reproducibility


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


def seed_everything(seed):
    """Seed torch's CPU and CUDA generators: two CPU runs with one seed then train identically."""
    torch.manual_seed(seed)


def keep_freed_memory():
    """Stop glibc returning freed activation buffers to the kernel after every step.

    By default glibc unmaps large freed blocks and maps them again on the next step: millions of
    page faults per epoch. Raising its thresholds keeps the memory for reuse. No-op off glibc.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_top_pad, 256 << 20)


def runtime_info(device):
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
    }


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
# MNIST files

# name: (IDX magic number, size in bytes)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, 16 + 60_000 * 28 * 28),
    "train-labels-idx1-ubyte": (2049, 8 + 60_000),
    "t10k-images-idx3-ubyte": (2051, 16 + 10_000 * 28 * 28),
    "t10k-labels-idx1-ubyte": (2049, 8 + 10_000),
}


def mnist_file_problem(path):
    """None if ``path`` looks like the genuine MNIST file of its name, else what is wrong."""
    magic, size = MNIST_FILES[path.name]
    actual = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(16)
    if head.lstrip()[:1] == b"<":
        return "holds an HTML or XML page (a failed download), not MNIST data"
    if actual != size:
        return f"is {actual:,} bytes, expected {size:,} (truncated, empty or not MNIST)"
    if int.from_bytes(head[:4], "big") != magic:
        return f"starts with IDX magic number {int.from_bytes(head[:4], 'big')}, expected {magic}"
    return None


def load_mnist(root, train, download=True):
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one MNIST split, read through torchvision.

    Looks in ``root/MNIST/raw``, downloading there when files are missing and ``download`` is set.
    Raises DataError, saying what to do, for missing, undownloadable, truncated or foreign files.
    """
    raw = Path(root) / "MNIST" / "raw"
    remedy = ("delete it so that it is downloaded again, or point --data-dir (MNIST_DATA) at a folder "
              "holding MNIST/raw with the genuine files")
    for name in MNIST_FILES:
        if (raw / name).is_file() and (problem := mnist_file_problem(raw / name)):
            raise DataError(f"MNIST file {raw / name} {problem}: {remedy}")
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=download)
    except (RuntimeError, OSError, ValueError) as error:  # URLError is an OSError
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"MNIST is not in {raw} and could not be downloaded ({reason[:300]}): connect "
                        "to the internet, or point --data-dir (MNIST_DATA) at a folder holding "
                        "MNIST/raw") from None
    return dataset.data, dataset.targets


# ---------------------------------------------------------------------------------------------
# Data pipelines: both yield (normalised images (B, 1, 28, 28), labels (B,)) on the device and
# expose ``generator``, whose state a checkpoint saves, so the loops never tell them apart.


def random_affine(count, rotate, shift, generator, scale=0.0):
    """``count`` affine_grid matrices of a uniform rotation in [-rotate, rotate] degrees, a shift in
    [-shift, shift] pixels along each axis and a zoom by a factor in [1 - scale, 1 + scale]."""
    angles = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(rotate)
    offsets = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2 * shift / 28)
    cos, sin = angles.cos(), angles.sin()
    if scale:
        # affine_grid maps output to input coordinates: reading from a smaller area zooms in.
        zoom = 1 + (torch.rand(count, generator=generator) * 2 - 1) * scale
        cos, sin = cos / zoom, sin / zoom
    return torch.stack([torch.stack([cos, -sin, offsets[:, 0]], 1),
                        torch.stack([sin, cos, offsets[:, 1]], 1)], 1)


def affine_transform(images, thetas):
    """Warp a batch (B, 1, 28, 28) by per-image affine matrices, filling with black (0) outside."""
    grid = F.affine_grid(thetas, images.shape, align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


class TensorLoader:
    """A whole split kept as one tensor on the device; each epoch shuffles it with a seeded
    generator and rotates and shifts whole batches at once with affine_grid + grid_sample."""

    def __init__(self, images, labels, batch_size, device, *, train, rotate=0.0, shift=0.0, scale=0.0, seed=0):
        self.images = images.to(device).unsqueeze(1).float().div_(255)
        self.labels = labels.to(device)
        self.batch_size, self.train = batch_size, train
        self.rotate, self.shift, self.scale = rotate, shift, scale
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        count, device = len(self.labels), self.labels.device
        augment = self.train and (self.rotate or self.shift or self.scale)
        if self.train:
            # One draw and one host-to-device copy per epoch instead of one per batch.
            order = torch.randperm(count, generator=self.generator).to(device)
            if augment:
                thetas = random_affine(count, self.rotate, self.shift, self.generator, self.scale).to(device)
        for start in range(0, count, self.batch_size):
            if self.train:
                index = order[start:start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
            else:
                images = self.images[start:start + self.batch_size]
                labels = self.labels[start:start + self.batch_size]
            if augment:
                images = affine_transform(images, thetas[start:start + self.batch_size])
            yield (images - MNIST_MEAN) / MNIST_STD, labels


class DeviceDataLoader:
    """torchvision's DataLoader with per-image PIL transforms (the reference pipeline), moving each
    batch to the device."""

    def __init__(self, dataset, batch_size, device, *, train, seed=0, workers=2):
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=train, generator=self.generator,
            num_workers=workers, pin_memory=device.type == "cuda")

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


def make_loaders(config, device):
    """(train_loader, test_loader) for ``config.pipeline``; the test set is never shuffled or augmented."""
    loaders = []
    for train, limit in ((True, config.train_limit), (False, config.test_limit)):
        images, labels = load_mnist(config.data_dir, train=train)
        limit = limit or len(labels)
        if config.pipeline == "tensor":
            images, labels = images[:limit], labels[:limit]
            loaders.append(TensorLoader(images, labels, config.batch_size, device, train=train,
                                        rotate=config.rotate, shift=config.shift, scale=config.scale,
                                        seed=config.seed))
            continue
        from torchvision import transforms

        steps = [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
        if train and (config.rotate or config.shift or config.scale):
            steps.insert(0, transforms.RandomAffine(config.rotate, translate=(config.shift / 28,) * 2,
                                                    scale=(1 - config.scale, 1 + config.scale)))
        dataset = torchvision.datasets.MNIST(config.data_dir, train=train, transform=transforms.Compose(steps))
        dataset = torch.utils.data.Subset(dataset, range(limit))
        loaders.append(DeviceDataLoader(dataset, config.batch_size, device, train=train, seed=config.seed))
    return tuple(loaders)


# ---------------------------------------------------------------------------------------------
# Training and evaluation


def smoothed_nll(log_probs, labels, smoothing):
    """Negative log-likelihood against labels smoothed towards the uniform distribution."""
    loss = F.nll_loss(log_probs, labels)
    if smoothing:
        loss = (1 - smoothing) * loss - smoothing * log_probs.mean(dim=1).mean()
    return loss


def train_epoch(model, loader, optimizer, scheduler=None, *, label_smoothing=0.0, epoch=1,
                max_batches=None, progress=True, averaged=None):
    """One pass over ``loader``; returns {"train_loss", "train_acc"} (mean loss, percent correct).

    Raises NonFiniteLossError naming the epoch and batch where the loss stopped being finite.
    """
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    # Index of the first non-finite batch, kept on the device so that checking costs no sync.
    first_bad = torch.full((), -1, device=device)
    seen = 0
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(loader, total=total, desc=f"epoch {epoch} train", leave=False, disable=not progress)
    for batch, (images, labels) in enumerate(bar):
        log_probs = model(images)
        loss = smoothed_nll(log_probs, labels, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if averaged is not None:
            averaged.update()
        loss = loss.detach()
        first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, batch)
        loss_sum += loss * len(labels)
        correct += (log_probs.argmax(dim=1) == labels).sum()
        seen += len(labels)
        last = batch + 1 == total
        if batch % 50 == 0 or last:
            if first_bad.item() >= 0:
                raise NonFiniteLossError(
                    f"training loss became non-finite at epoch {epoch}, batch {first_bad.item() + 1} of "
                    f"{len(loader)}: lower --lr or check the input data; the last checkpoint is kept")
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if last:
            break
    return {"train_loss": loss_sum.item() / seen, "train_acc": 100 * correct.item() / seen}


@torch.inference_mode()
def evaluate(model, loader, *, max_batches=None, progress=False):
    """{"loss": mean NLL over all images, "acc": percent correct, "predictions": int64 CPU tensor}."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    predictions = []
    labels_seen = []
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    for batch, (images, labels) in enumerate(tqdm(loader, total=total, desc="test", leave=False,
                                                  disable=not progress)):
        if batch == total:
            break
        log_probs = model(images)
        loss_sum += F.nll_loss(log_probs.float(), labels, reduction="sum").double()
        predictions.append(log_probs.argmax(dim=1))
        labels_seen.append(labels)
    predictions, labels = torch.cat(predictions), torch.cat(labels_seen)
    return {"loss": loss_sum.item() / len(labels),
            "acc": 100 * (predictions == labels).sum().item() / len(labels),
            "predictions": predictions.cpu()}


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


def prepare_model(model, device):
    """Move to the device in the layout measured fastest there (channels_last)."""
    return model.to(device, memory_format=torch.channels_last)


def fit(model, train_loader, test_loader, config, *, checkpoint=None, resume=False, progress=True,
        log=print):
    """Train for ``config.epochs`` with SGD (momentum, Nesterov) under a one-cycle LR schedule.

    Returns the history, a list of per-epoch dicts. With ``checkpoint`` (a path), saves everything
    needed to continue after every epoch, atomically; with ``resume`` also, continues from it.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    batches = 2 if config.dry_run else len(train_loader)
    epochs = 1 if config.dry_run else config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=epochs,
                                                    steps_per_epoch=batches, pct_start=0.25)
    averaged = WeightAverage(model, config.ema) if config.ema else None
    tested = model if averaged is None else averaged.model
    history = []
    if resume and checkpoint is not None and Path(checkpoint).exists():
        history = restore_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, averaged)
        log(f"resumed from {checkpoint} after epoch {len(history)}")
    for epoch in range(len(history) + 1, epochs + 1):
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        train_metrics = train_epoch(model, train_loader, optimizer, scheduler, epoch=epoch,
                                    label_smoothing=config.label_smoothing, max_batches=batches,
                                    progress=progress, averaged=averaged)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        test_metrics = evaluate(tested, test_loader, max_batches=2 if config.dry_run else None)
        history.append({"epoch": epoch, "lr": lr, **train_metrics, "test_loss": test_metrics["loss"],
                        "test_acc": test_metrics["acc"], "seconds": train_seconds,
                        "test_seconds": time.perf_counter() - started})
        log(format_epoch(history[-1]))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, scheduler, train_loader, config, history, averaged)
    if averaged is not None:
        model.load_state_dict(averaged.model.state_dict())  # the caller gets the weights that were tested
    return history


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every
    step. Late in training the raw weights still jump from batch to batch; their average does not, so
    it is the better model to test and keep."""

    def __init__(self, model, decay):
        self.model, self.decay = copy.deepcopy(model), decay
        # state_dict() tensors share memory with the modules: pair them once, update them in place.
        pairs = [(mine, theirs) for mine, theirs in zip(self.model.state_dict().values(),
                                                        model.state_dict().values()) if mine.is_floating_point()]
        self.mine, self.theirs = [pair[0] for pair in pairs], [pair[1] for pair in pairs]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.mine, self.theirs, 1 - self.decay)


def format_epoch(row):
    return (f"epoch {row['epoch']:2d}  lr {row['lr']:.4f}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2f}%  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}%  "
            f"{row['seconds']:.1f}s")


# ---------------------------------------------------------------------------------------------
# Checkpoints

# Settings that may differ between a run and its resumption: where data lives and what runs it.
RESUMABLE_CHANGES = {"data_dir", "device"}


def save_checkpoint(path, model, optimizer, scheduler, train_loader, config, history, averaged=None):
    """Write everything needed to continue exactly, to a temporary file renamed over ``path``."""
    state = {
        "config": asdict(config),
        "epoch": len(history),
        "history": history,
        "model": model.state_dict(),
        "averaged": None if averaged is None else averaged.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_data": train_loader.generator.get_state(),
    }
    atomic_write(path, lambda file: torch.save(state, file))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def read_checkpoint(path):
    """The checkpoint at ``path`` as a dict; CheckpointError if it is unreadable or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: truncated or "
                              "corrupt): delete it to start over, or use another --out") from None
    if not isinstance(state, dict) or not {"config", "model", "history"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project: delete it or use another --out")
    return state


def restore_checkpoint(path, model, optimizer, scheduler, train_loader, config, averaged=None):
    """Load ``path`` into the given objects and return its history; CheckpointError if unusable."""
    state = read_checkpoint(path)
    saved = state["config"]
    # A setting added after the checkpoint was written counts as its default.
    changed = [f"{field.name} {saved.get(field.name, field.default)!r} -> {getattr(config, field.name)!r}"
               for field in fields(config)
               if field.name not in RESUMABLE_CHANGES
               and saved.get(field.name, field.default) != getattr(config, field.name)]
    if changed:
        raise CheckpointError(f"checkpoint {path} was made with other settings ({'; '.join(changed)}): "
                              "resume with the same settings, or use another --out")
    try:
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.model.load_state_dict(state["averaged"])
    except RuntimeError:
        raise CheckpointError(f"checkpoint {path} holds weights of another model than "
                              f"{type(model).__name__}: use another --out") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    train_loader.generator.set_state(state["rng_data"])
    return state["history"]
