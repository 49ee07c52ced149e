"""Flow-matching training: the DSM loss with a flow (velocity) net on the flow path, against closed forms.

* the target is the path's velocity u = a'(t) x0 + s'(t) eps, written out here for FlowMatchingPath (a = 1 - sigma,
  s = sigma, sigma(t) = k t / (1 + (k - 1) t)): u = sigma'(t) (eps - x0), eps - x0 on the plain path;
* the exact velocity of a Gaussian mixture (posterior means from sdeflow.analytic, combined into a' x0 + s' eps) sits
  at the loss floor Var(u | x_t) = (D / s)^2 Var(x0 | x_t) (D = a s' - s a'; the posterior variance written out
  here), and a perturbed one pays exactly its squared error more;
* ``sdeflow train --sde flow`` writes a checkpoint that loads as a flow Denoiser and samples through ``sdeflow
  sample``; the combinations that cannot work are refused naming the argument.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mixture_posterior import posterior_x0_var

import sdeflow as sf
from sdeflow.cli import main
from sdeflow.sdes import FlowMatchingPath
from sdeflow.training import default_gmm, load_checkpoint
from sdeflow.training.config import build_loss, build_sde, load_run
from sdeflow.training.losses import DenoisingScoreMatching
from sdeflow.training.run import run_config

F64 = torch.float64


def sigma_and_slope(t: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's shifted noise level sigma(t) = k t / (1 + (k - 1) t) and its derivative k / (1 + (k - 1) t)^2."""
    return k * t / (1 + (k - 1) * t), k / (1 + (k - 1) * t) ** 2


def velocity_oracle(gmm: sf.GaussianMixture, path: FlowMatchingPath):
    """u*(x, t) = E[u | x_t = x] = a'(t) E[x0 | x] + s'(t) E[eps | x], from the mixture's exact posterior means."""

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.to(F64).expand(x.shape[0])[:, None]
        return path.d_alpha(tt) * gmm.x0(x, t, path) + path.d_sigma(tt) * gmm.eps(x, t, path)

    return net


# ------------------------------------------------------------------------------------------------ the target
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_target_is_the_closed_form_velocity(shift):
    path = FlowMatchingPath(shift=shift)
    loss = DenoisingScoreMatching(path, prediction="flow", stratified=True)
    assert (loss.space, loss.t_min, loss.t_max) == ("flow", path.eps, 1.0)  # T = 1 is trained on: all finite there
    g = torch.Generator().manual_seed(0)
    x0 = default_gmm().sample(512, generator=g)
    draw = loss.draw(x0, g)
    sig, slope = sigma_and_slope(draw.t, shift)
    torch.testing.assert_close(draw.x_t, (1 - sig)[:, None] * x0 + sig[:, None] * draw.noise, rtol=1e-12, atol=1e-12)
    u = slope[:, None] * (draw.noise - x0)  # a' x0 + s' eps with a' = -sigma', s' = sigma'
    if shift == 1.0:
        torch.testing.assert_close(u, draw.noise - x0, rtol=0, atol=0)
    zero = loss.per_sample(lambda x, t: torch.zeros_like(x), x0, draw=draw)
    torch.testing.assert_close(zero, u.square().mean(1), rtol=1e-12, atol=0)
    exact = loss.per_sample(lambda x, t: u, x0, draw=draw)  # a net that outputs the target scores 0
    assert float(exact.abs().max()) < 1e-24
    assert float(draw.t.max()) > 0.99  # the draws cover the end t -> 1, where a(t) -> 0


def test_flow_net_and_x0_net_give_the_same_loss_in_every_other_space():
    """The exact model as flow net and as x0 net: identical per-sample losses with min_snr (x0 space) and likelihood
    (score space), whose conversions of the flow output need a'(t), s'(t)."""
    path, gmm = FlowMatchingPath(shift=2.0), default_gmm()
    g = torch.Generator().manual_seed(1)
    x0 = gmm.sample(256, generator=g)
    for weighting in ("min_snr", "likelihood"):
        ref = DenoisingScoreMatching(path, "x0", weighting)
        draw = ref.draw(x0, g)
        want = ref.per_sample(gmm.denoiser(path, "x0"), x0, draw=draw)
        got = DenoisingScoreMatching(path, "flow", weighting).per_sample(velocity_oracle(gmm, path), x0, draw=draw)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_log_snr_objectives_stop_short_of_the_flow_paths_end():
    """lambda(1) = -inf and g(1)^2 = inf on the flow path: likelihood weighting and importance sampling default to
    t_max = T - eps, and an explicit t_max = T is refused naming t_max."""
    path = FlowMatchingPath()
    assert DenoisingScoreMatching(path, "flow", "likelihood").t_max == pytest.approx(1 - path.eps)
    imp = DenoisingScoreMatching(path, "flow", time_sampling="importance")
    assert imp.t_max == pytest.approx(1 - path.eps)
    t, ratio = imp.sample_time(64, torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(ratio).all()) and float(t.max()) <= 1 - path.eps
    with pytest.raises(ValueError, match=r"time_sampling='importance' needs a finite log-SNR at t_max"):
        DenoisingScoreMatching(path, "flow", time_sampling="importance", t_max=1.0)
    with pytest.raises(ValueError, match=r"weighting='likelihood' needs a finite log-SNR at t_max"):
        DenoisingScoreMatching(path, "flow", "likelihood", t_max=1.0)


# ------------------------------------------------------------------------------------------------ the floor
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_mixture_velocity_sits_at_the_floor_and_a_perturbed_one_pays_its_error(shift):
    """E[loss | x_t] of u* is Var(u | x_t) / d = (D / s)^2 Var(x0 | x_t) / d (u = (a' - s' a / s) x0 + s' x_t / s given
    x_t; D = a s' - s a' = sigma'); u* + delta pays ||delta||^2 / d more in expectation (the cross term has mean 0)."""
    path, gmm = FlowMatchingPath(shift=shift), default_gmm()
    loss = DenoisingScoreMatching(path, "flow", stratified=True)
    g = torch.Generator().manual_seed(2)
    x0 = gmm.sample(8192, generator=g)
    draw = loss.draw(x0, g)
    oracle = velocity_oracle(gmm, path)
    per = loss.per_sample(oracle, x0, draw=draw)
    sig, slope = sigma_and_slope(draw.t, shift)
    floor = (slope / sig) ** 2 * posterior_x0_var(gmm, draw.x_t, 1 - sig, sig).mean(1)
    gap = per - floor
    assert abs(float(gap.mean())) < 4 * float(gap.std()) / math.sqrt(len(gap)), (float(per.mean()), float(floor.mean()))

    def delta(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * torch.tanh(x) * (1 + t.to(F64).expand(x.shape[0])[:, None])

    worse = loss.per_sample(lambda x, t: oracle(x, t) + delta(x, t), x0, draw=draw)
    excess = worse - per
    diff = excess - delta(draw.x_t, draw.t).square().mean(1)
    assert float(excess.mean()) > 5 * float(excess.std()) / math.sqrt(len(excess))  # the oracle is strictly better
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff))


# ------------------------------------------------------------------------------------------------ runs and CLI
def test_run_config_builds_the_flow_path_and_loss():
    cfg = run_config("gmm", sde="flow", shift=3.0, hidden=8, depth=1, steps=1)
    assert cfg["sde"] == {"name": "flow", "shift": 3.0} and cfg["loss"]["prediction"] == "flow"  # flow by default
    sde = build_sde(cfg)
    assert isinstance(sde, FlowMatchingPath) and sde.shift == 3.0
    loss = build_loss(cfg, sde)
    assert loss.prediction == "flow" and loss.space == "flow" and loss.t_max == 1.0
    assert run_config("gmm", sde="flow", prediction="v")["loss"]["prediction"] == "v"
    assert run_config("gmm", prediction="flow")["sde"]["name"] == "vp"  # the velocity is defined on every path


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sde": "flow", "prediction": "eps"}, r"prediction='eps' on sde='flow': .* use prediction='flow'"),
        ({"sde": "flow", "prediction": "score"}, r"prediction='score' on sde='flow'"),
        ({"sde": "flow", "objective": "edm"}, r"objective='edm' on sde='flow'"),
        ({"sde": "vp", "shift": 3.0}, r"shift=3.0 .* needs sde='flow'"),
        ({"sde": "flow", "prediction": "velocity"}, r"prediction"),
    ],
)
def test_run_config_refuses_what_the_flow_path_cannot_serve(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_config("gmm", **kwargs)


def test_train_cli_flow_checkpoint_samples(tmp_path, capsys):
    run = tmp_path / "flow"
    tiny = ["--hidden", "16", "--depth", "1", "--batch-size", "64", "--no-progress", "--log-every", "10"]
    argv = ["train", "--data", "checkerboard", "--sde", "flow", "--shift", "3", "--prediction", "flow", *tiny]
    assert main([*argv, "--steps", "30", "--device", "cpu", "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["step"] == 30 and ckpt["config"]["sde"] == {"name": "flow", "shift": 3.0}
    assert ckpt["config"]["loss"]["prediction"] == "flow"
    den, config, _ = load_run(run / "ckpt.pt")
    assert den.prediction == "flow" and isinstance(den.sde, FlowMatchingPath) and den.sde.shift == 3.0
    out = tmp_path / "s.npy"
    for solver in ("dpm_solver++", "heun", "euler"):  # the default, and two that step through t = 1 itself
        argv = ["sample", "--ckpt", str(run / "ckpt.pt"), "--solver", solver, "--nfe", "8", "--n", "64", "--force"]
        assert main([*argv, "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
        x = np.load(out)
        assert x.shape == (64, 2) and np.isfinite(x).all(), solver
    assert main(["train", "--resume", "--steps", "30", "--shift", "2", "--no-progress", "--out", str(run)]) == 2
    assert "--shift 2.0 (the checkpoint has shift=3.0)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--sde", "flow", "--prediction", "eps"], "--prediction 'eps' on --sde 'flow'"),
        (["--sde", "flow", "--objective", "edm"], "--objective 'edm' on --sde 'flow'"),
        (["--shift", "3"], "--shift 3.0 is the flow path's time shift: it needs --sde 'flow'"),
    ],
)
def test_train_cli_names_the_flag_of_a_bad_combination(tmp_path, capsys, argv, message):
    assert main(["train", "--data", "gmm", *argv, "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "ckpt.pt").exists()
