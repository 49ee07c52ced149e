"""The `sdeflow` command line: train a model, sample from it, score its likelihood, benchmark the solvers.

Each subcommand lives in its own module of this package, with ``configure(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` is a static table (nothing registers itself at import) and a module is imported only to build its
parser. ``main`` is the ``sdeflow`` console script; ``python -m sdeflow.cli`` runs it too.
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["COMMANDS", "build_parser", "main"]

USAGE = """Score-based diffusion models as a numerical-solver problem: train, sample, likelihood, benchmarks.

Example: `sdeflow train --data checkerboard --steps 4000 --out runs/cb`, then
`sdeflow sample --ckpt runs/cb/ckpt.pt --solver dpm_solver++ --nfe 10 --out s.npy --plot s.png`.
`sdeflow COMMAND --help` lists a command's options. On several processes:
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
    parser = argparse.ArgumentParser(
        prog="sdeflow", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sdeflow {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand and return its exit status."""
    args = build_parser().parse_args(argv)
    rc = importlib.import_module(args._module).run(args)
    return int(rc or 0)
