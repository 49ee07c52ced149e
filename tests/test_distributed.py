"""torch.distributed: DDP training, sharded sampling and likelihood under torchrun (2 CPU processes, gloo).

Oracles: the one-process run of the same command. DDP training on the same global batch must give the same weights
(float32 rounding: the gradient is averaged over two half-batches instead of taken over one batch), sharded sampling
and likelihood must give bitwise the one-process values (same chunks, same per-sample seeds), and each sample must
equal a direct ``sf.sample`` with its own seeds. Every torchrun launch costs a few seconds of interpreter start-up, so
one launch runs several commands: this file is also the driver that torchrun executes (``__main__`` below), with one
process group shared by the commands (the CLIs reuse a group that exists).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sdeflow as sf
from sdeflow import distributed as D
from sdeflow.noise import PerSampleGenerator

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# --batch-size 7 over 2 ranks: uneven shares (4 + 3), so the loss weighting n_r W / B is exercised
TRAIN = [
    "--data",
    "gmm",
    "--hidden",
    "16",
    "--depth",
    "1",
    "--batch-size",
    "7",
    "--warmup",
    "0",
    "--no-progress",
    "--log-every",
    "2",
    "--device",
    "cpu",
]
SAMPLE = ["--solver", "ddpm", "--nfe", "6", "--n", "11", "--batch-size", "3", "--seed", "5", "--device", "cpu"]
LIKELIHOOD = [
    "--divergence",
    "hutchinson",
    "--batch-size",
    "3",
    "--rtol",
    "1e-2",
    "--atol",
    "1e-2",
    "--seed",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
PARALLEL = [
    "--solver",
    "parallel",
    "--option",
    "base='ddim'",
    "--option",
    "window=4",
    "--option",
    "tol=1e-3",
    "--nfe",
    "12",
    "--n",
    "4",
    "--seed",
    "1",
    "--device",
    "cpu",
]
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _cli(argv: list[str]) -> int:
    from sdeflow.cli import main

    return main(argv)


# ------------------------------------------------------------------------------------------ no process group
def test_shards_partition_the_work_the_same_way_for_every_world_size():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            parts = [D.shard_slice(n, r, world) for r in range(world)]
            assert [i for s in parts for i in range(n)[s]] == list(range(n))
            sizes = [s.stop - s.start for s in parts]
            assert max(sizes) - min(sizes) <= 1
            chunks = [c for r in range(world) for c in D.shard_chunks(n, 3, r, world)]
            assert chunks == D.shard_chunks(n, 3, 0, 1)  # the chunks never depend on the world size
            assert [i for c in chunks for i in c] == list(range(n)) and all(len(c) <= 3 for c in chunks)
    with pytest.raises(ValueError, match="chunk_size"):
        D.shard_chunks(5, 0)
    with pytest.raises(ValueError, match="rank"):
        D.shard_slice(5, 2, 2)


def test_one_process_context_and_bad_arguments(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.owns_group, ctx.is_main) == (0, 1, None, False, True)
    assert not torch.distributed.is_initialized() and D.get_world_size() == 1 and D.is_main_process()
    with pytest.raises(ValueError, match="backend"):
        D.init_distributed(backend="mpi")
    with pytest.raises(ValueError, match="device"):
        D.init_distributed(device="tpu:0")
    assert D.map_chunks(lambda r: list(r), 7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError, match="boom"):
        D.map_chunks(lambda r: (_ for _ in ()).throw(ValueError("boom")), 4, 2)
    net = sf.MLPScoreNet(2, hidden=8, depth=1)
    with pytest.raises(ValueError, match="distributed=True"):
        sf.Trainer(net, sf.DenoisingScoreMatching(sf.VPSDE()), _gmm_data(), distributed=True)


def _gmm_data():
    from sdeflow.training.data import make_data

    return make_data("gmm")


def test_sample_sharded_is_per_sample_seeded():
    """Sample i is sf.sample with seed 5 + i, whatever the chunking (chunks of 2 vs one call: equal to rounding)."""
    den = sf.GaussianMixture(
        torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6])
    ).denoiser(sf.VPSDE())
    x, nfe = D.sample_sharded(den, 5, (2,), seed=5, batch_size=2, solver="ddpm", nfe=8)
    assert x.shape == (5, 2) and nfe == 3 * 8
    part = sf.sample(den, "ddpm", nfe=8, shape=(2, 2), generator=PerSampleGenerator([7, 8])).x
    torch.testing.assert_close(x[2:4], part, rtol=0, atol=0)
    whole = sf.sample(den, "ddpm", nfe=8, shape=(5, 2), generator=PerSampleGenerator(range(5, 10))).x
    torch.testing.assert_close(x, whole, rtol=1e-5, atol=1e-5)
    other = D.sample_sharded(den, 5, (2,), seed=6, batch_size=2, solver="ddpm", nfe=8)[0]
    assert not torch.allclose(other[:4], x[:4])  # the seed matters, so the comparisons above can fail


# ------------------------------------------------------------------------------------------ under torchrun
def _assert_close_states(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a["step"] == b["step"]
    assert torch.equal(a["rng"]["data_generator"], b["rng"]["data_generator"])  # the same global batches
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])  # the same (t, noise) draws
    for part in ("model", "ema"):
        for k in b[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=atol, msg=f"{part}.{k}")
    for k, v in b["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a["optimizer"]["state"][k][name], v[name], rtol=1e-3, atol=1e-9)


@pytest.mark.slow  # one torchrun launch of 2 processes running 5 commands: 18-28 s on 2 cores
def test_torchrun_training_sampling_likelihood_match_one_process(tmp_path):
    from sdeflow.training import load_checkpoint

    single, resumed, two = tmp_path / "single", tmp_path / "resumed", tmp_path / "two"
    # one process: 8 steps, saved at 4 (kept as ckpt.prev.pt) and at 8
    assert _cli(["train", *TRAIN, "--steps", "8", "--save-every", "4", "--out", str(single)]) == 0
    resumed.mkdir()
    shutil.copy(single / "ckpt.prev.pt", resumed / "ckpt.pt")  # a one-process checkpoint at step 4
    ckpt = str(single / "ckpt.pt")
    data = tmp_path / "data.npy"
    np.save(
        data,
        sf.GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.4, 0.3]), torch.tensor([0.5, 0.5]))
        .sample(5, torch.Generator().manual_seed(0))
        .float()
        .numpy(),
    )
    commands = [
        ["train", *TRAIN, "--steps", "4", "--save-every", "0", "--out", str(two)],
        ["train", "--resume", "--steps", "8", "--no-progress", "--device", "cpu", "--out", str(resumed)],
        ["sample", "--ckpt", ckpt, *SAMPLE, "--out", str(tmp_path / "s2.npy")],
        ["likelihood", "--ckpt", ckpt, "--data", str(data), *LIKELIHOOD, "--out", str(tmp_path / "l2.json")],
        ["sample", "--ckpt", ckpt, *PARALLEL, "--split", "window", "--out", str(tmp_path / "p2.npy")],
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        _torchrun(__file__, json.dumps(commands), str(tmp_path / "report.json")),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    launch = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["codes"] == [0] * len(commands) and report["world_size"] == 2, report
    assert report["replica_check_caught"] == [True, True]  # the EMA-equality check can fail

    # training: 2 ranks x 4 steps == 1 process x 4 steps; 2 -> 1 and 1 -> 2 processes resume to the 8-step run
    a, b = load_checkpoint(two / "ckpt.pt"), load_checkpoint(single / "ckpt.prev.pt")
    assert a["world_size"] == 2 and b["world_size"] == 1
    _assert_close_states(a, b)
    final = load_checkpoint(single / "ckpt.pt")
    _assert_close_states(load_checkpoint(resumed / "ckpt.pt"), final)
    assert _cli(["train", "--resume", "--steps", "8", "--no-progress", "--device", "cpu", "--out", str(two)]) == 0
    _assert_close_states(load_checkpoint(two / "ckpt.pt"), final)
    # the tolerance is far below what one step moves the weights (lr 1e-3), so a wrong batch would be caught
    moved = max(float((final["model"][k] - b["model"][k]).abs().max()) for k in b["model"])
    assert moved > 1e-3

    # sampling and likelihood: bitwise the one-process output with the same --batch-size
    assert _cli(["sample", "--ckpt", ckpt, *SAMPLE, "--out", str(tmp_path / "s1.npy")]) == 0
    s1, s2 = np.load(tmp_path / "s1.npy"), np.load(tmp_path / "s2.npy")
    assert s1.shape == (11, 2)
    np.testing.assert_array_equal(s2, s1)
    den = sf.load_denoiser(ckpt)
    direct = sf.sample(den, "ddpm", nfe=6, shape=(3, 2), generator=PerSampleGenerator([5 + 6, 5 + 7, 5 + 8])).x
    np.testing.assert_array_equal(s1[6:9], direct.numpy())  # chunk 2 (rank 1's): samples 6..8, seeds 11..13
    assert (
        _cli(["likelihood", "--ckpt", ckpt, "--data", str(data), *LIKELIHOOD, "--out", str(tmp_path / "l1.json")]) == 0
    )
    l1, l2 = (json.loads((tmp_path / f).read_text()) for f in ("l1.json", "l2.json"))
    assert l2["world_size"] == 2 and l1["nfe"] == l2["nfe"]
    assert l1["per_sample"] == l2["per_sample"] and len(l1["per_sample"]["log_prob"]) == 5

    # Picard windows split across the ranks: the same fixed point (the sequential DDIM run) within the tolerance
    assert _cli(["sample", "--ckpt", ckpt, *PARALLEL, "--out", str(tmp_path / "p1.npy")]) == 0
    p1, p2 = np.load(tmp_path / "p1.npy"), np.load(tmp_path / "p2.npy")
    seq = sf.sample(den, "ddim", nfe=12, shape=(4, 2), generator=PerSampleGenerator(range(1, 5))).x.numpy()
    np.testing.assert_allclose(p1, seq, atol=1e-3)
    np.testing.assert_allclose(p2, seq, atol=1e-3)
    print(f"torchrun launch with {len(commands)} commands: {launch:.1f} s")


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60.0) -> int:
    """The pid of the torchrun worker whose environment says RANK=rank (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
        for pid in path.read_text().split() if path.exists() else []:
            try:
                env = dict(
                    kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv
                )
            except OSError:
                continue
            if env.get(b"RANK") == str(rank).encode():
                return int(pid)
        time.sleep(0.05)
    raise TimeoutError(f"no worker with RANK={rank}")


@pytest.mark.slow  # a torchrun launch trained until one rank is killed: about 14 s on 2 cores
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc to find the rank's pid")
def test_killed_rank_leaves_the_last_checkpoint_loadable(tmp_path):
    """SIGKILL one rank while rank 0 checkpoints every step: the run fails, and ckpt.pt (and ckpt.prev.pt) load
    and resume in one process."""
    from sdeflow.training import load_checkpoint

    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(
            "-m", "sdeflow.cli", "--", "train", *TRAIN, "--steps", "100000000", "--save-every", "1", "--out", str(out)
        ),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        victim = _rank_pid(launcher, 1)
        deadline = time.time() + 120
        while not (out / "ckpt.prev.pt").exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert (out / "ckpt.prev.pt").exists(), (
            launcher.communicate(timeout=10)[0] if launcher.poll() is not None else ""
        )
        time.sleep(0.2)  # a few more steps and checkpoint writes
        os.kill(victim, signal.SIGKILL)
        log, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0, log[-3000:]
    last = load_checkpoint(out / "ckpt.pt")
    assert last["step"] >= 2 and load_checkpoint(out / "ckpt.prev.pt")["step"] == last["step"] - 1
    assert (
        _cli(
            [
                "train",
                "--resume",
                "--steps",
                str(last["step"] + 2),
                "--no-progress",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_checkpoint(out / "ckpt.pt")["step"] == last["step"] + 2


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_all_ranks_at_one_step(tmp_path):
    """torchrun forwards SIGTERM to the workers; they agree at the next log point, rank 0 writes the checkpoint and
    every worker exits with 128 + SIGTERM."""
    from sdeflow.training import load_checkpoint

    out = tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(
            "-m", "sdeflow.cli", "--", "train", *TRAIN, "--steps", "100000000", "--save-every", "0", "--out", str(out)
        ),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        first = launcher.stdout.readline()
        while "sdeflow train" not in first and launcher.poll() is None:
            first = launcher.stdout.readline()
        time.sleep(1.0)
        launcher.send_signal(signal.SIGTERM)
        log, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert "interrupted by signal 15" in log, log[-3000:]
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert step > 0 and step % 2 == 0  # stopped at a log point (--log-every 2)


# ------------------------------------------------------------------------------------------ torchrun driver
def _driver(commands: list[list[str]], report: str) -> int:
    """Run each CLI command in one process group; rank 0 writes the exit codes to ``report``."""
    torch.set_num_threads(1)
    with D.distributed_session(device="cpu") as ctx:
        codes = [_cli(argv) for argv in commands]
        caught = False
        try:  # replicas that differ must be reported on every rank
            D.assert_replicas_equal([torch.tensor([float(ctx.rank)])])
        except RuntimeError:
            caught = True
        gathered: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(gathered, caught)
        if ctx.is_main:
            Path(report).write_text(
                json.dumps({"codes": codes, "world_size": ctx.world_size, "replica_check_caught": gathered})
            )
        # leave together: a rank that destroys its gloo group while the other is still finishing the last
        # collective aborted at exit ("terminate called without an active exception", about 1 launch in 4)
        torch.distributed.barrier()
    return 0 if all(c == 0 for c in codes) else 1


if __name__ == "__main__":
    sys.exit(_driver(json.loads(sys.argv[1]), sys.argv[2]))
