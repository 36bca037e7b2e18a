"""MNIST for training: the files (checked, downloaded when missing), batched augmentation on the
device, and the two pipelines that yield normalised batches.

    train_loader, test_loader = make_loaders(TrainConfig(), device)
"""

import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from config import TEST_IMAGES, TRAIN_IMAGES, ConfigError, DataError, TrainConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
VALIDATION_SEED = 2024  # --val holds out the same training images in every run, whatever its --seed


def make_loaders(config, device):
    """(train_loader, test_loader) for ``config.pipeline``; the test set is never shuffled or augmented.

    Both yield (normalised images (B, 1, 28, 28), labels (B,)) on the device and expose ``generator``,
    whose state a checkpoint saves, so the training loop never tells them apart. With ``config.val``, that
    many training images are held out: ``train_loader.validation`` yields them as the test loader does
    (else it is None).
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"make_loaders needs a TrainConfig (config.make_config(...)), got "
                          f"{type(config).__name__}")
    config = replace(config)  # checked again, as edits after make_config are not: a dry run set then counts
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = "no usable CUDA GPU" if "cuda" in str(device).lower() else " ".join(str(error).split())
        raise ConfigError(f"device {str(device)!r} cannot be used here ({reason}): use utils.pick_device() "
                          "for the best one present") from None
    loaders = []
    for train, limit in ((True, config.train_limit), (False, config.test_limit)):
        images, labels = load_mnist(config.data_dir, train=train)
        kept, held_out = torch.arange(len(labels)), None
        if train and config.val:
            drawn = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VALIDATION_SEED))
            held_out, kept = drawn[:config.val].sort().values, drawn[config.val:].sort().values
        kept = kept[:limit or len(kept)]
        if config.pipeline == "tensor":
            loader = TensorLoader(images[kept], labels[kept], config.batch_size, device, train=train,
                                  rotate=config.rotate, shift=config.shift, scale=config.scale,
                                  seed=config.seed)
            loader.validation = None if held_out is None else TensorLoader(
                images[held_out], labels[held_out], config.batch_size, device, train=False)
        else:
            loader = torchvision_loader(config, device, train, kept, held_out)
        loaders.append(loader)
    return tuple(loaders)


# ---------------------------------------------------------------------------------------------
# The tensor pipeline (the default): a whole split on the device, whole batches augmented at once


class TensorLoader:
    """A whole split kept as one tensor on the device. Each epoch shuffles it with a seeded generator
    and warps all its training images at once with affine_grid + grid_sample; the batches are views."""

    def __init__(self, images, labels, batch_size, device, *, train, rotate=0.0, shift=0.0, scale=0.0,
                 seed=0):
        self.images = images.to(device).unsqueeze(1).float().div_(255)
        self.labels = labels.to(device)
        self.batch_size, self.train = batch_size, train
        self.rotate, self.shift, self.scale = rotate, shift, scale
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        images, labels = self.images, self.labels
        if self.train:
            # One draw, one host-to-device copy and one warp per epoch instead of one per batch.
            order = torch.randperm(len(labels), generator=self.generator).to(labels.device)
            images, labels = images[order], labels[order]
            if self.rotate or self.shift or self.scale:
                thetas = random_affine(len(labels), self.rotate, self.shift, self.generator, self.scale)
                images = affine_transform(images, thetas.to(labels.device))
        yield from self.batches(images, labels)

    def unaugmented(self):
        """The split's batches in order, without augmentation."""
        return self.batches(self.images, self.labels)

    def batches(self, images, labels):
        images = normalise(images)
        for start in range(0, len(labels), self.batch_size):
            yield images[start:start + self.batch_size], labels[start:start + self.batch_size]


def normalise(pixels):
    """Pixels in [0, 1] to the inputs the models expect."""
    return (pixels - MNIST_MEAN) / MNIST_STD


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


# ---------------------------------------------------------------------------------------------
# The torchvision pipeline: the classic DataLoader with per-image PIL transforms (the reference)


def torchvision_loader(config, device, train, kept, held_out=None):
    """The loader of the images ``kept`` (indices) of a split, with the ``held_out`` ones as its
    validation."""
    from torchvision import transforms

    steps = [transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))]
    root = mnist_root(config.data_dir)
    whole = torchvision.datasets.MNIST(root, train=train, transform=transforms.Compose(steps))
    plain = dataset = torch.utils.data.Subset(whole, kept.tolist())
    if train and (config.rotate or config.shift or config.scale):
        affine = transforms.RandomAffine(config.rotate, translate=(config.shift / 28,) * 2,
                                         scale=(1 - config.scale, 1 + config.scale))
        dataset = torch.utils.data.Subset(torchvision.datasets.MNIST(
            root, train=train, transform=transforms.Compose([affine, *steps])), kept.tolist())
    loader = TorchvisionLoader(dataset, config.batch_size, device, train=train, seed=config.seed, plain=plain)
    loader.validation = None if held_out is None else TorchvisionLoader(
        torch.utils.data.Subset(whole, held_out.tolist()), config.batch_size, device, train=False)
    return loader


class TorchvisionLoader:
    """The torchvision pipeline's batches: a DataLoader of a torchvision dataset, each batch moved to the
    device; with the interface of TensorLoader."""

    def __init__(self, dataset, batch_size, device, *, train, seed=0, workers=2, plain=None):
        """``plain``: the same images without augmentation, for ``unaugmented()`` (default: ``dataset``)."""
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=train, generator=self.generator,
            num_workers=workers, pin_memory=device.type == "cuda")
        self.plain_loader = torch.utils.data.DataLoader(
            dataset if plain is None else plain, batch_size=batch_size, num_workers=workers,
            pin_memory=device.type == "cuda")

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return self.to_device(self.loader)

    def unaugmented(self):
        """The split's batches in order, without augmentation."""
        return self.to_device(self.plain_loader)

    def to_device(self, loader):
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


# ---------------------------------------------------------------------------------------------
# The files

# name: (IDX magic number, the header's dimensions)
MNIST_FILES = {
    "train-images-idx3-ubyte": (2051, (TRAIN_IMAGES, 28, 28)),
    "train-labels-idx1-ubyte": (2049, (TRAIN_IMAGES,)),
    "t10k-images-idx3-ubyte": (2051, (TEST_IMAGES, 28, 28)),
    "t10k-labels-idx1-ubyte": (2049, (TEST_IMAGES,)),
}
REMEDY = ("delete it so that it is downloaded again, or point --data-dir (MNIST_DATA) at a folder holding "
          "MNIST/raw with the genuine files")


def mnist_root(folder):
    """The folder torchvision reads MNIST from (the one holding MNIST/raw), for a ``folder`` given as
    that folder, as its MNIST/ or as MNIST/raw/ itself."""
    path = Path(folder).expanduser()
    if path.name == "raw" and path.parent.name == "MNIST":
        return path.parent.parent
    if path.name == "MNIST" and not (path / "MNIST").is_dir():
        return path.parent
    return path


def load_mnist(root, train, download=True):
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one MNIST split, read through torchvision.

    Looks in ``root/MNIST/raw`` (``root`` may also name that folder or its MNIST parent), downloading
    there when files are missing and ``download`` is set.
    Raises DataError, saying what to do, for missing, undownloadable, unreadable or foreign files.
    """
    root = mnist_root(root)
    raw = root / "MNIST" / "raw"
    for folder in (root, raw.parent, raw):
        if folder.is_file():
            raise DataError(f"{folder} is a file, not a folder: point --data-dir (MNIST_DATA) at the folder "
                            "holding MNIST/raw")
    for name in MNIST_FILES:
        if (raw / name).exists() and (problem := mnist_file_problem(raw / name)):
            raise DataError(f"MNIST file {raw / name} {problem}")
    missing = [name for name in MNIST_FILES if not (raw / name).exists()]
    if missing:
        if not download:
            raise DataError(f"{missing_files(missing)} missing from {raw}: point --data-dir (MNIST_DATA) "
                            "at a folder holding MNIST/raw, or allow the download")
        download_mnist(root, missing)
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"MNIST in {raw} could not be read ({reason}): {REMEDY}") from None
    labels = dataset.targets
    if labels.min() < 0 or labels.max() > 9:
        name = "train-labels-idx1-ubyte" if train else "t10k-labels-idx1-ubyte"
        raise DataError(f"MNIST file {raw / name} holds label values outside 0-9 (from {labels.min().item()} "
                        f"to {labels.max().item()}): {REMEDY}")
    return dataset.data, labels


def mnist_file_problem(path):
    """None if ``path`` looks like the genuine MNIST file of its name, else what is wrong and what to do."""
    magic, dims = MNIST_FILES[path.name]
    header_size = 4 + 4 * len(dims)
    expected_size = header_size + math.prod(dims)
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(header_size)
    except PermissionError:
        return "cannot be read (permission denied): give yourself read permission (chmod u+r) or copy it"
    except OSError as error:
        return f"cannot be read ({error.strerror or type(error).__name__}): {REMEDY}"
    if head.lstrip()[:1] == b"<":
        return f"holds an HTML or XML page (a failed download), not MNIST data: {REMEDY}"
    if size != expected_size:
        return f"is {size:,} bytes, expected {expected_size:,} (truncated, empty or not MNIST): {REMEDY}"
    if int.from_bytes(head[:4], "big") != magic:
        return f"starts with IDX magic number {int.from_bytes(head[:4], 'big')}, expected {magic}: {REMEDY}"
    header_dims = tuple(int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(len(dims)))
    if header_dims != dims:
        shape = " x ".join(f"{d:,}" for d in header_dims)
        expected = " x ".join(f"{d:,}" for d in dims)
        return f"has an IDX header of {shape}, expected {expected} (corrupt): {REMEDY}"
    return None


def missing_files(names):
    return "MNIST is" if len(names) == len(MNIST_FILES) else f"MNIST file(s) {', '.join(names)} are"


def download_mnist(root, missing):
    """Download MNIST into ``root/MNIST/raw``; on failure, remove the folders this call made."""
    raw = Path(root) / "MNIST" / "raw"
    made = [folder for folder in (Path(root), raw.parent, raw) if not folder.exists()]
    existing = next(folder for folder in (raw, *raw.parents) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{missing_files(missing)} missing from {raw} and cannot be downloaded there "
                        "(the folder cannot be written): point --data-dir (MNIST_DATA) at a folder holding "
                        "MNIST/raw, or one you can write to")
    try:
        torchvision.datasets.MNIST(root, train=True, download=True)
    except (RuntimeError, OSError, ValueError) as error:  # URLError is an OSError
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        if isinstance(error, PermissionError):
            raise DataError(f"MNIST is missing from {raw} and cannot be downloaded there (permission "
                            "denied): point --data-dir (MNIST_DATA) at a folder you can write to") from None
        # torchvision lists every mirror it tried; the last line holds the last mirror's answer.
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1] if lines else type(error).__name__
        raise DataError(f"{missing_files(missing)} missing from {raw} and the download failed "
                        f"({reason}): connect to the internet, or point --data-dir (MNIST_DATA) at a "
                        "folder holding MNIST/raw") from None
