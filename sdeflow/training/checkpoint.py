"""Safe checkpoints: atomic writes that keep the previous file, loads that never execute code.

Writing (:func:`save_checkpoint`): the payload goes to a temporary file in the destination's folder, is flushed and
``fsync``-ed, the current checkpoint (if any) is hard-linked (or copied) to ``<stem>.prev<suffix>``, and
``os.replace`` renames the temporary file over the destination; finally the folder is ``fsync``-ed. At every instant
``ckpt.pt`` is either the old or the new complete file, so a crash or a signal in the middle of a write leaves the
last good checkpoint loadable, and ``ckpt.prev.pt`` keeps the one before it.

Reading (:func:`load_checkpoint`): ``torch.load(weights_only=True)``, which unpickles only tensors and plain
containers of primitives; a file that asks for anything else (a pickle whose ``__reduce__`` would run code) is
refused with :class:`CheckpointError`, and so is a truncated or corrupt file, with a message naming the previous
checkpoint when one exists.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "check_primitive",
    "FORMAT",
    "VERSION",
]

FORMAT = "sdeflow-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: truncated, corrupt, of an unknown format, or unsafe to unpickle."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the previous checkpoint is kept: ``runs/x/ckpt.pt`` -> ``runs/x/ckpt.prev.pt``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix}")


def check_primitive(obj: Any, where: str = "config") -> None:
    """Raise ValueError unless obj is built from dict (str keys), list, tuple, str, int, float, bool and None."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_primitive(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} keys must be strings, got {k!r}")
            check_primitive(v, f"{where}[{k!r}]")
        return
    raise ValueError(
        f"{where} must hold only primitives (dict, list, str, int, float, bool, None), got {type(obj).__name__}"
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    prev = previous_path(path)
    tmp = path.with_name(f".{prev.name}.tmp.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # same inode: no copy, and path stays in place
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike, keep_previous: bool = True) -> Path:
    """Atomically write ``payload`` (tensors and primitives only) to ``path``; the old file becomes ``*.prev*``."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated or corrupt, holds objects that weights-only unpickling refuses
            (code would run), or is not an sdeflow checkpoint.
    """
    path = Path(path)
    prev = previous_path(path)
    hint = (
        f"; the previous checkpoint {prev} is still there: pass it instead" if prev.is_file() and prev != path else ""
    )
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():
            raise CheckpointError(
                f"refused to load {path}: it holds Python objects other than tensors and plain containers, and "
                f"unpickling them could execute code (torch.load weights_only=True). Underlying error: "
                f"{str(err).splitlines()[0]}"
            ) from err
        raise CheckpointError(f"{path} is corrupt ({err}){hint}") from err
    except Exception as err:  # truncated zip, bad CRC, wrong magic number, ...
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}){hint}") from err
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an sdeflow checkpoint (no format={FORMAT!r} field)")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')!r}; this sdeflow reads <= {VERSION}")
    return obj
