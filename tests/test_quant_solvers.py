"""The pure quantization maths: the grid, RTN and GPTQ on random layers (no model)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from compress.quant.gptq_solver import HessianError, gptq_quantize, output_error, solve_block
from compress.quant.grid import Grid, dequantize, expand, group_qparams, quantize, rtn


def _layer(out=96, n_in=256, n=2048, seed=0):
    """A random layer and the Hessian of correlated inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    x = torch.randn(n, n_in, generator=g) @ mix + 0.1 * torch.randn(n, n_in, generator=g)
    x[:, :6] *= 8.0
    w = 0.05 * torch.randn(out, n_in, generator=g)
    return w, 2 * x.T @ x / n


GRIDS = [Grid(4, True, -1), Grid(4, True, 128), Grid(4, False, 32), Grid(8, True, -1), Grid(8, False, 64)]


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_codes_in_range_and_zero_representable(grid):
    w, _ = _layer()
    scale, zero = group_qparams(w, grid)
    s, z = expand(scale, w.shape[1], grid.group_size), expand(zero, w.shape[1], grid.group_size)
    q = quantize(w, s, z, grid)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    assert torch.equal(q, q.round())
    assert zero.min() >= grid.qmin and zero.max() <= grid.qmax
    assert torch.equal(dequantize(quantize(torch.zeros_like(w), s, z, grid), s, z), torch.zeros_like(w))


def test_symmetric_scale_matches_the_compressed_tensors_convention():
    w = torch.tensor([[-1.5, 0.0, 0.75, 3.0]])
    scale, zero = group_qparams(w, Grid(4, True, -1))
    assert scale.item() == pytest.approx(3.0 / 7.5) and zero.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scales_are_storable_in_the_model_dtype(dtype):
    w, _ = _layer()
    scale, _ = group_qparams(w, Grid(4, True, 32, scale_dtype=dtype))
    assert torch.equal(scale.to(dtype).float(), scale)


@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_quantize_pack_unpack_dequantize_round_trips_exactly(grid):
    w, _ = _layer()
    q_fake, scale, zero = rtn(w, grid)
    s, z = expand(scale, w.shape[1], grid.group_size), expand(zero, w.shape[1], grid.group_size)
    codes = quantize(w, s, z, grid).to(torch.int8)
    packed = pack_to_int32(codes, grid.bits)
    assert packed.dtype == torch.int32 and packed.shape[1] == w.shape[1] * grid.bits // 32
    unpacked = unpack_from_int32(packed, grid.bits, torch.Size(w.shape))
    assert torch.equal(unpacked, codes)
    assert torch.equal(dequantize(unpacked.float(), s, z), q_fake)


@pytest.mark.parametrize("grid,actorder", [(Grid(4, True, -1), None), (Grid(4, True, 128), None),
                                           (Grid(4, False, 32), None), (Grid(4, True, 32), "weight"),
                                           (Grid(4, True, 32), "group"), (Grid(4, True, -1), "weight"),
                                           (Grid(8, True, -1), None)], ids=str)
def test_gptq_output_error_is_below_rtn(grid, actorder):
    w, h = _layer()
    q_rtn, _, _ = rtn(w, grid)
    r = gptq_quantize(w, h, grid, actorder=actorder)
    e_rtn, e_gptq = output_error(w, q_rtn, h), output_error(w, r.q, h)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    assert r.loss > 0


@pytest.mark.parametrize("actorder", [None, "weight", "group"])
def test_gptq_result_lies_on_its_own_grid(actorder):
    grid = Grid(4, False, 32)
    w, h = _layer()
    r = gptq_quantize(w, h, grid, actorder=actorder)
    s = expand(r.scale, w.shape[1], 32, r.g_idx)
    z = expand(r.zero, w.shape[1], 32, r.g_idx)
    codes = quantize(r.q, s, z, grid)
    assert torch.allclose(dequantize(codes, s, z), r.q, atol=0, rtol=1e-6)
    assert r.scale.shape == (w.shape[0], w.shape[1] // 32)
    if actorder == "group":  # compressed-tensors needs exactly group_size columns per group
        assert r.g_idx.dtype == torch.int32
        assert torch.bincount(r.g_idx.long()).tolist() == [32] * (w.shape[1] // 32)
    else:
        assert r.g_idx is None


def test_block_size_does_not_change_the_result():
    """Lazy batching is exact maths; only the float order differs, which can flip a rounding tie
    (absmax / 7.5 puts the group minimum exactly on -7.5) and the error feedback carries the
    flip on. So: the same error, and identical codes where no group scale is recomputed."""
    w, h = _layer()
    a = gptq_quantize(w, h, Grid(4, True, 32), block_size=32)
    b = gptq_quantize(w, h, Grid(4, True, 32), block_size=128)
    assert output_error(w, a.q, h) == pytest.approx(output_error(w, b.q, h), rel=0.02)
    c = gptq_quantize(w.double(), h.double(), Grid(4, True, -1), block_size=16)
    d = gptq_quantize(w.double(), h.double(), Grid(4, True, -1), block_size=128)
    assert (c.q != d.q).float().mean() < 0.01


def test_dead_input_channels_are_zeroed_and_the_rest_solved():
    w, h = _layer()
    h[:, 10] = 0
    h[10, :] = 0
    r = gptq_quantize(w, h, Grid(4, True, -1))
    assert torch.all(r.q[:, 10] == 0)
    assert torch.isfinite(r.q).all()


def test_indefinite_hessian_is_reported():
    w, _ = _layer(n_in=64)
    with pytest.raises(HessianError, match="damp"):
        gptq_quantize(w, -torch.eye(64), Grid(4, True, -1))


class _NoHostReads(TorchDispatchMode):
    """Fails on any read of a tensor's value by the host (`.item()`, `bool(t)`, `if t > 0`: all
    go through aten._local_scalar_dense), the synchronisation a CUDA graph cannot capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a block function read a tensor's value on the host: not capturable")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dynamic_group, keep", [(0, False), (32, False), (32, True)])
def test_block_solver_never_reads_back_to_the_host(dynamic_group, keep):
    """What the graph runner needs of solve_block, checked on the CPU: no host read of a tensor
    value (so the block can be captured), hinv only read, every output written. The replay
    itself needs CUDA: test_graph_runner_replays_the_block_functions_exactly."""
    w, h = _layer(out=8, n_in=64)
    from compress.quant.gptq_solver import inverse_hessian_factor

    hinv = inverse_hessian_factor(h.clone(), 0.01)
    w1, hinv1 = w.clone(), hinv.clone()
    s1, z1, q1, e1 = (torch.zeros_like(w) for _ in range(4))
    if not dynamic_group:
        s1, z1 = (expand(t, 64, 32) for t in group_qparams(w, Grid(4, True, 32)))
    keep1 = (torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5).float() if keep else None
    with _NoHostReads():
        solve_block(w1, hinv1, s1, z1, q1, e1, Grid(4, True, 32), dynamic_group, keep1)
    assert torch.equal(hinv1, hinv)
    assert (s1 > 0).all() and torch.isfinite(q1).all() and e1.abs().sum() > 0
    if keep:
        assert (q1[keep1 == 0] == 0).all()


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_prune_block_never_reads_back_to_the_host(nm):
    from compress.prune.sparsegpt import prune_block
    from compress.quant.gptq_solver import inverse_hessian_factor

    w, h = _layer(out=8, n_in=64)
    w1, hinv = w.clone(), inverse_hessian_factor(h.clone(), 0.01)
    keep1, q1, e1 = (torch.zeros_like(w) for _ in range(3))
    with _NoHostReads():
        prune_block(w1, hinv, keep1, q1, e1, 0 if nm[1] else 32, *nm)
    assert keep1.sum() == w.numel() // 2 and torch.equal(q1 == 0, keep1 == 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the graph runner captures CUDA graphs: needs a CUDA GPU")
def test_graph_runner_replays_the_block_functions_exactly():
    """GraphRunner (what GPTQ, AWQ and SparseGPT use on a GPU) captures each block shape once and
    replays it on new data: the result equals the eager solver's, bit for bit."""
    from compress.prune.sparsegpt import prune_block, sparsegpt_prune
    from compress.quant.cuda_graph import GraphRunner, graph_fn

    assert graph_fn(solve_block, "cpu") is solve_block and isinstance(graph_fn(solve_block, "cuda:0"), GraphRunner)
    w, h = (t.cuda() for t in _layer())
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)).cuda() > 0.3
    runner, calls = GraphRunner(solve_block), 0
    for grid, actorder, kp in [(Grid(4, True, -1), None, None), (Grid(4, True, 32), None, None),
                               (Grid(4, True, 32), "group", keep), (Grid(8, False, 64), "weight", keep)]:
        eager = gptq_quantize(w, h, grid, block_size=64, actorder=actorder, keep=kp)
        graphed = gptq_quantize(w, h, grid, block_size=64, actorder=actorder, keep=kp, block_fn=runner)
        calls += 256 // 64
        assert torch.equal(graphed.q, eager.q) and torch.equal(graphed.scale, eager.scale)
        assert torch.equal(graphed.row_error, eager.row_error)
        # and a real solve, not two equal wrong answers (30 % of the weights pruned with `keep`)
        assert output_error(w, graphed.q, h) < (0.1 if kp is None else 0.3)
        assert kp is None or (graphed.q[~kp] == 0).all()
    assert not runner.failed and 0 < len(runner.graphs) < calls  # captured once per shape, then replayed
    pruner = GraphRunner(prune_block)
    for nm in (None, (2, 4)):
        eager, graphed = (sparsegpt_prune(w, h, 0.5, nm, block_size=64, block_fn=f) for f in (prune_block, pruner))
        assert torch.equal(graphed.w, eager.w) and torch.equal(graphed.keep, eager.keep)
        assert graphed.keep.float().mean().item() == pytest.approx(0.5)
    assert not pruner.failed and len(pruner.graphs) == 2


@pytest.mark.parametrize("actorder", [None, "weight", "group"])
def test_gptq_error_per_row_is_the_output_error_under_the_damped_hessian(actorder):
    """Σ e_i² over GPTQ's propagated column errors equals ‖X(W−Q)ᵀ‖² under H + λI: the
    solver reports each module's output error without keeping H (memory)."""
    w, h = _layer()
    r = gptq_quantize(w, h, Grid(4, True, 32), damp=0.01, actorder=actorder)
    hd = h.clone()
    hd.diagonal().add_(0.01 * h.diagonal().mean())
    d = w - r.q
    torch.testing.assert_close(r.row_error, ((d @ hd) * d).sum(1), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(r.row_energy, ((w @ h) * w).sum(1), rtol=1e-4, atol=1e-6)
    assert r.loss == pytest.approx(r.row_error.sum().item() / 2)


def test_overwriting_the_hessian_gives_the_same_result():
    w, h = _layer()
    a = gptq_quantize(w, h, Grid(4, True, 32), actorder="group")
    h2 = h.clone()
    b = gptq_quantize(w, h2, Grid(4, True, 32), actorder="group", overwrite_h=True)
    assert torch.equal(a.q, b.q) and torch.equal(a.g_idx, b.g_idx)
    assert not torch.equal(h2, h)  # used as scratch
