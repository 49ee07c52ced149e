"""The offline digits feature extractor: deterministic training, hash-verified reload, features that see digits."""

from __future__ import annotations

import pickle

import pytest
import torch

from sdeflow.evaluation.extractors import (
    DigitsCNN,
    digits_extractor,
    load_digits_extractor,
    save_digits_extractor,
    sha256_file,
    train_digits_extractor,
    verify_sha256,
)
from sdeflow.evaluation.metrics import FeatureExtractor, feature_stats, frechet_distance
from sdeflow.training.data import load_digits

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("extractor") / "digits.pt"
    model = train_digits_extractor(seed=0)
    digest = save_digits_extractor(model, path)
    return model, path, digest


def test_trains_to_high_held_out_accuracy_deterministically(saved) -> None:
    model, _, _ = saved
    assert isinstance(model, FeatureExtractor)
    assert model.accuracy > 0.95  # held-out split never seen in training
    again = train_digits_extractor(seed=0)
    for (k, v), w in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k
    x, _ = load_digits()
    assert model(x[:5]).shape == (5, model.feature_dim)
    # (N, 64), (N, 8, 8) and (N, 1, 8, 8) are the same images
    torch.testing.assert_close(model(x[:5].reshape(5, 64)), model(x[:5].reshape(5, 8, 8)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="digits must have shape"):
        model(torch.zeros(2, 3, 8, 8))


def test_reload_verifies_the_hash(saved, tmp_path) -> None:
    model, path, digest = saved
    assert digest == sha256_file(path) == model.sha256
    assert path.with_name(path.name + ".sha256").read_text().split() == [digest, path.name]
    back = load_digits_extractor(path)
    assert back.sha256 == digest and back.accuracy == model.accuracy
    x, _ = load_digits()
    torch.testing.assert_close(back(x[:64]), model(x[:64]), rtol=0, atol=0)
    assert load_digits_extractor(path, sha256=digest[:8]).sha256 == digest  # an explicit (prefix) hash also works

    corrupt = tmp_path / "corrupt.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit inside the weights
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_digits_extractor(corrupt, sha256=digest)
    with pytest.raises(ValueError, match="no hash"):
        load_digits_extractor(corrupt)  # no sidecar, no hash: refused
    with pytest.raises(ValueError, match="hex"):
        verify_sha256(path, "not-a-hash")


def test_a_pickle_that_runs_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "sdeflow.digits_cnn", "x": Evil()}, f, protocol=2)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        load_digits_extractor(path, sha256=sha256_file(path))


def test_cache_trains_once_then_loads(saved, tmp_path, monkeypatch) -> None:
    model, path, digest = saved
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / "digits_cnn_seed0.pt"
    target.write_bytes(path.read_bytes())
    target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")

    def no_training(*args, **kwargs):
        raise AssertionError("a cached, verified extractor must not be retrained")

    monkeypatch.setattr("sdeflow.evaluation.extractors.train_digits_extractor", no_training)
    assert digits_extractor(cache).sha256 == digest
    target.write_bytes(target.read_bytes()[:-10])  # truncated: refused, not silently replaced
    with pytest.raises(ValueError, match="SHA-256"):
        digits_extractor(cache)


def test_features_separate_digits_from_noise(saved) -> None:
    """Two disjoint halves of the real digits are close; noise, and digits corrupted by growing Gaussian noise, move
    monotonically away: the features see what a digit looks like."""
    model, _, _ = saved
    x, _ = load_digits()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    a, b = x[perm[:850]], x[perm[850:1700]]
    ref = feature_stats(a, model)
    g = torch.Generator().manual_seed(2)
    fd_real = frechet_distance(ref, feature_stats(b, model))
    fd_noise = frechet_distance(ref, feature_stats(torch.rand(850, 1, 8, 8, generator=g) * 2 - 1, model))
    assert fd_real < 0.05 * fd_noise
    fds = [
        frechet_distance(ref, feature_stats((b + s * torch.randn(b.shape, generator=g)).clamp(-1, 1), model))
        for s in (0.1, 0.3, 0.6)
    ]
    assert fd_real < fds[0] < fds[1] < fds[2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        DigitsCNN(width=0)
    with pytest.raises(ValueError, match="test_fraction"):
        train_digits_extractor(test_fraction=1.5)
