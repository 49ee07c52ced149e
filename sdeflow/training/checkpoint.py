"""Safe checkpoints: atomic writes that keep the previous file, loads that never execute code.

Writing (:func:`save_checkpoint`): the payload goes to a temporary file in the destination's folder, is flushed and
``fsync``-ed, the current checkpoint (if any) is hard-linked (or copied) to ``<stem>.prev<suffix>``, and
``os.replace`` renames the temporary file over the destination; finally the folder is ``fsync``-ed. At every instant
``ckpt.pt`` is either the old or the new complete file, so a crash or a signal in the middle of a write leaves the
last good checkpoint loadable, and ``ckpt.prev.pt`` keeps the one before it.

Before writing, every floating-point tensor of the payload is checked to be finite (:func:`find_nonfinite`): a
diverged run never replaces the last good checkpoint with NaN weights. A failed write (a full disk, a read-only
folder) raises :class:`CheckpointWriteError` and leaves the existing files as they were.

Reading (:func:`load_checkpoint`): the file must be a zip archive (torch's format since 1.6) whose members all pass
their CRC-32 check (``zipfile.ZipFile.testzip``); a file that is no zip archive at all is reported as "not a
checkpoint", a damaged one as "truncated or corrupt", with a message naming the previous checkpoint when one exists.
Then ``torch.load(weights_only=True)`` unpickles only tensors and plain containers of primitives; a file that asks
for anything else (a pickle whose ``__reduce__`` would run code) is refused with :class:`CheckpointError`.

Orphaned temporary files (``.<name>.tmp.<pid>``) left by a process killed in the middle of a write are removed at the
next save or load in that folder, once their writer process no longer runs on this machine.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "check_primitive",
    "find_nonfinite",
    "CheckpointWriteError",
    "FORMAT",
    "VERSION",
]

FORMAT = "sdeflow-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: truncated, corrupt, of an unknown format, or unsafe to unpickle."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (full disk, no permission, ...); the previous files are unchanged."""


_TMP = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)$")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # not a valid pid at all
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:  # pragma: no cover - platforms without signal 0: assume alive, keep the file
        return True
    return True


def remove_orphans(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files ``.<name>.tmp.<pid>`` in ``folder`` whose writer process is gone; returns them.

    Best effort: a folder that cannot be listed or a file that cannot be removed is left alone. Only files whose pid
    no longer names a running process on this machine are touched, so a write in progress is never disturbed.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP.match(p.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def find_nonfinite(obj: Any, where: str = "") -> list[str]:
    """The paths (``"model['w']"``-style) of every floating-point or complex tensor in ``obj`` (nested dicts, lists and
    tuples) holding a NaN or an infinity, and of non-finite python floats. One host sync per device, whatever the
    number of tensors."""
    names: list[str] = []
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}

    def walk(o: Any, at: str) -> None:
        if isinstance(o, torch.Tensor):
            if (o.is_floating_point() or o.is_complex()) and o.numel():
                flags.setdefault(o.device, []).append((at, torch.isfinite(o.detach()).all()))
        elif isinstance(o, float):
            if not math.isfinite(o):
                names.append(at)
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{at}[{k!r}]")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{at}[{i}]")

    walk(obj, where)
    for entries in flags.values():
        ok = torch.stack([f for _, f in entries]).cpu()
        names.extend(name for (name, _), good in zip(entries, ok.tolist()) if not good)
    return names


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
    tmp = _tmp_path(prev)
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # same inode: no copy, and path stays in place
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def save_checkpoint(
    payload: dict[str, Any], path: str | os.PathLike, keep_previous: bool = True, check_finite: bool = True
) -> Path:
    """Atomically write ``payload`` (tensors and primitives only) to ``path``; the old file becomes ``*.prev*``.

    Raises:
        TypeError: ``payload`` is not a dict.
        ValueError: ``check_finite`` and a floating-point tensor (or float) of the payload holds NaN or inf; nothing
            is written.
        CheckpointWriteError: the write failed (e.g. no space left); the previous files are unchanged.
    """
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    path = Path(path)
    if check_finite:
        bad = find_nonfinite(payload, "payload")
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(
                f"refusing to write {path}: {', '.join(bad[:3])}{more} hold non-finite values (NaN or inf); "
                "the existing checkpoint is unchanged"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointWriteError(f"cannot create the folder {path.parent} for {path.name}: {_why(err)}") from err
    remove_orphans(path.parent)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {_why(err)}; the previous checkpoint is unchanged"
            ) from err
        if isinstance(err, RuntimeError) and "PytorchStreamWriter" in str(err):  # torch wraps write errors
            raise CheckpointWriteError(
                f"could not write the checkpoint {path} ({str(err).splitlines()[0]}); the previous checkpoint is "
                "unchanged"
            ) from err
        raise
    _fsync_dir(path.parent)
    return path


def _why(err: OSError) -> str:
    """An OSError in words: 'No space left on device' rather than '[Errno 28] ...: path'."""
    return err.strerror or str(err) or type(err).__name__


def _check_archive(path: Path, hint: str) -> None:
    """Raise CheckpointError unless ``path`` is a zip archive whose members all pass their CRC check."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {_why(err)}") from err
    if not zipfile.is_zipfile(path):
        if head[:2] == b"PK":
            raise CheckpointError(f"{path} is truncated or corrupt (a damaged zip archive){hint}")
        if not head:
            raise CheckpointError(f"{path} is empty: truncated or corrupt{hint}")
        raise CheckpointError(
            f"{path} is not a checkpoint: not a zip archive (the format torch.save and sdeflow write){hint}"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}){hint}") from err
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: the archive member {bad!r} fails its CRC check{hint}")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is not a zip archive, is truncated or corrupt (a CRC mismatch), holds objects that
            weights-only unpickling refuses (code would run), or is not an sdeflow checkpoint.
    """
    path = Path(path)
    prev = previous_path(path)
    hint = (
        f"; the previous checkpoint {prev} is still there (load that file, or copy it over {path.name} to resume "
        "from it)"
        if prev.is_file() and prev != path
        else ""
    )
    remove_orphans(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    _check_archive(path, hint)
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
