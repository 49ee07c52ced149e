r"""diffusers interop, both ways: diffusers models sample through sdeflow, sdeflow's solvers run inside diffusers.

* :func:`from_diffusers` turns a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, any module whose output
  has ``.sample``, or a plain callable) plus its scheduler (an instance or its config dict) into a
  :class:`~sdeflow.Denoiser`: the DDPM betas (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``trained_betas``,
  ``rescale_betas_zero_snr``) become a :class:`~sdeflow.sdes.DiscreteVPSDE` in the DPM-Solver time convention
  (timestep n at t = (n + 1)/N, Lu et al. 2022, App. D), flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``
  with ``shift``) a :class:`~sdeflow.sdes.FlowMatchingPath`, and ``prediction_type`` the Denoiser's prediction.
* :func:`diffusers_grid` gives the times a diffusers scheduler visits as a sdeflow grid, so that any sdeflow solver
  runs on exactly diffusers' schedule.
* :class:`SdeflowScheduler` is a diffusers scheduler (``set_timesteps`` / ``step`` / ``scale_model_input`` /
  ``add_noise`` / ``timesteps`` / ``init_noise_sigma`` / ``order`` / ``from_config`` / :meth:`~SdeflowScheduler.
  from_scheduler`) that drives a sdeflow stepper one model call per ``step``, so an unchanged pipeline
  (``DDPMPipeline(unet, scheduler)``) samples with sdeflow's solvers and returns what :func:`sdeflow.sample` returns
  on the same noise.
* :class:`DiffusersSolver` is the reverse: a diffusers scheduler as a sdeflow solver, to sweep it next to sdeflow's
  solvers under one NFE count.

Nothing is downloaded; diffusers is needed only for :class:`SdeflowScheduler` (it subclasses diffusers'
``SchedulerMixin`` / ``ConfigMixin``) and :class:`DiffusersSolver`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from ..denoiser import Denoiser, canonical_prediction
from ..grids import time_grid
from ..sampling import DEFAULT_SOLVER
from ..sdes import DiscreteVPSDE, FlowMatchingPath, GaussianSDE
from ..solvers import SOLVERS
from ..solvers.base import Integrator, Stepper
from ..solvers.record import SampleResult

__all__ = [
    "from_diffusers",
    "scheduler_config",
    "diffusers_betas",
    "diffusers_sde",
    "diffusers_grid",
    "DiffusersNet",
    "SdeflowScheduler",  # noqa: F822 (created on first access: it subclasses diffusers classes)
    "DiffusersSolver",
]

F64 = torch.float64
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


# ------------------------------------------------------------------------------------------------ configs
def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config as a plain dict (with ``_class_name``), from an instance or a config mapping."""
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(f"scheduler must be a diffusers scheduler or its config dict, got {type(scheduler).__name__}")
    out = dict(config)
    out.setdefault("_class_name", type(scheduler).__name__)
    return out


def is_flow_config(config: Mapping[str, Any]) -> bool:
    """A flow-matching scheduler (FlowMatch*), or a DPM-Solver/UniPC config with ``use_flow_sigmas`` /
    ``prediction_type="flow_prediction"``."""
    name = str(config.get("_class_name", ""))
    return (
        name.startswith("FlowMatch")
        or bool(config.get("use_flow_sigmas", False))
        or config.get("prediction_type") == "flow_prediction"
    )


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that its last value is 0 (float64)."""
    abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * (a0 / (a0 - aT))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def diffusers_betas(config: Mapping[str, Any]) -> torch.Tensor:
    r"""diffusers' DDPM betas from a scheduler config, in float64.

    ``trained_betas`` as given; ``"linear"``: linspace(beta_start, beta_end, N); ``"scaled_linear"``:
    linspace(sqrt(beta_start), sqrt(beta_end), N)^2 (Stable Diffusion); ``"squaredcos_cap_v2"``: improved DDPM's cosine
    (Nichol & Dhariwal 2021, eq. 17, beta <= 0.999); then ``rescale_betas_zero_snr`` (Lin et al. 2024).
    """
    N = int(config.get("num_train_timesteps", 1000))
    if N < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {N}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.as_tensor(np.asarray(trained), dtype=F64).flatten()
    else:
        kind = config.get("beta_schedule", "linear")
        b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(b0, b1, N, dtype=F64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, N, dtype=F64) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = DiscreteVPSDE.cosine(N).betas.clone()
        else:
            raise ValueError(
                f"beta_schedule={kind!r} is not supported; allowed values: {', '.join(map(repr, BETA_SCHEDULES))} "
                "(or trained_betas)"
            )
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _flow_shift(config: Mapping[str, Any], shift: float | None) -> float:
    if shift is not None:
        return float(shift)
    if config.get("use_dynamic_shifting", False):
        raise ValueError(
            "the scheduler uses a resolution-dependent shift (use_dynamic_shifting=True, shift = exp(mu)): pass the "
            "shift for your image size explicitly, from_diffusers(model, scheduler, shift=...)"
        )
    return float(config.get("shift", config.get("flow_shift", 1.0)))


def diffusers_sde(scheduler: Any, *, shift: float | None = None) -> GaussianSDE:
    """The sdeflow path of a diffusers scheduler: :class:`DiscreteVPSDE` from its betas, or
    :class:`FlowMatchingPath` (with its ``shift``) for flow-matching schedulers."""
    config = scheduler_config(scheduler)
    if is_flow_config(config):
        return FlowMatchingPath(shift=_flow_shift(config, shift))
    return DiscreteVPSDE(diffusers_betas(config))


# ------------------------------------------------------------------------------------------------ the model
def _round_near_integers(v: torch.Tensor) -> torch.Tensor:
    # the float time t = (n + 1)/N maps back to n up to float rounding: hand the net the exact integer timestep
    r = torch.round(v)
    return torch.where((v - r).abs() < 1e-3, r, v)


class DiffusersNet:
    r"""A diffusers model as a sdeflow net ``net(x, timestep, **kwargs) -> tensor``.

    Unwraps ``.sample`` outputs and ``return_dict=False`` tuples, and for shifted flow paths turns the model's
    velocity in diffusers' noise level :math:`\sigma` (:math:`\varepsilon - x_0`) into the velocity in sdeflow's time
    t: :math:`u_t = \sigma'(t)(\varepsilon - x_0)`, :math:`\sigma'(t) = (k - (k-1)\sigma)^2 / k` (shift k).
    """

    def __init__(self, model: Callable[..., Any], num_train_timesteps: int, flow_shift: float | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model, self.N, self.flow_shift = model, int(num_train_timesteps), flow_shift

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(x, timestep, **kwargs)
        if not isinstance(out, torch.Tensor):
            sample = getattr(out, "sample", None)
            out = sample if isinstance(sample, torch.Tensor) else out[0] if isinstance(out, (tuple, list)) else out
        if self.flow_shift is not None and self.flow_shift != 1.0 and isinstance(out, torch.Tensor):
            k = self.flow_shift
            sigma = (timestep / self.N).to(out.dtype)
            scale = (k - (k - 1) * sigma) ** 2 / k
            out = out * scale.reshape(-1, *([1] * (out.ndim - 1)))
        return out

    @property
    def num_classes(self) -> int | None:
        return getattr(self.model, "num_classes", None)


def from_diffusers(
    model: Callable[..., Any],
    scheduler: Any,
    *,
    prediction: str | None = None,
    shift: float | None = None,
    learned_variance: bool | None = None,
) -> Denoiser:
    r"""A :class:`~sdeflow.Denoiser` for a diffusers model and its scheduler (an instance or its config dict).

    Args:
        model: a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``, any module returning an object with
            ``.sample``) or a plain callable ``model(x, timestep, **kwargs)``; keyword arguments given to the Denoiser
            (e.g. ``encoder_hidden_states=``) are passed through.
        scheduler: the scheduler the model was trained with, or its config (``scheduler.config`` /
            ``scheduler_config.json`` contents); only its schedule and ``prediction_type`` are used.
        prediction: override the config's ``prediction_type`` (sdeflow's or diffusers' names).
        shift: the flow-matching shift (required when the config uses ``use_dynamic_shifting``).
        learned_variance: the model returns 2C channels (default: from ``variance_type`` "learned"/"learned_range"
            or ``model.config.out_channels == 2 * in_channels``).

    The model receives diffusers' timesteps: DDPM models the integer timestep n = t N - 1 (exact integers on
    diffusers' grids, float in between), flow models :math:`\sigma(t) N`, as diffusers' schedulers pass them.
    """
    config = scheduler_config(scheduler)
    N = int(config.get("num_train_timesteps", 1000))
    sde = diffusers_sde(config, shift=shift)
    if prediction is None:
        prediction = "flow" if is_flow_config(config) else str(config.get("prediction_type", "epsilon"))
    prediction = canonical_prediction(prediction)
    if isinstance(sde, FlowMatchingPath):
        if prediction != "flow":
            raise ValueError(f"flow-matching schedulers predict the velocity (prediction='flow'), got {prediction!r}")
        net = DiffusersNet(model, N, flow_shift=sde.shift)

        def time_input(t: torch.Tensor) -> torch.Tensor:
            return sde.shifted(t) * N

    else:
        if prediction == "flow":
            raise ValueError("prediction='flow' needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler)")
        net = DiffusersNet(model, N)

        def time_input(t: torch.Tensor) -> torch.Tensor:
            return _round_near_integers(t * N - 1)

    if learned_variance is None:
        mconf = getattr(model, "config", None)
        in_c, out_c = getattr(mconf, "in_channels", None), getattr(mconf, "out_channels", None)
        learned_variance = config.get("variance_type") in ("learned", "learned_range") or (
            isinstance(in_c, int) and out_c == 2 * in_c
        )
    return Denoiser(net, sde, prediction, time_input=time_input, learned_variance=bool(learned_variance))


# ------------------------------------------------------------------------------------------------ grids
def _timestep_to_time(sde: GaussianSDE, timesteps: torch.Tensor, N: int) -> torch.Tensor:
    ts = timesteps.detach().cpu().to(F64)
    if isinstance(sde, FlowMatchingPath):
        return sde.unshifted(ts / N)
    return (ts + 1.0) / N


def diffusers_grid(scheduler: Any, num_inference_steps: int, sde: GaussianSDE | None = None) -> torch.Tensor:
    """The float64 sdeflow times a configured diffusers scheduler visits for ``num_inference_steps`` (its
    ``timesteps`` then its final step), for ``sf.sample(..., grid=diffusers_grid(...))``.

    DDPM-type schedulers: timestep n -> t = (n + 1)/N; the final step is t = 0 for ``final_sigmas_type="zero"``
    (DPMSolverMultistep, UniPC, Euler) and DDIM's ``set_alpha_to_one=True``, and t = 1/N (timestep 0) for
    ``"sigma_min"`` / ``set_alpha_to_one=False``. Flow schedulers: sigma = timestep / N, t = the unshifted sigma.
    Calls ``scheduler.set_timesteps`` (a configured instance is required).
    """
    if isinstance(scheduler, Mapping):
        raise TypeError("diffusers_grid needs a scheduler instance (it calls set_timesteps), not a config dict")
    config = scheduler_config(scheduler)
    N = int(config.get("num_train_timesteps", 1000))
    sde = sde if sde is not None else diffusers_sde(config)
    scheduler.set_timesteps(num_inference_steps)
    return _visited_times(scheduler, config, N, sde)


def _visited_times(scheduler: Any, config: Mapping[str, Any], N: int, sde: GaussianSDE) -> torch.Tensor:
    times = _timestep_to_time(sde, torch.as_tensor(scheduler.timesteps), N)
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sde, FlowMatchingPath):
        last = float(sigmas[-1]) if sigmas is not None else 0.0
        final = float(sde.unshifted(torch.tensor(last, dtype=F64)))
    elif sigmas is not None and "final_alpha_cumprod" not in vars(scheduler):
        final = 0.0 if float(sigmas[-1]) == 0.0 else 1.0 / N
    else:  # DDIM: the last step goes to prev = t - N // steps, or to final_alpha_cumprod below 0
        prev = int(scheduler.timesteps[-1]) - N // int(scheduler.num_inference_steps)
        final = (prev + 1.0) / N if prev >= 0 else (0.0 if config.get("set_alpha_to_one", True) else 1.0 / N)
    return torch.cat([times, torch.tensor([final], dtype=F64)])


# ------------------------------------------------------------------------------------------------ steppers
class _Drive:
    """The one place that talks to sdeflow's stepper contract (``SOLVERS[name](den, **opts)``, ``init(x, grid)``,
    ``step(t0, t1, x, state, noise) -> .x, .state``, ``num_steps(nfe)``, ``noise_draws``, ``default_grid``)."""

    def __init__(self, den: Denoiser, solver: str | Stepper, options: Mapping[str, Any]) -> None:
        if isinstance(solver, Stepper):
            if options:
                raise ValueError("pass solver options to the stepper's constructor, not with a stepper instance")
            self.stepper = solver
        else:
            if solver not in SOLVERS:
                raise ValueError(f"unknown solver {solver!r}; available solvers: {', '.join(sorted(SOLVERS))}")
            made = SOLVERS[solver](den, **dict(options))
            if not isinstance(made, Stepper):
                raise ValueError(f"solver {made.name!r} does not step along a fixed grid; it cannot drive a scheduler")
            self.stepper = made
        s = self.stepper
        if s.integrator() is not None or s.tolerances is not None:
            raise ValueError(f"solver {s.name!r} does not step along a fixed grid; it cannot drive a scheduler")

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        return int(self.stepper.num_steps(nfe, t_end))

    @property
    def default_grid(self) -> str:
        return str(getattr(self.stepper, "default_grid", "uniform"))

    @property
    def noise_draws(self) -> int:
        return int(self.stepper.noise_draws)

    def init(self, x: torch.Tensor, grid: torch.Tensor) -> Any:
        return self.stepper.init(x, grid)

    def step(
        self, t0: torch.Tensor, t1: torch.Tensor, x: torch.Tensor, state: Any, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        res = self.stepper.step(t0, t1, x, state, noise)
        return res.x, res.state


class _NeedEval(Exception):
    def __init__(self, x: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__("model evaluation needed")
        self.x, self.t = x, t


class _Replay:
    """A net that returns the model outputs handed to the scheduler, in call order, and raises :class:`_NeedEval` at
    the first call it has no output for (the scheduler then returns that call's input as ``prev_sample``)."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.k = 0
        self.recording = False

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.recording:  # dry run: record the call, answer zeros
            self.inputs.append((x, timestep))
            return torch.zeros_like(x)
        if self.k < len(self.outputs):
            out = self.outputs[self.k]
            self.k += 1
            return out
        raise _NeedEval(x, timestep)


def _check_diffusers() -> tuple[Any, Any, Any, Any]:
    try:
        from diffusers.configuration_utils import ConfigMixin, register_to_config
        from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    except ImportError as exc:  # pragma: no cover - diffusers is a test dependency
        raise ImportError(
            "SdeflowScheduler and DiffusersSolver need diffusers (pip install 'sdeflow[dev]' or diffusers)"
        ) from exc
    return ConfigMixin, register_to_config, SchedulerMixin, SchedulerOutput


def _make_scheduler_class() -> type:
    ConfigMixin, register_to_config, SchedulerMixin, SchedulerOutput = _check_diffusers()

    class SdeflowScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc, valid-type]  # diffusers' mixins are untyped
        r"""A diffusers scheduler that runs a sdeflow solver, one model call per :meth:`step`.

        ``set_timesteps(n)`` takes ``n`` as the NFE budget (what ``sf.sample(nfe=n)`` takes: heun makes at most n model
        calls, not n steps) and builds the grid ``sf.sample`` builds: ``grid`` (a sdeflow grid name, diffusers'
        spacing ``"leading" | "trailing" | "linspace"``, or None for the solver's default) from ``sde.T`` to
        ``t_end`` (None: ``sde.eps``; 0 is diffusers' ``final_sigmas_type="zero"``). ``timesteps`` are then the
        model's time arguments of every model call, in order (diffusers' integer timesteps on DDPM grids, sigma * N
        for flow models), and each :meth:`step` hands the model output to the stepper and returns the state the
        next model call needs as ``prev_sample``: the next grid state, or a solver's intermediate point (heun).

        The schedule comes from the usual diffusers keys (``num_train_timesteps``, ``beta_*``, ``trained_betas``,
        ``rescale_betas_zero_snr``, ``prediction_type``, ``shift`` for flow models), so :meth:`from_scheduler` and
        ``from_config`` take any DDPM-type or flow-matching scheduler's config.
        """

        order = 1
        _compatibles: list[str] = []

        @register_to_config
        def __init__(
            self,
            num_train_timesteps: int = 1000,
            beta_start: float = 0.0001,
            beta_end: float = 0.02,
            beta_schedule: str = "linear",
            trained_betas: Any = None,
            prediction_type: str = "epsilon",
            rescale_betas_zero_snr: bool = False,
            flow: bool = False,
            shift: float = 1.0,
            solver: str = DEFAULT_SOLVER,
            solver_options: dict[str, Any] | None = None,
            grid: str | None = None,
            t_end: float | None = None,
            steps_offset: int = 0,
        ) -> None:
            cfg = dict(self.config)
            if flow:
                cfg["_class_name"] = "FlowMatchEulerDiscreteScheduler"
            self._replay = _Replay()
            self.den = from_diffusers(self._replay, cfg, shift=shift if flow else None)
            self.sde = self.den.sde
            self._drive = _Drive(self.den, solver, solver_options or {})
            self.init_noise_sigma = float(self.sde.prior_std())
            self.timesteps = torch.zeros(0)
            self.num_inference_steps: int | None = None
            self.grid: torch.Tensor | None = None

        # ---------------------------------------------------------------- construction from other schedulers
        @classmethod
        def from_scheduler(cls, scheduler: Any, solver: str = DEFAULT_SOLVER, **options: Any) -> SdeflowScheduler:
            """A SdeflowScheduler for the model of ``scheduler`` (instance or config), running ``solver``.

            ``options`` are solver options (``order=``, ``variant=``, ``eta=`` ...) plus the scheduler's own
            ``grid=`` and ``t_end=``.
            """
            config = scheduler_config(scheduler)
            flow = is_flow_config(config)
            keys = (
                "num_train_timesteps",
                "beta_start",
                "beta_end",
                "beta_schedule",
                "trained_betas",
                "rescale_betas_zero_snr",
                "steps_offset",
            )
            kwargs: dict[str, Any] = {k: config[k] for k in keys if k in config}
            kwargs["prediction_type"] = "flow_prediction" if flow else config.get("prediction_type", "epsilon")
            if flow:
                kwargs["flow"], kwargs["shift"] = True, _flow_shift(config, options.pop("shift", None))
            for k in ("grid", "t_end"):
                if k in options:
                    kwargs[k] = options.pop(k)
            return cls(solver=solver, solver_options=options, **kwargs)

        # ---------------------------------------------------------------- diffusers' API
        def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
            """Build the grid for an NFE budget of ``num_inference_steps`` and the model-call timesteps."""
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
            cfg = self.config
            t_end = float(self.sde.eps if cfg.t_end is None else cfg.t_end)
            steps = self._drive.num_steps(num_inference_steps, t_end)
            kind = cfg.grid if cfg.grid is not None else self._drive.default_grid
            self.grid = time_grid(self.sde, steps, kind, t_end=t_end, steps_offset=int(cfg.steps_offset))
            self.num_inference_steps = num_inference_steps
            # dry run with a zero model: the times of every model call (they do not depend on the values)
            rep = self._replay
            rep.recording, rep.inputs = True, []
            try:
                # float32 like the pipeline's sample: the model's time argument then rounds as in sf.sample
                x = torch.zeros(1, 1, dtype=torch.float32)
                state = self._drive.init(x, self.grid)
                for i in range(self.grid.numel() - 1):
                    draws = self._drive.noise_draws
                    z = torch.zeros(draws, 1, 1, dtype=torch.float32) if draws else None
                    x, state = self._drive.step(self.grid[i], self.grid[i + 1], x, state, z)
            finally:
                rep.recording = False
            calls = torch.stack([t.reshape(-1)[0].to(F64) for _, t in rep.inputs])
            integral = bool((calls == calls.round()).all())
            self.timesteps = (calls.round().long() if integral else calls.float()).to(device)
            self.den.reset_nfe()
            self._reset_run()

        def _reset_run(self) -> None:
            self._i = 0  # grid step
            self._k = 0  # model call
            self._x: torch.Tensor | None = None  # state at grid[_i]
            self._state: Any = None
            self._noise: torch.Tensor | None = None
            self._replay.outputs, self._replay.k = [], 0

        def _draw(self, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
            draws = self._drive.noise_draws
            if not draws:
                return None
            shape = (draws, *like.shape)
            return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)

        def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
            """The model sees the state itself (sdeflow's x_t)."""
            return sample

        def step(
            self,
            model_output: torch.Tensor,
            timestep: Any,
            sample: torch.Tensor,
            generator: torch.Generator | None = None,
            return_dict: bool = True,
        ) -> Any:
            """Hand one model output to the solver; ``prev_sample`` is where the next model call happens."""
            if self.grid is None:
                raise ValueError("call set_timesteps(num_inference_steps) before step()")
            if self._k >= len(self.timesteps):
                raise ValueError(f"step() called more than the {len(self.timesteps)} times set_timesteps planned")
            expected = self.timesteps[self._k]
            if abs(float(torch.as_tensor(timestep).reshape(-1)[0]) - float(expected)) > 1e-3 * max(
                1.0, abs(float(expected))
            ):
                raise ValueError(f"step() expected timestep {float(expected)} (call {self._k}), got {timestep}")
            out = model_output
            if not isinstance(out, torch.Tensor):
                out = getattr(out, "sample", out)
            if self._x is None:  # the first model call of the run: the start state, the first step's noise
                self._x = sample
                self._state = self._drive.init(sample, self.grid)
                self._noise = self._draw(sample, generator)
            self._replay.outputs.append(out)
            self._k += 1
            i = self._i
            try:
                self._replay.k = 0
                x1, state = self._drive.step(self.grid[i], self.grid[i + 1], self._x, self._state, self._noise)
            except _NeedEval as need:  # the step needs another model call (heun's corrector): return its input
                prev = need.x
            else:
                self._i += 1
                self._x, self._state = x1, state
                self._replay.outputs = []
                prev = x1
                if self._i < self.grid.numel() - 1:
                    # probe the next step up to its first model call: the model then sees exactly the point the
                    # solver evaluates (heun evaluates a(t) (x / a(t)), not x bit for bit)
                    self._noise = self._draw(x1, generator)
                    try:
                        self._replay.k = 0
                        self._drive.step(self.grid[self._i], self.grid[self._i + 1], x1, state, self._noise)
                    except _NeedEval as need:
                        prev = need.x
            if not return_dict:
                return (prev,)
            return SchedulerOutput(prev_sample=prev)

        def add_noise(
            self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
        ) -> torch.Tensor:
            """x_t = a(t) x0 + s(t) noise at diffusers' timesteps (training / img2img)."""
            ts = torch.as_tensor(timesteps).reshape(-1)
            if ts.numel() == 1:
                ts = ts.expand(original_samples.shape[0])
            t = _timestep_to_time(self.sde, ts, int(self.config.num_train_timesteps))
            return self.sde.marginal(original_samples, t.to(original_samples.device), noise)

        def __len__(self) -> int:
            return int(self.config.num_train_timesteps)

    return SdeflowScheduler


_SCHEDULER_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    global _SCHEDULER_CLASS
    if name == "SdeflowScheduler":
        if _SCHEDULER_CLASS is None:
            _SCHEDULER_CLASS = _make_scheduler_class()
        return _SCHEDULER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------ the reverse
class DiffusersSolver(Integrator):
    r"""A diffusers scheduler as a sdeflow solver (an :class:`~sdeflow.solvers.base.Integrator`: it runs diffusers'
    own loop over the whole span).

    ``sf.sample(den, DiffusersSolver(den, scheduler=DPMSolverMultistepScheduler(...)), nfe=n, x_T=x_T)`` calls
    ``set_timesteps(k)`` with the largest k whose schedule makes at most n model calls, then diffusers' loop
    (``scale_model_input``, the model, ``step``). The model is ``den`` (any sdeflow Denoiser): its prediction is
    converted to the scheduler's ``prediction_type`` and evaluated at the sdeflow time of the scheduler's timestep
    (t = (n + 1)/N, flow: the unshifted sigma). The scheduler must start where the grid starts (a ``trailing`` /
    ``linspace`` spacing, whose first timestep is N - 1) and its final time replaces ``t_end``. x_T is in sdeflow's
    variables; schedulers that work in EDM's scaled variables (Euler, Heun: ``init_noise_sigma > 1``) get
    ``x_T * init_noise_sigma`` and their result is scaled back.
    """

    name = "diffusers"
    nfe_per_step = 1
    requires = frozenset()
    options = {"scheduler": None}

    def validate(self) -> None:
        sched = self.opts["scheduler"]
        if sched is None or not hasattr(sched, "set_timesteps") or not hasattr(sched, "step"):
            raise ValueError("DiffusersSolver needs scheduler= a diffusers scheduler instance")
        self.config = scheduler_config(sched)
        self.N = int(self.config.get("num_train_timesteps", 1000))
        self.target = canonical_prediction(
            "flow" if is_flow_config(self.config) else str(self.config.get("prediction_type", "epsilon"))
        )
        self.flow = is_flow_config(self.config)

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        if int(nfe) < 1:
            raise ValueError(f"nfe={nfe} is too small for solver {self.name!r}: it needs at least 1")
        return int(nfe)

    def _schedule(self, nfe: int) -> None:
        sched = self.opts["scheduler"]
        for k in range(nfe, 0, -1):
            sched.set_timesteps(k)
            if len(sched.timesteps) <= nfe:
                return
        raise ValueError(f"no schedule of {type(sched).__name__} fits nfe={nfe}")

    def _time(self, timestep: torch.Tensor) -> torch.Tensor:
        ts = torch.as_tensor(timestep).detach().reshape(()).cpu().to(F64)
        if self.flow:
            sde = self.sde
            sigma = ts / self.N
            return sde.unshifted(sigma) if isinstance(sde, FlowMatchingPath) else sigma
        return (ts + 1.0) / self.N

    def _model_output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pred = self.den.predict(x, t)
        if self.target == "eps":
            return pred.eps
        if self.target == "x0":
            return pred.x0
        if self.target == "flow":  # diffusers' flow models: d x / d sigma = eps - x0
            return pred.eps - pred.x0
        a, s = self.den.coefficients(x, t)
        return a * pred.eps - s * pred.x0  # v (VP)

    def integrate(
        self,
        x: torch.Tensor,
        grid: torch.Tensor,
        noise: Any = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> Any:
        sched = self.opts["scheduler"]
        nfe0 = self.den.nfe
        self._schedule(grid.numel() - 1)
        init = float(getattr(sched, "init_noise_sigma", 1.0))
        scaled = init != 1.0 and not self.flow and getattr(sched, "sigmas", None) is not None
        # EDM-scaled state x / a = x sqrt(1 + sigma^2) (diffusers' own init_noise_sigma is sigma_max for trailing /
        # linspace spacings, 2e-5 away from that at sigma_max = 157)
        xs = x * math.sqrt(1.0 + float(sched.sigmas[0]) ** 2) if scaled else x
        traj = [x] if return_trajectory else None
        times = _visited_times(sched, self.config, self.N, self.sde)
        for i, ts in enumerate(sched.timesteps):
            t = self._time(ts)
            inp = sched.scale_model_input(xs, ts)
            out = self._model_output(inp, t).to(xs.dtype)
            xs = sched.step(out, ts, xs).prev_sample
            if traj is not None:
                traj.append(xs)
            if callback is not None:
                callback({"i": i, "t": t, "x": xs, "x0": None})
        if scaled:  # EDM-scaled state at the final sigma -> sdeflow's x = x_scaled / sqrt(1 + sigma^2)
            sig_last = float(sched.sigmas[-1])
            xs = xs / math.sqrt(1.0 + sig_last**2)
        nfe = self.den.nfe - nfe0
        stats = {"nfe": nfe, "steps": len(sched.timesteps), "accepted": len(sched.timesteps), "rejected": 0}
        trajectory = torch.stack(traj) if traj is not None else None
        return SampleResult(xs, nfe, times, trajectory, stats)
