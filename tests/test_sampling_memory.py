"""Issue 14 item 7: ``sf.sample`` with a net whose parameters require grad records no autograd graph and peaks at the
memory of the same call under ``torch.no_grad``; ``enable_grad=True`` keeps the graph, and the same measurement sees
it (so the measurement can fail).

Peak memory is measured exactly and deterministically on CPU by a ``TorchDispatchMode`` that sees every tensor an op
allocates (below autograd, so the tensors autograd saves for backward are among them): each new storage adds its
bytes to the live total, a ``weakref.finalize`` on the storage subtracts them when it is freed (torch keeps a storage's
Python object alive as long as the storage itself), and the peak is the largest live total. Tensors that exist before
the call (x_T, the parameters) are not counted.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sdeflow as sf


class PeakMemory(TorchDispatchMode):
    """Live and peak bytes of the CPU storages allocated by the ops run inside the mode."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch otherwise wraps __torch_dispatch__ in torch._dynamo.disable, importing dynamo (3 s) on first use; this
        # mode is never compiled. (A torch without this hook just takes the import.)
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.allocated = 0
        self.storages: dict[int, int] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.storages:  # a view, or an in-place result: no new memory
                continue
            self.storages[key] = nbytes
            self.live += nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


# (solver, options): the fixed-grid driver and the Picard integrator; marked slow (1-4 s each on a loaded 2-core
# machine): the per-sample adaptive driver and a whole-span bridge (torchdiffeq)
CASES = [
    pytest.param("dpm_solver++", {"nfe": 12}, id="dpm_solver++"),
    pytest.param("parallel", {"base": "ddim", "nfe": 8, "window": 4}, id="parallel"),
    pytest.param(
        "dpm_solver", {"adaptive": True, "rtol": 1e-2, "atol": 1e-2}, id="dpm_solver-adaptive", marks=pytest.mark.slow
    ),
    pytest.param("rk45", {"rtol": 1e-2, "atol": 1e-2}, id="rk45", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def den() -> sf.Denoiser:
    torch.manual_seed(0)
    net = sf.MLPScoreNet(2, hidden=64, depth=1)  # a fresh nn.Module: every parameter requires grad
    assert all(p.requires_grad for p in net.parameters())
    return sf.Denoiser(net, sf.VPSDE())


def measure(den: sf.Denoiser, solver: str, opts: dict, **kw: Any) -> tuple[PeakMemory, sf.SampleResult]:
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    mem = PeakMemory()
    with mem:
        res = sf.sample(den, solver, x_T=x_T, generator=torch.Generator().manual_seed(2), **opts, **kw)
    return mem, res


@pytest.mark.parametrize("solver,opts", CASES)
def test_sampling_peaks_at_no_grad_memory_and_a_graph_would_show(den, solver, opts):
    measure(den, solver, opts)  # warm-up: grids and coefficient tables are memoized per grid, built once
    default, res = measure(den, solver, opts)
    assert not res.x.requires_grad and res.x.grad_fn is None
    with torch.no_grad():
        reference, ref = measure(den, solver, opts)
    torch.testing.assert_close(res.x, ref.x, rtol=0, atol=0)
    assert default.peak <= reference.peak, (default.peak, reference.peak)
    graph, res_g = measure(den, solver, opts, enable_grad=True)
    assert res_g.x.grad_fn is not None
    # the graph holds every net call's activations until res_g dies: several times the gradient-free peak (measured:
    # 8.5x for dpm_solver++ at 12 NFE, 10x parallel, 7x adaptive, 17x rk45)
    assert graph.peak > 4 * default.peak, (graph.peak, default.peak)
    kept = graph.live
    del res_g
    assert graph.live < kept / 4  # freeing the result frees the graph: the tracker sees frees, not just allocations
    assert default.allocated > 4 * default.peak  # and the gradient-free run really freed its intermediates
