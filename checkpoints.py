"""Checkpoints: everything a run needs to continue exactly, saved after every epoch and restored by
--resume; and the atomic write that every file of a run goes through. Kept apart from the training
loop (utils.fit calls save_checkpoint and restore_checkpoint).
"""

import os
import pickle
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from config import CheckpointError, TrainConfig, settings_changes

CHECKPOINT_KEYS = {"config", "epoch", "history", "model", "averaged", "optimizer", "scheduler", "rng_cpu",
                   "rng_cuda", "rng_data"}


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
    }
    atomic_write(path, lambda file: torch.save(state, file))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never half of one. CheckpointError if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
        raise CheckpointError(f"checkpoint {path} {what} (another version of this project?): delete it to "
                              "start over, or use another --out")
    return state


def restore_checkpoint(path, model, optimizer, scheduler, train_loader, config, averaged=None):
    """Load ``path`` into the given objects and return its history; CheckpointError if unusable."""
    state = read_checkpoint(path)
    if changed := settings_changes(state["config"], config):
        raise CheckpointError(f"checkpoint {path} was made with other settings ({'; '.join(changed)}): "
                              "resume with the same settings, or use another --out")
    try:
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
    except (RuntimeError, ValueError):
        raise CheckpointError(f"checkpoint {path} holds weights of another model than "
                              f"{type(model).__name__}: use another --out") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    train_loader.generator.set_state(state["rng_data"])
    return state["history"]
