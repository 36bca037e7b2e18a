"""data.py: the MNIST files, checked and downloaded, and the pipelines that yield normalised batches."""

import errno
import functools
import gzip
import http.server
import os
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F
import torchvision

import data
from config import ConfigError, DataError, TrainConfig, make_config
from conftest import CPU, DATA_DIR
from data import MNIST_FILES, MNIST_MEAN, MNIST_STD, TensorLoader, load_mnist, make_loaders


def test_real_files_parse_to_the_expected_tensors(mnist):
    for split, count in (("train", 60_000), ("test", 10_000)):
        images, labels = mnist[split]
        assert images.shape == (count, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (count,) and labels.dtype == torch.int64
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist["train"][1].bincount().tolist() == counts
    pixels = mnist["train"][0].float() / 255
    assert pixels.mean().item() == pytest.approx(MNIST_MEAN, abs=5e-4)
    assert pixels.std().item() == pytest.approx(MNIST_STD, abs=5e-4)


def test_batched_augmentation_keeps_labels_and_image_statistics(mnist):
    images, labels = mnist["train"][0][:512], mnist["train"][1][:512]
    (x_plain, y_plain), = list(TensorLoader(images, labels, 512, CPU, train=True, seed=3))
    (x_aug, y_aug), = list(TensorLoader(images, labels, 512, CPU, train=True, rotate=10, shift=2, seed=3))
    assert torch.equal(y_plain, y_aug)
    assert not torch.allclose(x_plain, x_aug)
    ink_plain, ink_aug = x_plain * MNIST_STD + MNIST_MEAN, x_aug * MNIST_STD + MNIST_MEAN
    assert ink_aug.min() >= -1e-5 and ink_aug.max() <= 1 + 1e-5
    # Rotating and shifting moves ink about but keeps most of it inside the frame.
    kept = ink_aug.sum(dim=(1, 2, 3)) / ink_plain.sum(dim=(1, 2, 3))
    assert kept.min() > 0.75 and kept.median() > 0.95
    # Each augmented image still matches its source, and looks most like digits of its own label,
    # once both are blurred enough that a 2-pixel shift does not matter.
    blurred_aug, blurred_plain = (F.avg_pool2d(ink, 7, stride=1, padding=3).flatten(1)
                                  for ink in (ink_aug, ink_plain))
    unit_aug = F.normalize(blurred_aug - blurred_aug.mean(), dim=1)
    unit_plain = F.normalize(blurred_plain - blurred_plain.mean(), dim=1)
    assert ((unit_aug * unit_plain).sum(dim=1) > 0.5).float().mean() > 0.99
    nearest = (unit_aug @ unit_plain.T).argmax(dim=1)
    assert (y_plain[nearest] == y_aug).float().mean() > 0.85


@pytest.mark.parametrize("train", [True, False])
def test_both_pipelines_yield_the_same_kind_of_batches_and_the_test_split_as_it_is(mnist, train):
    fast, reference = (make_loaders(TrainConfig(train_limit=1024, test_limit=1024, rotate=15, shift=3,
                                                pipeline=p), CPU)[not train]
                       for p in ("tensor", "torchvision"))
    assert len(fast) == len(reference) == 4
    (x_fast, y_fast), (x_ref, y_ref) = next(iter(fast)), next(iter(reference))
    assert x_fast.shape == x_ref.shape == (256, 1, 28, 28)
    assert x_fast.dtype == x_ref.dtype == torch.float32 and y_fast.dtype == y_ref.dtype == torch.int64
    for x in (x_fast, x_ref):
        assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-4)
        assert x.mean().item() == pytest.approx(0, abs=0.12) and x.std().item() == pytest.approx(1, abs=0.12)
    if not train:  # normalised, in order, unaugmented, the same in every pass
        images, labels = mnist["test"][0][:1024], mnist["test"][1][:1024]
        for loader in (fast, reference, fast):
            x, y = (torch.cat(parts) for parts in zip(*loader))
            torch.testing.assert_close(x, (images.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD)
            assert torch.equal(y, labels)


def test_training_batches_reshuffle_each_epoch_and_unaugmented_are_the_split_in_order(mnist):
    images, labels = mnist["train"][0][:600], mnist["train"][1][:600]
    expected = (images.unsqueeze(1).float() / 255 - MNIST_MEAN) / MNIST_STD
    for pipeline in ("tensor", "torchvision"):
        config = TrainConfig(train_limit=600, test_limit=100, batch_size=256, rotate=10, shift=2, scale=0.1,
                             pipeline=pipeline)
        train_loader = make_loaders(config, CPU)[0]
        batches = list(train_loader.unaugmented())
        assert [len(y) for _, y in batches] == [256, 256, 88], pipeline
        torch.testing.assert_close(torch.cat([x for x, _ in batches]), expected)
        assert torch.equal(torch.cat([y for _, y in batches]), labels), pipeline
        first, second = (torch.cat([y for _, y in train_loader]) for _ in range(2))
        assert torch.equal(first.sort().values, labels.sort().values), pipeline  # each image once
        assert not torch.equal(first, labels) and not torch.equal(first, second), pipeline


def replace(raw, name, change):
    genuine = (raw / name).read_bytes()
    (raw / name).unlink()
    (raw / name).write_bytes(change(genuine))


@pytest.mark.parametrize(("name", "change", "words"), [
    ("train-images-idx3-ubyte", lambda genuine: b"", "is 0 bytes, expected 47,040,016"),
    ("train-images-idx3-ubyte", lambda genuine: b"<!DOCTYPE html><html>502 Bad Gateway</html>", "HTML"),
    ("train-images-idx3-ubyte", lambda genuine: genuine[:1000], "is 1,000 bytes, expected 47,040,016"),
    ("train-images-idx3-ubyte", lambda genuine: (2049).to_bytes(4, "big") + genuine[4:],
     "IDX magic number 2049, expected 2051"),
    ("t10k-images-idx3-ubyte", lambda genuine: genuine[:4] + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
     + (10_000).to_bytes(4,
                         "big") + genuine[16:], "has an IDX header of 28 x 28 x 10,000, expected 10,000 x"),
    ("t10k-labels-idx1-ubyte", lambda genuine: genuine[:8] + bytes([10]) + genuine[9:],
     "holds label values outside 0-9 (from 0 to 10)"),
])
def test_foreign_or_damaged_files_are_refused_by_name_and_left_alone(raw_copy, name, change, words):
    replace(raw_copy, name, change)
    content = (raw_copy / name).read_bytes()
    with pytest.raises(DataError) as caught:
        load_mnist(raw_copy.parent.parent, train=False)
    message = str(caught.value)
    assert words in message and str(raw_copy / name) in message and "delete it" in message, message
    assert "HTML" in words or "download" not in message.split(":")[0], "not called a failed download"
    assert (raw_copy / name).read_bytes() == content, "the bad file is left for the user to inspect"


def test_missing_files_without_internet_say_what_to_do_and_leave_no_folders(tmp_path, raw_copy, offline):
    with pytest.raises(DataError) as caught:
        load_mnist(tmp_path / "nowhere", train=True)
    raw = tmp_path / "nowhere" / "MNIST" / "raw"
    assert str(caught.value).startswith(f"MNIST is missing from {raw} and the "
                                        "download failed (<urlopen error [Errno 111] Connection refused>): "
                                        "connect to the internet, or point --data-dir")
    assert not (tmp_path / "nowhere").exists()
    (raw_copy / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError,
                       match=r"MNIST file\(s\) t10k-labels-idx1-ubyte are missing from .* download"):
        load_mnist(raw_copy.parent.parent, train=False)
    with pytest.raises(DataError, match="or allow the download"):
        load_mnist(raw_copy.parent.parent, train=False, download=False)
    assert raw_copy.is_dir(), "folders that were there before stay"


def test_a_data_folder_that_is_a_file_or_cannot_be_written_or_a_file_that_cannot_be_read_says_so(
        tmp_path, raw_copy, monkeypatch, offline):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(DataError, match="is a file, not a folder: point --data-dir"):
        load_mnist(tmp_path / "file", train=True)
    monkeypatch.setattr(data.os, "access", lambda path, mode: False)  # root writes anywhere: simulated
    with pytest.raises(DataError,
                       match=r"MNIST is missing from .* and cannot be downloaded there \(the folder "
                                        r"cannot be written\): point --data-dir"):
        load_mnist(tmp_path / "read-only", train=True)

    def no_permission(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(data, "open", no_permission, raising=False)  # root ignores file modes
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte cannot be read \(permission denied\): "):
        load_mnist(raw_copy.parent.parent, train=False)


def test_missing_data_is_downloaded_from_a_mirror(tmp_path, raw_copy, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MNIST_FILES:
        with open(raw_copy / name, "rb") as source, gzip.open(mirror / f"{name}.gz", "wb",
                                                              compresslevel=1) as gz:
            shutil.copyfileobj(source, gz)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=mirror)
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors",
                            [f"http://127.0.0.1:{server.server_port}/"])
        # Our archives are compressed anew, so they cannot match the checksums of the official ones.
        archives = [(f"{name}.gz", None) for name in MNIST_FILES]
        monkeypatch.setattr(torchvision.datasets.MNIST, "resources", archives)
        images, labels = load_mnist(tmp_path / "fresh", train=False)
        server.shutdown()
    assert images.shape == (10_000, 28, 28) and labels.shape == (10_000,)
    assert all((tmp_path / "fresh" / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES)


def test_the_data_folder_may_be_named_as_root_as_mnist_as_mnist_raw_with_a_tilde_or_by_mnist_data(
        raw_copy, monkeypatch, offline):
    root = raw_copy.parent.parent
    monkeypatch.setenv("HOME", str(root.parent))
    for folder in (root, root / "MNIST", raw_copy, f"~/{root.name}"):
        assert load_mnist(folder, train=False)[0].shape == (10_000, 28, 28)
        config = TrainConfig(data_dir=str(folder), test_limit=100, pipeline="torchvision")
        assert len(make_loaders(config, CPU)[1]) == 1
    assert TrainConfig(data_dir="~/x").data_dir == os.path.join(str(root.parent), "x")
    assert sorted(path.name for path in root.iterdir()) == ["MNIST"]  # nothing nested was made
    monkeypatch.setenv("MNIST_DATA", "/somewhere/else")  # read when a config is made; empty is unset
    assert TrainConfig().data_dir == "/somewhere/else"
    monkeypatch.setenv("MNIST_DATA", "")
    assert TrainConfig().data_dir == "./data"


def test_make_loaders_answers_a_wrong_config_or_device_in_one_line():
    with pytest.raises(ConfigError, match="make_loaders needs a TrainConfig .* got dict"):
        make_loaders({"batch_size": 100}, CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            make_loaders(make_config(test_limit=100), "cuda")
    config = make_config(test_limit=100, data_dir=DATA_DIR)
    config.dry_run = True  # set after the config was made: still a dry run
    assert sum(len(labels) for _, labels in make_loaders(config, "cpu")[0]) == 2 * config.batch_size


@pytest.mark.parametrize("pipeline", ["tensor", "torchvision"])
def test_val_holds_out_the_same_training_images_whatever_the_seed(pipeline):
    splits = []
    for seed in (0, 1):
        train_loader, _ = make_loaders(TrainConfig(val=1000, train_limit=2000, test_limit=10, seed=seed,
                                                   pipeline=pipeline, rotate=0, shift=0, scale=0), CPU)
        held, kept = ({bytes(image.numpy()) for images, _ in batches for image in images}
                      for batches in (train_loader.validation, train_loader.unaugmented()))
        assert len(held) == 1000 and len(kept) == 2000 and not held & kept
        splits.append((held, kept))
    assert splits[0] == splits[1]
    labels = torch.cat([y for _, y in train_loader.validation])
    assert labels.bincount(minlength=10).min() > 50  # a random draw, not the first 1,000
    assert make_loaders(TrainConfig(test_limit=10, train_limit=10), CPU)[0].validation is None
