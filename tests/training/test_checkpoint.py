"""Checkpoints: bit-exact resume, atomic writes that survive an interrupted write, clear errors for truncated or
corrupt files, and refusal of pickles that would execute code."""

from __future__ import annotations

import errno
import os
import pickle

import pytest
import torch

import sdeflow as sf
from sdeflow.nets import MLPScoreNet
from sdeflow.training import (
    CheckpointError,
    DenoisingScoreMatching,
    SampledData,
    TensorData,
    Trainer,
    load_checkpoint,
    load_denoiser,
    previous_path,
    save_checkpoint,
)
from sdeflow.training import checkpoint as ckpt_mod
from sdeflow.training.checkpoint import CheckpointWriteError, check_primitive, find_nonfinite


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


# ---------------------------------------------------------------------- divergence, corruption, orphans (issue 16)
def _small_trainer(out_dir, draw=None, **kw) -> Trainer:
    """A tiny unconditional run; ``draw(n, g)`` may poison a batch."""
    torch.manual_seed(0)
    data = SampledData(draw or (lambda n, g: torch.randn(n, 2, generator=g)), (2,), {"name": "probe"})
    kw = {"batch_size": 8, "progress": False, "lr": 1e-3, **kw}
    return Trainer(MLPScoreNet(2, hidden=8, depth=1), DenoisingScoreMatching(sf.VPSDE()), data, out_dir=out_dir, **kw)


def _all_finite(path) -> bool:
    state = load_checkpoint(path)
    return not find_nonfinite({k: state[k] for k in ("model", "ema", "optimizer")})


def test_one_nan_batch_never_reaches_a_checkpoint(tmp_path):
    """save_every < log_every: the NaN batch at step 13 stops the run at the next save (step 15) with an error naming
    step 13, and ckpt.pt (step 10) and ckpt.prev.pt (step 5) stay finite."""
    calls = {"n": 0}

    def draw(n, g):
        calls["n"] += 1
        x = torch.randn(n, 2, generator=g)
        return torch.full_like(x, float("nan")) if calls["n"] == 13 else x

    trainer = _small_trainer(tmp_path, draw, save_every=5, log_every=1000)
    with pytest.raises(FloatingPointError, match=r"loss was nan at step 13.*last good one .*ckpt.pt \(step 10\)"):
        trainer.fit(40)
    assert trainer.step == 15  # stopped at the first save point after the bad batch, not at the end
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 10 and _all_finite(tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.prev.pt")["step"] == 5 and _all_finite(tmp_path / "ckpt.prev.pt")
    with pytest.raises(FloatingPointError, match="step 13"):
        trainer.save()  # a direct save refuses too
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 10


def test_huge_learning_rate_leaves_last_good_checkpoint(tmp_path):
    """The issue's `--lr 1e6 --save-every 10`: whatever diverges first (the loss or the state), nothing non-finite is
    written and every checkpoint on disk is finite."""
    trainer = _small_trainer(tmp_path, lr=1e6, save_every=2, log_every=50, grad_clip=None, warmup=0)
    with pytest.raises(FloatingPointError, match="training diverged: .*step"):
        trainer.fit(3000)
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        if (tmp_path / name).exists():
            assert _all_finite(tmp_path / name), name


def test_nonfinite_state_is_refused_with_its_name(tmp_path):
    trainer = _small_trainer(tmp_path)
    trainer.fit(3)
    with torch.no_grad():
        next(trainer.ema.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"ema\[.*non-finite by step 3"):
        trainer.save()
    with pytest.raises(ValueError, match=r"payload\['w'\] hold non-finite"):
        save_checkpoint({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    assert find_nonfinite({"a": [torch.ones(2), 1.5, float("inf")], "b": torch.arange(3)}) == ["['a'][2]"]


def test_steps_below_the_checkpoint_step_is_an_error(tmp_path):
    first = _small_trainer(tmp_path, save_every=3)
    first.fit(6)
    before = (tmp_path / "ckpt.prev.pt").read_bytes()
    second = _small_trainer(tmp_path)
    assert second.resume() == 6
    with pytest.raises(ValueError, match=r"steps=4 is below the step 6"):
        second.fit(4)
    second.fit(6)  # already there: nothing to do, and the files are not rewritten
    assert (tmp_path / "ckpt.prev.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 6


def test_new_run_into_a_checkpoint_folder_is_refused(tmp_path):
    _small_trainer(tmp_path, save_every=1).fit(2)
    original = (tmp_path / "ckpt.pt").read_bytes()
    fresh = _small_trainer(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a checkpoint.*overwrite=True"):
        fresh.fit(3)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        fresh.save()
    assert (tmp_path / "ckpt.pt").read_bytes() == original and fresh.step == 0
    (tmp_path / "ckpt.pt").unlink()  # the previous checkpoint alone still counts
    with pytest.raises(FileExistsError, match="ckpt.prev.pt"):
        _small_trainer(tmp_path).fit(3)
    assert _small_trainer(tmp_path, overwrite=True).fit(3).checkpoint == tmp_path / "ckpt.pt"
    fresh.save(tmp_path / "elsewhere.pt")  # an explicit path is the caller's choice


def test_crc_mismatch_is_reported_as_corrupt(tmp_path):
    """torch.load does not verify the archive's CRCs: a flipped byte inside a tensor would load silently."""
    path = tmp_path / "ckpt.pt"
    w = torch.zeros(4096)
    save_checkpoint({"step": 1, "w": w}, path)
    data = bytearray(path.read_bytes())
    i = data.find(bytes(4096 * 4 // 2))  # inside the tensor's raw zeros
    assert i > 0
    data[i + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: the archive member .* fails its CRC check"):
        load_checkpoint(path)


def test_files_that_are_not_checkpoints_say_so(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_text("just some text, not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match="is not a checkpoint: not a zip archive") as info:
        load_checkpoint(path)
    assert "execute code" not in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)
    with open(path, "wb") as f:
        pickle.dump({"format": "sdeflow-checkpoint"}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a checkpoint") as info:
        load_checkpoint(path)
    assert "execute code" not in str(info.value)


def test_orphaned_temporary_files_are_removed(tmp_path):
    """Temporary files of a killed writer (a pid that no longer runs) go at the next save or load; those of a live
    process stay."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    dead = 2**31 - 2  # above any pid_max
    live = os.getppid()
    for name in (f".ckpt.pt.tmp.{dead}", f".ckpt.prev.pt.tmp.{dead}", f".ckpt.pt.tmp.{live}"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 half a zip")
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ckpt.pt.tmp.{live}", "ckpt.pt"]
    (tmp_path / f".ckpt.pt.tmp.{dead}").write_bytes(b"PK")
    save_checkpoint({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".ckpt.pt.tmp.{live}", "ckpt.prev.pt", "ckpt.pt"]


def test_failed_write_says_why_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left on device; the previous checkpoint is unchanged"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
