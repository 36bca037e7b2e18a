"""The results of runs: a Markdown table of run folders and their test curves on one figure (the Results of
a write-up, read from the runs themselves instead of typed), the verdict of a brief, and the figures of
one run (its curves, confusion matrix, range test). Imports no torch.

    python report.py runs/step1 runs/step2 runs/seeds         # the table, to paste into a hand-in
    python report.py runs/* --plot curves.png                  # and the test curves of every run
    python report.py records/NetCompact --per-seed             # a --seeds folder, one row per seed

A folder is one run (its metrics.json) or the runs of --seeds (seed<N>/metrics.json), which make one row:
the mean over the seeds, their standard deviation and the lowest. Each run is judged by its brief
(config.BRIEFS: its parameter budget, epochs and target accuracy in each of its last epochs).
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

from config import BRIEFS, ConfigError, TrainConfig, TrainingError, changed_settings, default_setting
from runs import format_seeds, read_metrics, seed_folders

# ---------------------------------------------------------------------------------------------
# One run: the facts of a write-up


def judge(epochs, params, brief="S6", split="test"):
    """The facts a Target / Results / Analysis write-up needs of one run's ``epochs`` (its history), and
    whether the run met ``brief``, by its accuracy on ``split`` (test, or val for the held-out training
    images of --val): a dict."""
    rules = BRIEFS[brief]
    tests = [row[f"{split}_acc"] for row in epochs]
    held = len(tests)  # the first epoch from which the test accuracy stayed at or above the target
    while held > 0 and tests[held - 1] >= rules.target:
        held -= 1
    last, missed = epochs[-1], []
    if params >= rules.budget:
        missed.append(f"{params:,} parameters, the budget is under {rules.budget:,}")
    if len(epochs) > rules.epochs:
        missed.append(f"{len(epochs)} epochs, {rules.epochs} allowed")
    if min(tests[-rules.last:]) < rules.target:
        which = f"the last {rules.last} epochs" if rules.last > 1 else "the last epoch"
        missed.append(f"{min(tests[-rules.last:]):.2f}% in {which}, under {rules.target:g}%")
    return {"brief": brief, "split": split, "params": params, "epochs": len(epochs),
            "final_acc": tests[-1], "best_acc": max(tests),
            "best_epoch": tests.index(max(tests)) + 1, "last3_min_acc": min(tests[-3:]),
            "final_train_acc": last["train_acc"], "best_train_acc": max(row["train_acc"] for row in epochs),
            "gap": last["train_acc"] - tests[-1],
            "target_from": held + 1 if held < len(tests) else None,
            "seconds": sum(row.get("seconds", 0) for row in epochs), "met": not missed, "missed": missed}


def verdict(judged):
    """A judge() dict in words, one line: for the end of a notebook or a log."""
    rules = BRIEFS[judged["brief"]]
    held = (f"held {rules.target:g}% from epoch {judged['target_from']} on" if judged["target_from"]
            else f"ended below {rules.target:g}%")
    verdict = "met" if judged["met"] else f"NOT met ({'; '.join(judged['missed'])})"
    return (f"brief {judged['brief']} ({rules}): {verdict}. {judged['params']:,} parameters, "
            f"{judged['epochs']} epochs; {judged['split']} accuracy final {judged['final_acc']:.2f}%, best "
            f"{judged['best_acc']:.2f}% (epoch {judged['best_epoch']}), {held}; train accuracy final "
            f"{judged['final_train_acc']:.2f}%, best {judged['best_train_acc']:.2f}%; train - test gap "
            f"{judged['gap']:+.2f} points")


# ---------------------------------------------------------------------------------------------
# Folders: runs and seeds


def load(folder):
    """(name, [metrics of each run]) of a run folder or a --seeds folder; ConfigError if it holds neither."""
    folder = Path(folder).expanduser()
    if (folder / "metrics.json").exists():
        return folder.name, [read_metrics(folder / "metrics.json")]
    runs = [read_metrics(folder / name / "metrics.json") for name in seed_folders(folder)
            if (folder / name / "metrics.json").exists()]
    if not runs:
        raise ConfigError(f"{folder} holds no finished run (metrics.json) and no finished --seeds runs "
                          "(seed<N>/metrics.json): name the --out folder of a run")
    return folder.name, sorted(runs, key=lambda run: run["seed"])


def settings_of(run):
    """The settings in which a run differs from the defaults, the seed and epochs aside (columns of
    their own)."""
    known = {key: value for key, value in run["config"].items() if key in TrainConfig.__dataclass_fields__}
    # The model is a column of its own, and may be a class this model.py no longer has.
    config = TrainConfig(**{**known, "model": "Net", "data_dir": default_setting("data_dir")})
    words = [word for word in changed_settings(config) if not word.startswith("epochs ")]
    return ", ".join(words) or "defaults"


def header(split="test"):
    """The columns of the table; a brief is judged on the test images, so a table of val has none."""
    return ("run", "model", "params", "RF", "epochs", "settings", f"final {split} %", "best %",
            "worst of last 3 %", f"train - {split}", *(["brief met"] if split == "test" else []),
            "train time")


def row(name, runs, split="test"):
    """The table row of ``runs`` (one run, or the seeds of one folder) as strings."""
    first = runs[0]
    judged = [judge(run["epochs"], run["params"], run["config"].get("brief", "S6"), split) for run in runs]
    field = first.get("receptive_field")
    finals = [facts["final_acc"] for facts in judged]
    final = f"{finals[0]:.2f}"
    if len(runs) > 1:
        final = (f"{statistics.mean(finals):.3f} ± {statistics.stdev(finals):.3f} (min {min(finals):.2f}, "
                 f"seeds {format_seeds([run['seed'] for run in runs])})")
    average = statistics.mean
    met = sum(facts["met"] for facts in judged)
    met = "yes" if met == len(runs) else "no" if not met else f"{met} of {len(runs)}"
    return (name, first["model"], f"{first['params']:,}", str(field[0]) if field else "?",
            str(judged[0]["epochs"]), settings_of(first), final,
            f"{average(facts['best_acc'] for facts in judged):.2f}",
            f"{min(facts['last3_min_acc'] for facts in judged):.2f}",
            f"{average(facts['gap'] for facts in judged):+.2f}",
            *([f"{judged[0]['brief']}: {met}"] if split == "test" else []),
            duration(average(facts["seconds"] for facts in judged)))


def duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def table(folders, per_seed=False, split="test"):
    """The Markdown table of ``folders``: a row per run or --seeds folder (with ``per_seed``, a row per
    seed before each folder's own), its accuracies on ``split`` (test, or val)."""
    rows = []
    for folder in folders:
        name, runs = load(folder)
        if split == "val" and "val_acc" not in runs[0]["epochs"][-1]:
            raise ConfigError(f"{folder} was trained without --val: it has no validation figures")
        if per_seed and len(runs) > 1:
            rows += [row(f"{name}/seed{run['seed']}", [run], split) for run in runs]
        rows.append(row(name, runs, split))
    columns = header(split)
    right = {2, 3, 4, 6, 7, 8, 9, len(columns) - 1}
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if column in right else "---" for column in range(len(columns))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def plot_curves(folders):
    """A matplotlib figure of the test accuracy per epoch of each folder (a --seeds folder: the mean over
    its seeds, the range between the lowest and highest shaded), with each brief's target."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    lowest, targets = 100.0, set()
    for folder in folders:
        name, runs = load(folder)
        epochs = min(len(run["epochs"]) for run in runs)
        curves = [[row["test_acc"] for row in run["epochs"][:epochs]] for run in runs]
        mean = [statistics.mean(values) for values in zip(*curves)]
        line, = axes.plot(range(1, epochs + 1), mean, "o-", ms=3, label=f"{name} ({runs[0]['model']}"
                          + (f", mean of {len(runs)} seeds)" if len(runs) > 1 else ")"))
        if len(runs) > 1:
            low, high = ([bound(values) for values in zip(*curves)] for bound in (min, max))
            axes.fill_between(range(1, epochs + 1), low, high, color=line.get_color(), alpha=0.2)
        lowest = min(lowest, min(mean[len(mean) // 2:]))
        targets.add(BRIEFS[runs[0]["config"].get("brief", "S6")].target)
    for target in targets:
        axes.axhline(target, color="grey", lw=0.8, ls="--", label=f"{target:g}%: the target")
    # The second half of training, where runs differ; the first epochs would squash it.
    axes.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy per epoch",
             ylim=(math.floor(min(lowest, *targets) * 10 - 2) / 10, 100))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------
# The figures of one run: its curves, its mistakes, the range test


def confusion_matrix(predictions, labels, classes=10):
    """counts[true, predicted] as an int64 (classes, classes) tensor, of two int64 tensors."""
    return (labels * classes + predictions).bincount(minlength=classes * classes).reshape(classes, classes)


def plot_history(history, target=99.4):
    """A matplotlib figure of the train and test loss and accuracy per epoch, with the ``target`` test
    accuracy; it reads as well for one epoch as for twenty."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "o-"), ("test", "s-")):
        loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], style, ms=4, label=split)
        acc_axes.plot(epochs, [row[f"{split}_acc"] for row in history], style, ms=4, label=split)
    losses = [row[f"{split}_loss"] for row in history for split in ("train", "test")]
    loss_axes.set(title="loss", xlabel="epoch", yscale="log", ylim=(min(losses) / 1.5, max(losses) * 1.5))
    final = history[-1]["test_acc"]
    acc_axes.set(title=f"accuracy (final test {final:.2f}%)", xlabel="epoch", ylabel="%",
                 ylim=(min(97.0, history[-1]["train_acc"] - 1, final - 1, target - 1), 100))
    acc_axes.axhline(target, color="grey", lw=0.8, ls="--", label=f"{target:g}%: the target")
    for axes in (loss_axes, acc_axes):
        axes.set_xlim(0.5, epochs[-1] + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def plot_lr_range(result, recipe_lr=None):
    """A matplotlib figure of the range test: smoothed loss against learning rate (log axis), with the
    suggestion and, if given, the recipe's peak."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(result["lr"], result["loss"], lw=1.2)
    axes.axvline(result["suggested_lr"], color="crimson", ls="--", lw=1,
                 label=f"suggested peak {result['suggested_lr']:.3g} (steepest fall)")
    if recipe_lr is not None:
        axes.axvline(recipe_lr, color="grey", ls=":", lw=1, label=f"the recipe's peak {recipe_lr:g}")
    axes.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)",
             title="learning-rate range test")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="run folders (--out of train.py)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the test curves into this file")
    parser.add_argument("--per-seed", action="store_true", help="a row for each seed of a --seeds folder too")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="the images the accuracies are of: test, or the held-out training images of "
                        "runs made with --val, on which a sweep chooses (default: test)")
    args = parser.parse_args(argv)
    try:
        text = table(args.folders, per_seed=args.per_seed, split=args.split)
        if args.plot:
            try:
                plot_curves(args.folders).savefig(args.plot, dpi=110, bbox_inches="tight")
            except OSError as error:
                raise ConfigError(f"the plot cannot be written to {args.plot} ({error.strerror}): choose "
                                  "another file") from None
    except TrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
