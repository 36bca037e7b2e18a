"""Training speed, side by side in one run: the reference setup against ours.

    python bench.py                      # MNIST in ./data, or where MNIST_DATA or --data-dir says

Each arm runs in a fresh process of its own, the two alternating for a few rounds, on the same machine:
  reference  the seed-style setup: a 15,662-parameter CNN (conv 1-8-16-32 at 28x28, max-pool, conv 32-32,
             1x1 to 10, GAP), torchvision DataLoader (2 workers) with per-image RandomRotation(7), batch 128,
             SGD lr 0.01 momentum 0.9, default memory allocator;
  ours       train.py's train_epoch for the model's recipe (Net by default): the whole dataset on the
             device, batched augmentation.
Training time is the median over timed chunks of batches after a warm-up, scaled to a 60,000-image epoch
(the chunk size is printed). Ours runs train_epoch over a split of one chunk, so its timing holds the
warp of that split; the reference's adds the time its workers take to start an epoch. The test pass is
the median of full 10,000-image passes. The figures shown
are medians over the rounds, and the ratio is the median of the rounds' ratios.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from torchvision.datasets import MNIST

from config import TRAIN_IMAGES, TrainConfig, TrainingError, build_model, make_config, model_names
from data import MNIST_MEAN, MNIST_STD, TorchvisionLoader, load_mnist, make_loaders
from utils import (
    average_of,
    check_step,
    evaluate,
    make_optimizer,
    make_static_step,
    pick_device,
    prepare_model,
    seed_everything,
    train_epoch,
)

MEDIAN_KEYS = ("epoch_seconds", "images_per_second", "test_seconds", "peak_memory_mb")


class ReferenceNet(nn.Module):
    """The 15,662-parameter model of the projects this one grew from, rebuilt for timing."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, kernel=3, padding=1):
            return [nn.Conv2d(cin, cout, kernel, padding=padding), nn.BatchNorm2d(cout), nn.ReLU()]

        self.layers = nn.Sequential(*block(1, 8), *block(8, 16), *block(16, 32), nn.MaxPool2d(2),
                                    *block(32, 32, padding=0), *block(32, 10, kernel=1, padding=0),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return F.log_softmax(self.layers(x), dim=1)


def count_macs(model):
    """Multiply-accumulates of one forward pass of one image (half of what FlopCounterMode counts)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, 28, 28, device=next(model.parameters()).device))
    model.train(was_training)
    return counter.get_total_flops() // 2


def matmul_gflops(device, size=2048, repeats=20):
    """Measured float32 matrix-multiply throughput of the device, in GFLOP/s."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loaders(config, device):
    rotation = transforms.Compose([transforms.RandomRotation(7, fill=0), transforms.ToTensor(),
                                   transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    load_mnist(config.data_dir, train=True)  # checks the files, with a clear message if they are bad
    return tuple(TorchvisionLoader(MNIST(config.data_dir, train=train, transform=transform), 128, device,
                                   train=train) for train, transform in ((True, rotation), (False, plain)))


def timings(run, device, repeats, warm_up=False):
    """Seconds of each of ``repeats`` calls of ``run()``, the device synchronised around each; after an
    untimed call first if ``warm_up``."""
    seconds = []
    for timed in [False] * warm_up + [True] * repeats:
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        if timed:
            seconds.append(time.perf_counter() - started)
    return seconds


def run_arm(arm, config, chunk, chunks):
    """Time one arm in this process; returns its figures."""
    device = pick_device(config.device)
    seed_everything(0, device)
    if arm == "reference":
        model = ReferenceNet().to(device)
        train_loader, test_loader = reference_loaders(config, device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batches = iter(())

        def run_chunk():
            nonlocal batches
            model.train()
            for _ in range(chunk):
                try:
                    images, labels = next(batches)
                except StopIteration:
                    batches = iter(train_loader)
                    images, labels = next(batches)
                loss = F.nll_loss(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        batch_size = 128
    else:
        model = prepare_model(build_model(config.model), device)
        chunk = min(chunk, TRAIN_IMAGES // config.batch_size)
        # train.py's own epoch (train_epoch, with --step as given) over a split of one chunk of batches:
        # each call shuffles and warps it as an epoch does, so the warp is timed in proportion.
        chunk_split = replace(config, train_limit=chunk * config.batch_size)
        train_loader, test_loader = make_loaders(chunk_split, device)
        optimizer, scheduler = make_optimizer(model, config, total_steps=100_000)  # longer than any timing
        averaged = average_of(model, config.ema)
        static_step = make_static_step(model, optimizer, scheduler, config, averaged)

        def run_chunk():
            train_epoch(model, train_loader, optimizer, scheduler, averaged=averaged,
                        label_smoothing=config.label_smoothing, static_step=static_step, progress=False)

        batch_size = config.batch_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    chunk_seconds = timings(run_chunk, device, chunks, warm_up=True)
    per_batch = statistics.median(chunk_seconds) / chunk
    # The reference starts its worker processes at each epoch (the time to its first batch); ours warps
    # within each timed chunk.
    epoch_start = 0.0
    if arm == "reference":
        epoch_start = statistics.median(timings(lambda: next(iter(train_loader)), device, 3))
    epoch_seconds = epoch_start + per_batch * TRAIN_IMAGES / batch_size
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"arm": arm, "model": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "macs": count_macs(model), "batch_size": batch_size, "device": str(device),
            "chunk_images": chunk * batch_size, "epoch_seconds": epoch_seconds,
            "epoch_start_seconds": epoch_start,
            "chunk_epoch_seconds": [t / chunk * TRAIN_IMAGES / batch_size for t in chunk_seconds],
            "images_per_second": batch_size / per_batch,
            "test_seconds": statistics.median(timings(lambda: evaluate(model, test_loader), device, 3)),
            "peak_memory_mb": peak / 2**20, "threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=TrainConfig().data_dir,
                        help="folder holding MNIST/raw, as for train.py (default: env MNIST_DATA, else "
                        "./data)")
    parser.add_argument("--device", default="auto",
                        help="where both arms run: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps "
                        "(default: auto)")
    parser.add_argument("--model", default="Net", choices=model_names())
    parser.add_argument("--step", default=TrainConfig().step,
                        help="our training step: eager, static or graph "
                        "(as train.py --step)")
    parser.add_argument("--images", type=int, default=10_000,
                        help="training images per timed chunk (default: 10000, a sixth of an epoch)")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks per arm; the median counts")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both arms (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--arm", choices=["reference", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("images", "chunks", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()
                                  or not os.access(args.json.parent, os.W_OK)):
        parser.error(f"--json {args.json} cannot be written: name a file in a folder you can write to")
    try:
        config = make_config(data_dir=args.data_dir, device=args.device, model=args.model, step=args.step)
        if args.arm:
            batch_size = 128 if args.arm == "reference" else config.batch_size
            print(json.dumps(run_arm(args.arm, config, max(1, args.images // batch_size), args.chunks)))
            return 0
        # Checked here once, so that a mistake stops at once and not in every arm's process.
        device = pick_device(args.device)
        check_step(config.step, device)
        load_mnist(config.data_dir, train=False)
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The arms alternate, round after round, so that a machine whose speed drifts (a shared virtual
    # machine does) weighs on both alike; each round's ratio compares neighbouring runs.
    rounds = []
    try:
        for _ in range(args.rounds):
            pair = {}
            for arm in ("reference", "ours"):
                command = [sys.executable, __file__, "--arm", arm, *(sys.argv[1:] if argv is None else argv)]
                finished = subprocess.run(command, capture_output=True, text=True, check=False)
                if finished.returncode:
                    print(finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else "failed",
                          file=sys.stderr)
                    return finished.returncode
                pair[arm] = json.loads(finished.stdout.strip().splitlines()[-1])
            rounds.append(pair)
    except KeyboardInterrupt:
        if rounds:
            show(rounds, device, args)
        print(f"interrupted: {len(rounds)} of {args.rounds} rounds finished"
              + (", shown above" if rounds else ", so nothing was measured"), file=sys.stderr)
        return 130
    try:
        figures = show(rounds, device, args)
        sys.stdout.flush()
    except OSError as error:  # a full disk, a closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python would flush it again on exit
        print(f"error: the output cannot be written ({error.strerror})", file=sys.stderr)
        return 2
    if args.json:
        try:
            with open(args.json, "w") as file:
                json.dump(figures, file, indent=1)
        except OSError as error:
            print(f"error: --json {args.json} cannot be written ({error.strerror}): the figures above stand",
                  file=sys.stderr)
            return 2
    return 0


def show(rounds, device, args):
    """Print the figures of the finished ``rounds``; returns them, as --json writes them."""
    gflops = matmul_gflops(device)
    results = [{**runs[0], **{key: statistics.median(run[key] for run in runs) for key in MEDIAN_KEYS}}
               for runs in ([pair[arm] for pair in rounds] for arm in ("reference", "ours"))]
    ratios = [pair["reference"]["epoch_seconds"] / pair["ours"]["epoch_seconds"] for pair in rounds]
    print(f"device {device} ({torch.get_num_threads()} threads), matmul {gflops:.0f} GFLOP/s, "
          f"torch {torch.__version__}; per arm and round: chunks of {args.images:,} images after a warm-up, "
          f"median of {args.chunks}, scaled to 60,000; below, medians over {len(rounds)} alternating rounds")
    print(f"{'':10} {'model':12} {'params':>7} {'MACs/img':>9} {'batch':>5} {'train s/epoch':>13} "
          f"{'img/s':>7} {'test s':>7} {'peak MB':>8}")
    for row in results:
        print(f"{row['arm']:10} {row['model']:12} {row['params']:7,} {row['macs'] / 1e6:8.2f}M "
              f"{row['batch_size']:5} {row['epoch_seconds']:13.2f} {row['images_per_second']:7.0f} "
              f"{row['test_seconds']:7.2f} {row['peak_memory_mb']:8.0f}")
    reference, ours = results
    ratio = statistics.median(ratios)
    floor = 3 * ours["macs"] * TRAIN_IMAGES * 2 / (gflops * 1e9)
    print(f"ratio reference/ours: training {ratio:.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)}), "
          f"test pass {reference['test_seconds'] / ours['test_seconds']:.2f}x")
    print(f"ours against its compute floor (3 x {ours['macs'] / 1e6:.2f}M MACs x 60,000 at "
          f"{gflops:.0f} GFLOP/s = {floor:.2f} s): {ours['epoch_seconds'] / floor:.2f}x the floor")
    return {"matmul_gflops": gflops, "arms": results, "ratio": ratio, "round_ratios": ratios,
            "rounds": rounds, "floor_seconds": floor, "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
