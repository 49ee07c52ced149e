"""Training runs as library calls (sdeflow.training.run): run_config, train / resume, ensure_trained.

Oracles: the `sdeflow train` CLI (its config and its weights must equal the library's bit for bit, as the CLI is a
layer over it) and a straight run (a resumed run must reproduce it exactly).
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from sdeflow.cli import main
from sdeflow.cli.train import config_from_args, configure
from sdeflow.training import ensure_trained, load_checkpoint, run_config, train


def test_ensure_trained_trains_resumes_and_reuses(tmp_path):
    options = {"data": "gmm", "hidden": 8, "depth": 1, "batch_size": 16, "save_every": 0}
    assert ensure_trained(tmp_path, options, 3, device="cpu", progress=False).startswith("trained")
    assert ensure_trained(tmp_path, options, 5, device="cpu", progress=False).startswith("resumed")
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 5
    assert ensure_trained(tmp_path, options, 4, device="cpu", progress=False).startswith("reused")
    with pytest.raises(ValueError, match="trained on"):
        ensure_trained(tmp_path, {"data": "moons"}, 4, progress=False)


def test_run_config_equals_the_cli_config_and_weights(tmp_path):
    argv = ["--data", "gmm", "--hidden", "8", "--depth", "1", "--batch-size", "16", "--sde", "ve", "--steps", "4"]
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args([*argv, "--out", str(tmp_path / "cli")])
    config = run_config("gmm", hidden=8, depth=1, batch_size=16, sde="ve", steps=4)
    assert config == config_from_args(args)
    assert config["sde"] == {"name": "ve", "sigma_min": 0.01, "sigma_max": 10.0}  # 2-D default sigma_max
    assert config["train"]["lr"] == 1e-3 and config["loss"]["time_sampling"] == "uniform"
    assert main(["train", *argv, "--no-progress", "--device", "cpu", "--out", str(tmp_path / "cli")]) == 0
    result = train(config, tmp_path / "lib", device="cpu", progress=False)
    assert result.step == 4 and result.interrupted is None
    a, b = load_checkpoint(tmp_path / "cli" / "ckpt.pt"), load_checkpoint(tmp_path / "lib" / "ckpt.pt")
    assert a["config"] == b["config"] == json.loads((tmp_path / "lib" / "config.json").read_text())
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_train_resume_reproduces_a_straight_run(tmp_path):
    config = run_config("gmm", hidden=8, depth=1, batch_size=16, save_every=0)
    train(config, tmp_path / "a", steps=3, device="cpu", progress=False)
    assert train(None, tmp_path / "a", resume=True, steps=6, device="cpu", progress=False).step == 6
    train(config, tmp_path / "b", steps=6, device="cpu", progress=False)
    a, b = load_checkpoint(tmp_path / "a" / "ckpt.pt"), load_checkpoint(tmp_path / "b" / "ckpt.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda d: run_config("gmm", sde="vq"), ValueError, "sde"),
        (lambda d: run_config("gmm", net="resnet"), ValueError, "net"),
        (lambda d: run_config("gmm", schedule="cubic"), ValueError, "schedule"),
        (lambda d: run_config("moons", net="unet"), ValueError, "image data"),
        (lambda d: run_config("moons", conditional=True), ValueError, "labelled"),
        (lambda d: train(None, d), ValueError, "config is required"),
        (lambda d: train(None, d, resume=True), FileNotFoundError, "no checkpoint"),
        (lambda d: train(run_config("gmm"), d, resume=True), ValueError, "config must be None"),
        (lambda d: train(run_config("gmm"), d, device="tpu"), ValueError, "device"),
        (lambda d: ensure_trained(d, {"hidden": 8}, 2), ValueError, "options must name the data"),
    ],
)
def test_run_errors_name_the_argument(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_new_run_refuses_a_folder_with_a_checkpoint(tmp_path):
    config = run_config("gmm", hidden=8, depth=1, batch_size=16, steps=1)
    train(config, tmp_path, device="cpu", progress=False)
    with pytest.raises(FileExistsError, match="exists"):
        train(config, tmp_path, device="cpu", progress=False)
