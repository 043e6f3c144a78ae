"""PowerNorm and MaskedBatchNorm on a CUDA device: the same equations and contracts as on CPU.

(The state_dict round trip runs on both devices in test_power_norm.py.)

Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm, group_rms_scale
from reference_powernorm import powernorm_step
from test_power_norm import C, MODES, random_batch, run_module_step, run_module_steps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
MERGED_FINISH = "POWERNORM_CUDA_MERGED_FINISH"  # read once, at the first CUDA training call


def on_gpu(batch, dtype):
    x, pad, dy = batch
    return x.to(CUDA, dtype), pad.to(CUDA), dy.to(CUDA, dtype)


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["native", "compiled", "eager"])
def test_matches_equations_over_consecutive_steps_on_gpu(mode, groups, backend):
    gen = torch.Generator().manual_seed(1)
    pn = PowerNorm(C, mode=mode, group_num=groups, warmup_updates=2, alpha_fwd=0.8,
                   alpha_bkw=0.7, backend=backend).to(CUDA)
    with torch.no_grad():
        pn.weight.copy_(1 + 0.1 * torch.randn(C, generator=gen))
        pn.bias.copy_(0.1 * torch.randn(C, generator=gen))
    state = {"phi": torch.ones(C, dtype=torch.float64), "nu": torch.zeros(C, dtype=torch.float64), "step": 0}
    gamma, beta = pn.weight.detach().cpu().double(), pn.bias.detach().cpu().double()
    for _ in range(6):  # two warm-up steps, then four with running statistics
        x, pad, dy = random_batch(gen)
        got = run_module_step(pn, *on_gpu((x, pad, dy), torch.float32))
        *want, state = powernorm_step(x, pad, dy, gamma, beta, state, mode, 2, 0.8, 0.7, 1e-5, groups)
        got += (pn.running_phi, pn.running_nu)
        want += (state["phi"], state["nu"])
        for g, w in zip(got, want):
            assert g.device.type == "cuda"
            torch.testing.assert_close(g.cpu().double(), w, rtol=2e-4, atol=2e-4)
        assert int(pn.num_steps) == state["step"]


@pytest.mark.parametrize("backend", ["native", "compiled"])
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu_keeps_fp32_statistics_and_matches_eager(half, backend):
    gen = torch.Generator().manual_seed(11)
    batches = [on_gpu(random_batch(gen, torch.float32), half) for _ in range(3)]
    results = []
    for backend in ("eager", backend):
        pn = PowerNorm(C, group_num=3, backend=backend).to(CUDA).to(half)
        assert pn.running_phi.dtype == torch.float32 and pn.weight.dtype == half
        results.append(run_module_steps(pn, batches))
    for e, c in zip(*results):
        assert e.dtype == c.dtype and torch.isfinite(c).all()
        torch.testing.assert_close(e.float(), c.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C_big,groups,dtype,T_big,B_big", [
    (512, None, torch.float32, 37, 11), (2560, 8, torch.float32, 37, 11),
    (1024, 16, torch.bfloat16, 37, 11), (96, 3, torch.float64, 37, 11),
    (1024, 4, torch.float32, 64, 84),  # 5376 rows: 128 row blocks of 42 rows
    (4096, 2048, torch.float64, 5, 3),  # the row and its factors fill 48 KiB of shared memory
    (4096, 4096, torch.float64, 5, 3)])  # more than that: left to the Python step
def test_native_kernels_match_eager_at_model_widths(mode, C_big, groups, dtype, T_big, B_big):
    # the fused kernels keep up to 8 columns per thread, in blocks of 256 or (C > 2048) 512,
    # and cut the rows into at most 128 blocks of at least 4
    gen = torch.Generator().manual_seed(6)
    pad = torch.zeros(B_big, T_big, dtype=torch.bool)
    pad[2:, -5:] = True
    batches = [((torch.randn(T_big, B_big, C_big, generator=gen) * 2 + 0.5).to(CUDA, dtype),
                pad.to(CUDA), torch.randn(T_big, B_big, C_big, generator=gen).to(CUDA, dtype))
               for _ in range(3)]
    results = []
    for backend in ("eager", "native"):
        pn = PowerNorm(C_big, mode=mode, group_num=groups, warmup_updates=1,
                       backend=backend).to(CUDA, dtype)
        results.append(run_module_steps(pn, batches) + [pn.num_steps])
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-10}[dtype]
    tol *= 10 if T_big * B_big > 1000 else 1  # (float32 sums of 5000 terms, in another order)
    for e, n in zip(*results):
        torch.testing.assert_close(n.float() if dtype == torch.bfloat16 else n,
                                   e.float() if dtype == torch.bfloat16 else e, rtol=tol, atol=tol)


def test_gpu_and_cpu_training_agree_and_checkpoints_move_between_them():
    gen = torch.Generator().manual_seed(3)
    batches = [random_batch(gen, torch.float32) for _ in range(4)]
    cpu = PowerNorm(C, mode="paper", group_num=3, warmup_updates=2)
    gpu = copy.deepcopy(cpu).to(CUDA)
    want = run_module_steps(cpu, batches)
    got = run_module_steps(gpu, [on_gpu(b, torch.float32) for b in batches])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4)
    back = PowerNorm(C, mode="paper", group_num=3, warmup_updates=2)
    back.load_state_dict(gpu.state_dict())
    assert int(back.num_steps) == 4 and back.running_phi.device.type == "cpu"


@pytest.mark.parametrize("make", [
    lambda: PowerNorm(C), lambda: PowerNorm(C, mode="official", warmup_updates=3),
    lambda: PowerNorm(C, mode="vanilla", group_num=3), lambda: MaskedBatchNorm(C),
])
def test_all_padding_batch_on_gpu_is_finite_and_leaves_statistics(make):
    norm = make().to(CUDA)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(5, 3, C, device=CUDA, requires_grad=True)
    y = norm(x, torch.ones(3, 5, dtype=torch.bool, device=CUDA))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", MODES)
def test_nan_input_on_gpu_is_refused_and_not_folded_into_statistics(mode):
    pn = PowerNorm(C, mode=mode).to(CUDA)
    pn.name = "encoder.layers.0.final_layer_norm"
    before = {k: v.clone() for k, v in pn.state_dict().items()}
    x = torch.randn(5, 3, C, device=CUDA)
    x[2, 1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="encoder.layers.0.final_layer_norm"):
        pn(x)
        pn(torch.randn(5, 3, C, device=CUDA))  # the check may report on the next call
    for k, v in pn.state_dict().items():
        assert torch.equal(v, before[k]), k


def steps_never_waiting(norm, x, pad, dy, steps=2):
    """Training steps of ``norm`` under torch's sync debug mode "error", which raises at any
    host-device synchronization."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            run_module_step(norm, x, pad, dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["native", "compiled", "eager"])
def test_training_step_on_gpu_never_waits_for_the_device(mode, backend):
    # after the first calls (which read the step counter and count the mask's tokens), a
    # training step only queues work: torch reports any host-device synchronization
    gen = torch.Generator().manual_seed(5)
    x, pad, dy = on_gpu(random_batch(gen, torch.float32), torch.float32)
    pn = PowerNorm(C, mode=mode, group_num=3, warmup_updates=2, backend=backend).to(CUDA)
    for _ in range(3):
        run_module_step(pn, x, pad, dy)
    steps_never_waiting(pn, x, pad, dy)
    assert int(pn.num_steps) == 5


@pytest.mark.parametrize("padded", [True, False])
def test_masked_batch_norm_on_gpu_matches_cpu(padded):
    gen = torch.Generator().manual_seed(4)
    x, pad, dy = random_batch(gen, torch.float32)
    pad = pad if padded else torch.zeros_like(pad)  # none: torch's batch norm kernels
    cpu = MaskedBatchNorm(C)
    gpu = copy.deepcopy(cpu).to(CUDA)
    for _ in range(2):
        want = run_module_step(cpu, x, pad, dy)
        got = run_module_step(gpu, *on_gpu((x, pad, dy), torch.float32))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4)
    for k, v in gpu.state_dict().items():
        torch.testing.assert_close(v.cpu(), cpu.state_dict()[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_masked_batch_norm_training_on_gpu_never_waits_for_the_device(padded):
    gen = torch.Generator().manual_seed(6)
    x, pad, dy = on_gpu(random_batch(gen, torch.float32), torch.float32)
    pad = pad if padded else torch.zeros_like(pad)
    bn = MaskedBatchNorm(C).to(CUDA)
    run_module_step(bn, x, pad, dy)  # counts the mask's tokens
    steps_never_waiting(bn, x, pad, dy)
    assert int(bn.num_batches_tracked) == 3


def test_masked_batch_norm_nan_on_gpu_is_reported_at_the_next_call():
    bn = MaskedBatchNorm(C).to(CUDA)
    bn.name = "encoder.layers.0.final_layer_norm"
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(5, 3, C, device=CUDA)
    x[2, 1, 3] = float("nan")
    bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(FloatingPointError, match="encoder.layers.0.final_layer_norm.*previous"):
        bn(torch.randn(5, 3, C, device=CUDA))


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_vanilla_gradcheck_on_gpu(backend):
    gen = torch.Generator().manual_seed(2)
    x, pad, _ = random_batch(gen)
    pn = PowerNorm(C, mode="vanilla", group_num=3, backend=backend).to(CUDA).double()
    pad = pad.to(CUDA)
    torch.autograd.gradcheck(lambda t: pn(t, pad), (x.to(CUDA).requires_grad_(True),))


def test_group_scaling_compiled_on_gpu_matches_eager():
    x = torch.randn(6, 4, C, device=CUDA, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    grads = []
    for backend in ("eager", "compiled"):
        x.grad = None
        y = group_rms_scale(x.float(), 3, backend=backend)
        y.backward(dy.float())
        grads.append((y.detach(), x.grad.clone()))
    for e, c in zip(*grads):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,sweeps", [("paper", 1), ("official", 1), ("vanilla", 2)])
def test_native_step_launches_one_finish_per_direction_or_none_when_merged(mode, sweeps):
    # per direction: the rows kernel (twice in PN-V), then the finish kernel, which the merged
    # finish runs inside the rows kernel instead
    gen = torch.Generator().manual_seed(6)
    x, pad, dy = on_gpu(random_batch(gen, torch.float32), torch.float32)
    pn = PowerNorm(C, mode=mode, backend="native").to(CUDA)
    run_module_step(pn, x, pad, dy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_module_step(pn, x, pad, dy)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = ("forward_rows", "backward_rows", "finish_forward", "finish_backward")
    launches = {kernel: sum(kernel in name for name in names) for kernel in kernels}
    finishes = 0 if os.environ.get(MERGED_FINISH) == "1" else 1
    assert launches == {"forward_rows": sweeps, "backward_rows": sweeps,
                        "finish_forward": finishes, "finish_backward": finishes}, names


@pytest.mark.skipif(os.environ.get(MERGED_FINISH) == "1", reason="this is the merged run")
def test_native_tests_pass_with_the_finish_merged_into_the_rows_kernels():
    # The native library reads $POWERNORM_CUDA_MERGED_FINISH once per process, so the
    # merged finish gets a process of its own: this file's tests of the native kernels again.
    tests = "(native or not (compiled or eager)) and not masked_batch_norm"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          __file__, "-k", tests], env=dict(os.environ, **{MERGED_FINISH: "1"}),
                         capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
