r"""Parallel-in-time sampling: Picard iterations on a sliding window of any fixed-grid stepper (ParaDiGMS; Shih,
Belkhale, Ermon, Sadigh & Anari 2023, "Parallel Sampling of Diffusion Models").

A fixed-grid sampler is a chain of maps :math:`x_{j+1} = \Phi_j(x_j)`, one step of a stepper over
:math:`[t_{j+1}, t_j]` with its standard normals :math:`z_j` fixed in advance. Written as a fixed point,

.. math:: x_{j+1} = x_b + \sum_{i=b}^{j} \big(\Phi_i(x_i) - x_i\big), \qquad j = b, \dots, e-1,

the chain can be solved by Picard iteration: guess the W = e - b states of a window, evaluate the W maps at once (ONE
batched net call of batch W·B, per-element times) and update every state of the window by the cumulative sum of the
increments. Iteration k makes the first k states of the window exact; in practice the states converge much sooner.
Convergence test (ParaDiGMS's): with the step's posterior variance :math:`\tilde\sigma_j^2 = s_{j+1}^2(1 -
e^{2(\lambda_j - \lambda_{j+1})})` (DDPM's :math:`\tilde\beta`, also the noise scale of deterministic samplers),

.. math:: e_j = \frac{\|x^{k+1}_{j+1} - x^{k}_{j+1}\|^2}{D\,\tilde\sigma_j^2} \le \tau^2 \quad\text{for every sample},

and the window slides past every state before the first failing one *and* that one (its inputs passed the test, so
it is a converged Picard update), at least one step per round, so rounds never exceed steps and W = 1 is sequential.
New states entering the window start at the window's last state. The noise of step j is drawn from the noise source
when step j first enters a window, in step order, so a stochastic sampler converges to the very path its sequential
run draws from the same generator (or :class:`~sdeflow.noise.TensorNoise`).

Costs: a round costs one batched call of batch W·B per net call of the stepper (``nfe_per_step``), and the sampler
needs about :math:`N\,k/W` rounds, where k (about 1 to 6 for W = 4 to 256) is the Picard overhead, so the wall-clock
speed-up over the sequential run is :math:`e(W)/k`, with :math:`e(W) = W\,c(B)/c(WB)` the batching efficiency of the
net (c(n) = time of one call of batch n). ``window="auto"`` measures c and picks W (see :func:`choose_window`);
docs/parallel.md derives it.

Steppers that carry a state are handled per kind (:func:`window_evaluator`): EDM Heun (its state only counts steps:
every step but the last is a full Heun step, the last one, an Euler step, runs after the Picard phase) and
DPM-Solver++(kM) (the multistep history: the window's model outputs come from one call, step j's older nodes are the
outputs at steps j-1, ... of the same round or the accepted ones before the window). Others raise a ValueError.
The update is computed in the residual form :math:`x^{k+1}_{j+1} = \Phi_j(x^k_j) + \sum_{i<j}(\Phi_i(x^k_i) -
x^k_{i+1})`, which equals the form above in exact arithmetic, is exact for the window's first state (so W = 1
reproduces the sequential run bit for bit) and sums small residuals instead of large increments.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..denoiser import Denoiser
from ..noise import IIDNoise, NoiseSource
from ..sdes import GaussianSDE
from .base import Integrator, SolverError, Stepper
from .ddim import posterior_std
from .record import Callback, Recorder, SampleResult
from .window import WindowEvaluator

__all__ = ["Parallel", "picard_solve", "AutoWindow", "choose_window", "measure_call_costs", "step_noise_variance"]

#: the windows ``window="auto"`` tries: powers of two up to this (and up to the number of steps)
AUTO_MAX_WINDOW = 256


def step_noise_variance(sde: GaussianSDE, grid: torch.Tensor) -> torch.Tensor:
    r"""Posterior variance :math:`\tilde\sigma_j^2 = s_{j+1}^2(1 - e^{2(\lambda_j - \lambda_{j+1})})` of every step
    of ``grid`` (float64, shape (N,)): ParaDiGMS's scale of the per-step error."""
    g = grid.to(torch.float64)
    return posterior_std(sde, g[:-1], g[1:]) ** 2


# --------------------------------------------------------------------------------------------- window evaluation
def _over_ranks(fn: Callable[..., tuple], group: Any, *args: torch.Tensor | None) -> tuple:
    """``fn(*args)`` with every arg split along its leading (window) axis across the ranks of ``group`` (None: no
    split). Each rank evaluates one contiguous chunk (padded with copies of the last entry so that all chunks have
    the same length), then all ranks gather every output (tensors with the window axis first, or None)."""
    if group is None:
        return fn(*args)
    import torch.distributed as dist

    grp = None if group is True else group
    P, rank = dist.get_world_size(grp), dist.get_rank(grp)
    W = next(a for a in args if a is not None).shape[0]
    chunk = -(-W // P)
    pad = chunk * P - W

    def piece(a: torch.Tensor | None) -> torch.Tensor | None:
        if a is None:
            return None
        if pad:
            a = torch.cat([a, a[-1:].expand(pad, *a.shape[1:])])
        return a[rank * chunk : (rank + 1) * chunk]

    outs = fn(*(piece(a) for a in args))
    gathered: list[torch.Tensor | None] = []
    for o in outs:
        if o is None:
            gathered.append(None)
            continue
        parts = [torch.empty_like(o) for _ in range(P)]
        dist.all_gather(parts, o.contiguous(), group=grp)
        gathered.append(torch.cat(parts)[:W])
    return tuple(gathered)


def window_evaluator(stepper: Stepper, x: torch.Tensor, grid: torch.Tensor, group: Any = None) -> WindowEvaluator:
    """The stepper's own batched-over-time evaluator (:meth:`~sdeflow.solvers.base.Stepper.window_evaluator`), its
    window split across the ranks of ``group`` (None: no split)."""
    over = None if group is None else (lambda fn, *args: _over_ranks(fn, group, *args))
    return stepper.window_evaluator(x, grid, over)


# --------------------------------------------------------------------------------------------- the Picard loop
def picard_solve(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    noise: NoiseSource | None = None,
    window: int | AutoWindow = 64,
    tol: float = 0.1,
    max_iters: int | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    group: Any = None,
):
    r"""Solve the chain of ``stepper`` along ``grid`` by sliding-window Picard iteration (ParaDiGMS, module doc).

    Args:
        stepper: a fixed-grid :class:`~sdeflow.solvers.base.Stepper` whose ``step`` takes batched times
            (single-step, EDM Heun or DPM-Solver++(kM); see :func:`window_evaluator`).
        x: the state at grid[0], shape (B, *data_shape).
        grid: float64 times, strictly decreasing, N + 1 of them.
        noise: the noise source of a stochastic stepper (default: IID from the global RNG); step j's draws are taken
            when step j enters a window, in step order, exactly as the sequential loop takes them.
        window: W >= 1 steps refined per round (capped at N), or an :class:`AutoWindow` (its window, and a switch to
            plain sequential stepping when the observed Picard overhead eats the batching gain).
        tol: tolerance tau > 0 of the per-step error e_j <= tau^2 (error over the step's posterior variance).
        max_iters: at most this many Picard sweeps per step: a step swept that often is accepted even if it failed
            the test (``stats["converged"]`` is then False). None: no cap (a step gets at most W sweeps anyway).
        callback: called for every accepted step, in order, with ``{"i", "t", "x", "x0"}`` like the sequential loop.
        return_trajectory: stack the N + 1 states.
        group: None (one device batches the window), True (the default torch.distributed group) or a process group:
            the window's steps are split across the ranks. Every rank must pass the same x, grid and noise (same
            generator seed); every rank returns the full result.

    Returns:
        :class:`~sdeflow.integrate.SampleResult`; ``stats``: nfe (net calls), rounds (Picard rounds, the sequential
        depth; a step run on its own counts one round), evaluations (per-step evaluations: window length times net
        calls, summed over rounds), window, converged, iterations (most sweeps any step received), steps,
        sequential_steps (steps run one by one: an auto fallback, Heun's last step).
    """
    policy = window if isinstance(window, AutoWindow) else None
    if policy is not None:
        window = policy.window
    if window == "auto":
        raise ValueError("picard_solve takes an integer window or an AutoWindow; 'auto' is an option of the solver")
    _check_window(window)
    _check_tol(tol)
    _check_max_iters(max_iters)
    den = stepper.den
    n = grid.numel() - 1
    if n < 1:
        raise ValueError(f"grid must hold at least 2 times, got {grid.numel()}")
    ev = window_evaluator(stepper, x, grid, group)
    n_par = ev.parallel_steps
    if not isinstance(window, int):
        raise ValueError(f"window must be an integer >= 1 or an AutoWindow, got {window!r}")
    W = max(1, min(window, n_par))
    draws = stepper.noise_draws
    if draws and noise is None:
        noise = IIDNoise(None)
    g = grid.to(device=x.device, dtype=torch.float64)
    thr = (tol**2) * step_noise_variance(stepper.sde, g)  # (N,) float64: e_j <= thr_j passes

    source = noise

    def draw(i: int) -> torch.Tensor:
        assert source is not None  # a stochastic stepper (draws > 0) always has a noise source here
        return source(i, grid[i], grid[i + 1], x, draws)

    rec = Recorder(den, f"parallel({stepper.name})", n, callback, return_trajectory, progress)
    rec.start(x)
    rounds = evaluations = 0
    converged = True
    most_sweeps = 0

    begin, end = 0, min(W, n_par)
    parallel = n_par > 0 and (policy is None or policy.window > 1)  # an explicit W = 1 runs the loop too
    if parallel:
        buf = x.unsqueeze(0).expand(end + 1, *x.shape).clone()  # the states at grid[begin .. end]
        zbuf = torch.stack([draw(i) for i in range(end)]) if draws else None  # (w, draws, B, *d)
        sweeps = [0] * end
    while parallel and begin < n_par:
        w = end - begin
        nfe_before = den.nfe
        y, x0 = ev(buf[:-1], begin, g[begin:end], g[begin + 1 : end + 1], zbuf)
        rounds += 1
        evaluations += (den.nfe - nfe_before) * w
        new, flags = _picard_update(buf, y, thr[begin:end])
        flags = flags.cpu()  # the one host sync of a round: the window's shape depends on it
        fail_l, bad_l = flags[0].tolist(), flags[1].tolist()
        stride = min(fail_l.index(True) + 1 if True in fail_l else w, w)
        sweeps = [s + 1 for s in sweeps]
        if max_iters is not None:
            forced = 0
            while forced < w and sweeps[forced] >= max_iters:
                forced += 1
            if forced > stride:  # accepted although an input had not converged: not a Picard fixed point
                converged = False
                stride = forced
        if True in bad_l[:stride]:
            _raise_nonfinite(begin + bad_l.index(True), grid)
        most_sweeps = max(most_sweeps, max(sweeps[:stride]))
        ev.accept(stride)
        for j in range(stride):
            rec.record(begin + j, g[begin + j + 1], new[j], None if x0 is None else x0[j])
        # slide: keep the states from begin + stride on; the entering ones start at the window's last state
        new_begin, new_end = begin + stride, min(begin + stride + W, n_par)
        grow = new_end - end
        buf = new[stride - 1 :]
        if grow > 0:
            buf = torch.cat([buf, new[-1:].expand(grow, *new.shape[1:])])
        if zbuf is not None:
            fresh = [draw(i) for i in range(end, new_end)]
            zbuf = torch.cat([zbuf[stride:], torch.stack(fresh)]) if fresh else zbuf[stride:]
        sweeps = sweeps[stride:] + [0] * grow
        begin, end = new_begin, new_end
        if policy is not None and begin < n_par and not policy.keep_parallel(w, stride):
            break
    # the steps left run one by one (auto fallback, Heun's last step): the noise already drawn is reused
    x_cur = buf[0] if parallel else x
    drawn = list(zbuf.unbind(0)) if parallel and zbuf is not None else []
    seq_steps = n - begin
    for i in range(begin, n):
        z = (drawn.pop(0) if drawn else draw(i)) if draws else None
        nfe_before = den.nfe
        y, x0 = ev(x_cur[None], i, g[i : i + 1], g[i + 1 : i + 2], None if z is None else z[None])
        evaluations += den.nfe - nfe_before
        rounds += 1
        ev.accept(1)
        x_cur = y[0]
        rec.record(i, g[i + 1], x_cur, None if x0 is None else x0[0])
    rec.close()
    if seq_steps and not bool(torch.isfinite(x_cur).all()):
        _raise_nonfinite(n - 1, grid)
    return rec.result(
        x_cur,
        grid,
        steps=n,
        accepted=n,
        rejected=0,
        rounds=rounds,
        evaluations=evaluations,
        window=W,
        converged=converged,
        iterations=most_sweeps,
        tol=float(tol),
        sequential_steps=seq_steps,
    )


def _picard_update(buf: torch.Tensor, y: torch.Tensor, thr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Picard update of a window: buf (w+1, B, *d) the states (buf[0] accepted), y (w, B, *d) the maps at buf[:-1],
    thr (w,) the thresholds of e_j. Returns (new states (w, B, *d), flags (2, w) bool: [test failed, non-finite])."""
    w, B = y.shape[:2]
    # residual form of x_{j+1} = x_b + sum_{i<=j} (y_i - x_i): new_j = y_j + sum_{i<j} (y_i - old_{i+1})
    change = torch.cumsum(y - buf[1:], 0)  # new - old for every state of the window
    new = y.clone()
    new[1:] += change[:-1]
    err = change.reshape(w, B, -1).pow(2).mean(-1).to(torch.float64)  # (w, B)
    fail = ~(err <= thr[:, None]).all(1)  # NaN fails
    bad = ~torch.isfinite(new.reshape(w, -1)).all(1)
    return new, torch.stack([fail, bad])


def _raise_nonfinite(i: int, grid: torch.Tensor) -> None:
    raise SolverError(
        f"non-finite values (NaN/inf) at step {i}, t = {float(grid[i]):.6g} -> {float(grid[i + 1]):.6g} in the "
        "parallel solve: the model output or the state diverged; check the model, the dtype and the grid's end time"
    )


# --------------------------------------------------------------------------------------------- window="auto"
def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    else:
        x.reshape(-1)[:1].cpu()


def measure_call_costs(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    max_window: int = AUTO_MAX_WINDOW,
    repeats: int = 5,
    budget_s: float = 2.0,
) -> dict[int, float]:
    r"""Seconds of one Picard round of ``stepper`` over a window of W steps (the batched step of W·B states, the update
    and its host sync), for W = 2, 4, 8, ..., and of one plain step for W = 1 (what a sequential run pays per step);
    best of ``repeats`` (timing noise on a shared machine only ever adds time).

    Stops once batching has stopped paying (the batching efficiency :math:`e(W) = W c(1)/c(W)` stayed below 0.9 of the
    best seen for two doublings: one dip may be timing noise) or after ``budget_s`` seconds. The calls go through the
    Denoiser, so it counts them.
    """
    ev = window_evaluator(stepper, x, grid)
    g = grid.to(device=x.device, dtype=torch.float64)
    draws = stepper.noise_draws

    def best_time(W: int) -> float:
        xs = x.unsqueeze(0).expand(W, *x.shape)
        z = torch.zeros(W, draws, *x.shape, dtype=x.dtype, device=x.device) if draws else None
        buf = x.unsqueeze(0).expand(W + 1, *x.shape)
        thr = torch.ones(W, dtype=torch.float64, device=x.device)

        def one_round() -> None:
            y = ev(xs, 0, g[:W], g[1 : W + 1], z)[0]
            _sync(y if W == 1 else _picard_update(buf, y, thr)[1])

        one_round()  # warm-up
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            one_round()
            samples.append(time.perf_counter() - tic)
        return min(samples)

    costs: dict[int, float] = {}
    start = time.perf_counter()
    best_eff, dips, W = 0.0, 0, 1
    while min(max_window, ev.parallel_steps) >= W:
        costs[W] = best_time(W)
        eff = W * costs[1] / costs[W]
        best_eff = max(best_eff, eff)
        dips = dips + 1 if eff < 0.9 * best_eff else 0
        if dips == 2 or time.perf_counter() - start > budget_s:
            break
        W *= 2
    # the baseline once more: a burst of load during its first measurement would inflate every e(W)
    costs[1] = min(costs[1], best_time(1))
    return costs


def prior_overhead(W: int, stochastic: bool = False) -> float:
    r"""The Picard overhead :math:`k(W) = W \cdot \text{rounds}/\text{steps}` assumed before any round is observed:
    :math:`1 + \sqrt W/6` for deterministic samplers, :math:`1 + \sqrt W/4` for stochastic ones, capped at W (upper
    envelopes of DDIM and DDPM on exact GMM models and a trained MLP at 100 to 1000 steps, tol = 0.1)."""
    return min(float(W), 1.0 + math.sqrt(W) / (4.0 if stochastic else 6.0))


def choose_window(costs: dict[int, float], stochastic: bool = False, margin: float = 1.1) -> int:
    r"""The W of ``costs`` that maximizes the predicted speed-up :math:`S(W) = e(W)/k(W)` over sequential stepping,
    :math:`e(W) = W c(1)/c(W)` measured, :math:`k(W)` from :func:`prior_overhead`; 1 (sequential) unless some
    window is predicted to be ``margin`` times faster."""
    best_w, best_s = 1, margin
    for W, c in sorted(costs.items()):
        s = W * costs[1] / c / prior_overhead(W, stochastic)
        if s > best_s:
            best_w, best_s = W, s
    return best_w


class AutoWindow:
    r"""``window="auto"``: the window from measured call costs (:func:`choose_window`), and a switch back to plain
    sequential stepping once the *observed* Picard overhead :math:`k = W\cdot\text{rounds}/\text{accepted}` exceeds
    the batching efficiency e(W), i.e. once the parallel run is slower than the sequential one would be.

    The verdict waits until ``2 W`` steps were accepted (or W full-width rounds ran): a window starts from copies of
    its first state, and its first rounds accept few steps whatever the overhead later is. Waiting costs at most W
    rounds of c(W) where the sequential run would have paid at least W c(1)."""

    def __init__(self, costs: dict[int, float], stochastic: bool = False) -> None:
        self.costs = dict(costs)
        self.window = choose_window(self.costs, stochastic)
        self.efficiency = self.window * self.costs[1] / self.costs[self.window]
        self.rounds = self.accepted = 0

    def keep_parallel(self, w: int, stride: int) -> bool:
        """Called after every round with its window length and stride; False ends the parallel phase."""
        if w < self.window:  # the shrinking windows at the end of the grid say nothing about the overhead
            return True
        self.rounds += 1
        self.accepted += stride
        if self.accepted < 2 * self.window and self.rounds < self.window:
            return True
        return self.efficiency * self.accepted / (self.rounds * self.window) >= 1.0


_COST_CACHE: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def _cached_costs(stepper: Stepper, x: torch.Tensor, grid: torch.Tensor) -> tuple[dict[int, float], int]:
    """Measured costs, cached per net and (stepper, shape, dtype, device, largest window the grid allows); returns
    (costs, calibration nfe)."""
    cap = min(AUTO_MAX_WINDOW, grid.numel() - 1)
    key = (type(stepper).__name__, repr(stepper), tuple(x.shape), x.dtype, str(x.device), cap)
    try:
        per_net = _COST_CACHE.setdefault(stepper.den.net, {})
    except TypeError:  # a net that cannot be weakly referenced: measure every time
        per_net = {}
    if key in per_net:
        return per_net[key], 0
    nfe0 = stepper.den.nfe
    costs = measure_call_costs(stepper, x, grid)
    per_net[key] = costs
    return costs, stepper.den.nfe - nfe0


# --------------------------------------------------------------------------------------------- the solver
def _check_window(window: Any) -> None:
    if window == "auto":
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 or 'auto', got {window!r}")


def _check_tol(tol: Any) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < math.inf):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")


def _check_max_iters(max_iters: Any) -> None:
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be None or an integer >= 1, got {max_iters!r}")


class Parallel(Integrator):
    r"""Parallel-in-time sampling around any fixed-grid stepper: ParaDiGMS (Shih et al. 2023), sliding-window Picard.

    ``sample(den, solver="parallel", base="ddim", nfe=1000, window=64, tol=0.1, **base_options)``: ``nfe`` is the
    base solver's sequential budget (its step count is ``base.num_steps(nfe)``, on its default grid); each Picard
    round evaluates the base stepper on every step of the window in one batched call per NFE of a step (so
    ``res.nfe`` = rounds x base ``nfe_per_step``). The result equals the base solver's sequential result within
    ``tol`` (same generator, same noise); as tol -> 0 it reproduces it to rounding. See :mod:`sdeflow.parallel`.

    Options:
        base: the wrapped solver's name in ``SOLVERS`` (fixed-grid, single-step) or a Stepper on the same denoiser.
        window: W >= 1, or ``"auto"``: measure the cost of a batched call against its batch size and pick W
            (:func:`choose_window`), falling back to plain sequential stepping when no window pays.
        tol: tau > 0, the per-step tolerance relative to the step's noise standard deviation (default 0.1).
        max_iters: cap on the Picard sweeps of one step (None: no cap).
        group: None, True (default torch.distributed group) or a process group: split each window across ranks.
        **base_options: options of the base solver (``eta`` for DDIM, ...).
    """

    name = "parallel"
    requires = frozenset()
    options = {"base": None, "window": 64, "tol": 0.1, "max_iters": None, "group": None}

    def __init__(self, denoiser: Denoiser, **options: Any) -> None:
        base = options.get("base")
        if not isinstance(base, Stepper):
            raise TypeError(
                f"base must be a fixed-grid Stepper instance, got {type(base).__name__} (by name: "
                "sf.sample(den, 'parallel', base='ddim', ...) or sdeflow.solvers.SOLVERS['parallel'](den, base='ddim'))"
            )
        if base.den is not denoiser:
            raise ValueError("the base stepper must wrap the same denoiser as the parallel solver")
        if base.tolerances is not None:
            raise ValueError(f"base={base.name!r} is configured as an adaptive solver; parallel needs a fixed grid")
        self.base = base
        super().__init__(denoiser, **options)

    def validate(self) -> None:
        _check_window(self.opts["window"])
        _check_tol(self.opts["tol"])
        _check_max_iters(self.opts["max_iters"])
        group = self.opts["group"]
        if group is not None and group is not True:
            import torch.distributed as dist

            if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
                raise ValueError(f"group must be None, True or a torch.distributed ProcessGroup, got {group!r}")

    def configure(self) -> None:
        """The wrapped solver's declarations."""
        self.order, self.strong_order = self.base.order, self.base.strong_order
        self.stochastic, self.nfe_per_step = self.base.stochastic, self.base.nfe_per_step
        self.default_grid = self.base.default_grid

    @property
    def noise_draws(self) -> int:
        return self.base.noise_draws

    def num_steps(self, nfe: int, t_end: float | None = None) -> int:
        return self.base.num_steps(nfe, t_end)

    def integrate(
        self,
        x_T: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SampleResult:
        """Integrate along ``grid`` by sliding-window Picard iteration (or sequentially when ``window="auto"`` finds
        that no window pays). Returns a :class:`~sdeflow.integrate.SampleResult`."""
        window, extra = self.opts["window"], {}
        if window == "auto":
            costs, cal_nfe = _cached_costs(self.base, x_T, grid)
            window = AutoWindow(costs, self.base.stochastic)
            extra = {"auto": True, "costs": costs, "calibration_nfe": cal_nfe}
        res = picard_solve(
            self.base,
            x_T,
            grid,
            noise,
            window=window,
            tol=float(self.opts["tol"]),
            max_iters=self.opts["max_iters"],
            callback=callback,
            return_trajectory=return_trajectory,
            progress=progress,
            group=self.opts["group"],
        )
        res.stats.update(extra)
        return res

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.opts.items() if k != "base")
        return f"Parallel(base={self.base!r}, {opts})"
