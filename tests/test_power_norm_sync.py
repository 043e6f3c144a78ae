"""Synchronized statistics across two data-parallel workers (gloo on CPU)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm

T, B, C = 6, 8, 12
STEPS = 3


def make_batches():
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        x = torch.randn(T, B, C, generator=gen, dtype=torch.float64) + 0.5
        dy = torch.randn(T, B, C, generator=gen, dtype=torch.float64)
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        out.append((x, torch.arange(T)[None, :] >= lengths[:, None], dy))
    return out


def make_norm(kind, sync):
    if kind == "batch":
        return MaskedBatchNorm(C, sync=sync).double()
    return PowerNorm(C, mode=kind, group_num=3, warmup_updates=1, sync=sync).double()


def train(norm, batches, cols):
    """The input gradients of a training call on each batch's columns ``cols``; ``norm`` the
    layer or its torch.compile'd call."""
    grads = []
    for x, pad, dy in batches:
        xs = x[:, cols].clone().requires_grad_(True)
        norm(xs, pad[cols]).backward(dy[:, cols])
        grads.append(xs.grad)
    return grads


def second_derivatives(norm, batches, cols):
    """d/dx of sum(v * dL/dx) with dL/dx taken under create_graph=True (MaskedBatchNorm's exact
    gradient is differentiable again), on each batch's columns ``cols``."""
    out = []
    for x, pad, dy in batches:
        xs = x[:, cols].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(norm(xs, pad[cols]), xs, dy[:, cols], create_graph=True)
        (grad * torch.cos(x[:, cols])).sum().backward()
        out.append(xs.grad)
    return out


KINDS = ["paper", "official", "vanilla", "batch"]


class Net(torch.nn.Module):
    """A linear layer, then a PowerNorm and a MaskedBatchNorm: what torch DDP wraps below."""

    def __init__(self, sync):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(C, C).double()
        self.pn = make_norm("paper", sync)
        self.bn = make_norm("batch", sync)

    def forward(self, x, pad):
        return self.bn(self.pn(self.lin(x), pad), pad)


def train_net(net, batches, cols, lr):
    """SGD steps on sum(y * dy) over each batch's columns ``cols``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for x, pad, dy in batches:
        opt.zero_grad()
        (net(x[:, cols], pad[cols]) * dy[:, cols]).sum().backward()
        opt.step()


def normalized_by_broadcast_statistics(rank, cols):
    """Under torch DDP's buffer broadcast (broadcast_buffers=True, its default) each forward
    starts from rank 0's buffers; rank 1 sees batches of padding only in its first two calls,
    which do not count, so its own count lags behind. Returns, for the calls after rank 0's
    warm-up, how far y is from x / sqrt(psi^2 + eps) with rank 0's psi^2 (the broadcast
    writes num_steps without bumping its version: the layer must still see it)."""
    norm = PowerNorm(C, warmup_updates=3).double()
    ddp = torch.nn.parallel.DistributedDataParallel(norm)
    errors = []
    for call in range(5):
        x, pad, dy = make_batches()[call % STEPS]
        x, pad, dy = x[:, cols], pad[cols], dy[:, cols]
        if rank == 1 and call < 2:
            pad = torch.ones_like(pad)
        phi = norm.running_phi.clone()
        dist.broadcast(phi, 0)
        y = ddp(x, pad)
        y.backward(dy)
        if call >= 3:
            errors.append(float((y - x / torch.sqrt(phi + norm.eps)).abs().max()))
    return errors


def worker(rank, port, out_dir):
    """Each rank trains on its half of every batch: all kinds with sync, paper without, and
    paper with sync under torch.compile."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        half = B // 2
        cols = slice(rank * half, (rank + 1) * half)
        results = {}
        for kind, sync in [(k, True) for k in KINDS] + [("paper", False)]:
            norm = make_norm(kind, sync)
            grads = train(norm, make_batches(), cols)
            results[f"{kind}-{sync}"] = {"state": norm.state_dict(), "grads": grads}
        results["batch-second"] = second_derivatives(make_norm("batch", True), make_batches(), cols)
        norm = make_norm("paper", True)
        grads = train(torch.compile(norm, backend="eager"), make_batches(), cols)
        results["paper-True-compiled"] = {"state": norm.state_dict(), "grads": grads}
        # inside torch DDP, whose gradient all-reduces (autograd hooks) interleave with the
        # layers' own all-reduces in the backward pass
        ddp = torch.nn.parallel.DistributedDataParallel(Net(sync=True), broadcast_buffers=False)
        train_net(ddp, make_batches(), cols, lr=0.1)
        results["ddp"] = ddp.module.state_dict()
        results["ddp-broadcast"] = normalized_by_broadcast_statistics(rank, cols)
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sync_equals_one_worker_on_the_whole_batch(kind, two_workers):
    ranks = [r[f"{kind}-True"] for r in two_workers]
    single = make_norm(kind, False)
    full_grads = train(single, make_batches(), slice(None))
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
        if name not in ("weight", "bias"):
            torch.testing.assert_close(ranks[0]["state"][name], value)
    half = B // 2
    for step, full in enumerate(full_grads):
        torch.testing.assert_close(ranks[0]["grads"][step], full[:, :half])
        torch.testing.assert_close(ranks[1]["grads"][step], full[:, half:])


@pytest.mark.slow
def test_sync_batch_norm_second_derivatives_equal_one_worker_on_the_whole_batch(two_workers):
    full = second_derivatives(make_norm("batch", False), make_batches(), slice(None))
    half = B // 2
    for step, want in enumerate(full):
        torch.testing.assert_close(two_workers[0]["batch-second"][step], want[:, :half])
        torch.testing.assert_close(two_workers[1]["batch-second"][step], want[:, half:])


@pytest.mark.slow
def test_without_sync_workers_keep_their_own_statistics(two_workers):
    a, b = (r["paper-False"]["state"]["running_phi"] for r in two_workers)
    assert not torch.allclose(a, b)


@pytest.mark.slow
def test_sync_under_torch_compile_trains_as_in_eager(two_workers):
    # torch.compile traces the Python step that synchronized statistics run, all-reduces and
    # C++ passes included
    for rank in two_workers:
        eager, compiled = rank["paper-True"], rank["paper-True-compiled"]
        for name, value in eager["state"].items():
            torch.testing.assert_close(compiled["state"][name], value, rtol=0, atol=0)
        for got, want in zip(compiled["grads"], eager["grads"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_sync_inside_torch_ddp_trains_as_one_worker_on_the_whole_batch(two_workers):
    # DDP averages the two ranks' gradients, half the whole batch's: one worker at half the
    # learning rate. (Not half the loss: nu follows the scale of the gradient a layer receives.)
    single = Net(sync=False)
    train_net(single, make_batches(), slice(None), lr=0.05)
    for name, want in single.state_dict().items():
        for rank in two_workers:
            torch.testing.assert_close(rank["ddp"][name], want, msg=name)


@pytest.mark.slow
def test_warm_up_follows_the_step_count_that_torch_ddp_broadcasts(two_workers):
    for rank in two_workers:
        assert max(rank["ddp-broadcast"]) < 1e-12, rank["ddp-broadcast"]
