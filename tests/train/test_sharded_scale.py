"""The weight scale of a sharded weight is the whole tensor's ``max(mean(|W|), eps)``, never a shard's.

Two CPU processes talk over gloo (docs/design.md §2: one scale per layer, computed from the full weight):

* FSDP2 (``fully_shard`` per decoder layer and at the root): every BitLinear weight is stored as a
  ``Shard(0)`` DTensor, yet the scale BitLinear's forward uses (captured by spying on
  :func:`bittern.quant.weight_scale`) equals the scale of the gathered full weight, bit for bit, and the
  loss, logits and gradients equal those of an unsharded reference model.
* Tensor-parallel style DTensors (``distribute_tensor(w, mesh, [Shard(d)])``): :mod:`bittern.quant` applied
  to the DTensor reduces over the whole tensor, and BitLinear under ``ColwiseParallel`` /
  ``RowwiseParallel`` computes what the unsharded layer computes.

Weights are built with rows and columns of very different magnitudes, so a per-shard scale would be far from
the whole tensor's and the tests could not pass by accident.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORLD_SIZE = 2
JOIN_TIMEOUT_S = 120.0
"""The whole two-process run must finish within this (a hang fails the test instead of blocking CI)."""

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _fsdp2_available() -> bool:
    """Whether this torch has FSDP2 (``torch.distributed.fsdp.fully_shard``, public since torch 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _run_on_ranks(worker: Callable[..., None], tmp_path: Path) -> None:
    """Run ``worker(rank, store_path)`` in :data:`WORLD_SIZE` spawned processes and wait for all of them.

    A failure in any rank re-raises here with that rank's traceback (the other ranks are terminated); a run
    that outlives :data:`JOIN_TIMEOUT_S` is killed and fails the test.
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    store_path = str(tmp_path / "gloo-filestore")  # a file rendezvous: no TCP port to pick or to collide on
    context = mp.start_processes(worker, args=(store_path,), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE}-process run did not finish within {JOIN_TIMEOUT_S:.0f} s")
    except ProcessExitedException:
        # A rank that died by a signal after every rank passed its checks died in gloo's teardown (seen on a loaded
        # 2-core machine: "terminate called without an active exception", SIGABRT): not what this file tests.
        if not all(_passed_marker(store_path, rank).exists() for rank in range(WORLD_SIZE)):
            raise
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def _passed_marker(store_path: str, rank: int) -> Path:
    """The file a rank writes once all of its checks have passed (before it tears its process group down)."""
    return Path(f"{store_path}.rank{rank}-passed")


def _init_rank(rank: int, store_path: str):
    """Join the gloo process group and return a 1-D CPU :class:`DeviceMesh` over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two ranks on a 2-core CI machine: no oversubscription
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # same host: loopback, whatever the hostname resolves to
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    return init_device_mesh("cpu", (WORLD_SIZE,))


def _uneven_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float32 ``[rows, cols]`` normal noise times a row ramp (0.25→4) and a column ramp (0.5→2).

    Any half of the rows or of the columns has a mean ``|W|`` far (tens of percent) from the whole tensor's.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=generator)
    return noise * torch.logspace(-2, 2, rows, base=2.0)[:, None] * torch.logspace(-1, 1, cols, base=2.0)[None, :]


def _assert_far(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Fail unless ``a`` and ``b`` differ by more than 1 % somewhere (a per-shard scale is detectable)."""
    assert not torch.allclose(a, b, rtol=1e-2, atol=0.0), f"{what}: the shard's own scale is the global one"


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Equal up to float32 summation-order rounding: ``|a - e| <= rtol * (|e| + max|e|)`` elementwise.

    The absolute part scales with the tensor's magnitude, because sums that cancel (a gradient entry much
    smaller than its terms) carry the rounding error of their largest terms.
    """
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- (a) FSDP2 ------------------------------------------------------------------------------------------------


def _fsdp2_worker(rank: int, store_path: str) -> None:
    """One rank of :func:`test_fsdp2_bitlinear_uses_the_full_weight_scale`."""
    mesh = _init_rank(rank, store_path)
    try:
        for per_channel, lam in ((False, 1.0), (True, 1.0), (False, 0.5)):
            _check_fsdp2(mesh, per_channel, lam)
        _passed_marker(store_path, rank).touch()
    finally:
        dist.destroy_process_group()


def _check_fsdp2(mesh, per_channel: bool, lam: float) -> None:
    """Shard a tiny BitLinear Llama with FSDP2 and compare the scales, outputs and gradients with the unsharded
    model (every rank runs the same inputs, so FSDP2's averaged gradients equal the single-process ones)."""
    from conftest import tiny_model, token_batch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from bittern import quant
    from bittern.convert import ConversionPolicy, to_bitlinear
    from bittern.nn import BitLinear

    config = f"per_channel={per_channel}, lam={lam}"
    policy = ConversionPolicy(per_channel=per_channel, lam=lam)
    reference = to_bitlinear(tiny_model("llama", seed=0), policy).train()
    names = [name for name, module in reference.named_modules() if isinstance(module, BitLinear)]
    assert len(names) == 14, names  # 2 layers x (q, k, v, o, gate, up, down)
    with torch.no_grad():
        for i, name in enumerate(names):
            weight = reference.get_submodule(name).weight
            weight.copy_(_uneven_weight(*weight.shape, seed=100 + i) * 0.02)

    model = copy.deepcopy(reference)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    for name in names:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, DTensor), f"{name}.weight is {type(weight).__name__}, not a DTensor"
        assert weight.placements == (Shard(0),), f"{name}.weight placements {weight.placements}"
        assert weight.to_local().shape[0] < weight.shape[0], f"{name}.weight is not sharded"

    # Spy on the scale BitLinear's forward really uses: BitLinear → quant.ternary_linear_ste (λ = 1) or
    # quant.ste_weight (λ < 1) → quant.ternarize → quant.weight_scale, looked up as a module global at call time.
    current: list[str] = []
    weight_in_forward: dict[str, tuple[bool, torch.Size]] = {}
    used_scales: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def pre_hook(module: torch.nn.Module, name: str) -> None:
        current.append(name)
        weight_in_forward[name] = (isinstance(module.weight, DTensor), module.weight.shape)

    hooks = [
        model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: pre_hook(module, name))
        for name in names
    ]
    real_weight_scale = quant.weight_scale

    def spy_weight_scale(weight: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
        scale = real_weight_scale(weight, per_channel)
        used_scales[current[-1]].append(scale.detach().clone())
        return scale

    ids = token_batch(batch=2, length=16)
    quant.weight_scale = spy_weight_scale
    try:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        quant.weight_scale = real_weight_scale
        for hook in hooks:
            hook.remove()

    ref_out = reference(input_ids=ids, labels=ids)
    ref_out.loss.backward()

    for name in names:
        what = f"{config}: {name}"
        sharded = model.get_submodule(name).weight
        full = sharded.full_tensor()  # a collective: every rank gathers the same names in the same order
        assert torch.equal(full, reference.get_submodule(name).weight), f"{what}: gathered weight differs"
        is_dtensor, shape = weight_in_forward[name]
        assert not is_dtensor and shape == full.shape, (
            f"{what}: forward saw a weight of shape {tuple(shape)} (DTensor: {is_dtensor}), not the full one"
        )
        assert len(used_scales[name]) == 1, f"{what}: weight_scale called {len(used_scales[name])} times"
        used = used_scales[name][0]
        expected = quant.weight_scale(full, per_channel)
        assert torch.equal(used, expected), f"{what}: forward used scale {used}, full-weight scale {expected}"
        if not per_channel:
            _assert_far(quant.weight_scale(sharded.to_local()), expected, what)

    _assert_close(out.logits, ref_out.logits, f"{config}: logits")
    _assert_close(out.loss, ref_out.loss, f"{config}: loss")
    for name, ref_param in reference.named_parameters():
        grad = model.get_parameter(name).grad
        assert grad is not None, f"{config}: {name}: no gradient under FSDP2"
        _assert_close(grad.full_tensor(), ref_param.grad, f"{config}: {name}.grad")


@pytest.mark.slow  # about 14 s on a busy 2-core machine (two spawned ranks each import transformers)
@pytest.mark.skipif(not _fsdp2_available(), reason="FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
def test_fsdp2_bitlinear_uses_the_full_weight_scale(tmp_path: Path) -> None:
    """FSDP2 on a CPU mesh: sharded BitLinear weights, full-tensor scales, reference outputs and gradients."""
    _run_on_ranks(_fsdp2_worker, tmp_path)


# --- (b) tensor-parallel DTensors -----------------------------------------------------------------------------


def _dtensor_worker(rank: int, store_path: str) -> None:
    """One rank of :func:`test_dtensor_weight_scale_is_a_global_reduction`."""
    mesh = _init_rank(rank, store_path)
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        from bittern import quant
        from bittern.nn import BitLinear

        weight = _uneven_weight(33, 20, seed=7)  # 33 rows: an uneven Shard(0) split (17 + 16)
        for dim in (0, 1):
            sharded = distribute_tensor(weight, mesh, [Shard(dim)])
            local = sharded.to_local()
            assert local.shape[dim] < weight.shape[dim], f"Shard({dim}) did not shard"
            for per_channel in (False, True):
                what = f"Shard({dim}), per_channel={per_channel}"
                scale = quant.weight_scale(sharded, per_channel)
                assert isinstance(scale, DTensor), f"{what}: scale is a {type(scale).__name__}"
                expected = quant.weight_scale(weight, per_channel)
                # Summation order differs from the single-tensor mean (partial sums, then an all-reduce):
                # equal up to float32 rounding, a few ulp at most.
                torch.testing.assert_close(
                    scale.full_tensor(), expected, rtol=1e-6, atol=0.0, msg=lambda m, w=what: f"{w}: {m}"
                )
                if per_channel and dim == 0:
                    assert scale.placements == (Shard(0),), f"{what}: placements {scale.placements}"
                else:
                    assert scale.placements == (Replicate(),), f"{what}: placements {scale.placements}"
                    _assert_far(quant.weight_scale(local, per_channel), expected, what)
                codes, _ = quant.ternarize(sharded, per_channel)
                assert torch.equal(codes.full_tensor(), quant.ternarize(weight, per_channel)[0]), f"{what}: codes"

        # BitLinear itself under tensor parallelism (Colwise shards N, Rowwise shards K).
        generator = torch.Generator().manual_seed(3)
        x = torch.randn(3, 5, 20, generator=generator)
        grad_y = torch.randn(3, 5, 33, generator=generator)  # backward of the loss (y * grad_y).sum()
        styles = {
            "colwise": ColwiseParallel(use_local_output=False),
            "rowwise": RowwiseParallel(input_layouts=Replicate(), use_local_output=False),
        }
        for lam, per_channel in ((1.0, False), (1.0, True), (0.5, False)):
            reference = BitLinear(20, 33, lam=lam, per_channel=per_channel)
            with torch.no_grad():
                reference.weight.copy_(weight)
                reference.bias.copy_(torch.linspace(-1, 1, 33))
            ref_x = x.clone().requires_grad_(True)
            ref_y = reference(ref_x)
            (ref_y * grad_y).sum().backward()
            for style_name, style in styles.items():
                what = f"{style_name}, lam={lam}, per_channel={per_channel}"
                unsharded = copy.deepcopy(reference)
                unsharded.zero_grad()
                layer = parallelize_module(unsharded, mesh, style)
                assert isinstance(layer.weight, DTensor), what
                tp_x = x.clone().requires_grad_(True)
                y = layer(tp_x)
                y_full = y.full_tensor() if isinstance(y, DTensor) else y
                _assert_close(y_full, ref_y, f"{what}: output")
                (y_full * grad_y).sum().backward()
                _assert_close(layer.weight.grad.full_tensor(), reference.weight.grad, f"{what}: weight grad")
                _assert_close(layer.bias.grad.full_tensor(), reference.bias.grad, f"{what}: bias grad")
                _assert_close(tp_x.grad, ref_x.grad, f"{what}: input grad")
        _passed_marker(store_path, rank).touch()
    finally:
        dist.destroy_process_group()


def test_dtensor_weight_scale_is_a_global_reduction(tmp_path: Path) -> None:
    """quant.weight_scale / ternarize on Shard(0) and Shard(1) DTensors, and BitLinear under TP, match the full
    tensor's."""
    _run_on_ranks(_dtensor_worker, tmp_path)
