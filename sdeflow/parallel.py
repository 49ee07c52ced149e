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
needs about :math:`N\,k/W` rounds where k (about 2 to 10) is the Picard overhead, so the wall-clock speed-up over the
sequential run is :math:`e(W)/k`, with :math:`e(W) = W\,c(B)/c(WB)` the batching efficiency of the net (c(n) = time of
one call of batch n). ``window="auto"`` measures c and picks W (see :func:`choose_window`); docs/parallel.md derives it.

Multistep steppers (a history carried in ``state``) are not supported: :class:`Parallel` raises a ValueError naming
them. The update is computed in the residual form :math:`x^{k+1}_{j+1} = \Phi_j(x^k_j) + \sum_{i<j}(\Phi_i(x^k_i) -
x^k_{i+1})`, which equals the form above in exact arithmetic, is exact for the window's first state (so W = 1
reproduces the sequential run bit for bit) and sums small residuals instead of large increments.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from typing import Any, Callable

import torch

from .denoiser import Denoiser
from .noise import NoiseSource
from .solvers.base import SolverError, Stepper

__all__ = ["Parallel", "picard_solve", "AutoWindow", "choose_window", "measure_call_costs", "step_noise_variance"]

Callback = Callable[[dict[str, Any]], None]

#: the windows ``window="auto"`` tries: powers of two up to this (and up to the number of steps)
AUTO_MAX_WINDOW = 256


def step_noise_variance(sde, grid: torch.Tensor) -> torch.Tensor:
    r"""Posterior variance :math:`\tilde\sigma_j^2 = s_{j+1}^2(1 - e^{2(\lambda_j - \lambda_{j+1})})` of every step
    of ``grid`` (float64, shape (N,)): ParaDiGMS's scale of the per-step error."""
    from .solvers.ddim import posterior_std

    g = grid.to(torch.float64)
    return posterior_std(sde, g[:-1], g[1:]) ** 2


# --------------------------------------------------------------------------------------------- batched evaluation
def _evaluate(
    stepper: Stepper, xs: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, z: torch.Tensor | None, group: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step every state of a window at once: xs (W, B, *d), t0/t1 (W,) float64, z (W, draws, B, *d) or None.

    Returns (Phi(xs) (W, B, *d), x0 predictions like xs or None). With a process group the W steps are split across
    its ranks (each rank evaluates a contiguous chunk, then all ranks gather the whole window).
    """
    if group is not None:
        return _evaluate_distributed(stepper, xs, t0, t1, z, group)
    W, B = xs.shape[:2]
    rest = xs.shape[2:]
    flat = xs.reshape(W * B, *rest)
    zz = None
    if z is not None:
        zz = z.transpose(0, 1).reshape(z.shape[1], W * B, *rest)
    res = stepper.step(t0.repeat_interleave(B), t1.repeat_interleave(B), flat, None, zz)
    y = res.x.reshape(W, B, *rest)
    x0 = res.x0.reshape(W, B, *rest) if res.x0 is not None else None
    return y, x0


def _evaluate_distributed(stepper, xs, t0, t1, z, group):
    import torch.distributed as dist

    grp = None if group is True else group
    P, rank = dist.get_world_size(grp), dist.get_rank(grp)
    W = xs.shape[0]
    chunk = -(-W // P)  # ceil: every rank gets the same chunk size (all_gather needs equal shapes); pad with copies
    pad = chunk * P - W
    if pad:
        xs = torch.cat([xs, xs[-1:].expand(pad, *xs.shape[1:])])
        t0 = torch.cat([t0, t0[-1:].expand(pad)])
        t1 = torch.cat([t1, t1[-1:].expand(pad)])
        if z is not None:
            z = torch.cat([z, z[-1:].expand(pad, *z.shape[1:])])
    sl = slice(rank * chunk, (rank + 1) * chunk)
    y, x0 = _evaluate(stepper, xs[sl], t0[sl], t1[sl], None if z is None else z[sl], None)
    ys = [torch.empty_like(y) for _ in range(P)]
    dist.all_gather(ys, y.contiguous(), group=grp)
    y_all = torch.cat(ys)[:W]
    x0_all = None
    if x0 is not None:
        x0s = [torch.empty_like(x0) for _ in range(P)]
        dist.all_gather(x0s, x0.contiguous(), group=grp)
        x0_all = torch.cat(x0s)[:W]
    return y_all, x0_all


# --------------------------------------------------------------------------------------------- the Picard loop
class _ResumedNoise(NoiseSource):
    """The noise of a sequential tail that starts at step ``offset``: the draws already taken for the steps still in
    the window (``drawn``, (m, draws, B, *d)), then the source's own draws, so the stream matches a sequential run."""

    def __init__(self, source: NoiseSource, offset: int, drawn: torch.Tensor) -> None:
        self.source, self.offset, self.drawn = source, offset, drawn

    def __call__(self, i, t0, t1, like, draws=1):
        if i < self.drawn.shape[0]:
            return self.drawn[i]
        return self.source(i + self.offset, t0, t1, like, draws)


def picard_solve(
    stepper: Stepper,
    x: torch.Tensor,
    grid: torch.Tensor,
    noise: NoiseSource | None = None,
    window: "int | AutoWindow" = 64,
    tol: float = 0.1,
    max_iters: int | None = None,
    callback: Callback | None = None,
    return_trajectory: bool = False,
    progress: bool = False,
    group: Any = None,
):
    r"""Solve the chain of ``stepper`` along ``grid`` by sliding-window Picard iteration (ParaDiGMS, module doc).

    Args:
        stepper: a fixed-grid, single-step :class:`~sdeflow.solvers.base.Stepper` (its ``step`` takes batched times).
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
        depth; a sequential tail counts one round per step), evaluations (per-step evaluations: window length times
        net calls, summed over rounds), window, converged, iterations (most sweeps any step received), steps,
        sequential_steps (steps of a sequential tail after an auto fallback).
    """
    from .integrate import SampleResult, solve
    from .noise import IIDNoise

    policy = window if isinstance(window, AutoWindow) else None
    if policy is not None:
        window = policy.window
    _check_window(window)
    if window == "auto":
        raise ValueError("picard_solve takes an integer window or an AutoWindow; 'auto' is the Parallel solver's option")
    _check_tol(tol)
    _check_max_iters(max_iters)
    den = stepper.den
    nfe0 = den.nfe
    grid_host = grid
    n = grid.numel() - 1
    if n < 1:
        raise ValueError(f"grid must hold at least 2 times, got {grid.numel()}")
    W = min(int(window), n)
    draws = stepper.noise_draws
    if draws and noise is None:
        noise = IIDNoise(None)
    g = grid.to(device=x.device, dtype=torch.float64)
    thr = (tol**2) * step_noise_variance(stepper.sde, g)  # (N,) float64: e_j <= thr_j passes
    B = x.shape[0]

    def draw(i: int) -> torch.Tensor | None:
        return noise(i, grid_host[i], grid_host[i + 1], x, draws) if draws else None

    begin, end = 0, W
    buf = x.unsqueeze(0).expand(W + 1, *x.shape).clone()  # the states at grid[begin .. end]
    zbuf = torch.stack([draw(i) for i in range(W)]) if draws else None  # (W, draws, B, *d)
    sweeps = [0] * W
    traj = [x] if return_trajectory else None
    rounds = evaluations = 0
    converged = True
    most_sweeps = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"parallel({stepper.name})", leave=False)
    while begin < n:
        w = end - begin
        nfe_before = den.nfe
        y, x0 = _evaluate(stepper, buf[:-1], g[begin:end], g[begin + 1 : end + 1], zbuf, group)
        rounds += 1
        evaluations += (den.nfe - nfe_before) * w
        # residual form of x_{j+1} = x_b + sum_{i<=j} (y_i - x_i): new_j = y_j + sum_{i<j} (y_i - old_{i+1})
        change = torch.cumsum(y - buf[1:], 0)  # new - old for every state of the window
        new = y.clone()
        new[1:] += change[:-1]
        err = change.reshape(w, B, -1).pow(2).mean(-1).to(torch.float64)  # (w, B)
        fail = ~(err <= thr[begin:end, None]).all(1)  # NaN fails
        bad = ~torch.isfinite(new.reshape(w, -1)).all(1)
        flags = torch.stack([fail, bad]).cpu()  # the one host sync of a round: the window's shape depends on it
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
            i = begin + bad_l.index(True)
            raise SolverError(
                f"non-finite values (NaN/inf) at step {i}, t = {float(grid_host[i]):.6g} -> "
                f"{float(grid_host[i + 1]):.6g} in the parallel solve: the model output or the state diverged"
            )
        most_sweeps = max(most_sweeps, max(sweeps[:stride]))
        for j in range(stride):
            if traj is not None:
                traj.append(new[j])
            if callback is not None:
                callback({"i": begin + j, "t": g[begin + j + 1], "x": new[j], "x0": None if x0 is None else x0[j]})
        if bar is not None:
            bar.update(stride)
        # slide: keep the states from begin + stride on; the entering ones start at the window's last state
        new_begin, new_end = begin + stride, min(begin + stride + W, n)
        grow = new_end - end
        buf = new[stride - 1 :]
        if grow > 0:
            buf = torch.cat([buf, new[-1:].expand(grow, *new.shape[1:])])
        if draws:
            fresh = [draw(i) for i in range(end, new_end)]
            zbuf = torch.cat([zbuf[stride:], torch.stack(fresh)]) if fresh else zbuf[stride:]
        sweeps = sweeps[stride:] + [0] * grow
        begin, end = new_begin, new_end
        if policy is not None and begin < n and not policy.keep_parallel(w, stride):
            break
    if bar is not None:
        bar.close()
    x_out, seq_steps = buf[0], n - begin
    if seq_steps:  # the auto policy found that no window pays: plain sequential steps, same noise stream
        tail_cb = None
        if callback is not None:
            off = begin
            tail_cb = lambda p: callback({**p, "i": p["i"] + off})  # noqa: E731
        tail = solve(stepper, x_out, grid_host[begin:], _ResumedNoise(noise, begin, zbuf) if draws else None,
                     tail_cb, return_trajectory, progress)
        x_out = tail.x
        rounds += seq_steps
        evaluations += tail.nfe
        if traj is not None:
            traj.extend(tail.trajectory[1:])
    nfe = den.nfe - nfe0
    stats = {
        "nfe": nfe,
        "steps": n,
        "accepted": n,
        "rejected": 0,
        "rounds": rounds,
        "evaluations": evaluations,
        "window": W,
        "converged": converged,
        "iterations": most_sweeps,
        "tol": float(tol),
        "sequential_steps": seq_steps,
    }
    trajectory = torch.stack(traj) if traj is not None else None
    return SampleResult(x_out, nfe, grid, trajectory, stats)


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
    repeats: int = 3,
    budget_s: float = 2.0,
) -> dict[int, float]:
    r"""Seconds of one batched step of ``stepper`` over W·B states, for W = 1, 2, 4, ... (median of ``repeats``).

    Stops once batching stops paying (the batching efficiency :math:`e(W) = W c(1)/c(W)` falls below 0.9 of the best
    seen) or after ``budget_s`` seconds. The calls go through the Denoiser, so it counts them.
    """
    n = grid.numel() - 1
    g = grid.to(device=x.device, dtype=torch.float64)
    costs: dict[int, float] = {}
    start = time.perf_counter()
    best_eff = 0.0
    draws = stepper.noise_draws
    W = 1
    while W <= min(max_window, n):
        xs = x.unsqueeze(0).expand(W, *x.shape)
        z = torch.zeros(W, draws, *x.shape, dtype=x.dtype, device=x.device) if draws else None
        t0, t1 = g[:W], g[1 : W + 1]
        _sync(_evaluate(stepper, xs, t0, t1, z, None)[0])  # warm-up
        samples = []
        for _ in range(repeats):
            tic = time.perf_counter()
            _sync(_evaluate(stepper, xs, t0, t1, z, None)[0])
            samples.append(time.perf_counter() - tic)
        costs[W] = statistics.median(samples)
        eff = W * costs[1] / costs[W]
        best_eff = max(best_eff, eff)
        if eff < 0.9 * best_eff or time.perf_counter() - start > budget_s:
            break
        W *= 2
    return costs


def prior_overhead(W: int) -> float:
    r"""The Picard overhead :math:`k(W) = W/\text{stride}` assumed before any round is observed: :math:`1 +
    \sqrt W/6`, capped at W (fitted to DDIM/DDPM on exact GMM models at 100 to 1000 steps, tol = 0.1)."""
    return min(float(W), 1.0 + math.sqrt(W) / 6.0)


def choose_window(costs: dict[int, float], margin: float = 1.1) -> int:
    r"""The W of ``costs`` that maximizes the predicted speed-up :math:`S(W) = e(W)/k(W)` over sequential stepping,
    :math:`e(W) = W c(1)/c(W)` measured, :math:`k(W)` from :func:`prior_overhead`; 1 (sequential) unless some
    window is predicted to be ``margin`` times faster."""
    best_w, best_s = 1, margin
    for W, c in sorted(costs.items()):
        s = W * costs[1] / c / prior_overhead(W)
        if s > best_s:
            best_w, best_s = W, s
    return best_w


class AutoWindow:
    r"""``window="auto"``: the window from measured call costs (:func:`choose_window`), and a switch back to plain
    sequential stepping once the *observed* Picard overhead :math:`k = W\cdot\text{rounds}/\text{accepted}` (over at
    least ``patience`` full-width rounds) exceeds the batching efficiency e(W), i.e. once the parallel run is
    slower than the sequential one would be."""

    def __init__(self, costs: dict[int, float], patience: int = 3) -> None:
        self.costs = dict(costs)
        self.window = choose_window(self.costs)
        self.efficiency = self.window * self.costs[1] / self.costs[self.window]
        self.patience = patience
        self.rounds = self.accepted = 0

    def keep_parallel(self, w: int, stride: int) -> bool:
        """Called after every round with its window length and stride; False ends the parallel phase."""
        if w < self.window:  # the shrinking windows at the end of the grid say nothing about the overhead
            return True
        self.rounds += 1
        self.accepted += stride
        if self.rounds < self.patience:
            return True
        return self.efficiency * self.accepted / (self.rounds * self.window) >= 1.0


_COST_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _cached_costs(stepper: Stepper, x: torch.Tensor, grid: torch.Tensor) -> tuple[dict[int, float], int]:
    """Measured costs, cached per net and (stepper class, shape, dtype, device); returns (costs, calibration nfe)."""
    key = (type(stepper).__name__, repr(stepper), tuple(x.shape), x.dtype, str(x.device))
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


class Parallel(Stepper):
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
    mode = "external"
    requires = frozenset()
    options = {"base": "ddim", "window": 64, "tol": 0.1, "max_iters": None, "group": None}

    def __init__(self, denoiser: Denoiser, **options: Any) -> None:
        own = {k: options.pop(k) for k in list(options) if k in self.options}
        base = own.get("base", self.options["base"])
        from .solvers import SOLVERS, available  # lazy: sdeflow.solvers imports this module

        if isinstance(base, Stepper):
            if options:
                raise ValueError("pass base options to the base stepper's constructor, not with a stepper instance")
            if base.den is not denoiser:
                raise ValueError("the base stepper must wrap the same denoiser as the parallel solver")
            self.base = base
        else:
            names = [s for s in available() if s != self.name and getattr(SOLVERS[s], "mode", "fixed") == "fixed"]
            if not isinstance(base, str) or base not in names:
                raise ValueError(f"base={base!r} is not supported; allowed values: {', '.join(map(repr, names))}")
            self.base = SOLVERS[base](denoiser, **options)
        if self.base.mode != "fixed":
            raise ValueError(f"base solver {self.base.name!r} has mode {self.base.mode!r}; parallel needs a fixed-grid one")
        super().__init__(denoiser, **own)

    def validate(self) -> None:
        _check_window(self.opts["window"])
        _check_tol(self.opts["tol"])
        _check_max_iters(self.opts["max_iters"])
        group = self.opts["group"]
        if group is not None and group is not True:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise ValueError(f"group must be None, True or a torch.distributed ProcessGroup, got {group!r}")

    # the wrapped solver's declarations
    @property
    def order(self) -> float:  # type: ignore[override]
        return self.base.order

    @property
    def strong_order(self) -> float | None:  # type: ignore[override]
        return self.base.strong_order

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.base.stochastic

    @property
    def nfe_per_step(self) -> int:  # type: ignore[override]
        return self.base.nfe_per_step

    @property
    def default_grid(self) -> str:  # type: ignore[override]
        return self.base.default_grid

    @property
    def noise_draws(self) -> int:
        return self.base.noise_draws

    def num_steps(self, nfe: int) -> int:
        return self.base.num_steps(nfe)

    def _check_single_step(self, x: torch.Tensor, grid: torch.Tensor) -> None:
        if self.base.init(x, grid) is not None:
            raise ValueError(
                f"base solver {self.base.name!r} carries state across steps (multistep history or FSAL cache), which "
                "the Picard window does not propagate; use a single-step base solver"
            )

    def integrate(
        self,
        x_T: torch.Tensor,
        grid: torch.Tensor,
        noise: NoiseSource | None = None,
        callback: Callback | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ):
        """Integrate along ``grid`` by sliding-window Picard iteration (or sequentially when ``window="auto"`` finds
        that no window pays). Returns a :class:`~sdeflow.integrate.SampleResult`."""
        self._check_single_step(x_T, grid)
        window, extra = self.opts["window"], {}
        if window == "auto":
            costs, cal_nfe = _cached_costs(self.base, x_T, grid)
            window = AutoWindow(costs)
            extra = {"auto": True, "costs": costs, "calibration_nfe": cal_nfe}
            if window.window == 1:  # no window pays: the plain sequential loop
                from .integrate import solve

                res = solve(self.base, x_T, grid, noise, callback, return_trajectory, progress)
                res.stats.update(evaluations=res.nfe, window=1, converged=True, iterations=1,
                                 tol=float(self.opts["tol"]), sequential_steps=res.stats["steps"], **extra)
                res.stats["rounds"] = res.stats["steps"]
                return res
        res = picard_solve(
            self.base, x_T, grid, noise, window=window, tol=float(self.opts["tol"]),
            max_iters=self.opts["max_iters"], callback=callback, return_trajectory=return_trajectory,
            progress=progress, group=self.opts["group"],
        )
        res.stats.update(extra)
        return res

    def step(self, t0, t1, x, state, noise):
        """One step of the base solver (the parallel solver itself only integrates whole grids)."""
        return self.base.step(t0, t1, x, state, noise)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.opts.items() if k != "base")
        return f"Parallel(base={self.base!r}, {opts})"
