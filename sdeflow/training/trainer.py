r"""The training loop: AdamW with linear warm-up, gradient clipping, EMA, optional CUDA mixed precision, and
bit-exact resumable checkpoints that are also written when SIGINT or SIGTERM arrives.

One step: draw a batch from the data source with the data generator, draw (t, noise, label dropout) with the loss
generator, minimise the :class:`~sdeflow.training.losses.DenoisingScoreMatching` objective with AdamW (Loshchilov &
Hutter 2019) at learning rate :math:`\eta \min(1, (k+1)/k_{warm})`, clip the global gradient norm, and update the
exponential moving average :math:`\bar\theta \leftarrow \beta_k\bar\theta + (1-\beta_k)\theta` with
:math:`\beta_k = \min(\beta, (1+k)/(10+k))` (the warm-started EMA of the TensorFlow ExponentialMovingAverage, used by
score_sde), where k is the step index.

Reproducibility: every random number comes from the trainer's two generators (data, loss) or torch's global CPU
generator (dropout); all three states, the model, the EMA, the optimizer (and the AMP scaler) and the step go into the
checkpoint, so on CPU N steps + save + load + N steps equal 2N steps bit for bit.

Several processes (``torchrun``, an initialized ``torch.distributed`` group of W > 1 processes): the net is wrapped in
``DistributedDataParallel`` and the *global* batch of B samples is the one-process batch. Every rank draws the same
global batch and the same (t, noise, label-dropout) draws from the same two generators, keeps its consecutive share
``[floor(rB/W), floor((r+1)B/W))`` of it, and weights its mean loss by :math:`W n_r / B`; DDP's gradient average
:math:`\frac1W\sum_r \frac{W n_r}{B}\nabla\bar\ell_r = \frac1B\sum_i\nabla\ell_i` is then the gradient of
the one-process batch (to rounding), for any W and uneven shares. Gradients, hence weights, optimizer states and the
EMA, are identical on every rank (checked at the end of :meth:`Trainer.fit`); only rank 0 writes checkpoints. The
checkpoint holds no per-rank state except torch's global generator (dropout, reseeded per rank from (seed, step,
rank)), so a run resumes with any number of processes, and a resumed run with dropout off continues the one-process
run to rounding.

Divergence never reaches the disk: every step ORs "this loss is not finite" into a flag on the device (and records
the first such step) without a host sync; the flag is read at each log point and before each checkpoint, and every
checkpoint write first checks that the weights, the EMA and the optimizer state are finite. A diverged run stops with
:class:`FloatingPointError` naming the step, and the last good checkpoint (and its ``ckpt.prev.pt``) stays in place.
A new trainer refuses to write into a folder that already holds a checkpoint unless it was resumed
(:meth:`Trainer.resume` / :meth:`Trainer.load_state_dict`) or built with ``overwrite=True``.
"""

from __future__ import annotations

import copy
import math
import numbers
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import distributed as _dist
from .checkpoint import check_primitive, find_nonfinite, load_checkpoint, previous_path, save_checkpoint
from .data import DataSource
from .losses import DenoisingScoreMatching, DSMDraw

__all__ = ["Trainer", "FitResult"]


class FitResult(NamedTuple):
    """What :meth:`Trainer.fit` did: the step reached, the last logged mean loss, the signal that stopped it (or None),
    the wall time and the checkpoint path (None when no ``out_dir``)."""

    step: int
    loss: float
    interrupted: int | None
    seconds: float
    checkpoint: Path | None


class Trainer:
    """Trains a score net by denoising score matching.

    Args:
        net: the network, ``net(x, t, y=None) -> tensor like x`` (an ``nn.Module``).
        loss: the objective (holds the SDE, prediction type, weighting and time sampling).
        data: a :class:`~sdeflow.training.data.DataSource` (``sample(batch, generator) -> (x, y)``).
        batch_size: samples per step.
        lr: peak AdamW learning rate; ``betas``, ``weight_decay``: AdamW's.
        warmup: linear warm-up steps (0: none).
        grad_clip: max global gradient norm (None or 0: no clipping).
        ema_decay: EMA decay beta in [0, 1).
        amp: float16 autocast with a gradient scaler; CUDA only.
        device: where to train (defaults to the net's device).
        seed: seeds the data generator (CPU) and the loss generator (on ``device``).
        conditional: feed the data's labels to the net (needs a class-conditional net and labelled data).
        out_dir: folder for ``ckpt.pt`` / ``ckpt.prev.pt`` (None: no checkpoints).
        save_every: write a checkpoint every this many steps (0: only at the end or on a signal).
        log_every: steps between progress-bar loss updates (one host sync each).
        progress: show a tqdm progress bar with the loss and steps/s.
        config: a plain dict of primitives stored in the checkpoint (enough to rebuild the SDE, net and loss; see
            :func:`sdeflow.training.config.load_denoiser`).
        distributed: train with ``DistributedDataParallel`` over the initialized ``torch.distributed`` group (module
            docstring); None: whenever such a group of more than one process exists. ``batch_size`` stays the
            global batch. All ranks must build the trainer together (DDP broadcasts rank 0's initial weights).
        overwrite: allow a trainer that was not resumed to replace a checkpoint already in ``out_dir`` (by default
            :meth:`fit` and :meth:`save` refuse with FileExistsError, so a new run never destroys an old one).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: DenoisingScoreMatching,
        data: DataSource,
        *,
        batch_size: int = 256,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup: int = 0,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.999,
        amp: bool = False,
        device: torch.device | str | None = None,
        seed: int = 0,
        conditional: bool = False,
        out_dir: str | Path | None = None,
        save_every: int = 0,
        log_every: int = 50,
        progress: bool = True,
        config: dict[str, Any] | None = None,
        distributed: bool | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if warmup < 0 or save_every < 0 or log_every < 1:
            raise ValueError(
                f"warmup and save_every must be >= 0 and log_every >= 1, got {warmup}, {save_every}, {log_every}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
        if grad_clip is not None and grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 or None, got {grad_clip}")
        params = list(net.parameters())
        if not params:
            raise ValueError("net has no parameters to train")
        self.device = torch.device(device) if device is not None else params[0].device
        if amp and self.device.type != "cuda":
            raise ValueError(f"amp=True needs a CUDA device, got device={str(self.device)!r}")
        if conditional and (data.num_classes is None or getattr(net, "num_classes", None) is None):
            raise ValueError("conditional=True needs labelled data and a class-conditional net (num_classes set)")
        if distributed and not _dist.is_distributed():
            raise ValueError(
                "distributed=True needs an initialized torch.distributed group of more than one process "
                "(launch with torchrun)"
            )
        self.world_size = _dist.get_world_size() if (distributed is not False and _dist.is_distributed()) else 1
        self.rank = _dist.get_rank() if self.world_size > 1 else 0
        if batch_size < self.world_size:
            raise ValueError(
                f"batch_size (the global batch) must be >= the number of processes {self.world_size}, got {batch_size}"
            )
        self.config = dict(config or {})
        check_primitive(self.config)
        self.net = net.to(self.device)
        self.dtype = params[0].dtype
        self.ema = copy.deepcopy(self.net).requires_grad_(False).eval()
        self.model: nn.Module = self.net  # what the forward pass calls: the net, or its DDP wrapper
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            if self.device.type == "cuda" and self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(
                self.net, device_ids=ids, output_device=None if ids is None else ids[0]
            )
            self.ema.load_state_dict(self.net.state_dict())  # DDP broadcast rank 0's initial weights into the net
        self.loss, self.data = loss, data
        # the labels are dropped for the whole global batch before sharding, so the per-shard loss must not drop again
        self._shard_loss = copy.copy(loss)
        self._shard_loss.p_uncond = 0.0
        self._shard = _dist.shard_slice(int(batch_size), self.rank, self.world_size)
        n_local = self._shard.stop - self._shard.start
        self._loss_scale = n_local * self.world_size / int(batch_size)  # exactly 1.0 in one process
        self.seed = int(seed)
        self.batch_size, self.lr, self.warmup = int(batch_size), float(lr), int(warmup)
        self.grad_clip = float(grad_clip) if grad_clip else None
        self.ema_decay, self.amp, self.conditional = float(ema_decay), bool(amp), bool(conditional)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.data_generator = torch.Generator().manual_seed(seed)
        self.generator = torch.Generator(self.device).manual_seed(seed + 1)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.save_every, self.log_every, self.progress = int(save_every), int(log_every), bool(progress)
        self.step = 0
        self.overwrite = bool(overwrite)
        self._resumed = False  # True once this trainer continues a loaded run or has written its own checkpoint
        self._saved_step: int | None = None  # the step of the checkpoint last written to / read from out_dir
        self._signal: int | None = None
        # the first step (1-based count) whose loss was not finite, -1 while all were; lives on the device (no sync)
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_loss = torch.full((), float("nan"), dtype=torch.float32, device=self.device)
        if self.world_size > 1:
            self._reseed_rank_rng()

    def _reseed_rank_rng(self) -> None:
        """Distinct dropout streams per rank: torch's global generator(s) seeded from (seed, step, rank)."""
        torch.manual_seed((self.seed * 1_000_003 + self.step) * 4099 + self.rank + 1)

    # ------------------------------------------------------------------ one step
    def _lr_at(self, step: int) -> float:
        return self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr

    def train_step(self) -> torch.Tensor:
        """One optimisation step; returns the batch loss (a detached 0-dim tensor, no host sync).

        With several processes the returned value is this rank's share, weighted so that the mean over the ranks is
        the global batch loss.
        """
        self.model.train()
        x, y = self.data.sample(self.batch_size, self.data_generator)  # the global batch, the same on every rank
        x = x.to(device=self.device, dtype=self.dtype, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if (self.conditional and y is not None) else None
        draw = self.loss.draw(x, self.generator)  # then the label dropout: the loss's own order of draws
        y = self.loss.drop_labels(y, getattr(self.net, "num_classes", None), self.generator)
        sl = self._shard
        mine = DSMDraw(*(v[sl] for v in draw))
        for group in self.opt.param_groups:
            group["lr"] = self._lr_at(self.step)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with autocast:
            loss = self._shard_loss.per_sample(self.model, x[sl], y=None if y is None else y[sl], draw=mine).mean()
            if self._loss_scale != 1.0:
                loss = loss * self._loss_scale
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip is not None:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self._update_ema()
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        for e, p in zip(self.ema.parameters(), self.net.parameters()):
            e.lerp_(p, 1.0 - decay)
        for eb, b in zip(self.ema.buffers(), self.net.buffers()):
            eb.copy_(b)

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum

    def fit(self, steps: int) -> FitResult:
        """Train until ``self.step == steps`` (a total, so a resumed run continues to the same end).

        SIGINT / SIGTERM (when called from the main thread) stop the loop after the current step and write a
        checkpoint before returning; ``FitResult.interrupted`` holds the signal number.
        """
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps must be an int, got {type(steps).__name__}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps < self.step:
            raise ValueError(
                f"steps={steps} is below the step {self.step} this trainer has already reached (steps is the total, "
                f"not the number of further steps): pass steps >= {self.step}"
            )
        self._check_out_dir()
        handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self._signal = None
        start, last, running, count = time.perf_counter(), float("nan"), None, 0
        stop: int | None = None  # the signal that ends the loop (agreed by all ranks when distributed)
        path: Path | None = None
        saved_at = -1
        bar = self._bar(steps)
        try:
            while self.step < steps and stop is None:
                loss = self.train_step()
                self._flag_loss(loss)
                running = loss if running is None else running + loss
                count += 1
                if count == self.log_every or self.step == steps:
                    last, stop = self._log_point(running, count)  # one host sync per log_every steps
                    if not math.isfinite(last):
                        self._raise_diverged(last)
                    running, count = None, 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{last:.4g}", refresh=False)
                elif self.world_size == 1:
                    stop = self._signal  # one process stops right after the current step
                if bar is not None:
                    bar.update(1)
                if self.out_dir is not None and self.save_every and self.step % self.save_every == 0:
                    path, saved_at = self._save_checked(), self.step
            if count:
                last, stop = self._log_point(running, count)
                if not math.isfinite(last):
                    self._raise_diverged(last)
            if self.out_dir is not None and saved_at != self.step:
                if self._saved_step == self.step and self.checkpoint_path.is_file():
                    path = self.checkpoint_path  # nothing new since the checkpoint was written or loaded
                else:
                    path = self._save_checked()
            if self.world_size > 1:
                _dist.assert_replicas_equal([*self.net.parameters(), *self.ema.parameters()], "weights or EMA")
                _dist.barrier()  # every rank returns once rank 0's checkpoint is complete
        finally:
            if bar is not None:
                bar.close()
            for sig, old in handlers.items():
                signal.signal(sig, old)
        return FitResult(self.step, last, stop, time.perf_counter() - start, path)

    # ------------------------------------------------------------------ divergence and out_dir guards
    @torch.no_grad()
    def _flag_loss(self, loss: torch.Tensor) -> None:
        """Record the first step whose loss is not finite, on the device (no host sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, self.step, self._first_bad)
        self._bad_loss = torch.where(bad, loss.detach().float(), self._bad_loss)

    def _nonfinite_state(self) -> list[str]:
        """Which of the weights, EMA and optimizer state hold NaN or inf (one sync per device)."""
        parts = {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict()}
        return [name for where, part in parts.items() for name in find_nonfinite(part, where)]

    def _divergence(self) -> str | None:
        """None if the losses so far and the state are finite, else a sentence saying what went wrong where."""
        first = int(self._first_bad)
        if first >= 0:
            return f"the loss was {float(self._bad_loss)} at step {first}"
        bad = self._nonfinite_state()
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            return f"{', '.join(bad[:3])}{more} became non-finite by step {self.step}"
        return None

    def _diverged_message(self, what: str) -> str:
        kept = ""
        if self.out_dir is not None and self.checkpoint_path.is_file():
            when = f" (step {self._saved_step})" if self._saved_step is not None else ""
            kept = f"; no checkpoint written, the last good one {self.checkpoint_path}{when} is kept"
        elif self.out_dir is not None:
            kept = "; no checkpoint written"
        return f"training diverged: {what}{kept}. Lower lr (now {self.lr:g}), use grad_clip or check the data"

    def _raise_diverged(self, logged: float) -> None:
        what = self._divergence() or f"the mean loss was {logged} by step {self.step}"
        raise FloatingPointError(self._diverged_message(what))

    def _assert_finite(self) -> None:
        """Raise FloatingPointError (on every rank together) if any loss so far or the state is not finite."""
        what = self._divergence()
        if self.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if what else 0.0], dtype=torch.float64, device=self._first_bad.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not what:
                what = "another process saw a non-finite loss"
        if what:
            raise FloatingPointError(self._diverged_message(what))

    def _check_out_dir(self, collective: bool = True) -> None:
        """Refuse to replace a checkpoint of another run in out_dir (unless resumed or overwrite=True).

        ``collective`` (inside :meth:`fit`, which all ranks run together): every rank follows rank 0's view."""
        if self.out_dir is None or self._resumed or self.overwrite:
            return
        found = [p for p in (self.checkpoint_path, previous_path(self.checkpoint_path)) if p.exists()]
        if collective and self.world_size > 1:  # every rank decides as rank 0 does (the folder may be rank 0's alone)
            import torch.distributed as dist

            box = [found if self.rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            found = box[0] or []
        if found:
            raise FileExistsError(
                f"{self.out_dir} already holds a checkpoint ({found[0].name}) of another run: resume it "
                "(Trainer.resume() or load_state_dict), pass overwrite=True to replace it, or choose another out_dir"
            )

    def _save_checked(self) -> Path:
        self._assert_finite()
        return self._write(self.checkpoint_path)

    def _write(self, path: Path) -> Path:
        if self.rank != 0:
            return path
        out = save_checkpoint(self.state_dict(), path, check_finite=False)  # the caller checked the state
        if self.out_dir is not None and out == self.checkpoint_path:
            self._saved_step = self.step
            self._resumed = True  # the folder now holds this run's own checkpoint
        return out

    def _log_point(self, running: torch.Tensor, count: int) -> tuple[float, int | None]:
        """(mean loss since the last log point, the signal to stop on or None). With several processes one
        all-reduce sums the ranks' losses and takes the largest pending signal number, so every rank sees the same
        loss (the global batch's) and stops after the same step."""
        if self.world_size == 1:
            return float(running) / count, self._signal
        import torch.distributed as dist

        box = torch.stack(
            [
                running.detach().to(torch.float64),
                torch.tensor(float(self._signal or 0), dtype=torch.float64, device=running.device),
            ]
        )
        dist.all_reduce(box)  # SUM: the loss over ranks, and the signal flag (nonzero if any rank got one)
        total, flag = box.tolist()
        if flag:
            flags = torch.tensor([float(self._signal or 0)], dtype=torch.float64, device=running.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flag = flags.item()
        return total / (count * self.world_size), (int(flag) if flag else None)

    def _bar(self, steps: int):
        if not self.progress or self.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=steps, initial=self.step, unit="step", dynamic_ncols=True, smoothing=0.05)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs (tensors and primitives only)."""
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "data_generator": self.data_generator.get_state(),
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else {},
            "step": self.step,
            "rng": rng,
            "config": self.config,
            "world_size": self.world_size,  # informative only: a checkpoint resumes with any number of processes
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from a checkpoint of a run built the same way).

        The trainer then continues that run: it may write into ``out_dir`` even when a checkpoint is there."""
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        if self.amp and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.data_generator.set_state(rng["data_generator"])
        saved_type = rng.get("generator_device", self.device.type)
        if saved_type == self.device.type:
            self.generator.set_state(rng["generator"])
        else:  # a CPU generator state does not fit a CUDA generator: continue, but not bit-exactly
            warnings.warn(
                f"the checkpoint's loss generator lived on {saved_type!r}, this run trains on {self.device.type!r}: "
                "resuming with a fresh loss generator (the continuation is not bit-exact)",
                stacklevel=2,
            )
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.world_size > 1:
            self._reseed_rank_rng()
        self._resumed = True
        self._first_bad.fill_(-1)

    @property
    def checkpoint_path(self) -> Path:
        if self.out_dir is None:
            raise ValueError("this trainer has no out_dir")
        return self.out_dir / "ckpt.pt"

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint atomically (default ``out_dir/ckpt.pt``; the old one becomes ``ckpt.prev.pt``).

        With several processes only rank 0 writes (the state is the same on every rank); the others return the path
        at once, without waiting for the file (:meth:`fit` ends with a barrier).

        Raises:
            FloatingPointError: a loss since the start (or the last resume) was not finite, or the weights, EMA or
                optimizer state hold NaN or inf; nothing is written.
            FileExistsError: ``out_dir`` holds another run's checkpoint (see ``overwrite``).
        """
        if path is None and self.rank == 0:
            self._check_out_dir(collective=False)
        path = Path(path) if path is not None else self.checkpoint_path
        if self.rank != 0:
            return path
        what = self._divergence()
        if what:
            raise FloatingPointError(self._diverged_message(what))
        return self._write(path)

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default ``out_dir/ckpt.pt``) into this trainer; returns the step reached."""
        src = Path(path) if path is not None else self.checkpoint_path
        state = load_checkpoint(src, map_location="cpu")
        self.load_state_dict(state)
        if self.out_dir is not None and src == self.checkpoint_path:
            self._saved_step = self.step
        return self.step
