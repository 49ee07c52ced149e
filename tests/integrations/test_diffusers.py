"""sdeflow against diffusers on the same tiny random UNet and the same noise (diffusers is a dev dependency; nothing
is downloaded): schedules, timestep spacings, solvers on diffusers' grids, SdeflowScheduler inside DDPMPipeline,
diffusers' schedulers as sdeflow solvers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sdeflow as sf
from sdeflow.grids import time_grid

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from sdeflow.integrations import diffusers as sfd  # noqa: E402
from sdeflow.integrations import from_diffusers  # noqa: E402


def tiny_unet(out_channels: int = 3, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet()


@pytest.fixture(scope="module")
def x_T() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def diffusers_loop(unet, sched, n: int, x: torch.Tensor) -> torch.Tensor:
    """diffusers' sampling loop: one model call and one step per timestep, from x (in sdeflow's variables)."""
    sched.set_timesteps(n)
    if isinstance(sched, EulerDiscreteScheduler):  # EDM-scaled state x / a(T) (diffusers' trailing init_noise_sigma
        x = x * float((sched.sigmas.max() ** 2 + 1) ** 0.5)  # is sigma_max, 2e-5 away from 1 / a(T))
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            x = sched.step(unet(inp, t).sample, t, x).prev_sample
    return x


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------------ schedules
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_match_diffusers(schedule, zero_snr):
    sched = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    sde = sfd.diffusers_sde(sched)
    assert isinstance(sde, sf.DiscreteVPSDE) and sde.N == 1000 and sde.zero_terminal_snr == zero_snr
    # diffusers keeps float32 tables
    torch.testing.assert_close(sde.betas, sched.betas.double(), rtol=0, atol=5e-6)
    torch.testing.assert_close(sde.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=1e-6)


def test_flow_scheduler_builds_the_shifted_flow_path():
    sde = sfd.diffusers_sde(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert isinstance(sde, sf.sdes.FlowMatchingPath) and sde.shift == 3.0
    with pytest.raises(ValueError, match="shift"):
        sfd.diffusers_sde(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(ValueError, match="beta_schedule"):
        sfd.diffusers_betas({"beta_schedule": "quadratic"})


@given(
    steps=st.integers(1, 60),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    N=st.sampled_from([100, 1000]),
    offset=st.sampled_from([0, 1]),
)
def test_named_spacings_are_diffusers_timesteps(steps, spacing, N, offset):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=N, timestep_spacing=spacing, steps_offset=offset, final_sigmas_type="sigma_min"
    )
    sched.set_timesteps(steps)
    sde = sf.DiscreteVPSDE.linear(N)
    try:
        ours = time_grid(sde, steps, spacing, steps_offset=offset)
    except ValueError:  # diffusers' own grid repeats timestep 0 then: sdeflow refuses a non-decreasing grid
        assert int(sched.timesteps.min()) == 0
        return
    assert torch.equal(ours[:-1], (sched.timesteps.double() + 1) / N)
    assert float(ours[-1]) == 1.0 / N
    assert float(time_grid(sde, steps, spacing, t_end=0.0, steps_offset=offset)[-1]) == 0.0


def test_named_spacings_refuse_continuous_paths():
    with pytest.raises(ValueError, match="discrete"):
        time_grid(sf.VPSDE(), 10, "trailing")


# ------------------------------------------------------------------------------------------------ the model
def test_from_diffusers_model_contract(unet, x_T):
    den = from_diffusers(unet, DDPMScheduler())
    assert den.prediction == "eps" and den.sde.N == 1000
    t = torch.full((2,), 500 / 1000, dtype=torch.float64)  # timestep 499
    with torch.no_grad():
        torch.testing.assert_close(den.eps(x_T, t), unet(x_T, torch.tensor(499)).sample)
    assert from_diffusers(unet, {"prediction_type": "v_prediction"}).prediction == "v"
    assert from_diffusers(unet, DDPMScheduler(prediction_type="sample")).prediction == "x0"
    wide = tiny_unet(out_channels=6)
    den_w = from_diffusers(wide, DDPMScheduler(variance_type="learned_range"))
    assert den_w.learned_variance
    with torch.no_grad():
        torch.testing.assert_close(den_w.eps(x_T, 0.5), wide(x_T, torch.tensor(499)).sample[:, :3])
    with pytest.raises(TypeError, match="scheduler"):
        from_diffusers(unet, 3)


def test_from_diffusers_passes_keywords_to_the_model(x_T):
    seen = {}

    def model(x, timestep, encoder_hidden_states=None):
        seen["ehs"] = encoder_hidden_states
        seen["t"] = timestep
        return (x * 0.5,)

    den = from_diffusers(model, DDPMScheduler())
    ehs = torch.randn(2, 4, 8)
    den.eps(x_T, 1.0, encoder_hidden_states=ehs)
    assert seen["ehs"] is ehs and torch.equal(seen["t"], torch.full((2,), 999.0))


# ------------------------------------------------------------------------------------------------ same grids, same results
CASES = {
    "DDIM": (lambda: DDIMScheduler(timestep_spacing="trailing", clip_sample=False), "ddim", {}),
    "DDIM-leading": (lambda: DDIMScheduler(clip_sample=False, steps_offset=1), "ddim", {}),
    "DPMSolverMultistep": (
        lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        "dpm_solver++",
        {"order": 2},
    ),
    "DPMSolverMultistep-cosine-v": (
        lambda: DPMSolverMultistepScheduler(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            final_sigmas_type="sigma_min",
        ),
        "dpm_solver++",
        {"order": 2},
    ),
    "UniPC": (
        lambda: UniPCMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        "unipc",
        {"order": 2, "variant": "bh2"},
    ),
    "Euler": (lambda: EulerDiscreteScheduler(timestep_spacing="trailing"), "ddim", {}),
    "DDIM-zero-snr-v": (
        lambda: DDIMScheduler(
            rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
        ),
        "ddim",
        {},
    ),
    "FlowMatchEuler": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), "ddim", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdeflow_on_diffusers_grid_matches_diffusers(case, unet, x_T):
    """Euler in EDM's sigma and FlowMatchEuler are DDIM steps in sdeflow's variables (the exponential integrator of
    order 1 is exact for the linear part); DPM-Solver++(2M) and UniPC-bh2 are the same methods. (diffusers' 3M uses
    its own finite-difference formula, sdeflow's the exact 3-node quadrature: they differ at O(h^4) by design.)"""
    make, solver, opts = CASES[case]
    n = 10
    sched = make()
    den = from_diffusers(unet, sched)
    grid = sfd.diffusers_grid(sched, n, den.sde)
    x_start = x_T * den.sde.sigma(grid[0]).item() if not isinstance(den.sde, sf.DiscreteVPSDE) else x_T
    theirs = diffusers_loop(unet, make(), n, x_start)
    with torch.no_grad():
        ours = sf.sample(den, solver, nfe=n, x_T=x_start, grid=grid, t_start=float(grid[0]), **opts)
    assert ours.nfe == n
    assert rel(ours.x, theirs) < 1e-5


def test_trailing_by_name_is_diffusers(unet, x_T):
    """sf.sample(grid="trailing") reproduces DPMSolverMultistep(timestep_spacing="trailing") by name."""
    make = lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="sigma_min")
    den = from_diffusers(unet, make())
    with torch.no_grad():
        ours = sf.sample(den, "dpm_solver++", nfe=8, x_T=x_T, grid="trailing", order=2)
    assert rel(ours.x, diffusers_loop(unet, make(), 8, x_T)) < 1e-5


# ------------------------------------------------------------------------------------------------ sdeflow inside diffusers
@pytest.mark.parametrize(
    "solver,opts", [("ddim", {}), ("dpm_solver++", {}), ("unipc", {"order": 3}), ("euler", {}), ("heun", {})]
)
def test_sdeflow_scheduler_in_ddpm_pipeline_equals_sample(solver, opts, unet):
    sched = sfd.SdeflowScheduler.from_scheduler(DDPMScheduler(), solver=solver, **opts)
    finals = []
    step = sched.step

    def recording_step(*args, **kwargs):  # the pipeline clamps its output to [0, 1]: compare the state itself
        out = step(*args, **kwargs)
        finals.append(out.prev_sample)
        return out

    sched.step = recording_step
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    nfe = 8
    pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=nfe, output_type="np")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sf.sample(from_diffusers(unet, DDPMScheduler()), solver, nfe=nfe, x_T=x_T, **opts)
    assert len(finals) == len(sched.timesteps) == ref.nfe
    # heun evaluates its first point at a(T) (x_T / a(T)): one rounding away from the pipeline's x_T
    assert rel(finals[-1], ref.x) < (1e-6 if solver == "heun" else 1e-7)


def test_sdeflow_scheduler_api():
    base = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sched = sfd.SdeflowScheduler.from_scheduler(base, solver="unipc", order=3, grid="trailing")
    assert sched.config.solver == "unipc" and sched.config.solver_options == {"order": 3}
    again = sfd.SdeflowScheduler.from_config(sched.config)
    sched.set_timesteps(6)
    again.set_timesteps(6)
    assert torch.equal(sched.timesteps, again.timesteps) and sched.timesteps.dtype == torch.int64
    assert sched.timesteps[0] == 999 and len(sched.timesteps) == 6
    assert sched.init_noise_sigma == sched.sde.prior_std() == pytest.approx(1.0, abs=1e-8)
    assert sched.order == 1
    x0, noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([10, 700])
    torch.testing.assert_close(sched.add_noise(x0, noise, ts), base.add_noise(x0, noise, ts))
    x = torch.randn(2, 3)
    assert sched.scale_model_input(x, ts[0]) is x
    with pytest.raises(ValueError, match="expected timestep"):
        sched.step(torch.zeros(2, 3), 5, x)
    flow = sfd.SdeflowScheduler.from_scheduler(
        FlowMatchEulerDiscreteScheduler(shift=3.0), solver="ddim", grid="uniform"
    )
    flow.set_timesteps(4)
    assert float(flow.timesteps[0]) == 1000.0 and flow.timesteps.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ diffusers inside sdeflow
@pytest.mark.parametrize(
    "make,solver,opts",
    [
        (
            lambda: DPMSolverMultistepScheduler(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
            "dpm_solver++",
            {"order": 2},
        ),
        (lambda: EulerDiscreteScheduler(timestep_spacing="trailing"), "ddim", {}),
    ],
)
def test_diffusers_solver_runs_diffusers_schedulers_under_sample(make, solver, opts, unet, x_T):
    den = from_diffusers(unet, DDPMScheduler())
    with torch.no_grad():
        theirs = sf.sample(den, sfd.DiffusersSolver(den, scheduler=make()), nfe=10, x_T=x_T)
        ours = sf.sample(den, solver, nfe=10, x_T=x_T, grid=sfd.diffusers_grid(make(), 10), **opts)
    assert theirs.nfe == 10
    assert np.isclose(float(theirs.times[-1]), float(ours.times[-1]))
    assert rel(theirs.x, ours.x) < 1e-5


def test_sdeflow_scheduler_stochastic_and_zero_snr(unet):
    """A stochastic solver draws its noise from the pipeline's generator (reproducible); a zero-terminal-SNR
    v-prediction model samples with DDIM on the trailing grid from T (where a = 0) without NaN."""
    for base, solver, opts in [
        (DDPMScheduler(), "ddpm", {}),
        (
            DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
            "ddim",
            {"grid": "trailing"},
        ),
    ]:
        outs = []
        for _ in range(2):
            sched = sfd.SdeflowScheduler.from_scheduler(base, solver=solver, **opts)
            pipe = DDPMPipeline(unet=unet, scheduler=sched)
            pipe.set_progress_bar_config(disable=True)
            gen = torch.Generator().manual_seed(4)
            outs.append(pipe(batch_size=2, generator=gen, num_inference_steps=6, output_type="np").images)
        assert np.isfinite(outs[0]).all() and np.array_equal(outs[0], outs[1])
    assert sched.sde.zero_terminal_snr and float(sched.grid[0]) == 1.0
