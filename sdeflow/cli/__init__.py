"""`sdeflow` command line: one subcommand per module, looked up in a static table (nothing registers at import)."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module defining `configure(parser)` and `run(args) -> int | None`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sdeflow.training.cli", "train a score network by denoising score matching"),
    "sample": ("sdeflow.training.sample_cli", "sample from a checkpoint with any solver"),
    "likelihood": ("sdeflow.likelihood_cli", "exact log-likelihood / bits-per-dim of data under a checkpoint"),
    "bench": ("sdeflow.bench_cli", "NFE-versus-quality benchmark of the solvers"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdeflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).configure(p)
        except ModuleNotFoundError as err:  # a subcommand whose module is not built yet
            if err.name != module:
                raise
            p.set_defaults(_missing=str(err))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"sdeflow {args.command}: not available ({args._missing})", file=sys.stderr)
        return 2
    rc = importlib.import_module(args._module).run(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
