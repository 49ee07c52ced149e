"""Every `sdeflow` subcommand turns a bad input into ONE line on stderr that names the flag, and a non-zero exit.

A table of bad inputs for train, sample, likelihood, bench and demo, run in-process through ``sdeflow.cli.main``:
each must exit with a non-zero status, print exactly one non-empty line on stderr (no "Traceback"), name the flag
(or the solver option) at fault, and fail before any computation (the whole table runs in a few seconds). Then the
behaviours around it: an output file that exists survives a refused run and is replaced with --force, --overwrite and
--resume, --debug / SDEFLOW_DEBUG re-raise, one option style (--progress/--no-progress, --dtype, --option).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdeflow.cli import build_parser, main
from sdeflow.training import load_checkpoint

TINY = ["--data", "gmm", "--hidden", "8", "--depth", "1", "--batch-size", "8", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A 3-step run, data files good and bad, a plain file, a folder, a folder with only ckpt.prev.pt."""
    root = tmp_path_factory.mktemp("cli_errors")
    run = root / "run"
    assert main(["train", *TINY, "--steps", "3", "--log-every", "1", "--out", str(run)]) == 0
    np.save(root / "data.npy", np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32))
    np.save(root / "wide.npy", np.zeros((4, 3), dtype=np.float32))
    np.save(root / "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32))
    np.save(root / "ints.npy", np.array([[0, 5], [1, 2]], dtype=np.int64))
    (root / "garbage.npy").write_bytes(b"not an array")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "data.txt").write_text("1 2\n")
    (root / "file.txt").write_text("a user's file\n")
    (root / "folder").mkdir()
    (root / "dir.png").mkdir()
    prev_only = root / "prev_only"
    prev_only.mkdir()
    (prev_only / "ckpt.prev.pt").write_bytes((run / "ckpt.pt").read_bytes())
    bench_done = root / "bench_done"
    bench_done.mkdir()
    (bench_done / "results.json").write_text("{}\n")
    return {
        "root": str(root),
        "run": str(run),
        "ckpt": str(run / "ckpt.pt"),
        "data": str(root / "data.npy"),
        "wide": str(root / "wide.npy"),
        "nan": str(root / "nan.npy"),
        "ints": str(root / "ints.npy"),
        "garbage_npy": str(root / "garbage.npy"),
        "garbage_pt": str(root / "garbage.pt"),
        "txt": str(root / "data.txt"),
        "file": str(root / "file.txt"),
        "under_file": str(root / "file.txt" / "x.npy"),
        "folder": str(root / "folder"),
        "prev_only": str(prev_only),
        "bench_done": str(bench_done),
        "new": str(root / "new"),
        "missing": str(root / "missing" / "ckpt.pt"),
    }


T = ["train", "--no-progress", "--device", "cpu"]
NEW = ["--data", "gmm", "--out", "{new}"]
S = ["sample", "--ckpt", "{ckpt}", "--solver", "ddim", "--nfe", "2", "--n", "3", "--out", "{root}/s.npy"]
L = ["likelihood", "--ckpt", "{ckpt}", "--data", "{data}", "--no-progress"]
B = [
    "bench",
    "--ckpt",
    "{ckpt}",
    "--solvers",
    "ddim",
    "--nfe",
    "2",
    "--n",
    "8",
    "--out",
    "{root}/bench",
    "--no-progress",
]
D = ["demo", "--out", "{root}/demo", "--no-progress"]

# (argv, text the one error line must contain: the flag, or the solver option, at fault)
CASES: list[tuple[list[str], str]] = [
    # ---------------------------------------------------------------- train
    ([*T, *NEW, "--batch-size", "0"], "--batch-size"),
    ([*T, *NEW, "--lr", "0"], "--lr"),
    ([*T, *NEW, "--lr", "nan"], "--lr"),
    ([*T, *NEW, "--lr", "-1e-3"], "--lr"),
    ([*T, *NEW, "--steps", "-5"], "--steps"),
    ([*T, *NEW, "--steps", "0"], "--steps"),
    ([*T, *NEW, "--ema-decay", "1.5"], "--ema-decay"),
    ([*T, *NEW, "--hidden", "0"], "--hidden"),
    ([*T, *NEW, "--save-every", "-1"], "--save-every"),
    ([*T, *NEW, "--log-every", "0"], "--log-every"),
    ([*T, *NEW, "--dropout", "1"], "--dropout"),
    ([*T, *NEW, "--grad-clip", "-1"], "--grad-clip"),
    ([*T, *NEW, "--warmup", "-1"], "--warmup"),
    ([*T, *NEW, "--channel-mult", "1,x"], "--channel-mult"),
    ([*T, *NEW, "--beta-max", "inf"], "--beta-max"),
    ([*T, *NEW, "--seed", "-1"], "--seed"),
    ([*T, *NEW, "--sigma-data", "0"], "--sigma-data"),
    ([*T, *NEW, "--p-uncond", "2"], "--p-uncond"),
    ([*T, *NEW, "--sde", "nope"], "--sde"),
    ([*T, *NEW, "--net", "unet"], "--net"),
    ([*T, *NEW, "--amp"], "--amp"),
    (["train", *NEW, "--device", "cuda:99"], "--device"),
    (["train", *NEW, "--device", "nope"], "--device"),
    ([*T, "--data", "nowhere", "--out", "{new}"], "--data"),
    ([*T, "--data", "moons", "--conditional", "--out", "{new}"], "--data"),
    ([*T, "--out", "{new}"], "--data"),
    ([*T, "--resume", "--out", "{new}"], "--resume"),
    ([*T, "--data", "gmm", "--out", "{run}"], "--resume"),
    ([*T, "--data", "gmm", "--out", "{prev_only}"], "--overwrite"),
    ([*T, "--resume", "--hidden", "64", "--out", "{run}"], "--hidden"),
    ([*T, "--resume", "--data", "moons", "--out", "{run}"], "--data"),
    ([*T, "--resume", "--sde", "ve", "--out", "{run}"], "--sde"),
    ([*T, "--resume", "--lr", "0.5", "--out", "{run}"], "--lr"),
    ([*T, "--resume", "--steps", "1", "--out", "{run}"], "--steps"),
    ([*T, "--resume", "--overwrite", "--out", "{run}"], "--overwrite"),
    ([*T, "--data", "gmm", "--out", "{file}"], "--out"),
    # ---------------------------------------------------------------- sample
    ([*S, "--n", "0"], "--n"),
    ([*S, "--batch-size", "0"], "--batch-size"),
    ([*S, "--nfe", "0"], "--nfe"),
    ([*S, "--nfe", "abc"], "--nfe"),
    ([*S, "--solver", "nope"], "--solver"),
    ([*S, "--option", "eta=abc"], "eta"),
    ([*S, "--option", "bogus=1"], "bogus"),
    ([*S, "--option", "noequals"], "--option"),
    ([*S, "--option", "rtol=1e-3"], "--rtol"),
    ([*S, "--rtol", "1e-3"], "--rtol"),
    ([*S, "--solver", "rk45", "--rtol", "-1"], "--rtol"),
    ([*S, "--solver", "rk45", "--atol", "nan"], "--atol"),
    ([*S, "--solver", "rk45", "--rtol", "1e-12"], "--rtol"),  # unreachable in float32: refused, not a hang
    ([*S, "--ckpt", "{missing}"], "--ckpt"),
    ([*S, "--ckpt", "{garbage_pt}"], "--ckpt"),
    ([*S, "--out", "{folder}"], "--out"),
    ([*S, "--out", "{file}"], "--out"),
    ([*S, "--out", "{root}/s.txt"], "--out"),
    ([*S, "--out", "{under_file}"], "--out"),
    ([*S, "--plot", "{root}/s.gif"], "--plot"),
    ([*S, "--plot", "{root}/dir.png", "--force"], "--plot"),
    ([*S, "--class", "3"], "--class"),
    ([*S, "--class", "1", "--cfg-scale", "nan"], "--cfg-scale"),
    ([*S, "--cfg-scale", "2"], "--cfg-scale"),
    ([*S, "--t-end", "5"], "--t-end"),
    ([*S, "--t-end", "0"], "--t-end"),
    ([*S, "--grid", "nope"], "--grid"),
    ([*S, "--dtype", "float16"], "--dtype"),
    ([*S, "--solver", "rk45", "--max-steps", "0"], "--max-steps"),
    ([*S, "--solver", "rk45", "--max-steps", "50"], "--max-steps"),  # a cap rk45 would ignore
    ([*S, "--max-steps", "50"], "--max-steps"),  # ddim: no adaptive driver
    ([*S, "--device", "cuda:99"], "--device"),
    ([*S, "--split", "window"], "--split"),
    ([*S, "--seed", "-1"], "--seed"),
    # ---------------------------------------------------------------- likelihood
    ([*L, "--ckpt", "{missing}"], "--ckpt"),
    ([*L, "--ckpt", "{garbage_pt}"], "--ckpt"),
    ([*L, "--data", "{root}/none.npy"], "--data"),
    ([*L, "--data", "{txt}"], "--data"),
    ([*L, "--data", "{wide}"], "--data"),
    ([*L, "--data", "{nan}"], "--data"),
    ([*L, "--data", "{garbage_npy}"], "--data"),
    ([*L, "--n", "0"], "--n"),
    ([*L, "--batch-size", "0"], "--batch-size"),
    ([*L, "--rtol", "0"], "--rtol"),
    ([*L, "--atol", "nan"], "--atol"),
    ([*L, "--rtol", "1e-13"], "--rtol"),  # unreachable with a float32 net: refused, not a hang
    ([*L, "--n-probes", "0"], "--n-probes"),
    ([*L, "--levels", "17"], "--levels"),
    ([*L, "--t-eps", "2"], "--t-eps"),
    ([*L, "--out", "{folder}"], "--out"),
    ([*L, "--out", "{file}"], "--out"),
    ([*L, "--method", "rk4", "--step-size", "-1"], "--step-size"),
    ([*L, "--method", "rk4"], "--step-size"),
    ([*L, "--step-size", "0.1"], "--step-size"),
    ([*L, "--device", "cuda:99"], "--device"),
    ([*L, "--divergence", "nope"], "--divergence"),
    ([*L, "--data", "{ints}", "--levels", "4"], "--levels"),
    ([*L, "--data", "{ints}", "--low", "1", "--high", "0"], "--low"),
    ([*L, "--variable", "sigma"], "--variable"),
    ([*L, "--solver", "dopri5", "--nfe", "10"], "--solver"),
    ([*L, "--solver", "rk4"], "--nfe"),
    ([*L, "--solver", "rk4", "--nfe", "3"], "--nfe"),
    ([*L, "--solver", "abm4", "--nfe", "0"], "--nfe"),
    ([*L, "--nfe", "10"], "--nfe"),
    ([*L, "--solver", "abm4", "--nfe", "10", "--method", "adams"], "--method"),
    ([*L, "--solver", "abm4", "--nfe", "10", "--step-size", "0.1"], "--step-size"),
    ([*L, "--method", "adams", "--step-size", "0.1"], "--step-size"),
    ([*L, "--divergence", "hutch++", "--n-probes", "2"], "--n-probes"),
    # ---------------------------------------------------------------- bench
    ([*B, "--solvers", "nope"], "--solvers"),
    ([*B, "--option", "eta=abc"], "eta"),
    ([*B, "--solvers", "ddim:eta=abc"], "eta"),
    ([*B, "--solvers", "ddim:bogus=1"], "bogus"),
    ([*B, "--nfe", "0"], "--nfe"),
    ([*B, "--n", "0"], "--n"),
    ([*B, "--tolerances", "-1"], "--tolerances"),
    ([*B, "--out", "{file}"], "--out"),
    ([*B, "--out", "{bench_done}"], "--out"),
    ([*B, "--threads", "0"], "--threads"),
    ([*B, "--batch-size", "0"], "--batch-size"),
    ([*B, "--nfe-cap", "nan"], "--nfe-cap"),
    ([*B, "--ckpt", "{missing}"], "--ckpt"),
    ([*B, "--device", "cuda:99"], "--device"),
    ([*B, "--dtype", "float16"], "--dtype"),
    # ---------------------------------------------------------------- demo
    ([*D, "--steps", "0"], "--steps"),
    ([*D, "--n", "0"], "--n"),
    ([*D, "--nfe", "0"], "--nfe"),
    ([*D, "--data", "nope"], "--data"),
    ([*D, "--hidden", "0"], "--hidden"),
    ([*D, "--threads", "0"], "--threads"),
    ([*D, "--nll-tol", "0"], "--nll-tol"),
    ([*D, "--out", "{file}"], "--out"),
    ([*D, "--solvers", "nope"], "--solvers"),
    ([*D, "--tolerances", "nan"], "--tolerances"),
    ([*D, "--nll-points", "-1"], "--nll-points"),
    ([*D, "--solvers", "ddim", "--option", "eta=abc"], "eta"),
    ([*D, "--out", "{run}", "--data", "moons", "--hidden", "8", "--depth", "1"], "--data"),
    ([*D, "--out", "{run}", "--data", "gmm", "--hidden", "64", "--depth", "1"], "--hidden"),
]


def invoke(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit status, non-empty stderr lines, stdout) of ``sdeflow ARGV`` run in this process."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse: a syntax error
        rc = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return rc, [line for line in captured.err.splitlines() if line.strip()], captured.out


def _ids() -> list[str]:
    return [f"{i:03d}-{argv[0]}-{want}" for i, (argv, want) in enumerate(CASES)]


def test_the_table_covers_every_subcommand():
    counts = {
        cmd: sum(argv[0] == cmd for argv, _ in CASES) for cmd in ("train", "sample", "likelihood", "bench", "demo")
    }
    assert all(n >= 8 for n in counts.values()), counts
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv,want", CASES, ids=_ids())
def test_bad_input_is_one_line_naming_the_flag(paths, capsys, argv, want):
    argv = [a.format(**paths) for a in argv]
    before = Path(paths["file"]).read_text()
    rc, lines, out = invoke(argv, capsys)
    assert rc not in (0, None), (argv, lines, out)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "Traceback" not in line and line.startswith(f"sdeflow {argv[0]}: error: "), line
    assert want in line, (want, line)
    assert "internal error" not in line, line
    assert Path(paths["file"]).read_text() == before  # a user's file is never replaced by a refused run
    assert not Path(paths["root"], "s.npy").exists()  # nothing was computed and written


def test_existing_outputs_need_force(paths, capsys, tmp_path):
    out = tmp_path / "s.npy"
    out.write_bytes(b"precious")
    argv = ["sample", "--ckpt", paths["ckpt"], "--solver", "ddim", "--nfe", "2", "--n", "3", "--out", str(out)]
    rc, lines, _ = invoke(argv, capsys)
    assert rc == 2 and "--force" in lines[0] and out.read_bytes() == b"precious"
    rc, lines, _ = invoke([*argv, "--force", "--no-progress"], capsys)
    assert rc == 0 and lines == []
    assert np.load(out).shape == (3, 2)
    named = tmp_path / "exact_name.npy"  # the file is written under exactly the name given
    assert invoke([*argv[:-1], str(named), "--dtype", "float64", "--option", "eta=0.5"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact_name.npy", "s.npy"]


def test_train_overwrite_and_resume(paths, capsys, tmp_path):
    run = tmp_path / "r"
    base = ["train", *TINY, "--log-every", "1", "--out", str(run)]
    assert invoke([*base, "--steps", "2"], capsys)[0] == 0
    rc, lines, _ = invoke([*base, "--steps", "2"], capsys)  # a second new run into the folder: refused
    assert rc == 2 and "--resume" in lines[0] and "--overwrite" in lines[0]
    first = load_checkpoint(run / "ckpt.pt")
    assert first["step"] == 2
    # --resume with flags that agree with the checkpoint is fine; the total grows to --steps
    assert (
        invoke(["train", "--resume", "--hidden", "8", "--steps", "4", "--no-progress", "--out", str(run)], capsys)[0]
        == 0
    )
    assert load_checkpoint(run / "ckpt.pt")["step"] == 4
    # --overwrite: a new run (another seed) replaces the old one
    assert invoke([*base, "--steps", "2", "--seed", "7", "--overwrite"], capsys)[0] == 0
    new = load_checkpoint(run / "ckpt.pt")
    assert new["step"] == 2 and new["config"]["train"]["seed"] == 7
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 7


def test_debug_reraises(paths, capsys, monkeypatch):
    argv = ["sample", "--ckpt", paths["missing"], "--out", str(Path(paths["root"]) / "d.npy")]
    with pytest.raises(Exception, match="--ckpt"):
        main(["--debug", *argv])
    monkeypatch.setenv("SDEFLOW_DEBUG", "1")
    with pytest.raises(Exception, match="--ckpt"):
        main(argv)
    monkeypatch.delenv("SDEFLOW_DEBUG")
    assert invoke(argv, capsys)[0] == 2


def test_unexpected_errors_are_one_line_too(paths, capsys, monkeypatch):
    from sdeflow.cli import sample

    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(sample, "sample_sharded", boom)
    argv = ["sample", "--ckpt", paths["ckpt"], "--solver", "ddim", "--out", str(Path(paths["root"]) / "k.npy")]
    rc, lines, _ = invoke(argv, capsys)
    assert rc == 1 and len(lines) == 1 and "internal error" in lines[0] and "--debug" in lines[0]


def test_one_option_style():
    parser = build_parser()
    for cmd, required in [
        ("train", ["--out", "x"]),
        ("sample", ["--ckpt", "c", "--out", "x"]),
        ("likelihood", ["--ckpt", "c", "--data", "d"]),
        ("bench", ["--ckpt", "c"]),
        ("demo", []),
    ]:
        assert parser.parse_args([cmd, *required, "--progress"]).progress is True, cmd
        assert parser.parse_args([cmd, *required, "--no-progress"]).progress is False, cmd
        assert parser.parse_args([cmd, *required]).progress is None, cmd  # default: when stderr is a terminal
    for cmd, required in [
        ("sample", ["--ckpt", "c", "--out", "x"]),
        ("likelihood", ["--ckpt", "c", "--data", "d"]),
        ("bench", ["--ckpt", "c"]),
    ]:
        assert parser.parse_args([cmd, *required, "--dtype", "float64"]).dtype == "float64", cmd
        assert parser.parse_args([cmd, *required]).dtype == "float32", cmd
    for cmd, required in [("sample", ["--ckpt", "c", "--out", "x"]), ("bench", ["--ckpt", "c"])]:
        args = parser.parse_args([cmd, *required, "--option", "eta=0.5", "--option", "order=3"])
        assert args.option == [("eta", 0.5), ("order", 3)], cmd
    text = parser.format_help()
    assert "sdeflow train" in text and "--debug" in text and "--force" in text


def test_cuda_unavailable_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, lines, _ = invoke(["train", "--data", "gmm", "--device", "cuda", "--out", str(tmp_path / "r")], capsys)
    assert rc == 2 and len(lines) == 1 and "--device" in lines[0] and "CUDA" in lines[0]


def test_a_failed_write_is_one_line_and_keeps_the_old_file(paths, capsys, monkeypatch, tmp_path):
    """A full disk while writing the samples: one line saying why in words; the existing file is left as it was."""
    from sdeflow.cli import common

    out = tmp_path / "s.npy"
    out.write_bytes(b"old")

    monkeypatch.setattr(common.os, "fdopen", lambda fd, mode: _Full(fd))
    argv = ["sample", "--ckpt", paths["ckpt"], "--solver", "ddim", "--nfe", "2", "--n", "3", "--out", str(out)]
    rc, lines, _ = invoke([*argv, "--force", "--no-progress"], capsys)
    assert rc == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]


class _Full:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, fd: int) -> None:
        import os

        os.close(fd)

    def __enter__(self) -> _Full:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: bytes) -> int:
        import errno
        import os

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_demo_module_errors_are_one_line(capsys, tmp_path):
    from sdeflow.cli import demo

    assert demo.main(["--out", str(tmp_path / "d"), "--solvers", "nope"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--solvers" in lines[0] and "Traceback" not in lines[0]


def test_library_choices_reach_the_cli():
    from sdeflow.grids import SPACINGS

    parser = build_parser()
    for grid in SPACINGS:
        assert parser.parse_args(["sample", "--ckpt", "c", "--out", "x", "--grid", grid]).grid == grid
    assert parser.parse_args(["sample", "--ckpt", "c", "--out", "x", "--float64"]).dtype == "float64"  # old alias
