"""The main job behind `make demo` (foundation stage): build every SDE, sample the analytic oracle, print marginals."""

from __future__ import annotations

import torch

import sdeflow as sf


def main() -> None:
    sdes = {
        "VP linear": sf.VPSDE(0.1, 20.0, "linear"),
        "VP cosine": sf.VPSDE(schedule="cosine"),
        "VP sigmoid": sf.VPSDE(schedule="sigmoid"),
        "sub-VP": sf.SubVPSDE(0.1, 20.0),
        "VE": sf.VESDE(0.01, 50.0),
        "DDPM linear (1000)": sf.DiscreteVPSDE.linear(1000),
        "DDPM cosine (1000)": sf.DiscreteVPSDE.cosine(1000),
    }
    gmm = sf.GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0]]), torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.6]))
    g = torch.Generator().manual_seed(0)
    x0 = gmm.sample(4096, generator=g)
    print(f"data: mean {gmm.mean().numpy().round(3)}, empirical {x0.mean(0).numpy().round(3)}")
    header = f"{'SDE':<20} {'t':>6} {'a(t)':>9} {'s(t)':>9} {'logSNR':>8} {'E|x_t|^2 exact':>15} {'sampled':>9}"
    print(header)
    print("-" * len(header))
    for name, sde in sdes.items():
        for t in (sde.eps, 0.5 * sde.T, sde.T):
            tt = torch.tensor(t, dtype=torch.float64)
            a, s = float(sde.alpha(tt)), float(sde.sigma(tt))
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            xt = sde.marginal(x0, tt, noise)
            second = a**2 * float((gmm.covariance().trace() + gmm.mean().pow(2).sum())) + 2 * s**2
            print(
                f"{name:<20} {t:>6.3g} {a:>9.4g} {s:>9.4g} {float(sde.log_snr(tt)):>8.3f} {second:>15.4g} "
                f"{float(xt.pow(2).sum(1).mean()):>9.4g}"
            )
        lp = gmm.marginal_log_prob(x0[:4], sde.eps, sde)
        print(f"{'':<20} log p_eps(x0[:4]) = {lp.numpy().round(3)}")


if __name__ == "__main__":
    main()
