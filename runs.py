"""The run folder (--out): the files a run keeps there and the rules that keep them whole, and the
summary of several seeds. Imports no torch, so that train.py checks a request in full before torch loads.

    config.json     the settings, written when the run starts
    checkpoint.pt   all that is needed to continue, after every epoch (checkpoints.py)
    model.pt        the weights that were tested, written when the last epoch ends
    metrics.json    the settings, layers, versions, device and every epoch; written last, it marks the
                    run finished

The rules: nothing is written before RunFolder.start(), and all before it only reads; one process at a
time holds a folder (a lock); --overwrite sets the old run aside, in .replaced/, until the new run has a
checkpoint of its own, and puts it back if the new run stops before that.
"""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import statistics
import tempfile
from pathlib import Path

from config import RECIPES, CheckpointError, ConfigError, TrainConfig, make_config, settings_changes

try:
    import fcntl
except ImportError:  # Windows: runs into one --out are not locked against each other
    fcntl = None

RUN_FILES = ("config.json", "checkpoint.pt", "model.pt", "metrics.json")  # in the order they are written
SEEDS_FILE = "seeds.json"
REPLACED = ".replaced"
MAX_SEEDS = 1000
UMASK = os.umask(0o022)
os.umask(UMASK)  # only read: the files of a run are created as the user's other files are

# ---------------------------------------------------------------------------------------------
# Writing files


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one. CheckpointError if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(descriptor, 0o666 & ~UMASK)  # mkstemp makes it private to its owner
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
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(f"cannot write {path} ({reason}): free some space or make the folder "
                              f"writable, then continue with --resume; {kept}") from None


def write_json(path, data):
    atomic_write(path, lambda file: file.write(json.dumps(data, indent=1).encode()))


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is unreadable ({error}): pass --overwrite to start over, or choose "
                          "another --out") from None


# ---------------------------------------------------------------------------------------------
# One run's folder


def started():
    """The moment a run starts: from here on Ctrl-C reaches it, and it says what it leaves."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interrupted_while_starting(*_):
    # train.py's handler until a run starts: Ctrl-C while torch loads would end in a traceback from deep
    # inside an import, and nothing has been written to lose.
    os.write(2, b"interrupted while starting: nothing was written\n")
    os._exit(130)


class RunFolder:
    """The folder of one run. Reading methods first; ``start`` is the first to write."""

    def __init__(self, path):
        self.path = Path(os.path.expanduser(path))
        self.lock = None

    def __str__(self):
        return str(self.path)

    def __truediv__(self, name):
        return self.path / name

    @property
    def finished(self):
        return (self.path / "metrics.json").exists()

    def existing(self):
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def check_path(self):
        """ConfigError unless the folder exists or can be made, as far as can be told without writing."""
        path = self.path
        while True:
            try:
                is_folder, exists = stat.S_ISDIR(os.stat(path).st_mode), True
            except (FileNotFoundError, NotADirectoryError):  # the second: a file above it, said below
                is_folder = exists = False
            except OSError as error:  # a symbolic link loop, a name too long, ...
                raise ConfigError(f"--out {self} cannot be used ({error.strerror}): choose another "
                                  "folder") from None
            if exists and not is_folder:
                what = "it is a file" if path == self.path else f"{path} is a file"
                raise ConfigError(f"--out {self} cannot be used ({what}): choose a folder")
            if exists:
                if not os.access(path, os.W_OK | os.X_OK):
                    why = "read-only" if path == self.path else f"{path} is read-only"
                    raise ConfigError(f"--out {self} cannot be used ({why}): choose a folder you can write "
                                      "to")
                return
            if path == path.parent:
                return
            path = path.parent

    def settings(self, given, *, resume=False, overwrite=False):
        """The settings a run into this folder trains with: ``given`` for a new run; with ``resume``,
        the saved run's settings with ``given`` on top. Reads the folder, writes nothing (but for putting
        back a run that an --overwrite cut short set aside). ConfigError for an unusable folder and for
        any request that would lose a result or resume with other settings."""
        make_config(**given)
        self.check_path()
        self.put_back_replaced()
        if seeds := seed_folders(self.path):
            raise ConfigError(f"{self} holds the runs of --seeds ({', '.join(seeds[:3])}"
                              f"{', ...' if len(seeds) > 3 else ''}): continue them with --seeds and this "
                              "--out, or choose another --out")
        existing = self.existing()
        if overwrite or not existing:
            return given
        if not resume:
            what = "a finished run (metrics.json)" if "metrics.json" in existing else "a run"
            raise ConfigError(f"{self} already holds {what}: pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --out")
        saved = self.saved_settings()
        flags = {key: value for key, value in given.items() if key != "recipe"}
        settings = {**saved, **RECIPES.get(given.get("recipe"), {}), **flags}
        # Where the data lives may change between a run and its resumption: MNIST_DATA counts as it does
        # for a new run.
        if "data_dir" not in flags and os.environ.get("MNIST_DATA"):
            settings["data_dir"] = os.environ["MNIST_DATA"]
        if changed := settings_changes(saved, make_config(**settings)):
            raise ConfigError(f"the run in {self} was made with other settings ({'; '.join(changed)}): "
                              "resume without those flags, or start over with --overwrite")
        return settings

    def saved_settings(self):
        """The settings the run in this folder trains with: its checkpoint's, once it has one, which
        config.json must agree with (a user may edit it); before that, config.json's. ConfigError if they
        cannot be read, or disagree."""
        path = self.path / "config.json"
        saved = self.read_config() if path.exists() else None
        if (self.path / "checkpoint.pt").exists():
            from checkpoints import read_checkpoint  # loads torch: only to resume a run that has a checkpoint

            trained = read_checkpoint(self.path / "checkpoint.pt")["config"]
            if saved is not None and (changed := settings_changes(trained, make_config(**saved))):
                changes = "; ".join(changed)
                raise ConfigError(f"{path} no longer holds the settings the run trained with ({changes}: "
                                  "checkpoint.pt's -> config.json's): put config.json back as they were, or "
                                  "start over with --overwrite")
            return trained
        return saved or {}

    def read_config(self):
        """config.json's settings, checked to be settings of this version."""
        path = self.path / "config.json"
        saved = read_json(path)
        known = TrainConfig.__dataclass_fields__.keys()
        if not isinstance(saved, dict) or not set(saved) <= known:
            what = (f"unknown settings {', '.join(sorted(set(saved) - known))}" if isinstance(saved, dict)
                    else f"a {type(saved).__name__} where the settings belong")
            raise ConfigError(f"{path} holds {what}, not the settings of a run of this version: pass "
                              "--overwrite to start over, or choose another --out")
        try:
            make_config(**saved)
        except ConfigError as error:
            raise ConfigError(f"{path} holds settings this version refuses ({error}): pass --overwrite to "
                              "start over, or choose another --out") from None
        return saved

    def read_metrics(self):
        return read_metrics(self.path / "metrics.json")

    # --- writing: from here on

    def start(self, config, *, overwrite=False):
        """The run starts: lock the folder, set an old run aside (``overwrite``), write config.json."""
        self.hold()
        started()
        if overwrite and self.existing():
            aside = self.path / REPLACED
            aside.mkdir(exist_ok=True)
            for name in self.existing():
                os.replace(self.path / name, aside / name)
        write_json(self.path / "config.json", config)

    def hold(self):
        """Make the folder and lock it for this process (released when the process ends, however it ends).
        ConfigError if it cannot be written or another run holds it."""
        if self.lock is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")  # noqa: SIM115 (held until release() or the process ends)
        except OSError as error:
            raise ConfigError(f"--out {self} cannot be used ({error.strerror}): choose a folder you can "
                              "write to") from None
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                lock.close()
                raise ConfigError(f"another run ({holder}) is writing into {self}: wait for it to end, or "
                                  "choose another --out") from None
            lock.truncate(0)
            lock.write(f"pid {os.getpid()}")
            lock.flush()
        self.lock = lock
        # Temporary files of this project's writes that a kill cut short; nobody else can be writing them
        # now. Other files are the user's and stay.
        for name in (*RUN_FILES, SEEDS_FILE):
            for temporary in self.path.glob(f".{name}.*.tmp"):
                temporary.unlink(missing_ok=True)

    def put_back_replaced(self):
        """Settle what an --overwrite set aside, if a kill left it: drop it once the new run has a
        checkpoint, else put the old run back."""
        if (self.path / REPLACED).is_dir():
            self.hold()
            self.settle()
            self.release()

    def settle(self):
        """After a run ends, however: the run an --overwrite set aside goes if the new run has a checkpoint,
        else it comes back (and this returns True)."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return False
        back = not (self.path / "checkpoint.pt").exists()
        if back:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
                if (aside / name).exists():
                    os.replace(aside / name, self.path / name)
        shutil.rmtree(aside)
        return back

    def finish(self, metrics, write_weights):
        """The last writes: the weights, then metrics.json, which marks the run finished."""
        write_weights(self.path / "model.pt")
        write_json(self.path / "metrics.json", metrics)

    def release(self):
        if self.lock is not None:
            self.lock.close()
            self.lock = None


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


def left_behind(folder, command, seeds=False, restored=False):
    """What a run stopped now leaves in ``folder`` (None: it had none), and the ``command`` that continues
    it, for the end of a message. ``restored``: an --overwrite put the run it was replacing back."""
    if folder is None:
        return kept(None)
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    if restored:
        text = f"the run it was to replace is back in {folder}; {command} starts again"
    else:
        text = kept(folder / "checkpoint.pt", command=command)
    return f"{folder.path.name}: {text}" if seeds else text


def continue_command(flags, out, seeds=None, overwrite=False):
    """The command that continues a run of ``flags`` (canonical words, whatever the user typed) into
    ``out``, train.py named so that it runs from the current folder."""
    script = os.path.relpath(Path(__file__).with_name("train.py"))
    script = script if not script.startswith("..") else str(Path(__file__).with_name("train.py"))
    words = [*flags, "--out", str(out)]
    if seeds is not None:
        # --resume continues the seed runs of these settings; --overwrite, if given, replaces the others.
        words += ["--seeds", format_seeds(seeds), "--resume", *(["--overwrite"] if overwrite else [])]
    else:
        words += ["--overwrite"] if overwrite and not (Path(out) / "checkpoint.pt").exists() else ["--resume"]
    return shlex.join(["python", script, *words])


def kept(checkpoint, epochs=None, command=None):
    """What a run that stops now leaves, and the command that continues it: for the end of a message.
    ``epochs``: how many epochs the checkpoint holds, if known."""
    if checkpoint is None:
        return "nothing was saved (pass --out to keep a checkpoint every epoch)"
    checkpoint = Path(checkpoint)
    then = f": continue with {command}" if command else ""
    if epochs == 0 or not checkpoint.exists():
        return "no epoch had finished, so there is no checkpoint yet" + (
            f"; {command} starts it again with its settings" if command else "")
    which = f"epoch {epochs}" if epochs else "the last finished epoch"
    return f"the checkpoint of {which} is kept in {checkpoint}{then}"


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


def seed_folders(out):
    """The names of the seed runs' folders in ``out`` (seed0, seed1, ...), in the order of their seeds."""
    try:
        found = [path.name for path in Path(out).glob("seed*") if re.fullmatch(r"seed\d+", path.name)
                 and any((path / name).exists() for name in RUN_FILES)]
    except OSError:
        return []
    return sorted(found, key=lambda name: int(name[4:]))


def seed_plan(out, given, seeds, *, resume=False, overwrite=False):
    """[(settings, RunFolder, resume, overwrite)] for each seed, every one checked before the first trains;
    and checked that the seed runs already in ``out``, which seeds.json will summarise with them, share
    their settings. With both ``resume`` and ``overwrite``, the seed runs made with these settings
    continue and the others are replaced."""
    out = RunFolder(out)
    out.check_path()
    if out.existing():
        raise ConfigError(f"{out} holds a single run ({', '.join(out.existing())}), not runs of --seeds: "
                          "choose another --out")
    plan = []
    for seed in seeds:
        folder, settings = RunFolder(out / f"seed{seed}"), {**given, "seed": seed}
        try:
            plan.append((folder.settings(settings, resume=resume, overwrite=overwrite and not resume), folder,
                         resume, overwrite and not resume))
        except ConfigError:
            if not (resume and overwrite):
                raise
            plan.append((folder.settings(settings, overwrite=True), folder, False, True))
    reference = make_config(**plan[0][0])
    for name in seed_folders(out.path):
        if name in {plan_folder.path.name for _, plan_folder, _, _ in plan}:
            continue
        saved = {**RunFolder(out / name).saved_settings(), "seed": reference.seed}
        if changed := settings_changes(saved, reference):
            raise ConfigError(f"{out} already holds {name}, made with other settings ({'; '.join(changed)}), "
                              f"which {SEEDS_FILE} would summarise with these runs: choose another --out")
    return plan


def summarise_seeds(out, reference):
    """The summary of the finished seed runs in ``out`` made with the settings of ``reference`` (a
    TrainConfig; the seed aside): seeds.json's content, or None if there are none."""
    runs = sorted((read_metrics(Path(out) / name / "metrics.json") for name in seed_folders(out)
                   if (Path(out) / name / "metrics.json").exists()), key=lambda run: run["seed"])
    runs = [run for run in runs if not settings_changes({**run["config"], "seed": reference.seed}, reference)]
    if not runs:
        return None
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
