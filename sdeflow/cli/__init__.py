"""The `sdeflow` command line: train a model, sample from it, score its likelihood, benchmark the solvers.

Each subcommand lives in its own module of this package, with ``configure(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` is a static table (nothing registers itself at import) and a module is imported only to build its
parser. ``main`` is the ``sdeflow`` console script; ``python -m sdeflow.cli`` runs it too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import Parser, debug_enabled, report_error

__all__ = ["COMMANDS", "build_parser", "main"]

USAGE = """sdeflow: score-based diffusion models treated as a numerical-solver problem.

Typical session:
  sdeflow train --data checkerboard --steps 4000 --out runs/cb        train a small 2-D model (minutes on a CPU)
  sdeflow sample --ckpt runs/cb/ckpt.pt --solver dpm_solver++ --nfe 10 --out s.npy --plot s.png
  sdeflow likelihood --ckpt runs/cb/ckpt.pt --data test.npy          exact log-likelihood, bits/dim
  sdeflow bench --ckpt runs/cb/ckpt.pt --nfe 5 10 20 --out runs/bench which solver, how many NFE?
  sdeflow demo --quick                                                all of it in seconds

`sdeflow COMMAND --help` lists a command's options. Every command prints one line `sdeflow COMMAND: error: ...`
and exits with status 2 on a bad input; `sdeflow --debug COMMAND ...` (or SDEFLOW_DEBUG=1) shows the traceback.
Outputs that already exist are only replaced with --force. Several processes:
`torchrun --nproc_per_node=N -m sdeflow.cli -- train ...` (docs/distributed.md).
"""

# subcommand -> (module defining `configure(parser)` and `run(args) -> int | None`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sdeflow.cli.train", "train a score network (a 2-D toy, a mixture, digits, a .npy file or images)"),
    "sample": ("sdeflow.cli.sample", "draw samples from a checkpoint with any solver; save .npy, plot"),
    "likelihood": ("sdeflow.cli.likelihood", "exact log-likelihood / bits-per-dim of data under a checkpoint"),
    "bench": ("sdeflow.cli.bench", "NFE-versus-quality sweep of every solver on a checkpoint"),
    "demo": ("sdeflow.cli.demo", "train a small 2-D model, sweep the solvers, report a test NLL (make demo)"),
}


def _version() -> str:
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = Parser(prog="sdeflow", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sdeflow {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also: SDEFLOW_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback")
        importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand and return its exit status.

    A command-line syntax error exits (SystemExit 2) with one line on stderr; an error while the command runs is one
    line ``sdeflow COMMAND: error: ...`` and exit status 2 (1 for an unexpected one), unless ``--debug`` or
    ``SDEFLOW_DEBUG=1``, which re-raise it."""
    args = build_parser().parse_args(argv)
    prog = f"sdeflow {args.command}"
    try:
        rc = importlib.import_module(args._module).run(args)
    except KeyboardInterrupt:
        if debug_enabled(args):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug_enabled(args):
            raise
        return report_error(prog, err)
    return int(rc or 0)
