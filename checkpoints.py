"""Checkpoints and weights: everything a run needs to continue exactly, saved after every epoch and
restored by --resume; and load_weights, which loads a run's weights into a model. Kept apart from the
training loop (utils.fit calls save_checkpoint and restore_checkpoint).

    model = Net()
    load_weights(model, "runs/net")         # a run folder, its model.pt or checkpoint.pt, or a state dict
"""

import ast
import hashlib
import inspect
import pickle
import textwrap
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from config import CheckpointError, TrainConfig, model_names, settings_changes
from runs import atomic_write

CHECKPOINT_KEYS = {"config", "epoch", "history", "model", "averaged", "optimizer", "scheduler", "rng_cpu",
                   "rng_cuda", "rng_data", "definition"}


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
        "definition": definition(model),
    }
    atomic_write(path, lambda file: torch.save(state, file))


def definition(model):
    """A fingerprint of what ``model`` is: its layers as printed and its class's code (comments and
    layout aside), so that a resume notices a model changed in model.py since the run began."""
    try:
        code = ast.dump(ast.parse(textwrap.dedent(inspect.getsource(type(model)))))
    except (OSError, TypeError, SyntaxError):  # a class typed into a notebook or a console
        code = ""
    return hashlib.sha256(f"{model!r}\n{code}".encode()).hexdigest()


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
        raise CheckpointError(f"checkpoint {path} {what} (an older or newer version of this project): start "
                              "over with --overwrite, or use another --out")
    return state


def restore_checkpoint(path, model, optimizer, scheduler, train_loader, config, averaged=None):
    """Load ``path`` into the given objects and return its history; CheckpointError if unusable."""
    state = read_checkpoint(path)
    if changed := settings_changes(state["config"], config):
        raise CheckpointError(f"checkpoint {path} was made with other settings than these "
                              f"({'; '.join(changed)}; from flags or an edited config.json): resume with the "
                              "run's own settings, or start over with --overwrite")
    if state["definition"] != definition(model):
        raise CheckpointError(f"{type(model).__name__} in model.py has changed since checkpoint {path} was "
                              "made: resume with model.py as it was then, or start over with --overwrite")
    model.load_state_dict(state["model"])
    if averaged is not None:
        averaged.load_state_dict(state["averaged"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    train_loader.generator.set_state(state["rng_data"])
    return state["history"]


def tested_weights(state):
    """The weights a checkpoint's run tested (its weight average's, if it kept one): model.pt's content."""
    if state.get("averaged") is None:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in state["averaged"].items()
            if key != "n_averaged"}


# ---------------------------------------------------------------------------------------------
# Loading a run's weights


def load_weights(model, source):
    """Load into ``model`` the weights of ``source``: a run folder, its model.pt, its checkpoint.pt (the
    weights it tested), or a state dict (a weight average's too). Returns ``model``. Where they do not fit,
    PyTorch's error, with a hint added to its message."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "model.pt" if (path / "model.pt").exists() else path / "checkpoint.pt"
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"{path} cannot be loaded ({type(error).__name__}: "
                                  f"{' '.join(str(error).split())[:200]})") from None
    if not isinstance(source, dict):
        raise TypeError(f"expected a state dict (a dict of tensors, as model.pt holds), got "
                        f"{type(source).__name__}")
    if {"config", "model", "history"} <= source.keys():  # a whole checkpoint
        source = tested_weights(source)
    elif "n_averaged" in source:  # a weight average's state dict
        source = tested_weights({"averaged": source})
    if foreign := [key for key, value in source.items() if not isinstance(value, torch.Tensor)]:
        what = type(source[foreign[0]]).__name__
        raise ValueError(f"these are not weights: {foreign[0]!r} holds a {what}, where a state dict holds "
                         "tensors (load model.pt)")
    if all(key.startswith("module.") for key in source):  # saved from nn.DataParallel
        source = {key.removeprefix("module."): value for key, value in source.items()}
    try:
        model.load_state_dict(source)
    except RuntimeError as error:
        raise RuntimeError(f"{error}\nhint: {mismatch_hint(model, source)}") from None
    return model


def mismatch_hint(model, weights):
    """Why ``weights`` may not fit ``model``, and what to do: for the end of PyTorch's message."""
    shapes = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    import model as models

    for name in model_names():
        try:
            candidate = getattr(models, name)()
        except Exception:  # noqa: BLE001, S112 (a learner's class that cannot be built fits nothing)
            continue
        if {key: tuple(value.shape) for key, value in candidate.state_dict().items()} == shapes:
            return f"they are weights of {name}: load them into {name}()"
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
    if len(missing) + len(unexpected) <= 2 and (missing or unexpected):
        return (f"{type(model).__name__} in model.py may have changed since they were saved (keys missing: "
                f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})")
    return "load them into the model class they were trained with (metrics.json names it)"
