"""Guidance and inversion against exact oracles.

* A Gaussian mixture whose components are the classes has the exact posterior p(y | x_t) (``gmm_class_logits``) and
  the exact class-conditional scores (one-component mixtures): classifier guidance at w = 1 with the exact classifier
  is the conditional score; classifier-free guidance at w = 1 / w = 0 is the conditional / unconditional prediction,
  and at any w it is eps_null + w (eps_y - eps_null) whatever the net predicts.
* Gaussian data N(mu, S^2 I): along the probability-flow ODE (x_t - a mu) / sqrt(a^2 S^2 + s^2) is constant, so the
  exact latent of ODE inversion is known in closed form; empirical orders are fitted against it and against the
  round trip.
"""

from __future__ import annotations

import pytest
import torch
from gmm_oracles import gmm_class_logits, gmm_conditional_net

import sdeflow as sf
from sdeflow.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    ClassifierLoss,
    ConditionalDenoiser,
    NoiseAwareClassifier,
    decode,
    encode,
    interpolate,
    slerp,
    train_classifier,
)
from sdeflow.sampling import make_stepper
from sdeflow.solvers import SOLVERS
from sdeflow.solvers.control import Tolerances
from sdeflow.solvers.ddim import DDIM

F64 = torch.float64
SDES = {
    "vp": lambda: sf.VPSDE(0.1, 20.0),
    "subvp": lambda: sf.SubVPSDE(0.1, 20.0),
    "ve": lambda: sf.VESDE(0.01, 50.0),
    "vp_cosine": lambda: sf.VPSDE(schedule="cosine"),
    "discrete": lambda: sf.DiscreteVPSDE.linear(1000),
}


def mixture() -> sf.GaussianMixture:
    means = torch.tensor([[-2.0, 0.5], [2.0, 1.0], [0.0, -2.5]], dtype=F64)
    stds = torch.tensor([[0.4, 0.7], [0.6, 0.5], [0.5, 0.5]], dtype=F64)
    return sf.GaussianMixture(means, stds, torch.tensor([0.2, 0.3, 0.5], dtype=F64))


def component(gmm: sf.GaussianMixture, k: int) -> sf.GaussianMixture:
    return sf.GaussianMixture(gmm.means[k : k + 1], gmm.stds[k : k + 1])


def points(sde, n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn(n, 2, generator=g, dtype=F64)
    t = sde.eps + (sde.T - sde.eps) * torch.rand(n, generator=g, dtype=F64)
    return x, t


# ---------------------------------------------------------------------------------------------- classifier guidance
@pytest.mark.parametrize("kind", list(SDES))
def test_classifier_guidance_exact_classifier_is_the_conditional_score(kind):
    sde, gmm = SDES[kind](), mixture()
    x, t = points(sde)
    labels = torch.tensor([0, 1, 2] * 8)
    den = gmm.denoiser(sde)
    guided = ClassifierGuidance(den, gmm_class_logits(gmm, sde), labels, scale=1.0)
    exact = torch.stack(
        [component(gmm, int(k)).score(x[i : i + 1], t[i : i + 1], sde)[0] for i, k in enumerate(labels)]
    )
    got = guided.score(x, t)
    assert torch.allclose(got, exact, rtol=1e-8, atol=1e-8 * float(exact.abs().max())), (got - exact).abs().max()
    assert guided.nfe == 1 and guided.classifier_nfe == 1
    # w = 0: the unconditional model; the guidance term is linear in w
    x0 = ClassifierGuidance(den, gmm_class_logits(gmm, sde), labels, scale=0.0).score(x, t)
    torch.testing.assert_close(x0, gmm.score(x, t, sde), rtol=1e-10, atol=1e-10)
    x3 = ClassifierGuidance(den, gmm_class_logits(gmm, sde), labels, scale=3.0).score(x, t)
    torch.testing.assert_close(x3 - x0, 3.0 * (exact - x0), rtol=1e-8, atol=1e-8 * float(exact.abs().max()))


def test_classifier_guidance_samples_the_class():
    """Sampling with exact classifier guidance at w = 1 follows the conditional ODE: it equals sampling the component."""
    sde, gmm = sf.VPSDE(), mixture()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    guided = ClassifierGuidance(gmm.denoiser(sde), gmm_class_logits(gmm, sde), 2)
    with torch.no_grad():  # the classifier gradient is taken under enable_grad inside
        a = sf.sample(guided, "ddim", nfe=20, x_T=x_T)
    b = sf.sample(component(gmm, 2).denoiser(sde), "ddim", nfe=20, x_T=x_T)
    torch.testing.assert_close(a.x, b.x, rtol=1e-9, atol=1e-9)
    assert a.nfe == b.nfe == 20


# ---------------------------------------------------------------------------------------------- classifier-free guidance
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
@pytest.mark.parametrize("kind", ["vp", "ve", "subvp"])
def test_cfg_seed_identities_and_affine_equivalence(prediction, kind):
    sde, gmm = SDES[kind](), mixture()
    x, t = points(sde, seed=2)
    labels = torch.tensor([2, 0, 1] * 8)
    den = sf.Denoiser(gmm_conditional_net(gmm, sde, prediction), sde, prediction)
    eps_c = torch.stack([component(gmm, int(k)).eps(x[i : i + 1], t[i : i + 1], sde)[0] for i, k in enumerate(labels)])
    eps_u = gmm.eps(x, t, sde)
    for w in (0.0, 1.0, 2.5):
        cfg = ClassifierFreeGuidance(den, labels, scale=w)
        den.reset_nfe()
        got = cfg.eps(x, t)
        assert den.nfe == 1 and cfg.nfe == 1  # both branches in one counted call
        torch.testing.assert_close(got, eps_u + w * (eps_c - eps_u), rtol=1e-9, atol=1e-9)
    # w = 1 is the conditional prediction and w = 0 the unconditional one in the net's own target space too
    cond = ConditionalDenoiser(den, labels)
    torch.testing.assert_close(
        ClassifierFreeGuidance(den, labels, 1.0).raw(x, t), cond.raw(x, t), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(
        ClassifierFreeGuidance(den, labels, 0.0).x0(x, t), gmm.x0(x, t, sde), rtol=1e-9, atol=1e-9
    )


class _Spy:
    """A conditional net that records the batch sizes and labels it was called with."""

    def __init__(self, net):
        self.net, self.num_classes, self.calls = net, net.num_classes, []

    def __call__(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        return self.net(x, t, y)


def test_cfg_one_batched_call_and_interval():
    sde, gmm = sf.VPSDE(), mixture()
    x, _ = points(sde, n=6, seed=3)
    spy = _Spy(gmm_conditional_net(gmm, sde))
    den = sf.Denoiser(spy, sde)
    cfg = ClassifierFreeGuidance(den, 1, scale=4.0, interval=(0.2, 0.6))
    eps_c, eps_u = component(gmm, 1).eps(x, 0.4, sde), gmm.eps(x, 0.4, sde)
    torch.testing.assert_close(cfg.eps(x, 0.4), eps_u + 4.0 * (eps_c - eps_u))
    assert spy.calls[-1][0] == 12 and spy.calls[-1][1].tolist() == [1] * 6 + [3] * 6
    # a CPU time outside the interval: the conditional model, one call of the plain batch
    torch.testing.assert_close(cfg.eps(x, 0.9), component(gmm, 1).eps(x, 0.9, sde))
    assert spy.calls[-1][0] == 6 and den.nfe == 2
    # per-sample times straddling the interval: guided inside, conditional outside, still one call
    t = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 0.95], dtype=F64)
    inside = ((t >= 0.2) & (t <= 0.6))[:, None]
    ec, eu = (
        torch.stack([component(gmm, 1).eps(x[i : i + 1], t[i : i + 1], sde)[0] for i in range(6)]),
        gmm.eps(x, t, sde),
    )
    torch.testing.assert_close(cfg.eps(x, t), torch.where(inside, eu + 4.0 * (ec - eu), ec))
    assert den.nfe == 3


def test_cfg_per_sample_scale_and_float32():
    sde, gmm = sf.VPSDE(), mixture()
    x, t = points(sde, n=4, seed=4)
    den = sf.Denoiser(gmm_conditional_net(gmm, sde), sde)
    w = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=F64)
    got = ClassifierFreeGuidance(den, 0, scale=w).eps(x, t)
    for i in range(4):
        ref = ClassifierFreeGuidance(den, 0, scale=float(w[i])).eps(x[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], ref)
    out = ClassifierFreeGuidance(den, 0, scale=3.0).eps(x.float(), t)  # float32 state, float64 times
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ClassifierFreeGuidance(den, 0, 3.0).eps(x, t).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", sf.solvers.available())
def test_wrappers_work_with_every_solver(solver):
    """w = 1 samples exactly like the conditional model and w = 0 like the unconditional one, at the same nfe."""
    sde, gmm = sf.VPSDE(), mixture()
    den = sf.Denoiser(gmm_conditional_net(gmm, sde), sde)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64)

    def run(d):
        return sf.sample(d, solver, nfe=12, x_T=x_T, generator=torch.Generator().manual_seed(6))

    guided, cond = run(ClassifierFreeGuidance(den, 1, 1.0)), run(ConditionalDenoiser(den, 1))
    torch.testing.assert_close(guided.x, cond.x, rtol=1e-8, atol=1e-8)
    assert guided.nfe == cond.nfe
    torch.testing.assert_close(
        run(ClassifierFreeGuidance(den, 1, 0.0)).x, run(gmm.denoiser(sde)).x, rtol=1e-8, atol=1e-8
    )


def test_bad_arguments():
    sde, gmm = sf.VPSDE(), mixture()
    plain = gmm.denoiser(sde)
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(plain, 0, 2.0)
    den = sf.Denoiser(gmm_conditional_net(gmm, sde), sde)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(den, 0, 2.0, interval=(0.5, 0.2))
    x, t = points(sde, n=4)
    with pytest.raises(ValueError, match="y must be an int or have shape"):
        ClassifierFreeGuidance(den, torch.tensor([0, 1]), 2.0).eps(x, t)
    with pytest.raises(ValueError, match="integer class labels"):
        ConditionalDenoiser(den, torch.tensor([0.5] * 4)).eps(x, t)
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(den, 0, torch.ones(3)).eps(x, t)
    with pytest.raises(ValueError, match="logits"):
        ClassifierGuidance(plain, lambda x, t: x.sum(1), 0).eps(x, t)
    with pytest.raises(TypeError):
        ClassifierFreeGuidance(lambda x, t: x, 0)


# ---------------------------------------------------------------------------------------------- noise-aware classifier
def test_noise_aware_classifier_learns_the_exact_posterior():
    """Trained by cross-entropy on noisy data with the library's Trainer, p(y | x_t, t) approaches the exact one."""

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP: one thread is fastest, and immune to oversubscribed CI machines
    try:
        _train_and_compare()
    finally:
        torch.set_num_threads(threads)


def _train_and_compare():
    from sdeflow.training.data import TensorData

    sde, gmm = sf.VPSDE(), mixture()
    g = torch.Generator().manual_seed(7)
    counts = torch.multinomial(gmm.weights, 4096, replacement=True, generator=g).bincount(minlength=3)
    xs = [component(gmm, k).sample(int(n), g, dtype=torch.float32) for k, n in enumerate(counts)]
    ys = [torch.full((int(n),), k) for k, n in enumerate(counts)]
    data = TensorData(torch.cat(xs), torch.cat(ys))
    clf = NoiseAwareClassifier(2, 3, hidden=64, depth=2, time_dim=32)
    trainer = train_classifier(clf, sde, data, 400, batch_size=256, lr=3e-3, ema_decay=0.99, seed=0)
    x, t = points(sde, n=512, seed=8)
    x = gmm.sample(512, torch.Generator().manual_seed(9))
    x_t = sde.marginal(x, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(10), dtype=F64))
    with torch.no_grad():
        p = torch.softmax(trainer.ema(x_t.float(), t.float()).double(), 1)
    p_exact = torch.softmax(gmm_class_logits(gmm, sde)(x_t, t), 1)
    tv = 0.5 * (p - p_exact).abs().sum(1).mean()
    tv_prior = 0.5 * (gmm.weights - p_exact).abs().sum(1).mean()
    assert tv < 0.05 and tv < 0.2 * tv_prior, (float(tv), float(tv_prior))
    # the loss of the exact classifier is the Bayes cross-entropy: lower than the trained one's, both finite
    loss = ClassifierLoss(sde)
    gl = torch.Generator().manual_seed(11)
    y = torch.cat(ys)[:1024]
    x0 = torch.cat(xs)[:1024].double()
    perm = torch.randperm(x0.shape[0], generator=gl)
    exact_ce = loss(gmm_class_logits(gmm, sde), x0[perm], torch.Generator().manual_seed(12), y[perm])
    trained_ce = loss(
        lambda a, b: trainer.ema(a.float(), b.float()), x0[perm], torch.Generator().manual_seed(12), y[perm]
    )
    assert float(exact_ce) <= float(trained_ce) + 0.01 < float(exact_ce) + 0.05


# ---------------------------------------------------------------------------------------------- inversion
def gaussian(mu=(0.5, -1.0), std=0.8) -> sf.GaussianMixture:
    return sf.GaussianMixture(torch.tensor([mu], dtype=F64), torch.tensor([std], dtype=F64))


def exact_latent(gmm: sf.GaussianMixture, sde, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
    """The probability-flow map of N(mu, S^2 I) data: (x_t - a mu) / sqrt(a^2 S^2 + s^2) is constant in t."""
    mu, S = gmm.means[0], gmm.stds[0]

    def scale(t):
        a, s = float(sde.alpha(t)), float(sde.sigma(t))
        return a, torch.sqrt(a * a * S * S + s * s)

    a0, r0 = scale(t_from)
    a1, r1 = scale(t_to)
    return a1 * mu + r1 * (x - a0 * mu) / r0


def slope(ns, errs) -> float:
    lx, ly = torch.log(torch.tensor(ns, dtype=F64)), torch.log(torch.tensor(errs, dtype=F64))
    lx = lx - lx.mean()
    return -float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


@pytest.mark.parametrize("solver", [s for s in ("ddim", "euler", "heun", "dpm_solver++") if s in SOLVERS])
def test_encode_matches_the_exact_flow_at_the_solver_order(solver):
    sde, gmm = sf.VPSDE(), gaussian()
    x0 = gmm.sample(16, torch.Generator().manual_seed(13))
    z = exact_latent(gmm, sde, x0, sde.eps, sde.T)
    stepper = make_stepper(gmm.denoiser(sde), solver)
    order, per_step = stepper.order, SOLVERS[solver].nfe_per_step
    ns = [16 // per_step, 32 // per_step, 64 // per_step, 128 // per_step]  # steps at NFE 16..128
    errs = [float((encode(gmm.denoiser(sde), x0, solver, n * per_step).x - z).abs().max()) for n in ns]
    assert abs(slope(ns, errs) - order) < 0.3, errs
    # the round trip through decode also converges at the solver's order
    den = mixture().denoiser(sde)
    x0 = mixture().sample(16, torch.Generator().manual_seed(14))
    errs, ns = [], ns[:3]
    for n in ns:
        k = n * per_step
        errs.append(float((decode(den, encode(den, x0, solver, k).x, solver, k).x - x0).norm(dim=1).mean()))
    # at least the solver's order (Heun's round trip gains one: its leading local errors cancel going back)
    assert slope(ns, errs) > order - 0.3, errs


def test_encode_partial_span_and_nfe():
    sde, gmm = sf.VESDE(0.01, 50.0), gaussian()
    x0 = gmm.sample(8, torch.Generator().manual_seed(15))
    den = gmm.denoiser(sde)
    res = encode(den, x0, "ddim", 200, grid="logsnr", t_noise=0.5)
    assert res.nfe == 200 and float(res.times[0]) == sde.eps and float(res.times[-1]) == 0.5
    torch.testing.assert_close(res.x, exact_latent(gmm, sde, x0, sde.eps, 0.5), rtol=2e-2, atol=2e-2)


class _StepDoublingDDIM(DDIM):
    """DDIM made adaptive by the driver's step doubling (tests solve_adaptive forward in time without rk45)."""

    name = "ddim_adaptive"
    options = {"eta": 0.0, "rtol": 1e-3, "atol": 1e-3, "h0": None}

    @property
    def tolerances(self) -> Tolerances:  # declaring tolerances makes the sampling layer run the adaptive driver
        return Tolerances(float(self.opts["rtol"]), float(self.opts["atol"]), self.opts["h0"])


def test_adaptive_encode_forward_in_time():
    sde, gmm = sf.VPSDE(), gaussian()
    x0 = gmm.sample(8, torch.Generator().manual_seed(16))
    den = gmm.denoiser(sde)
    errs = []
    for tol in (1e-3, 1e-4):  # step doubling on an order-1 step: global error ~ tol^(1/2)
        res = encode(den, x0, _StepDoublingDDIM(den, rtol=tol, atol=tol))
        assert torch.all(res.times == sde.T)
        errs.append(float((res.x - exact_latent(gmm, sde, x0, sde.eps, sde.T)).abs().max()))
    assert errs[1] < 0.5 * errs[0] and errs[1] < 0.03, errs


@pytest.mark.skipif("rk45" not in SOLVERS, reason="rk45 not available")
def test_rk45_round_trip_below_1e_4():
    sde, gmm = sf.VPSDE(), mixture()
    x0 = gmm.sample(16, torch.Generator().manual_seed(17))
    den = gmm.denoiser(sde)
    z = encode(den, x0, "rk45", rtol=1e-8, atol=1e-8)
    back = decode(den, z.x, "rk45", rtol=1e-8, atol=1e-8)
    assert float((back.x - x0).abs().max()) < 1e-4
    g = gaussian()
    x0 = g.sample(16, torch.Generator().manual_seed(18))
    z = encode(g.denoiser(sde), x0, "rk45", rtol=1e-8, atol=1e-8).x
    assert float((z - exact_latent(g, sde, x0, sde.eps, sde.T)).abs().max()) < 1e-4


def test_inversion_rejects_stochastic_solvers():
    sde, gmm = sf.VPSDE(), gaussian()
    x0 = gmm.sample(4)
    with pytest.raises(ValueError, match="stochastic"):
        encode(gmm.denoiser(sde), x0, "ddpm", 10)
    with pytest.raises(ValueError, match="stochastic"):
        decode(gmm.denoiser(sde), x0, "ddim", 10, eta=1.0)
    with pytest.raises(ValueError, match="t_data"):
        encode(gmm.denoiser(sde), x0, "ddim", 10, t_data=0.5, t_noise=0.4)


# ---------------------------------------------------------------------------------------------- interpolation
def test_slerp_geometry():
    g = torch.Generator().manual_seed(19)
    z0, z1 = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, generator=g, dtype=F64)
    z1 = z1 * (z0.flatten(1).norm(dim=1) / z1.flatten(1).norm(dim=1))[:, None, None]  # equal norms
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    f0, f1 = z0.flatten(1), z1.flatten(1)
    theta = torch.arccos((f0 * f1).sum(1) / (f0.norm(dim=1) * f1.norm(dim=1)))
    alpha = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=F64)
    zm = slerp(z0, z1, alpha).flatten(1)
    torch.testing.assert_close(zm.norm(dim=1), f0.norm(dim=1))  # stays on the sphere
    ang = torch.arccos((zm * f0).sum(1) / (zm.norm(dim=1) * f0.norm(dim=1)))
    torch.testing.assert_close(ang, alpha * theta)  # constant angular speed
    # (nearly) parallel: the linear limit, finite
    par = slerp(z0, 2 * z0, 0.25)
    torch.testing.assert_close(par, 1.25 * z0)
    with pytest.raises(ValueError, match="same shape"):
        slerp(z0, z1[:, :2], 0.5)
    with pytest.raises(ValueError, match="alpha"):
        slerp(z0, z1, torch.ones(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["z0", "z1", "alpha"])
def test_slerp_rejects_non_finite_input(where, bad):
    g = torch.Generator().manual_seed(21)
    args = {"z0": torch.randn(4, 3, generator=g, dtype=F64), "z1": torch.randn(4, 3, generator=g, dtype=F64)}
    args["alpha"] = torch.full((4,), 0.5, dtype=F64)
    args[where] = args[where].clone()
    args[where].view(-1)[1] = bad
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        slerp(args["z0"], args["z1"], args["alpha"])


def test_interpolate_endpoints_reconstruct():
    sde, gmm = sf.VPSDE(), mixture()
    g = torch.Generator().manual_seed(20)
    xa, xb = gmm.sample(3, g), gmm.sample(3, g)
    den = gmm.denoiser(sde)
    out = interpolate(den, xa, xb, [0.0, 0.5, 1.0], "ddim", 100, grid="logsnr")
    assert out.shape == (3, 3, 2)
    roundtrip = decode(den, encode(den, xa, "ddim", 100, grid="logsnr").x, "ddim", 100, grid="logsnr").x
    torch.testing.assert_close(out[0], roundtrip)
    assert float((out[0] - xa).abs().max()) < 0.2 and float((out[2] - xb).abs().max()) < 0.2
