"""Train a compact CNN on MNIST: one line per epoch; with --out, the run's files in that folder.

    python train.py --epochs 1                       # a first try: one epoch, about 98% (20 s on 2 cores)
    python train.py                                  # Net, 20 epochs, data in ./data (downloaded)
    python train.py --model NetCompact               # another model, with its measured recipe
    python train.py --out runs/net --seed 0          # checkpoint every epoch into runs/net
    python train.py --out runs/net --resume          # continue after an interruption, exactly
    python train.py --seeds 0-4 --out runs/seeds     # one run per seed and a summary (seeds.json)
"""

# Only the standard library and config.py load before the arguments are checked, so that --help and
# mistakes are answered at once; torch and what needs it (seconds to load) come after.
import argparse
import functools
import json
import os
import re
import shlex
import signal
import statistics
import sys
from dataclasses import asdict, fields
from pathlib import Path

from config import (
    RECIPES,
    ConfigError,
    TrainConfig,
    TrainingError,
    default_setting,
    make_config,
    model_names,
    settings_changes,
)

try:
    import fcntl
except ImportError:  # Windows: runs into one --out are not locked against each other
    fcntl = None

RUN_FILES = ("config.json", "checkpoint.pt", "metrics.json", "model.pt")
SEEDS_FILE = "seeds.json"
MAX_SEEDS = 1000


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    out, resume, overwrite, seeds, quiet, find_lr = (args.pop(key, default) for key, default in (
        ("out", None), ("resume", False), ("overwrite", False), ("seeds", None), ("quiet", False),
        ("find_lr", False)))
    progress = not quiet and sys.stderr.isatty()
    writing = {"folder": None}  # the run folder being written, for the message of an interruption
    try:
        if out is not None and not out.strip():
            raise ConfigError("--out is empty: name the folder for the run's files")
        out = writing["folder"] = None if out is None else Path(out)
        if resume and out is None:
            raise ConfigError("--resume needs --out DIR, the folder holding the run to continue")
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one")
        if find_lr:
            if resume or seeds is not None:
                raise ConfigError("--find-lr trains nothing to resume or repeat: leave out --resume and "
                                  "--seeds")
            range_test(args, out, progress=progress)
            return 0
        if seeds is None:
            train_once(args, out, resume=resume, overwrite=overwrite, progress=progress)
            print(where_the_files_are(out))
            return 0
        if out is None:
            raise ConfigError("--seeds needs --out DIR to hold one folder per seed and seeds.json")
        plan = [({**args, "seed": seed}, out / f"seed{seed}") for seed in parse_seeds(seeds)]
        writing["folder"] = plan[0][1]
        check_seed_request(out, plan, resume=resume, overwrite=overwrite)
        for index, (given, folder) in enumerate(plan):
            writing["folder"] = folder
            # With --overwrite the old summary goes once the first seed is known to start.
            starting = None
            if overwrite and not index:
                starting = functools.partial((out / SEEDS_FILE).unlink, missing_ok=True)
            train_once(given, folder, resume=resume, overwrite=overwrite, progress=progress,
                       starting=starting)
            summary = summarise_seeds(finished_seed_runs(out))
            write_json(out / SEEDS_FILE, summary)
        print(f"final test accuracy over seeds {format_seeds(summary['seeds'])}: mean "
              f"{summary['mean']:.3f}%  std {summary['std']:.3f}  min {summary['min']:.2f}%  "
              f"max {summary['max']:.2f}%")
        print(f"runs in {out}/seed<N>/ (metrics.json, model.pt), their summary in {out / SEEDS_FILE}")
        return 0
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = range_test_kept(out) if find_lr else what_is_kept(writing["folder"], argv, seeds)
        print(f"interrupted: {kept}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of the output (such as head) has gone; further prints would fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        kept = range_test_kept(out) if find_lr else what_is_kept(writing["folder"], argv, seeds)
        print(f"stopped: the output pipe was closed; {kept}", file=sys.stderr)
        return 141


# ---------------------------------------------------------------------------------------------
# One run


def train_once(given, out=None, *, resume=False, overwrite=False, progress=True, starting=None):
    """Train one model with the ``given`` settings (TrainConfig fields and ``recipe``; those not given
    come from the recipe, or with ``resume`` from the run in ``out``). With ``out``, the run's settings,
    a checkpoint every epoch, metrics.json and model.pt go there. Returns the metrics dict.

    Settings, device, data and ``out`` are all checked before anything is written; ``overwrite``
    removes the old run's files only then, and ``starting()``, if given, is called at that moment.
    """
    settings = run_settings(out, given, resume=resume, overwrite=overwrite)  # refused before torch loads
    config = make_config(**settings)
    if out is not None and resume and (out / "metrics.json").exists():
        metrics = read_metrics(out / "metrics.json")
        print(f"the run in {out} is finished ({len(metrics['epochs'])} epochs, final test accuracy "
              f"{metrics['epochs'][-1]['test_acc']:.2f}%): nothing left to do")
        return metrics

    import torch

    from checkpoints import atomic_write
    from data import make_loaders
    from model import MODELS
    from utils import (
        check_step,
        fit,
        keep_freed_memory,
        pick_device,
        prepare_model,
        runtime_info,
        seed_everything,
    )

    device = pick_device(config.device)
    check_step(config.step, device)
    if device.type == "cpu":
        keep_freed_memory()
    seed_everything(config.seed, device, config.deterministic)
    model = prepare_model(MODELS[config.model](), device)
    params = sum(p.numel() for p in model.parameters())
    train_loader, test_loader = make_loaders(config, device)
    lock = None if out is None else open_run_folder(out)  # the first thing written
    try:
        if out is not None and overwrite:
            remove_run(out)
        if starting is not None:
            starting()
        started_writing()
        if out is not None:
            if resume and not (out / "config.json").exists() and not (out / "checkpoint.pt").exists():
                print(f"no run in {out} yet: starting from scratch", file=sys.stderr)
            write_json(out / "config.json", asdict(config))
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


def range_test(given, out=None, progress=True):
    """The learning-rate range test of the model and recipe ``given``: a plot in ``out`` (else the
    current folder) and a suggested peak learning rate."""
    config = make_config(**given)
    if out is not None:
        check_out_folder(out)

    from data import make_loaders
    from model import MODELS
    from utils import lr_range_test, pick_device, plot_lr_range, prepare_model, seed_everything

    device = pick_device(config.device)
    seed_everything(config.seed, device, config.deterministic)
    model = prepare_model(MODELS[config.model](), device)
    train_loader, _ = make_loaders(config, device)
    result = lr_range_test(model, train_loader, config, progress=progress)
    path = (out or Path(".")) / "lr_range.png"
    started_writing()
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_lr_range(result, recipe_lr=config.lr).savefig(path, dpi=110, bbox_inches="tight")
    print(f"{config.model}: suggested peak learning rate {result['suggested_lr']:.3g} ({result['rule']}, "
          f"over {len(result['lr'])} batches); the recipe's peak is {config.lr:g}")
    print(f"to train with it: python train.py --model {config.model} --lr {result['suggested_lr']:.3g}; "
          f"the plot is {path}")
    return result


def range_test_kept(out):
    plot = (out or Path(".")) / "lr_range.png"
    return f"the range test's plot is in {plot}" if plot.exists() else "the range test wrote nothing"


def run_settings(out, given, *, resume=False, overwrite=False):
    """The settings a run into ``out`` trains with: ``given`` for a new run; with ``resume``, the saved
    run's settings with ``given`` on top. Reads ``out``, never writes it. ConfigError for impossible
    settings, an unusable ``out``, and any request that would lose a result or resume with other
    settings."""
    make_config(**given)
    if out is None:
        return given
    check_out_folder(out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if overwrite or not existing:
        return given
    if not resume:
        what = "a finished run (metrics.json)" if "metrics.json" in existing else "a run"
        raise ConfigError(f"{out} already holds {what}: pass --resume to continue it, --overwrite to "
                          "replace it, or choose another --out")
    saved = saved_settings(out)
    flags = {key: value for key, value in given.items() if key != "recipe"}
    settings = {**saved, **RECIPES.get(given.get("recipe"), {}), **flags}
    # Where the data lives may change between a run and its resumption: MNIST_DATA counts as it does
    # for a new run.
    if "data_dir" not in flags and os.environ.get("MNIST_DATA"):
        settings["data_dir"] = os.environ["MNIST_DATA"]
    if changed := settings_changes(saved, make_config(**settings)):
        raise ConfigError(f"the run in {out} was made with other settings ({'; '.join(changed)}): resume "
                          "with the same settings, or choose another --out")
    return settings


def saved_settings(out):
    """The settings of the run in ``out``, from its config.json (else its checkpoint), checked."""
    path = out / "config.json"
    if path.exists():
        saved = read_json(path)
    else:  # config.json deleted by hand: the checkpoint holds the same settings
        from checkpoints import read_checkpoint

        saved, path = read_checkpoint(out / "checkpoint.pt")["config"], out / "checkpoint.pt"
    known = TrainConfig.__dataclass_fields__.keys()
    if not isinstance(saved, dict) or not set(saved) <= known:
        what = (f"unknown settings {', '.join(sorted(set(saved) - known))}" if isinstance(saved, dict)
                else f"a {type(saved).__name__} where the settings belong")
        raise ConfigError(f"{path} holds {what}, not the settings of a run of this version: pass --overwrite "
                          "to start over, or choose another --out")
    try:
        make_config(**saved)
    except ConfigError as error:
        raise ConfigError(f"{path} holds settings this version refuses ({error}): pass --overwrite to start "
                          "over, or choose another --out") from None
    return saved


def check_out_folder(out):
    """ConfigError unless ``out`` is a folder, or a path where one can be made."""
    path = Path(out)
    while True:
        try:
            is_folder = path.is_dir()
            exists = is_folder or path.exists()
        except OSError as error:
            raise ConfigError(f"--out {out} cannot be used ({error.strerror}): choose another "
                              "folder") from None
        if exists and not is_folder:
            what = "it is a file" if path == Path(out) else f"{path} is a file"
            raise ConfigError(f"--out {out} cannot be used ({what}): choose a folder")
        if exists or path == path.parent:
            return
        path = path.parent


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
    # Temporary files of this project's writes that a kill cut short; nobody else can be writing them
    # now. Other files are the user's and stay.
    for name in (*RUN_FILES, SEEDS_FILE):
        for temporary in out.glob(f".{name}.*.tmp"):
            temporary.unlink(missing_ok=True)
    return lock


def remove_run(out):
    """Remove the files a run writes in ``out`` (--overwrite); the folder's other files stay."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def started_writing():
    # From here on files are written: Ctrl-C must reach the run, which says what it leaves.
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted_while_starting(*_):
    os.write(2, b"interrupted while starting: nothing was written\n")
    os._exit(130)


def write_json(path, data):
    from checkpoints import atomic_write

    atomic_write(path, lambda file: file.write(json.dumps(data, indent=1).encode()))


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): pass --overwrite to start over, or choose "
                          "another --out") from None


def read_metrics(path):
    """A finished run's metrics.json, checked to hold what the summaries read."""
    metrics = read_json(path)
    rows = metrics.get("epochs") if isinstance(metrics, dict) else None
    well_formed = (isinstance(rows, list) and rows and isinstance(metrics.get("seed"), int)
                   and isinstance(metrics.get("config"), dict)
                   and all(isinstance(row, dict) and isinstance(row.get("test_acc"), (int, float))
                           for row in rows))
    if not well_formed:
        raise ConfigError(f"{path} is not the metrics of a finished run of this project: pass --overwrite to "
                          "train it again, or choose another --out")
    return metrics


def where_the_files_are(out):
    if out is None:
        return "nothing was saved: pass --out DIR to keep the weights (model.pt) and the metrics"
    return (f"files in {out}/: metrics.json (settings, versions, every epoch), model.pt (the weights), "
            "checkpoint.pt (for --resume)")


def what_is_kept(folder, argv, seeds=None):
    """What an interrupted run leaves in ``folder`` and the command that continues it."""
    if folder is None:
        return "nothing was saved (pass --out to keep a checkpoint every epoch)"
    command = shlex.join(["python", "train.py", *(arg for arg in argv if arg != "--overwrite"),
                          *([] if "--resume" in argv else ["--resume"])])
    run = f"seed {folder.name.removeprefix('seed')}" if seeds is not None else "the run"
    if (folder / "checkpoint.pt").exists():
        return f"the checkpoint of {run}'s last finished epoch is kept: continue with {command}"
    if (folder / "config.json").exists():
        return f"no epoch of {run} had finished: {command} starts it again with its settings"
    return f"nothing of {run} was written: {command} starts it"


# ---------------------------------------------------------------------------------------------
# Several seeds


def parse_seeds(text):
    """The seeds of a range such as 0-4 or a list such as 0,3,7; ConfigError for anything else."""
    if match := re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text):
        first, last = map(int, match.groups())
        count = last - first + 1
        seeds = range(first, last + 1) if 0 < count <= MAX_SEEDS else []
    else:
        try:
            seeds = [int(part) for part in text.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {text!r} is not a range such as 0-4 or a list such as "
                              "0,3,7") from None
        count = len(seeds)
    if count > MAX_SEEDS:
        raise ConfigError(f"--seeds {text!r} names {count:,} seeds: at most {MAX_SEEDS:,}")
    if not seeds:
        raise ConfigError(f"--seeds {text!r} names no seed: write the range low-high, such as 0-4")
    if duplicates := sorted({seed for seed in seeds if seeds.count(seed) > 1}):
        raise ConfigError(f"--seeds {text!r} names seed {', '.join(map(str, duplicates))} twice: name "
                          "each once")
    return list(seeds)


def check_seed_request(out, plan, *, resume, overwrite):
    """Check every seed's run before the first trains, and that the seed runs already in ``out`` (which
    seeds.json will summarise with these) were made with the same settings."""
    check_out_folder(out)
    configs = {folder.name: make_config(**run_settings(folder, given, resume=resume, overwrite=overwrite))
               for given, folder in plan}
    reference = next(iter(configs.values()))
    others = sorted(folder for folder in (out.glob("seed*") if out.is_dir() else ())
                    if folder.name not in configs and (folder / "config.json").exists())
    for folder in others:
        saved = {**saved_settings(folder), "seed": reference.seed}
        if changed := settings_changes(saved, reference):
            raise ConfigError(f"{out} already holds {folder.name}, made with other settings "
                              f"({'; '.join(changed)}), which {SEEDS_FILE} would summarise with these runs: "
                              "choose another --out")


def finished_seed_runs(out):
    """The metrics of every finished seed run in ``out``, by seed."""
    runs = [read_metrics(path) for path in out.glob("seed*/metrics.json")]
    return sorted(runs, key=lambda run: run["seed"])


def summarise_seeds(runs):
    finals = [run["epochs"][-1]["test_acc"] for run in runs]
    return {"model": runs[0]["model"], "params": runs[0]["params"], "epochs": len(runs[0]["epochs"]),
            "seeds": [run["seed"] for run in runs],
            "final_test_acc": {str(run["seed"]): run["epochs"][-1]["test_acc"] for run in runs},
            # A run that ends well by luck shows it here: the worst of its last three epochs.
            "last3_min_test_acc": {str(run["seed"]): min(row["test_acc"] for row in run["epochs"][-3:])
                                   for run in runs},
            "mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "min": min(finals), "max": max(finals),
            "config": {key: value for key, value in runs[0]["config"].items() if key != "seed"}}


def format_seeds(seeds):
    if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


# ---------------------------------------------------------------------------------------------
# The command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its mistakes answered in one line like every other refusal."""

    def error(self, message):
        self.exit(2, f"error: {message} (python train.py --help lists every flag)\n")


def parse_args(argv):
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
        text = spec.metadata["help"]
        if spec.name == "model":
            text += f": {', '.join(model_names())}"
        if spec.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            # A help that explains its own default (--data-dir's) is not given a second one.
            if "(default:" not in text:
                text += f" (default: {default_setting(spec.name)})"
            parser.add_argument(flag, type=spec.type, metavar=spec.name.split("_")[-1].upper(), help=text)
    parser.add_argument("--out",
                        help="folder for config.json, checkpoint.pt, metrics.json, model.pt")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, with its settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run already in --out (its files only, once the new run starts)")
    parser.add_argument("--seeds", help="run each seed of a range such as 0-4 or 0,3,7 into --out/seedN "
                        "and summarise them in --out/seeds.json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--find-lr", action="store_true",
                        help="instead of training, a learning-rate range test of the model and recipe: "
                        "a suggested peak --lr, and the loss against the learning rate in --out/lr_range.png "
                        "(without --out, ./lr_range.png)")
    return vars(parser.parse_args(argv))


if __name__ == "__main__":
    # Until a run starts writing, Ctrl-C may end the process at once: left to Python, Ctrl-C while torch
    # loads (seconds) ends in a traceback from deep inside an import.
    signal.signal(signal.SIGINT, interrupted_while_starting)
    sys.exit(main())
