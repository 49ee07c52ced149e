"""`sdeflow train`: a run, its resume (bit-exact against a straight run), and checkpoints written on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sdeflow as sf
from sdeflow.cli import main
from sdeflow.nets import MLPScoreNet
from sdeflow.noise import PerSampleGenerator
from sdeflow.training import DenoisingScoreMatching, SampledData, Trainer, load_checkpoint, load_denoiser

TINY = ["--data", "gmm", "--hidden", "16", "--depth", "1", "--batch-size", "32", "--no-progress", "--log-every", "5"]


def test_train_resume_equals_straight_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--steps", "20", "--save-every", "10", "--out", str(a)]) == 0
    ckpt = load_checkpoint(a / "ckpt.pt")
    assert ckpt["step"] == 20 and load_checkpoint(a / "ckpt.prev.pt")["step"] == 10
    config = json.loads((a / "config.json").read_text())
    assert config == ckpt["config"] and config["sde"]["name"] == "vp" and config["net"]["dim"] == 2
    assert main(["train", *TINY, "--steps", "20", "--out", str(a)]) == 2  # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--steps", "30", "--resume", "--no-progress", "--out", str(a)]) == 0
    assert main(["train", *TINY, "--steps", "30", "--save-every", "0", "--out", str(b)]) == 0
    ra, rb = load_checkpoint(a / "ckpt.pt"), load_checkpoint(b / "ckpt.pt")
    assert ra["step"] == rb["step"] == 30
    for k in rb["model"]:
        assert torch.equal(ra["model"][k], rb["model"][k]), k
        assert torch.equal(ra["ema"][k], rb["ema"][k]), k
    den = load_denoiser(a / "ckpt.pt")
    assert den.prediction == "eps" and isinstance(den.sde, sf.VPSDE)
    assert den.eps(torch.randn(3, 2), 0.5).shape == (3, 2)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--data", "moons", "--net", "unet"], "image data"),
        (["--data", "moons", "--conditional"], "labelled"),
        (["--data", "nowhere"], "neither"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_train_cli_errors(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err


def test_sigint_in_process_writes_checkpoint(tmp_path):
    """SIGINT arriving mid-run (sent here from inside the data source, so the timing is deterministic) stops the
    loop after the current step and writes a loadable checkpoint; the handler is restored afterwards."""
    calls = {"n": 0}

    def draw(n, g):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.randn(n, 2, generator=g)

    torch.manual_seed(0)
    trainer = Trainer(
        MLPScoreNet(2, hidden=8, depth=1),
        DenoisingScoreMatching(sf.VPSDE()),
        SampledData(draw, (2,), {"name": "probe"}),
        batch_size=8,
        progress=False,
        out_dir=tmp_path,
    )
    before = signal.getsignal(signal.SIGINT)
    result = trainer.fit(10**6)
    assert result.interrupted == signal.SIGINT and result.step == 5
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow  # a subprocess that imports torch and trains until the signal: about 10 s on 2 cores
def test_sigterm_subprocess_writes_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(sf.__file__).parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdeflow.cli",
            "train",
            *TINY,
            "--steps",
            "100000000",
            "--save-every",
            "0",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stdout.readline()  # printed just before the loop starts
        assert "sdeflow train" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by signal" in err
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert 0 < ckpt["step"] < 100000000
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_sample_cli_matches_the_api_and_plots(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "5", "--out", str(run)]) == 0
    out, png = tmp_path / "s.npy", tmp_path / "s.png"
    argv = ["sample", "--ckpt", str(run / "ckpt.pt"), "--solver", "ddim", "--nfe", "4", "--n", "50", "--seed", "3"]
    assert main([*argv, "--out", str(out), "--plot", str(png)]) == 0
    x = np.load(out)
    assert x.shape == (50, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    den = load_denoiser(run / "ckpt.pt")
    seeds = PerSampleGenerator(range(3, 53))  # sample i uses seed 3 + i (sdeflow.distributed.sample_sharded)
    direct = sf.sample(den, solver="ddim", nfe=4, shape=(50, 2), generator=seeds)
    np.testing.assert_array_equal(x, direct.x.numpy())
    assert main([*argv, "--batch-size", "20", "--out", str(tmp_path / "b.npy")]) == 0  # batches: same shape
    assert np.load(tmp_path / "b.npy").shape == (50, 2)
    assert main([*argv, "--class", "1", "--out", str(tmp_path / "c.npy")]) == 2  # unconditional checkpoint


def test_sample_cli_conditional_images_with_guidance(tmp_path):
    run = tmp_path / "digits"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--net",
                "unet",
                "--channels",
                "8",
                "--channel-mult",
                "1,2",
                "--num-res-blocks",
                "1",
                "--attention-levels",
                "1",
                "--conditional",
                "--batch-size",
                "4",
                "--steps",
                "2",
                "--no-progress",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    den = load_denoiser(run / "ckpt.pt")
    assert den.net.num_classes == 10
    out, png = tmp_path / "d.npy", tmp_path / "d.png"
    assert (
        main(
            [
                "sample",
                "--ckpt",
                str(run / "ckpt.pt"),
                "--solver",
                "ddim",
                "--nfe",
                "2",
                "--n",
                "5",
                "--class",
                "3",
                "--cfg-scale",
                "2.0",
                "--out",
                str(out),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert np.load(out).shape == (5, 1, 8, 8)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # subprocesses that import torch and train until killed: about 10-20 s on 2 cores
def test_kill_9_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL (no handler can run) while a checkpoint is written at every step: ckpt.pt is always a complete
    checkpoint (the old or the new one, never half of one), no temporary file survives the next load, and
    `sdeflow train --resume` continues from it."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(sf.__file__).parents[1])}
    argv = [*TINY, "--steps", "100000000", "--save-every", "1", "--out", str(out)]
    steps = []
    for round_ in range(2):
        cmd = [sys.executable, "-m", "sdeflow.cli", "train", *argv, *(["--resume"] if round_ else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            first = proc.stdout.readline()  # printed just before the loop starts
            assert "sdeflow train" in first, (first, proc.stderr.read() if proc.poll() is not None else "")
            deadline = time.time() + 60
            while not (out / "ckpt.prev.pt").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5 + 0.37 * round_)  # many more writes; the kill lands at an arbitrary point of one
            proc.kill()
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        ckpt = load_checkpoint(out / "ckpt.pt")  # complete and CRC-clean
        assert ckpt["step"] > 0
        assert not [p for p in out.iterdir() if ".tmp" in p.name]  # orphans of the killed writer are gone
        steps.append(ckpt["step"])
    assert steps[1] >= steps[0]
    assert main(["train", "--resume", "--steps", str(steps[1] + 2), "--no-progress", "--out", str(out)]) == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == steps[1] + 2
