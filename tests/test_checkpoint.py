"""Checkpoints: bit-exact resume, atomic writes that survive an interrupted write, clear errors for truncated or
corrupt files, and refusal of pickles that would execute code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import sdeflow as sf
from sdeflow.nets import MLPScoreNet
from sdeflow.training import (
    CheckpointError,
    DenoisingScoreMatching,
    TensorData,
    Trainer,
    load_checkpoint,
    load_denoiser,
    previous_path,
    save_checkpoint,
)
from sdeflow.training import checkpoint as ckpt_mod
from sdeflow.training.checkpoint import check_primitive


def _trainer(out_dir=None, seed=0) -> Trainer:
    """A conditional run exercising every random stream: data indices, t, noise, label dropout and net dropout
    (torch's global generator), with warm-up, clipping and EMA."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(42)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] > 0).long()
    net = MLPScoreNet(2, hidden=32, depth=2, time_dim=16, num_classes=2, dropout=0.1)
    loss = DenoisingScoreMatching(sf.VPSDE(), "v", "min_snr", stratified=True, p_uncond=0.2)
    config = {
        "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "schedule": "linear"},
        "net": {"name": "mlp", "dim": 2, "hidden": 32, "depth": 2, "time_dim": 16, "num_classes": 2, "dropout": 0.1},
        "loss": loss.config(),
    }
    return Trainer(
        net,
        loss,
        TensorData(x, y),
        batch_size=16,
        lr=1e-2,
        warmup=5,
        grad_clip=0.5,
        ema_decay=0.9,
        conditional=True,
        progress=False,
        out_dir=out_dir,
        config=config,
        seed=seed,
    )


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for (ka, va), (kb, vb) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for va, vb in zip(a.ema.state_dict().values(), b.ema.state_dict().values()):
        assert torch.equal(va, vb)
    sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.data_generator.get_state(), b.data_generator.get_state())


def test_resume_is_bit_exact(tmp_path):
    """2N steps == N steps, checkpoint, a fresh process-like trainer (other seed, scrambled global RNG), resume, N."""
    n = 12
    straight = _trainer()
    straight.fit(2 * n)
    straight_rng = torch.get_rng_state()

    first = _trainer(tmp_path)
    first.fit(n)  # writes tmp_path/ckpt.pt at the end
    torch.manual_seed(12345)  # anything the resumed run does not restore would now diverge
    second = _trainer(tmp_path, seed=7)
    assert second.resume() == n
    second.fit(2 * n)
    _assert_same_state(straight, second)
    assert torch.equal(torch.get_rng_state(), straight_rng)
    assert second.step == 2 * n
    # the checkpoint rebuilds a working Denoiser from its config alone
    den = load_denoiser(tmp_path / "ckpt.pt")
    assert den.prediction == "v" and den.net.num_classes == 2
    x = torch.randn(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(
            den.net(x, torch.full((4,), 0.5), y=1), second.ema.eval()(x, torch.full((4,), 0.5), y=1)
        )


def test_save_keeps_previous_and_roundtrips(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.arange(3.0), "config": {"a": [1, 2.5, "x", None, True]}}, path)
    save_checkpoint({"step": 2, "w": torch.arange(4.0)}, path)
    cur, prev = load_checkpoint(path), load_checkpoint(previous_path(path))
    assert cur["step"] == 2 and prev["step"] == 1
    assert torch.equal(prev["w"], torch.arange(3.0)) and prev["config"]["a"] == [1, 2.5, "x", None, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]  # no temporary files left


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    """A write that dies halfway (here: torch.save raising after writing part of the file) changes nothing."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(f.tell() // 2 + 17)
        raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of the write

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 3, "w": torch.randn(1000)}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert load_checkpoint(path)["step"] == 2
    assert load_checkpoint(previous_path(path))["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.prev.pt", "ckpt.pt"]


def test_crash_before_rename_leaves_previous_checkpoint(tmp_path):
    """A process killed after writing its temporary file but before the rename: the destination is untouched."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 5}, path)
    stray = tmp_path / ".ckpt.pt.tmp.99999"
    stray.write_bytes(b"PK\x03\x04 half a zip")
    assert load_checkpoint(path)["step"] == 5


def test_truncated_checkpoint_gives_clear_error_and_names_previous(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "w": torch.randn(5000)}, path)
    save_checkpoint({"step": 2, "w": torch.randn(5000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert "ckpt.prev.pt" in str(info.value)
    assert load_checkpoint(previous_path(path))["step"] == 1
    path.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="ckpt.prev.pt"):
        load_checkpoint(path)


class _Evil:
    """Unpickling this calls os.mkdir(marker): a stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "sdeflow-checkpoint", "version": 1, "model": {}, "payload": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_denoiser(path)
    assert not marker.exists()
    # the file really is malicious: an unrestricted unpickler runs the payload
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_foreign_files_are_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not an sdeflow checkpoint"):
        load_checkpoint(path)
    with open(path, "wb") as f:
        pickle.dump({"format": "sdeflow-checkpoint"}, f, protocol=2)  # a bare pickle, not torch's zip format
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    save_checkpoint({"step": 0}, path)
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        load_denoiser(path)  # no config


def test_config_must_be_primitive():
    check_primitive({"a": [1, 2.0, None, {"b": "c"}], "d": (True,)})
    with pytest.raises(ValueError, match="primitives"):
        check_primitive({"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="keys"):
        check_primitive({1: 2})
    with pytest.raises(ValueError, match="primitives"):
        Trainer(
            MLPScoreNet(2, hidden=8, depth=1),
            DenoisingScoreMatching(sf.VPSDE()),
            TensorData(torch.randn(4, 2)),
            config={"sde": sf.VPSDE()},
        )
