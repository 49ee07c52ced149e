"""The real-image FID sweep (sdeflow.evaluation.fid, `sdeflow bench --fid`).

Oracles: the features of every image computed at once and fitted directly (numpy-style mean / covariance) against
the streamed accumulators; EDM's uint8 quantisation formula at known points; a sweep with several seeds against
single-seed sweeps; the same images read from a folder, a .npy and a .npz; torch-fidelity's own Inception (when
installed) for the same weights. The end-to-end CLI test uses the real 299 x 299 Inception with random weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sdeflow as sf
from sdeflow.evaluation import fid_sweep as fid
from sdeflow.evaluation import sweep
from sdeflow.evaluation.inception import FIDInceptionV3, load_fid_inception
from sdeflow.evaluation.metrics import frechet_distance, gaussian_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(n: int = 8, seed: int = 0) -> np.ndarray:
    """n random RGB 16 x 16 uint8 images, (N, H, W, C), with a per-image brightness so they differ in law."""
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, size=(n, 16, 16, 3))
    shift = g.integers(-60, 60, size=(n, 1, 1, 1))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    arr = _images()
    folder = root / "png"
    (folder / "sub").mkdir(parents=True)
    for i, a in enumerate(arr):  # a sub-folder too: the set is searched recursively, in sorted path order
        Image.fromarray(a).save(folder / ("sub" if i >= 6 else ".") / f"img{i:02d}.png")
    np.savez(root / "set.npz", x=arr)  # (N, H, W, C)
    np.save(root / "set.npy", arr.transpose(0, 3, 1, 2))  # (N, C, H, W)
    return root, arr


class TinyFeatures(nn.Module):
    """A cheap stand-in for the Inception: random float64 conv + ReLU + 2 x 2 average pool -> 32 features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv = nn.Conv2d(3, 8, 3, padding=1).double()
        self.requires_grad_(False)
        self.calls: list[int] = []
        self.sha256: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x.double())), 2).flatten(1)


def _direct_features(net: nn.Module, u8: torch.Tensor) -> torch.Tensor:
    """All features at once, the input mapped u / 255 * 2 - 1 in float64 (the pipeline maps in float32: the
    comparisons allow float32 rounding of the inputs)."""
    with torch.inference_mode():
        return net(u8.double() / 255 * 2 - 1)


def _cov(f: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.cov(f.numpy(), rowvar=False))


# ---------------------------------------------------------------------------------------------- images
def test_image_sets_agree_across_formats(image_dir):
    root, arr = image_dir
    sets = [fid.open_images(root / "png"), fid.open_images(root / "set.npz"), fid.open_images(root / "set.npy")]
    expected = torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())
    for s in sets:
        assert s.count == 8 and s.shape == (3, 16, 16)
        got = torch.cat(list(s.batches(3)))
        assert got.dtype == torch.uint8 and torch.equal(got, expected)
    assert [b.shape[0] for b in sets[0].batches(3)] == [3, 3, 2]


def test_image_set_errors_and_hash(image_dir, tmp_path):
    root, arr = image_dir
    with pytest.raises(ValueError, match="uint8"):
        np.save(tmp_path / "f.npy", arr.astype(np.float32))
        fid.open_images(tmp_path / "f.npy")
    with pytest.raises(ValueError, match="neither a folder"):
        fid.open_images(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="at least 4"):
        np.save(tmp_path / "few.npy", arr[:3])
        fid.open_images(tmp_path / "few.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        fid.open_images(tmp_path / "empty")
    h = fid.open_images(root / "set.npy").content_hash()
    changed = arr.transpose(0, 3, 1, 2).copy()
    changed[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "changed.npy", changed)
    assert fid.open_images(tmp_path / "changed.npy").content_hash() != h
    assert fid.open_images(root / "png").content_hash() != h  # a folder hashes its files and names


def test_to_uint8_is_edm_quantisation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0, float("nan")])
    # floor(127.5 x + 128) clipped: -1 -> floor(0.5) = 0, -0.5 -> floor(64.25) = 64, 0 -> 128, 0.999 -> 255
    assert fid.to_uint8(x).tolist() == [0.0, 0.0, 64.0, 128.0, 255.0, 255.0, 255.0, 0.0]
    # a stored image read back as 2 u / 255 - 1 quantises to itself
    u = torch.arange(256, dtype=torch.float32)
    assert torch.equal(fid.to_uint8(u / 127.5 - 1.0), u)


# ---------------------------------------------------------------------------------------------- statistics
def test_reference_stats_stream_equals_direct_and_cache(image_dir, tmp_path):
    root, arr = image_dir
    net = TinyFeatures()
    u8 = torch.from_numpy(arr.transpose(0, 3, 1, 2).copy())
    f = _direct_features(net, u8)
    net.calls.clear()
    ref = fid.reference_stats(root / "set.npz", net, batch_size=3, cache_dir=tmp_path)
    assert not ref.cached and ref.stats.n == 8 and max(net.calls) <= 3
    torch.testing.assert_close(ref.stats.mean, f.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ref.stats.cov, _cov(f), rtol=1e-6, atol=1e-9)
    # the floor: FID between the random halves of each split, recomputed from all features at once
    gen = torch.Generator().manual_seed(12345)
    values = []
    for _ in range(fid.FLOOR_SPLITS):
        m = torch.zeros(8, dtype=torch.bool)
        m[torch.randperm(8, generator=gen)[:4]] = True
        values.append(frechet_distance(gaussian_stats(f[m]), gaussian_stats(f[~m])))
    assert ref.floor == pytest.approx(float(np.mean(values)), rel=1e-6)
    assert ref.floor_std == pytest.approx(float(np.std(values, ddof=1)), rel=1e-5)
    # cached: same numbers, no feature pass; a different image file or different weights miss the cache
    net.calls.clear()
    again = fid.reference_stats(root / "set.npz", net, batch_size=3, cache_dir=tmp_path)
    assert again.cached and net.calls == [] and again.key == ref.key
    torch.testing.assert_close(again.stats.cov, ref.stats.cov, rtol=0, atol=0)
    assert again.floor == ref.floor
    assert fid.reference_stats(root / "set.npy", net, cache_dir=tmp_path).key != ref.key
    other = fid.reference_stats(root / "set.npz", TinyFeatures(seed=1), cache_dir=tmp_path)
    assert not other.cached and other.key != ref.key
    # the cache file is pytorch-fid's layout
    with np.load(ref.path) as z:
        assert set(z.files) >= {"mu", "sigma"}


def test_fid_scorer_streams_and_equals_direct(image_dir):
    root, _ = image_dir
    net = TinyFeatures()
    ref = fid.reference_stats(root / "set.npz", net, batch_size=8)
    scorer = fid.FIDScorer(net, ref, batch_size=4)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(10, 3, 16, 16, generator=g) * 2.4 - 1.2  # some outside [-1, 1]: clipped like an image file
    net.calls.clear()
    streamed = scorer.score_batches(torch.split(x, 3))["fid"]
    assert max(net.calls) <= 3
    f = _direct_features(net, fid.to_uint8(x))
    assert streamed == pytest.approx(frechet_distance(gaussian_stats(f), ref.stats), rel=1e-6)
    assert scorer.score(x)["fid"] == pytest.approx(streamed, rel=1e-9)
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    assert np.isnan(scorer.score(bad)["fid"])
    assert scorer.floor["fid"] == ref.floor and scorer.describe()["protocol_version"] == fid.PROTOCOL_VERSION


class _ZeroEps(nn.Module):
    """eps-prediction 0: the sampler then shrinks the prior noise deterministically (a cheap image 'model')."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_sweep_with_seeds_streams_batches_and_averages(image_dir):
    root, _ = image_dir
    net = TinyFeatures()
    scorer = fid.FIDScorer(net, fid.reference_stats(root / "set.npz", net), batch_size=64)
    den = sf.Denoiser(_ZeroEps(), sf.VPSDE(), prediction="eps")
    seen: list[int] = []
    inner = scorer.score_batches

    def spy(batches):
        def watch():
            for b in batches:
                seen.append(b.shape[0])
                yield b

        return inner(watch())

    scorer.score_batches = spy  # type: ignore[method-assign]
    kw = dict(solvers=["ddim", "ddpm"], nfes=[2, 4], n=6, batch_size=4, keep=3, progress=False)
    res = sweep.run_sweep(den, scorer, (3, 16, 16), seeds=(0, 1), **kw)
    assert set(seen) == {4, 2}  # the scorer saw batches of at most batch_size, never the whole set
    assert res.seeds == (0, 1) and len(res.cells) == 4
    singles = [sweep.run_sweep(den, scorer, (3, 16, 16), seed=s, **kw) for s in (0, 1)]
    for i, c in enumerate(res.cells):
        assert c.ok
        per = [singles[0].cells[i].metrics["fid"], singles[1].cells[i].metrics["fid"]]
        assert c.metrics["fid"] == pytest.approx(np.mean(per), rel=1e-12)
        assert c.metrics["fid_std"] == pytest.approx(np.std(per, ddof=1), rel=1e-9)
        assert c.stats["fid@seed=1"] == pytest.approx(per[1], rel=1e-12)
    kept = res.samples[("ddim", 2)]
    assert kept.shape == (3, 3, 16, 16)
    torch.testing.assert_close(kept, singles[0].samples[("ddim", 2)])
    with pytest.raises(ValueError, match="seeds"):
        sweep.run_sweep(den, scorer, (3, 16, 16), seeds=(1, 1), **kw)


# ---------------------------------------------------------------------------------------------- models
def test_load_diffusers_model(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    model.save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "pipe" / "scheduler")
    den, shape = fid.load_diffusers_model(tmp_path / "pipe")
    assert shape == (3, 16, 16)
    res = sf.sample(den, solver="ddim", nfe=2, shape=(2, *shape), generator=torch.Generator().manual_seed(0))
    assert res.x.shape == (2, 3, 16, 16) and bool(torch.isfinite(res.x).all())
    with pytest.raises(ValueError, match="scheduler"):
        (tmp_path / "lonely").mkdir()
        model.save_pretrained(tmp_path / "lonely")
        fid.load_diffusers_model(tmp_path / "lonely")


# ---------------------------------------------------------------------------------------------- the real Inception
def _random_inception(seed: int = 0) -> FIDInceptionV3:
    """The FID Inception with random weights that keep activations O(1) through its 94 layers (He-normal convs,
    identity BatchNorm), so that features and FIDs are not ~1e-8."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = FIDInceptionV3().eval()
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    return m


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(_random_inception().state_dict(), path)
    return path


@pytest.fixture
def tiny_inception(monkeypatch):
    """load_fid_inception replaced by TinyFeatures (the 299 x 299 Inception takes seconds per image on 2 CPU
    cores); the weight file must still exist. The slow test runs the real one."""
    import sdeflow.evaluation.inception as inception

    def load(path, sha256=None, *, input_range=(-1.0, 1.0), device=None):
        assert Path(path).is_file()
        return TinyFeatures()

    monkeypatch.setattr(inception, "load_fid_inception", load)


def test_cli_fid_sweep_end_to_end_fast(image_dir, inception_file, tiny_inception, tmp_path):
    _cli_fid_sweep(image_dir, inception_file, tmp_path)


@pytest.mark.slow
def test_cli_fid_sweep_end_to_end(image_dir, inception_file, tmp_path):
    """The real 299 x 299 Inception (random weights): about 10 images through it, a minute on 2 loaded cores."""
    _cli_fid_sweep(image_dir, inception_file, tmp_path)


def _cli_fid_sweep(image_dir, inception_file, tmp_path) -> None:
    """`sdeflow bench --fid` on 4 PNG images with a 2-step sdeflow checkpoint."""
    from sdeflow.cli import main
    from sdeflow.training import run_config, train

    root, arr = image_dir
    images = tmp_path / "four"
    images.mkdir()
    for f in sorted((root / "png").glob("*.png"))[:4]:
        (images / f.name).write_bytes(f.read_bytes())
    cfg = run_config(str(images), net="mlp", hidden=16, depth=1, steps=2, batch_size=4, save_every=2, log_every=1)
    train(cfg, tmp_path / "run", device="cpu", progress=False)
    out = tmp_path / "bench"
    argv = ["bench", "--fid", "--images", str(images), "--inception-weights", str(inception_file)]
    argv += ["--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--solvers", "ddim", "--nfe", "2", "--n", "2"]
    argv += ["--seeds", "0", "1", "--fid-batch-size", "4", "--keep", "2", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    (cell,) = payload["cells"]
    assert cell["status"] == "ok" and cell["nfe"] == 2
    assert np.isfinite(cell["metrics"]["fid"]) and cell["metrics"]["fid"] > 0
    assert np.isfinite(cell["metrics"]["fid_std"])
    proto = payload["protocol"]
    assert proto["sampling_seeds"] == [0, 1] and proto["n_samples"] == 2
    assert proto["reference"]["n_reference"] == 4 and not proto["reference"]["reference_cache"]["hit"]
    assert (out / "nfe_vs_fid.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "nfe_vs_fid_samples.png").read_bytes()[:8] == PNG_MAGIC
    assert "±" in (out / "table.md").read_text()
    # the same images and weights again: the reference statistics come from the cache
    argv[argv.index("--seeds") + 1 : argv.index("--seeds") + 3] = ["0"]
    assert main([*argv, "--out", str(tmp_path / "again"), "--cache-dir", str(out / "fid_cache")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["protocol"]["reference"]["reference_cache"]["hit"]
    # seed 0 alone reproduces the seed-0 value of the first run
    assert again["cells"][0]["metrics"]["fid"] == pytest.approx(cell["stats"]["fid@seed=0"], rel=1e-9)


def test_cli_fid_argument_errors(image_dir, inception_file, capsys):
    from sdeflow.cli import main

    root, _ = image_dir
    assert main(["bench", "--images", str(root / "set.npz")]) == 2
    assert "--fid" in capsys.readouterr().err
    assert main(["bench", "--fid", "--images", str(root / "set.npz"), "--ckpt", "x.pt"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    base = ["bench", "--fid", "--images", str(root / "set.npz"), "--inception-weights", str(inception_file)]
    assert main(base) == 2
    assert "exactly one model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- torch-fidelity
def _fidelity_inception(monkeypatch):
    """torch-fidelity's FeatureExtractorInceptionV3, or skip. Its package __init__ imports extractors that need
    torchvision; the Inception module itself needs only torch, so without torchvision it is imported from the
    package folder directly (sys.modules restored afterwards)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch-fidelity is not installed")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3
    except ImportError:
        pass
    for name in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
        monkeypatch.delitem(sys.modules, name)
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    before = set(sys.modules)
    try:
        mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as err:
        pytest.skip(f"torch-fidelity's Inception does not import here: {err}")
    for name in set(sys.modules) - before:
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again at teardown
    return mod.FeatureExtractorInceptionV3


def test_features_equal_torch_fidelity(monkeypatch, tmp_path):
    """Same random weights, same 8-bit 299 x 299 images (so that neither resizes: torch-fidelity resizes like TF1,
    pytorch-fid and sdeflow with F.interpolate): torch-fidelity's '2048' features equal sdeflow's pool3 features.
    torch-fidelity feeds (u - 128) / 128, i.e. sdeflow's input_range (0, 256)."""
    extractor_cls = _fidelity_inception(monkeypatch)
    net = _random_inception(seed=3)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that a mis-mapped parameter would show
        g = torch.Generator().manual_seed(4)
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.05 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.8 + 0.4 * torch.rand(mod.running_var.shape, generator=g))
    state = net.state_dict()
    g = torch.Generator().manual_seed(5)
    state["fc.weight"] = torch.randn(1008, 2048, generator=g) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    theirs = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    ours = load_fid_inception(path, input_range=(0.0, 256.0))
    u8 = torch.randint(0, 256, (2, 3, 299, 299), generator=g, dtype=torch.uint8)
    with torch.inference_mode():
        (f_theirs,) = theirs(u8)
        f_ours = ours(u8.float())
    assert f_ours.shape == f_theirs.shape == (2, 2048)
    assert float(f_ours.abs().mean()) > 1e-3
    torch.testing.assert_close(f_ours, f_theirs, rtol=1e-5, atol=1e-6)
