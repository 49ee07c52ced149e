r"""Multi-process runs with ``torch.distributed``: start-up under torchrun, index sharding, gathering on rank 0.

Everything here is a thin layer over ``torch.distributed`` (process groups, ``all_reduce``, ``gather_object``,
``broadcast``); nothing talks to other processes by any other means.

**Start-up.** ``torchrun --nproc_per_node=N ...`` (or ``python -m torch.distributed.run``) starts N processes and
gives each the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init_distributed` reads them, picks the device (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU), the
backend (NCCL on GPUs, gloo on the CPU) and calls ``init_process_group`` with the ``env://`` method. Without those
variables it returns a one-process context and initializes nothing, so the same code runs under ``python`` and under
``torchrun``.

**Sharding by index.** Work on n items (samples to draw, data points to evaluate) is cut into consecutive *chunks* of
``chunk_size`` items, the same chunks for every world size; rank r takes the consecutive block of chunks
:math:`[\lfloor rK/W\rfloor, \lfloor (r+1)K/W\rfloor)` of the K chunks (:func:`shard_chunks`). Each chunk is computed
exactly as a one-process run computes it (same batch, same per-sample seeds), so the gathered result is bitwise the
one-process result for every world size W (floating-point kernels can round a row differently when the batch size
changes, which is why the chunk, not the rank, is the unit of work). :func:`map_chunks` runs a function on the local
chunks and gathers the results on rank 0 in index order; :func:`sample_sharded` draws samples with per-sample seeds
(sample i uses ``seed + i`` through :class:`~sdeflow.noise.PerSampleGenerator`, for x_T and the solver's noise), the
building block of ``sdeflow sample`` and of the benchmarks (gather samples or metric features on rank 0).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ._utils import check_choice

__all__ = [
    "BACKENDS",
    "DistributedContext",
    "launched_by_torchrun",
    "init_distributed",
    "distributed_session",
    "shutdown",
    "run_cli",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "is_main_process",
    "barrier",
    "broadcast_object",
    "shard_slice",
    "shard_chunks",
    "map_chunks",
    "sample_sharded",
    "assert_replicas_equal",
]

BACKENDS = ("nccl", "gloo")
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes, its node-local rank, its device, the
    backend (None in a one-process run) and whether :func:`init_distributed` created the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True when the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is set."""
    return all(k in os.environ for k in _ENV)


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank(group: Any = None) -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process)."""
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` inside a process group of several processes; nothing otherwise."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``dist.broadcast_object_list``); ``obj`` itself outside a group."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _resolve_device(device: torch.device | str | None, local_rank: int) -> torch.device:
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device; allowed: 'cpu', 'cuda', 'cuda:k', 'mps'") from err
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)  # "cuda" under torchrun means this process's GPU
    return device


def init_distributed(
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout: float | None = None,
) -> DistributedContext:
    """Join the process group that torchrun set up (or do nothing in a plain one-process run).

    Args:
        device: where this process computes; None: ``cuda:LOCAL_RANK`` if CUDA is available, else the CPU. A bare
            ``"cuda"`` also means ``cuda:LOCAL_RANK``; an explicit ``"cuda:k"`` is kept.
        backend: ``"nccl"`` (GPUs) or ``"gloo"`` (CPU); default: NCCL for a CUDA device, gloo otherwise.
        timeout: seconds a collective may wait for the other ranks (default: torch's).

    Returns:
        The :class:`DistributedContext`. A process group that already exists (initialized by the caller) is reused
        and ``owns_group`` is False; :func:`shutdown`-like cleanup is then the caller's business.
    """
    if backend is not None:
        check_choice("backend", backend, BACKENDS)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dev = _resolve_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistributedContext(rank, world, local_rank, dev, dist.get_backend(), owns_group=False)
    if not launched_by_torchrun():
        return DistributedContext(0, 1, 0, _resolve_device(device, 0), None)
    if not dist.is_available():  # pragma: no cover - builds without torch.distributed
        raise RuntimeError("this torch build has no torch.distributed, but the process was started by torchrun")
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    dev = _resolve_device(device, local_rank)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend='nccl' needs CUDA devices, got device={str(dev)!r}; use backend='gloo'")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world}
    if timeout is not None:
        kwargs["timeout"] = timedelta(seconds=float(timeout))
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # binds the NCCL communicator to this GPU (eager init, no device guessing)
    dist.init_process_group(**kwargs)
    return DistributedContext(rank, world, local_rank, dev, backend, owns_group=True)


def shutdown(ctx: DistributedContext) -> None:
    """``destroy_process_group`` when :func:`init_distributed` created the group of ``ctx``."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    device: torch.device | str | None = None, backend: str | None = None, timeout: float | None = None
) -> Iterator[DistributedContext]:
    """``with distributed_session() as ctx:`` :func:`init_distributed` on entry, :func:`shutdown` on exit."""
    ctx = init_distributed(device, backend, timeout)
    try:
        yield ctx
    finally:
        shutdown(ctx)


def run_cli(prog: str, fn: Callable[[DistributedContext], int], device: torch.device | str | None = None) -> int:
    """A command's body under :func:`distributed_session`: ``fn(ctx)``'s exit status, or 2 (with ``prog: error:``
    on stderr) when the session cannot start (a bad device or backend). Used by ``sdeflow train | sample |
    likelihood`` so that they run alike under ``python`` and under ``torchrun``."""
    import sys

    try:
        ctx = init_distributed(device)
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        return fn(ctx)
    finally:
        shutdown(ctx)


# ------------------------------------------------------------------------------------------------------ sharding
def shard_slice(n: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Rank ``rank``'s consecutive part of n items: ``[floor(r n / W), floor((r+1) n / W))``; sizes differ by <= 1."""
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank must lie in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}"
        )
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def shard_chunks(n: int, chunk_size: int, rank: int | None = None, world_size: int | None = None) -> list[range]:
    """This rank's chunks of ``range(n)``: the consecutive chunks of ``chunk_size`` indices (the last one shorter),
    split into consecutive blocks across the ranks (:func:`shard_slice` over the chunk list).

    The chunks do not depend on the world size, only their owner does: chunk k is ``range(k c, min((k+1) c, n))``.
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    chunks = [range(lo, min(lo + chunk_size, n)) for lo in range(0, max(n, 0), chunk_size)]
    return chunks[shard_slice(len(chunks), rank, world_size)]


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, tuple):  # a NamedTuple
        return type(obj)(*(_to_cpu(v) for v in obj))
    return obj


_ERRORS = {e.__name__: e for e in (ValueError, TypeError, RuntimeError, FloatingPointError, MemoryError)}


def _agree_on_errors(err: BaseException | None) -> None:
    """Collective: if any rank failed, raise on every rank (its own exception, or the first failing rank's message
    as the same built-in type), so that no rank waits forever in a later collective."""
    if not is_distributed():
        if err is not None:
            raise err
        return
    reports: list[Any] = [None] * get_world_size()
    dist.all_gather_object(reports, None if err is None else (type(err).__name__, str(err)))
    if err is not None:
        raise err
    for r, report in enumerate(reports):
        if report is not None:
            kind, message = report
            raise _ERRORS.get(kind, RuntimeError)(f"rank {r}: {message}")


def map_chunks(
    fn: Callable[[range], T],
    n: int,
    chunk_size: int,
    *,
    dst: int | None = 0,
    shard: bool = True,
    progress: bool = False,
    desc: str | None = None,
) -> list[T] | None:
    """``[fn(chunk) for chunk in chunks of range(n)]`` with the chunks spread over the ranks (:func:`shard_chunks`).

    Every rank calls ``fn`` on its own chunks; the results (tensors are moved to the CPU; anything picklable) are
    gathered with ``gather_object`` and returned in chunk order on rank ``dst`` (None on the other ranks), or on every
    rank with ``dst=None`` (``all_gather_object``). A one-process run calls ``fn`` on every chunk and returns the
    list. All ranks must call this together with the same n and chunk_size. An exception in ``fn`` on any rank is
    raised on every rank.

    Args:
        fn: computes one chunk from its indices (e.g. draws samples seeded by index).
        shard: False: every rank computes every chunk itself (when ``fn`` is itself collective, e.g. a Picard window
            split across the ranks); the results are then returned on ``dst`` (or everywhere) without gathering.
        progress: a tqdm bar over this rank's chunks, on rank 0 only.
    """
    rank, world = get_rank(), get_world_size()
    if not shard:
        rank, world = 0, 1
    mine = shard_chunks(n, chunk_size, rank, world)
    first = shard_slice(-(-max(n, 0) // chunk_size), rank, world).start  # index of this rank's first chunk
    it: Any = mine
    if progress and get_rank() == 0:
        from tqdm.auto import tqdm

        it = tqdm(mine, desc=desc, unit="chunk")
    local: list[tuple[int, Any]] = []
    err: BaseException | None = None
    try:
        local = [(first + k, _to_cpu(fn(chunk))) for k, chunk in enumerate(it)]
    except Exception as e:
        err = e
    _agree_on_errors(err)
    if world == 1:
        return [r for _, r in local] if (dst is None or not is_distributed() or get_rank() == dst) else None
    if dst is None:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, local)
    else:
        parts = [None] * world if rank == dst else None  # type: ignore[assignment]  # gather_object fills it
        dist.gather_object(local, parts, dst=dst)
        if rank != dst:
            return None
    flat = sorted((pair for part in parts for pair in part), key=lambda p: p[0])
    if [k for k, _ in flat] != list(range(len(flat))):  # pragma: no cover - a broken contract, not an input error
        raise RuntimeError("gathered chunks are not the consecutive chunks 0..K-1")
    return [r for _, r in flat]


def sample_sharded(
    den: Any,
    n: int,
    shape: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int = 1024,
    dst: int | None = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    transform: Callable[[torch.Tensor], Any] | None = None,
    shard: bool = True,
    **sample_kwargs: Any,
) -> tuple[Any, int] | tuple[None, int]:
    """n samples of ``den`` drawn by :func:`sdeflow.sample` in chunks of ``batch_size`` spread over the ranks.

    Sample i starts from x_T and uses solver noise from its own generator seeded with ``seed + i``
    (:class:`~sdeflow.noise.PerSampleGenerator`), so sample i is the same for every world size and batch split (and
    bitwise the same for every world size at a fixed ``batch_size``).

    Args:
        den: the Denoiser (or a guidance wrapper).
        shape: the data shape of one sample.
        transform: applied to each chunk's samples before gathering (e.g. a feature extractor for a metric, so that
            only features travel); default: the samples themselves.
        shard: False when the solver itself splits work across the ranks (``solver="parallel"`` with
            ``group=True``): every rank then draws every sample.
        **sample_kwargs: passed to :func:`sdeflow.sample` (solver, nfe, grid, t_end, dtype, solver options ...).

    Returns:
        (the concatenated samples or transformed chunks -- a tensor when ``transform`` returns tensors -- on rank
        ``dst``, None on the others; the total NFE over all chunks of all ranks, on every rank).
    """
    from .noise import PerSampleGenerator
    from .sampling import sample

    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def chunk(idx: range) -> tuple[Any, int]:
        gen = PerSampleGenerator([seed + i for i in idx], device=dev)
        res = sample(den, shape=(len(idx), *shape), generator=gen, device=dev, progress=False, **sample_kwargs)
        out = res.x.detach() if transform is None else transform(res.x.detach())
        return out, int(res.nfe)

    parts = map_chunks(chunk, n, batch_size, dst=dst, shard=shard, progress=progress, desc="sampling")
    nfe = sum(p[1] for p in parts) if parts is not None else 0
    if is_distributed() and dst is not None:
        nfe = broadcast_object(nfe, src=dst)
    if parts is None:
        return None, nfe
    outs = [p[0] for p in parts]
    if all(isinstance(o, torch.Tensor) for o in outs):
        return torch.cat(outs), nfe
    return outs, nfe


def assert_replicas_equal(tensors: Sequence[torch.Tensor] | torch.nn.Module, what: str = "tensors") -> None:
    """Raise RuntimeError unless every rank holds bitwise the same ``tensors`` (a module: its parameters and
    buffers) as rank 0: rank 0's values are broadcast and compared with ``torch.equal``; the verdict is all-reduced so
    every rank raises together. Nothing happens outside a process group of several processes."""
    if not is_distributed():
        return
    if isinstance(tensors, torch.nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([0.0 if torch.equal(flat, ref) else 1.0], dtype=torch.float64, device=flat.device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if float(bad) > 0:
        raise RuntimeError(f"{what} differ between the ranks (replicas diverged)")
