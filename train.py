"""Train a compact CNN on MNIST: one line per epoch; with --out, the run's files in that folder.

    python train.py --epochs 1                       # a first try: one epoch, about 98% (30 s on 2 cores)
    python train.py                                  # Net, 20 epochs, data in ./data (downloaded)
    python train.py --model NetCompact               # another model, with its measured recipe
    python train.py --model MyNet --brief S7         # your own model, judged by the S7 brief
    python train.py --out runs/net --seed 0          # checkpoint every epoch into runs/net
    python train.py --out runs/net --resume          # continue after an interruption, exactly
    python train.py --seeds 0-4 --out runs/seeds     # one run per seed and a summary (seeds.json)
"""

# Only the standard library, config.py and runs.py load before the arguments are checked, so that --help
# and mistakes are answered at once; torch and what needs it (seconds to load) come after.
import argparse
import errno
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import runs
from config import (
    BRIEFS,
    RECIPES,
    ConfigError,
    TrainConfig,
    TrainingError,
    default_setting,
    make_config,
    model_names,
)


@dataclass
class Request:
    """What the command line asks for."""

    settings: dict  # the TrainConfig settings given as flags (and "recipe"), nothing else
    out: Path | None
    resume: bool
    overwrite: bool
    seeds: list | None
    find_lr: bool
    progress: bool
    flags: list  # the flags as canonical words, for the command that continues an interrupted run


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    request, folder = None, None
    try:
        request = parse_args(argv)
        if request.find_lr:
            range_test(request.settings, request.out, progress=request.progress)
        elif request.seeds is not None:
            train_seeds(request)
        else:
            folder = request.out
            train_once(request.settings, request.out, resume=request.resume, overwrite=request.overwrite,
                       progress=request.progress)
            print(runs.where_the_files_are(request.out))
        sys.stdout.flush()  # a full disk shows here, not in an "Exception ignored" as Python exits
        return 0
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        folder = getattr(interrupt, "folder", folder)
        print(f"interrupted: {stopped(request, folder, getattr(interrupt, 'restored', False))}",
              file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output (such as head) has gone
        return output_lost(f"stopped: the output pipe was closed; {stopped(request, folder)}", 141)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EIO) or error.filename is not None:
            raise
        kept = stopped(request, folder)
        return output_lost(f"error: the output cannot be written ({error.strerror}); {kept}", 2)


def output_lost(message, code):
    # Standard output fails: what Python would still flush into it on the way out goes nowhere instead of
    # failing again with an "Exception ignored" message.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print(message, file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------
# One run, several seeds, the range test


def train_once(given, out=None, *, resume=False, overwrite=False, progress=True):
    """Train one model with the ``given`` settings (TrainConfig fields and ``recipe``; those not given
    come from the recipe, or with ``resume`` from the run in ``out``). With ``out``, the run's files go
    there (runs.py). Returns the metrics dict. Everything is checked before anything is written."""
    folder = None if out is None else runs.RunFolder(out)
    settings = given if folder is None else folder.settings(given, resume=resume, overwrite=overwrite)
    config = make_config(**settings)
    if folder is not None and resume and folder.finished:
        return finished_run(folder)

    import torch

    from architecture import describe
    from config import build_model
    from data import make_loaders
    from utils import fit, pick_device, prepare_model, runtime_info, seed_everything

    device = pick_device(config.device)
    seed_everything(config.seed, device, config.deterministic)
    model = prepare_model(build_model(config.model), device)
    params = sum(p.numel() for p in model.parameters())
    if params >= (budget := BRIEFS[config.brief].budget):
        print(f"note: {config.model} has {params:,} parameters, over the {config.brief} budget of {budget:,}")
    train_loaders = make_loaders(config, device)
    if folder is None:
        runs.started()
    else:
        if resume and not folder.existing():
            print(f"no run in {folder} yet: starting from scratch", file=sys.stderr)
        folder.start(asdict(config), overwrite=overwrite)
    try:
        history = fit(model, *train_loaders, config, checkpoint=folder and folder / "checkpoint.pt",
                      resume=resume, progress=progress)
        # The layers as printed, so that a run says what it trained even when model.py has changed since.
        last_conv = describe(model).last_conv
        metrics = {"model": config.model, "params": params, "layers": repr(model), "seed": config.seed,
                   "receptive_field": last_conv and last_conv.receptive_field, "device": str(device),
                   "config": asdict(config), "runtime": runtime_info(device), "epochs": history}
        if folder is not None:
            folder.finish(metrics, lambda path: runs.atomic_write(
                path, lambda file: torch.save(model.state_dict(), file)))
        return metrics
    except (TrainingError, KeyboardInterrupt) as error:
        if folder is not None and folder.settle():
            if isinstance(error, KeyboardInterrupt):
                error.restored = True
                raise
            raise type(error)(f"{error}; the run it was to replace is back in {folder}") from None
        raise
    finally:
        if folder is not None:
            folder.settle()
            folder.release()


def finished_run(folder):
    """The metrics of the finished run in ``folder``; its model.pt, if lost, rebuilt from its checkpoint."""
    metrics = folder.read_metrics()
    if not (folder / "model.pt").exists():
        import torch

        from checkpoints import read_checkpoint, tested_weights

        if not (folder / "checkpoint.pt").exists():
            raise ConfigError(f"the run in {folder} is finished, but both model.pt and checkpoint.pt are "
                              "gone: train it again with --overwrite")
        folder.hold()
        weights = tested_weights(read_checkpoint(folder / "checkpoint.pt"))
        runs.atomic_write(folder / "model.pt", lambda file: torch.save(weights, file))
        folder.release()
        print(f"model.pt was missing from {folder}: written again from checkpoint.pt")
    print(f"the run in {folder} is finished ({len(metrics['epochs'])} epochs, final test accuracy "
          f"{metrics['epochs'][-1]['test_acc']:.2f}%): nothing left to do")
    return metrics


def train_seeds(request):
    plan = runs.seed_plan(request.out, request.settings, request.seeds, resume=request.resume,
                          overwrite=request.overwrite)
    reference = make_config(**plan[0][0])
    for settings, folder, resume, overwrite in plan:
        try:
            train_once(settings, folder.path, resume=resume, overwrite=overwrite, progress=request.progress)
        except KeyboardInterrupt as interrupt:
            interrupt.folder = folder
            raise
        summary = runs.summarise_seeds(request.out, reference)
        runs.write_json(request.out / runs.SEEDS_FILE, summary)
    print(f"final test accuracy over seeds {runs.format_seeds(summary['seeds'])}: mean "
          f"{summary['mean']:.3f}%  std {summary['std']:.3f}  min {summary['min']:.2f}%  "
          f"max {summary['max']:.2f}%")
    print(f"runs in {request.out}/seed<N>/ (metrics.json, model.pt), their summary in "
          f"{request.out / runs.SEEDS_FILE}")


def range_test(given, out=None, progress=True):
    """The learning-rate range test of the model and recipe ``given``: a suggested peak learning rate, and
    a plot in ``out`` (else the current folder)."""
    config = make_config(**given)
    plot = (runs.RunFolder(out).path if out is not None else Path(".")) / "lr_range.png"
    runs.RunFolder(plot.parent).check_path()  # before the work, which takes a minute

    from config import build_model
    from data import make_loaders
    from report import plot_lr_range
    from utils import lr_range_test, pick_device, prepare_model, seed_everything

    device = pick_device(config.device)
    seed_everything(config.seed, device, config.deterministic)
    model = prepare_model(build_model(config.model), device)
    train_loader, _ = make_loaders(config, device)
    runs.started()
    result = lr_range_test(model, train_loader, config, progress=progress)
    print(f"{config.model}: suggested peak learning rate {result['suggested_lr']:.3g} ({result['rule']}, "
          f"over {len(result['lr'])} batches); the recipe's peak is {config.lr:g}")
    print(f"to train with it: python train.py --model {config.model} --lr {result['suggested_lr']:.3g}")
    try:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_lr_range(result, recipe_lr=config.lr).savefig(plot, dpi=110, bbox_inches="tight")
    except OSError as error:
        raise ConfigError(f"the plot cannot be written to {plot} ({error.strerror}); the suggestion above "
                          "stands") from None
    print(f"the plot is {plot}")
    return result


def stopped(request, folder, restored=False):
    """What a run stopped now leaves, and the command that continues it (runs.py), for a message's end."""
    if request is None or request.find_lr:
        plot = (request.out or Path(".")) / "lr_range.png" if request else None
        return f"the range test's plot is in {plot}" if plot and plot.exists() else "nothing was written"
    command = runs.continue_command(request.flags, request.out, request.seeds, request.overwrite)
    return runs.left_behind(folder, command, seeds=request.seeds is not None, restored=restored)


# ---------------------------------------------------------------------------------------------
# The command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its mistakes answered in one line like every other refusal."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists every flag)\n")


def parse_args(argv):
    """The Request of ``argv``; ConfigError for a request that cannot be carried out as it stands."""
    # Flags left out stay out of the namespace, so that a resumed run can tell which were given.
    parser = OneLineParser(description=__doc__.split("\n")[0], argument_default=argparse.SUPPRESS,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="\n".join(__doc__.split("\n")[2:]))
    named = ", ".join(name for name in RECIPES if name not in model_names())
    parser.add_argument("--recipe", choices=list(RECIPES), metavar="RECIPE",
                        help=f"measured settings to start from: {named}, or a model's name for that model's "
                             "recipe (default: the recipe of --model); flags given override it")
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        text = spec.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if spec.name == "model":
            text += f": {', '.join(model_names())}"
        if spec.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            # A help that explains its own default (--data-dir's) is not given a second one.
            if "(default:" not in text:
                text += f" (default: {default_setting(spec.name)})"
            parser.add_argument(flag, type=spec.type, metavar=spec.name.split("_")[-1].upper(), help=text)
    parser.add_argument("--out", help="folder for config.json, checkpoint.pt, model.pt, metrics.json")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out (its files only; kept until the new run has a "
                        "checkpoint)")
    parser.add_argument("--seeds", help="run each seed of a range such as 0-4 or 0,3,7 into --out/seedN "
                        "and summarise them in --out/seeds.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--find-lr", action="store_true",
                        help="instead of training, a learning-rate range test of the model and recipe: "
                        "a suggested peak --lr, and the loss against the learning rate in --out/lr_range.png "
                        "(without --out, ./lr_range.png)")
    given = vars(parser.parse_args(argv))
    switches = {name: given.pop(name, False) for name in ("resume", "overwrite", "quiet", "find_lr")}
    out, seeds = given.pop("out", None), given.pop("seeds", None)
    flags = [word for name, value in given.items() for word in flag_words(name, value)]
    if out is not None and not out.strip():
        raise ConfigError("--out is empty: name the folder for the run's files")
    conflicts = [
        (switches["resume"] and out is None, "--resume needs --out DIR, the folder of the run to continue"),
        (switches["resume"] and switches["overwrite"] and seeds is None,
         "--resume continues the run in --out and --overwrite replaces it: pass one"),
        (switches["find_lr"] and (switches["resume"] or seeds is not None),
         "--find-lr trains nothing to resume or repeat: leave out --resume and --seeds"),
        (seeds is not None and out is None, "--seeds needs --out DIR, for a folder per seed and seeds.json"),
        (seeds is not None and "seed" in given, "--seed and --seeds both name seeds: pass one"),
    ]
    for conflict, message in conflicts:
        if conflict:
            raise ConfigError(message)
    make_config(**given)  # every setting checked now, before torch loads
    return Request(given, None if out is None else Path(os.path.expanduser(out)), switches["resume"],
                   switches["overwrite"], None if seeds is None else runs.parse_seeds(seeds),
                   switches["find_lr"], not switches["quiet"] and sys.stderr.isatty(), flags)


def flag_words(name, value):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


if __name__ == "__main__":
    import signal

    # Until a run starts writing, Ctrl-C ends the process at once (runs.py says why).
    signal.signal(signal.SIGINT, runs.interrupted_while_starting)
    sys.exit(main())
