"""What every `sdeflow` subcommand shares: one-line errors, checked numbers, devices, output paths, one option style.

Errors: a subcommand raises (a :class:`CLIError` naming the flag, or a library ValueError, TypeError, OSError,
CheckpointError, SolverError ...) and :func:`report_error` turns it into ONE line ``sdeflow CMD: error: ...`` on
stderr and exit status 2 (1 for an unexpected exception, "internal error"); ``sdeflow --debug ...`` or the
environment variable ``SDEFLOW_DEBUG=1`` re-raises instead, with the traceback. Command-line syntax errors
(:class:`Parser`) are one line too, exit status 2.

Checks run at parse time or before any computation: numbers (:func:`int_at_least`, :func:`float_in`) reject NaN, inf
and out-of-range values naming the flag; :func:`device_arg` refuses a CUDA device on a machine or torch build without
CUDA; :func:`check_output_file` / :func:`check_output_dir` refuse an existing folder where a file goes, an unwritable
place, and an existing file without ``--force``, so no finished result is thrown away at the end of a run.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "CLIError",
    "Parser",
    "int_at_least",
    "check_tolerance",
    "float_in",
    "device_arg",
    "option_arg",
    "add_progress",
    "progress_enabled",
    "add_dtype",
    "DTYPES",
    "add_force",
    "check_output_file",
    "check_output_dir",
    "atomic_write_bytes",
    "debug_enabled",
    "report_error",
    "one_line",
    "solver_option_error",
    "solver_specs",
]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class CLIError(Exception):
    """A bad command line or environment, reported as one line; the message names the flag."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``sdeflow CMD: error: MESSAGE (see 'sdeflow CMD --help')``, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------------------------ numbers
def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` parsing an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """An argparse ``type`` parsing a finite float in the interval [low, high] (an end is open with ``*_open``)."""
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"
    where = f"{lo}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {where}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number in {where}, got {text}")
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            raise argparse.ArgumentTypeError(f"must lie in {where}, got {value:g}")
        return value

    parse.__name__ = f"number in {where}"
    return parse


def check_tolerance(value: float | None, flag: str, dtype: torch.dtype) -> None:
    """Refuse a tolerance below what ``dtype`` resolves (10 machine epsilons): an adaptive solver would shrink its
    step for minutes without ever meeting it."""
    if value is None:
        return
    floor = 10 * torch.finfo(dtype).eps
    if value < floor:
        name = str(dtype).replace("torch.", "")
        hint = " or --dtype float64" if dtype != torch.float64 else ""
        raise CLIError(
            f"{flag} {value:g} is below what {name} can resolve (10 x eps = {floor:.2g}): use {flag} >= {floor:.2g}{hint}"
        )


# ------------------------------------------------------------------------------------------------ devices
def device_arg(text: str) -> str:
    """An argparse ``type`` for ``--device``: cpu, cuda, cuda:k or mps, available in this torch on this machine."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; allowed: cpu, cuda, cuda:K, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise argparse.ArgumentTypeError(f"{text!r}: {why} (torch.cuda.is_available() is False); use cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), cuda:0..{count - 1}")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use cpu")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: allowed device types are cpu, cuda, mps")
    return text


# ------------------------------------------------------------------------------------------------ options
def option_arg(text: str) -> tuple[str, Any]:
    """An argparse ``type`` for ``--option KEY=VALUE``: VALUE is a Python literal, or else the string itself."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. eta=1.0), got {text!r}")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key, value.strip()


def solver_option_error(den: Any, solver: str, options: dict[str, Any], err: Exception, flags: dict[str, str]) -> str:
    """A message naming the solver option that ``make_solver(den, solver, **options)`` refused (``err``).

    Each option is tried alone to find the culprit; ``flags`` maps option names to the flag that set them
    (``{"rtol": "--rtol"}``), the rest are ``--option KEY=VALUE``."""
    from ..sampling import make_solver

    for key, value in options.items():
        try:
            make_solver(den, solver, **{key: value})
        except (ValueError, TypeError) as e:
            flag = flags.get(key, f"--option {key}={value!r}")
            return f"{flag} for --solver {solver}: {one_line(e)}"
    return f"--option for --solver {solver}: {one_line(err)}"


def solver_specs(
    texts: Iterable[str] | None, options: Iterable[tuple[str, Any]] = (), flag: str = "--solvers"
) -> list[Any]:
    """Parse ``name`` / ``name:key=value,...`` specs (``None``: every default solver when ``options`` is empty) and
    add the ``--option`` pairs to each; every solver is built once with its options (on an analytic 2-D mixture, no
    net evaluated), so a bad name or option fails here, naming it, before any sampling."""
    from ..evaluation import sweep
    from ..sampling import make_solver
    from ..sdes import VPSDE
    from ..training import default_gmm

    extra = tuple(options)
    try:
        specs = [sweep.parse_solver(t) for t in texts] if texts else sweep.default_solvers()
    except ValueError as err:
        raise CLIError(f"{flag}: {one_line(err)}") from err
    specs = [sweep.SolverSpec(s.name, tuple(s.options) + extra) for s in specs]
    den = default_gmm().denoiser(VPSDE())
    for spec in specs:
        opts = dict(spec.options)
        try:
            make_solver(den, spec.name, **opts)
        except (ValueError, TypeError) as err:
            for key, value in opts.items():
                try:
                    make_solver(den, spec.name, **{key: value})
                except (ValueError, TypeError) as e:
                    where = "--option" if (key, value) in extra else f"{flag} {spec.label}:"
                    raise CLIError(f"{where} {key}={value!r} for solver {spec.name}: {one_line(e)}") from err
            raise CLIError(f"{flag} {spec.label}: {one_line(err)}") from err
    return specs


# ------------------------------------------------------------------------------------------------ shared flags
def add_progress(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--progress / --no-progress`` (default: a progress bar when stderr is a terminal)."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress`` as given, else whether stderr is a terminal."""
    value = getattr(args, "progress", None)
    if value is None:
        try:
            return bool(sys.stderr.isatty())
        except (AttributeError, ValueError):
            return False
    return bool(value)


def add_dtype(parser: argparse.ArgumentParser, help: str = "floating-point type of the net and the solver") -> None:
    """``--dtype {float32,float64}`` (``--float64`` is kept as a hidden alias of ``--dtype float64``)."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help=f"{help} (default float32)")
    parser.add_argument("--float64", dest="dtype", action="store_const", const="float64", help=argparse.SUPPRESS)


def add_force(parser: argparse.ArgumentParser) -> None:
    """``--force``: allow replacing existing output files."""
    parser.add_argument("--force", action="store_true", help="replace output files that already exist")


# ------------------------------------------------------------------------------------------------ output paths
def _writable_folder(folder: Path, flag: str) -> None:
    """Raise CLIError unless ``folder`` exists as a writable folder or can be created."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CLIError(f"{flag} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {folder}: {probe} is not writable (permission denied)")


def check_output_file(
    path: str | os.PathLike, flag: str, force: bool = False, suffixes: Iterable[str] | None = None
) -> Path:
    """Check, before any computation, that ``path`` can receive an output file: not an existing folder, in a
    writable (or creatable) folder, with an allowed suffix, and not an existing file unless ``force``."""
    p = Path(path)
    allowed = tuple(suffixes or ())
    if allowed and p.suffix.lower() not in allowed:
        raise CLIError(f"{flag} {p}: expected a file name ending in {' or '.join(allowed)}")
    if p.is_dir():
        raise CLIError(f"{flag} {p} is an existing folder; give a file name")
    if p.exists() or p.is_symlink():
        if not force:
            raise CLIError(f"{flag} {p} already exists; pass --force to replace it or choose another {flag}")
        if not os.access(p, os.W_OK):
            raise CLIError(f"{flag} {p} exists and is not writable")
    _writable_folder(p.parent, flag)
    return p


def check_output_dir(
    path: str | os.PathLike, flag: str, force: bool = False, products: Iterable[str] = (), own: str | None = None
) -> Path:
    """Check that ``path`` can be (or is) an output folder: not a file, writable, and without any of ``products``
    unless ``force`` or the folder holds the file ``own`` (the folder is then a run of this very command, whose
    outputs it rewrites)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{flag} {p} is an existing file, not a folder")
    _writable_folder(p, flag)
    if p.is_dir() and not force and not (own is not None and (p / own).exists()):
        found = [name for name in products if (p / name).exists()]
        if found:
            raise CLIError(
                f"{flag} {p} already holds {', '.join(found)}; pass --force to replace them or choose another {flag}"
            )
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename: a failed write (a full
    disk) leaves any previous file as it was."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------ errors
def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` or ``SDEFLOW_DEBUG=1``: re-raise errors with their traceback."""
    env = os.environ.get("SDEFLOW_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or bool(getattr(args, "debug", False))


def one_line(err: BaseException | str) -> str:
    """An exception (or text) as one line of words."""
    if isinstance(err, OSError) and not isinstance(err, RuntimeError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = str(err)
        if isinstance(err, KeyError) and len(err.args) == 1:
            text = f"missing key {err.args[0]!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = " ".join(lines)
    if not out and isinstance(err, BaseException):
        out = type(err).__name__
    return out


def _is_cuda_error(err: BaseException) -> bool:
    text = str(err)
    return isinstance(err, (RuntimeError, AssertionError)) and (
        "Torch not compiled with CUDA" in text
        or "no NVIDIA driver" in text
        or "CUDA driver" in text
        or "CUDA error" in text
        or "CUDA out of memory" in text
    )


def _expected() -> tuple[type[BaseException], ...]:
    from ..solvers.base import SolverError
    from ..training.checkpoint import CheckpointError

    return (CLIError, ValueError, TypeError, OSError, CheckpointError, SolverError, FloatingPointError, ImportError)


def report_error(prog: str, err: BaseException) -> int:
    """Print ``err`` as one line ``prog: error: ...`` on stderr (rank 0 only under torchrun); the exit status."""
    if _is_cuda_error(err):
        message, status = f"CUDA: {one_line(err)} (choose another --device, e.g. --device cpu)", 2
    elif isinstance(err, _expected()):
        message, status = one_line(err), 2
    else:
        message = (
            f"internal error ({type(err).__name__}: {one_line(err)}); rerun with `sdeflow --debug ...` or "
            "SDEFLOW_DEBUG=1 for the traceback"
        )
        status = 1
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return status
