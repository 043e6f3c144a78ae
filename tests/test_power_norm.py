"""PowerNorm against a float64 transcription of its equations, and its contracts."""
import copy
import itertools
import math
import warnings

import pytest
import torch

from powernorm_plugin.modules import PowerNorm, build_norm
from reference_powernorm import group_scale, powernorm_step

T, B, C = 7, 5, 12
GROUPS = [None, 3]
MODES = ["paper", "official", "vanilla"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def random_batch(gen, dtype=torch.float64, pad_frac=0.3, features=C):
    x = torch.randn(T, B, features, generator=gen, dtype=dtype) * 2 + 0.5
    dy = torch.randn(T, B, features, generator=gen, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    pad = torch.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    return x, pad, dy


def run_module_step(pn, x, pad, dy):
    x = x.clone().requires_grad_(True)
    pn.zero_grad()
    y = pn(x, pad)
    y.backward(dy)
    return y.detach(), x.grad, pn.weight.grad.clone(), pn.bias.grad.clone()


def run_module_steps(pn, batches):
    """Outputs and gradients of consecutive training steps on (x, pad, dy) batches, then the
    running statistics they leave."""
    outs = []
    for x, pad, dy in batches:
        outs += run_module_step(pn, x, pad, dy)
    return outs + [pn.running_phi, pn.running_nu]


def layer_backend(backend, monkeypatch):
    """The backend name for PowerNorm; ``native-python`` is the native backend with every call
    declined by its C++ step, so that it runs as the Python step on the native passes (as
    synchronized statistics do, and the calls the C++ step has no fused kernels for)."""
    if backend == "native-python":
        from powernorm_plugin.modules.native_kernels import NativeKernels

        monkeypatch.setattr(NativeKernels, "fused", False)
        return "native"
    return backend


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend,dtype,tol", [
    ("eager", torch.float64, 1e-10),
    ("eager", torch.float32, 2e-4),
    ("native", torch.float64, 1e-10),
    ("native", torch.float32, 2e-4),
    ("native-python", torch.float64, 1e-10),
    ("native-python", torch.float32, 2e-4),
    pytest.param("compiled", torch.float32, 2e-4, marks=pytest.mark.slow),
])
def test_matches_equations_over_consecutive_steps(mode, groups, backend, dtype, tol, monkeypatch):
    check_equations(mode, groups, layer_backend(backend, monkeypatch), dtype, tol)


@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("mode,causal", [
    ("paper", True), ("official", True), ("paper", False), ("vanilla", False)])
@pytest.mark.parametrize("backend", ["eager", "native", "native-python"])
def test_causal_mode_and_another_eps_match_equations(mode, causal, groups, backend, monkeypatch):
    # causal (every decoder layer): warm-up normalizes by psi_{t-1}, not by psi_B
    check_equations(mode, groups, layer_backend(backend, monkeypatch), torch.float64, 1e-10,
                    eps=0.3, causal=causal)


def check_equations(mode, groups, backend, dtype, tol, eps=1e-5, causal=False):
    """Six consecutive training steps (two of warm-up) against the float64 transcription."""
    gen = torch.Generator().manual_seed(1)
    warmup = 2
    pn = PowerNorm(C, mode=mode, group_num=groups, warmup_updates=warmup, alpha_fwd=0.8,
                   alpha_bkw=0.7, eps=eps, causal=causal, backend=backend).to(dtype)
    with torch.no_grad():
        pn.weight.copy_(1 + 0.1 * torch.randn(C, generator=gen))
        pn.bias.copy_(0.1 * torch.randn(C, generator=gen))
    state = {"phi": torch.ones(C, dtype=torch.float64), "nu": torch.zeros(C, dtype=torch.float64), "step": 0}
    gamma, beta = pn.weight.detach().double(), pn.bias.detach().double()
    for _ in range(6):  # two warm-up steps, then four with running statistics
        x, pad, dy = random_batch(gen)
        y, dx, dg, db = run_module_step(pn, x.to(dtype), pad, dy.to(dtype))
        ry, rdx, rdg, rdb, state = powernorm_step(x, pad, dy, gamma, beta, state, mode, warmup,
                                                  0.8, 0.7, eps, groups, causal)
        for got, want in [(y, ry), (dx, rdx), (dg, rdg), (db, rdb),
                          (pn.running_phi, state["phi"]), (pn.running_nu, state["nu"])]:
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        assert int(pn.num_steps) == state["step"]
    assert pn.running_phi.dtype == dtype


def test_paper_mode_nu_is_nonzero_and_changes_gradient():
    """The approximate backward is really active: nu != 0 changes dL/dx vs plain scaling."""
    gen = torch.Generator().manual_seed(2)
    pn = PowerNorm(C)
    for _ in range(3):
        x, pad, dy = random_batch(gen, torch.float32)
        phi, nu = pn.running_phi.clone(), pn.running_nu.clone()  # what this step uses
        _, dx, _, _ = run_module_step(pn, x, pad, dy)
    assert nu.abs().max() > 1e-3
    tok = ~pad.t()
    plain = dy * pn.weight.detach() / torch.sqrt(phi + 1e-5)  # the step's scale, without nu
    assert not torch.allclose(dx[tok], plain[tok], atol=1e-4)
    torch.testing.assert_close(dx[~tok], plain[~tok])  # padding rows get no nu term


def test_padding_rows_get_no_nu_correction():
    gen = torch.Generator().manual_seed(3)
    pn = PowerNorm(C)
    pn.running_nu.fill_(0.5)
    x, pad, dy = random_batch(gen, torch.float32)
    inv = torch.rsqrt(pn.running_phi + 1e-5)
    _, dx, _, _ = run_module_step(pn, x, pad, dy)
    padded = pad.t()  # (T, B)
    torch.testing.assert_close(dx[padded], (dy * inv)[padded])


def test_padding_values_do_not_change_token_outputs_or_statistics():
    gen = torch.Generator().manual_seed(4)
    x, pad, dy = random_batch(gen, torch.float32)
    x2 = x.clone()
    x2[pad.t()] = 1e3
    outs = []
    for inp in (x, x2):
        pn = PowerNorm(C, mode="vanilla", group_num=3)
        y, dx, _, _ = run_module_step(pn, inp, pad, torch.where(pad.t()[..., None], 0.0, dy))
        outs.append((y[~pad.t()], dx[~pad.t()], pn.running_phi.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("groups", GROUPS)
def test_gradcheck_eval_mode(groups):
    pn = PowerNorm(C, group_num=groups).double()
    pn.running_phi.uniform_(0.5, 2.0)
    pn.eval()
    x = torch.randn(3, 2, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pn(t), (x,))
    assert torch.autograd.gradcheck(lambda w: torch.nn.functional.linear(pn(x), w), (torch.randn(4, C, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("groups", GROUPS)
def test_gradcheck_vanilla_training_mode_with_padding(groups):
    pn = PowerNorm(C, mode="vanilla", group_num=groups).double()
    gen = torch.Generator().manual_seed(5)
    x, pad, _ = random_batch(gen)
    x = x[:, :3].clone().requires_grad_(True)
    pad = pad[:3]
    assert torch.autograd.gradcheck(lambda inp: pn(inp, pad), (x,))


def test_vanilla_weight_and_bias_gradients_match_autograd():
    gen = torch.Generator().manual_seed(6)
    x, pad, dy = random_batch(gen)
    pn = PowerNorm(C, mode="vanilla").double()
    _, _, dg, db = run_module_step(pn, x, pad, dy)
    w = torch.ones(C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    tok = ~pad.t()
    y = w * x / torch.sqrt((x[tok] ** 2).mean(0) + 1e-5) + b
    y.backward(dy)
    torch.testing.assert_close(dg, w.grad)
    torch.testing.assert_close(db, b.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_mid_training_continues_bit_for_bit(mode, device):
    gen = torch.Generator().manual_seed(7)
    batches = [tuple(t.to(device) for t in random_batch(gen, torch.float32)) for _ in range(6)]
    a = PowerNorm(C, mode=mode, group_num=3, warmup_updates=4).to(device)
    for x, pad, dy in batches[:3]:
        run_module_step(a, x, pad, dy)
    saved = copy.deepcopy(a.state_dict())
    assert set(saved) == {"weight", "bias", "running_phi", "running_nu", "num_steps"}
    b = PowerNorm(C, mode=mode, group_num=3, warmup_updates=4).to(device)
    b.load_state_dict(saved)
    for x, pad, dy in batches[3:]:  # crosses the end of warm-up
        ra = run_module_step(a, x, pad, dy)
        rb = run_module_step(b, x, pad, dy)
        for u, v in zip(ra, rb):
            assert torch.equal(u, v)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_step_mirror_follows_one_increment_per_call_and_rereads_anything_else():
    from powernorm_plugin.modules.host_mirrors import StepCounter

    class DeviceSteps(StepCounter):  # the mirror as on a GPU, where reading the buffer waits
        _reads_directly = staticmethod(lambda num_steps: False)

    steps, num_steps = DeviceSteps(), torch.zeros((), dtype=torch.long)
    assert steps.value(num_steps) == 0
    version = num_steps._version
    num_steps.add_(1)  # what a training call does (in place, or in a kernel that bumps the version)
    steps.moved(num_steps, version)
    assert steps.value(num_steps) == 1
    steps.moved(num_steps, num_steps._version)  # a call that did not count (no tokens)
    assert steps.value(num_steps) == 1
    version = num_steps._version
    num_steps.add_(1)
    num_steps.add_(5)  # something else changed it too: read again
    steps.moved(num_steps, version)
    assert steps.value(num_steps) == 7
    # the same object with another tensor's contents swapped in (torch.utils.swap_tensors, as
    # load_state_dict does under torch.__future__), even at the same version: read again
    replacement = torch.full((), 3, dtype=torch.long)
    while replacement._version < num_steps._version:
        replacement.add_(0)
    torch.utils.swap_tensors(num_steps, replacement)
    assert steps.value(num_steps) == 3


def test_step_count_written_where_torch_keeps_no_version_is_seen_by_the_next_call():
    # on the CPU the layer reads num_steps at each call: a write through .data (or by DDP's
    # buffer broadcast, or another process sharing the memory) does not bump the version
    gen = torch.Generator().manual_seed(12)
    batches = [random_batch(gen, torch.float32) for _ in range(5)]
    for backend in ("native", "eager"):
        a, b = (PowerNorm(C, warmup_updates=3, backend=backend) for _ in range(2))
        run_module_steps(a, batches)  # past warm-up
        a.num_steps.data.zero_()  # back into it, with b's state
        a.running_phi.data.fill_(1.0)
        a.running_nu.data.zero_()
        for u, v in zip(run_module_steps(a, batches), run_module_steps(b, batches)):
            assert torch.equal(u, v)


def test_checkpoint_loads_by_swapping_tensors_after_training():
    # torch.__future__'s swap of module tensors on load refuses a tensor with a weak
    # reference: the layer's host mirror of num_steps must not hold one
    gen = torch.Generator().manual_seed(12)
    batches = [random_batch(gen, torch.float32) for _ in range(4)]
    a, b = PowerNorm(C, warmup_updates=3), PowerNorm(C, warmup_updates=3)
    run_module_step(a, *batches[0])
    saved = copy.deepcopy(a.state_dict())
    run_module_steps(a, batches[1:])
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        a.load_state_dict(saved)
        b.load_state_dict(saved)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)
    for u, v in zip(run_module_steps(a, batches[1:]), run_module_steps(b, batches[1:])):
        assert torch.equal(u, v)


def test_reloaded_or_edited_step_count_is_seen_by_the_next_call():
    # the layer mirrors num_steps on the host; a load_state_dict or an in-place edit of the
    # buffer must reach that mirror, or warm-up would be decided from a stale count
    gen = torch.Generator().manual_seed(12)
    batches = [random_batch(gen, torch.float32) for _ in range(4)]
    a = PowerNorm(C, warmup_updates=3)
    run_module_step(a, *batches[0])
    saved = copy.deepcopy(a.state_dict())
    run_module_steps(a, batches[1:])  # a's mirror now says 4 steps
    a.load_state_dict(saved)
    b = PowerNorm(C, warmup_updates=3)
    b.load_state_dict(saved)
    for u, v in zip(run_module_steps(a, batches[1:]), run_module_steps(b, batches[1:])):
        assert torch.equal(u, v)
    with torch.no_grad():
        a.num_steps.zero_()  # back into warm-up
    b = PowerNorm(C, warmup_updates=3)
    b.load_state_dict(a.state_dict())
    for u, v in zip(run_module_steps(a, batches), run_module_steps(b, batches)):
        assert torch.equal(u, v)
    assert int(a.num_steps) == 4


@pytest.mark.parametrize("setting,value", [("mode", "official"), ("eps", 0.5),
                                           ("warmup_updates", 5), ("alpha_fwd", 0.3)])
def test_setting_changed_after_training_applies_to_the_next_call(setting, value):
    # a layer keeps its call configuration between training calls: changing a setting must
    # reach the next call, as for a layer built with it
    gen = torch.Generator().manual_seed(14)
    batches = [random_batch(gen, torch.float32) for _ in range(3)]
    a = PowerNorm(C, group_num=3)
    run_module_steps(a, batches[:1])
    setattr(a, setting, value)
    b = PowerNorm(C, group_num=3, **{setting: value})
    b.load_state_dict(a.state_dict())
    for u, v in zip(run_module_steps(a, batches[1:]), run_module_steps(b, batches[1:])):
        assert torch.equal(u, v)


def test_copy_of_a_trained_layer_counts_its_own_steps():
    # a deep copy (fairseq's EMA model, a model copied for evaluation) carries no call
    # configuration of the original's: its step count and warm-up follow its own buffers
    gen = torch.Generator().manual_seed(15)
    batches = [random_batch(gen, torch.float32) for _ in range(4)]
    a = PowerNorm(C, warmup_updates=3)
    run_module_steps(a, batches[:2])
    b = copy.deepcopy(a)
    run_module_steps(b, batches[2:])
    assert int(a.num_steps) == 2 and int(b.num_steps) == 4
    fresh = PowerNorm(C, warmup_updates=3)
    fresh.load_state_dict(a.state_dict())
    for u, v in zip(run_module_steps(a, batches[2:]), run_module_steps(fresh, batches[2:])):
        assert torch.equal(u, v)


@pytest.mark.parametrize("groups", GROUPS)
def test_eval_mode_is_a_fixed_affine_map_and_updates_nothing(groups):
    gen = torch.Generator().manual_seed(8)
    eps = 0.3
    pn = PowerNorm(C, eps=eps, group_num=groups)
    for _ in range(3):
        run_module_step(pn, *random_batch(gen, torch.float32))
    with torch.no_grad():  # as training leaves them, not the initial 1 and 0
        pn.weight.copy_(1 + 0.5 * torch.randn(C, generator=gen))
        pn.bias.copy_(torch.randn(C, generator=gen))
    pn.eval()
    before = copy.deepcopy(pn.state_dict())
    x = torch.randn(4, 2, C, generator=gen)
    y = pn(x)
    z = group_scale(x.double().view(-1, C), groups, eps).view(x.shape)
    gamma, beta, phi = (t.detach().double() for t in (pn.weight, pn.bias, pn.running_phi))
    torch.testing.assert_close(y.double(), gamma * z / torch.sqrt(phi + eps) + beta,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pn(x[:, :1]), y[:, :1])  # no batch dependence
    for k, v in pn.state_dict().items():
        assert torch.equal(v, before[k])


def test_causal_mode_output_ignores_the_current_batch_even_in_warmup():
    gen = torch.Generator().manual_seed(9)
    pn = PowerNorm(C, warmup_updates=5, causal=True)
    x, _, _ = random_batch(gen, torch.float32)
    y = pn(x)
    x2 = x.clone()
    x2[-1] = 100.0  # change the last time step only
    y2 = PowerNorm(C, warmup_updates=5, causal=True)(x2)
    torch.testing.assert_close(y[:-1], y2[:-1])
    with pytest.raises(ValueError, match="vanilla"):
        PowerNorm(C, mode="vanilla", causal=True)


def test_non_causal_warmup_does_depend_on_later_tokens():
    gen = torch.Generator().manual_seed(9)
    x, _, _ = random_batch(gen, torch.float32)
    x2 = x.clone()
    x2[-1] = 100.0
    y = PowerNorm(C, warmup_updates=5)(x)
    y2 = PowerNorm(C, warmup_updates=5)(x2)
    assert not torch.allclose(y[:-1], y2[:-1])


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_fp32_statistics(half):
    # the statistics of a half-precision layer are those of an fp32 layer fed the same
    # (rounded) values, to fp32 rounding: nothing is accumulated in half precision
    gen = torch.Generator().manual_seed(10)
    batches = [tuple(t if t.dtype == torch.bool else t.to(half) for t in random_batch(gen))
               for _ in range(2)]
    ref = PowerNorm(C, group_num=3)
    pn = PowerNorm(C, group_num=3).to(half)
    assert pn.weight.dtype == half
    assert pn.running_phi.dtype == torch.float32 and pn.running_nu.dtype == torch.float32
    for x, pad, dy in batches:
        run_module_step(ref, x.float(), pad, dy.float())
        y, dx, dg, _ = run_module_step(pn, x, pad, dy)
        assert y.dtype == half and dx.dtype == half and dg.dtype == half
        torch.testing.assert_close(pn.running_phi, ref.running_phi, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pn.running_nu, ref.running_nu, rtol=1e-4, atol=1e-6)
    assert (ref.running_phi - 1).abs().min() > 1e-3 and ref.running_nu.abs().min() > 1e-5
    pn.float()
    assert pn.running_phi.dtype == torch.float32
    # values that overflow fp16 when squared still give finite statistics
    big = PowerNorm(C).half()
    big(torch.full((2, 2, C), 300.0, dtype=torch.float16))
    assert torch.isfinite(big.running_phi).all()


def test_double_keeps_double_buffers():
    assert PowerNorm(C).double().running_phi.dtype == torch.float64


def test_fp16_overflowed_gradient_leaves_nu_untouched():
    # loss scaling overflows now and then: that step's nu is dropped, the previous one kept
    pn = PowerNorm(C)
    x = torch.randn(3, 2, C, requires_grad=True)
    pn(x).backward(torch.randn(3, 2, C))
    nu = pn.running_nu.clone()
    assert nu.abs().min() > 0
    pn(x).backward(torch.full((3, 2, C), float("inf")))
    assert torch.equal(pn.running_nu, nu)


def test_backend_choice():
    assert PowerNorm(C, backend="eager").backend == "eager"
    with pytest.raises(ValueError, match="auto, native, compiled, eager"):
        PowerNorm(C, backend="triton")


@pytest.mark.parametrize("backend", [
    "native", pytest.param("compiled", marks=pytest.mark.slow)])
def test_fused_backends_match_eager_with_low_precision_and_padding(backend):
    gen = torch.Generator().manual_seed(11)
    x, pad, dy = random_batch(gen, torch.float32)
    batches = [(x.to(torch.bfloat16), pad, dy.to(torch.bfloat16))] * 2
    results = []
    for backend in ("eager", backend):
        pn = PowerNorm(C, group_num=3, backend=backend).to(torch.bfloat16)
        results.append(run_module_steps(pn, batches))
    for e, c in zip(*results):
        assert e.dtype == c.dtype
        torch.testing.assert_close(e.float(), c.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", MODES)
def test_native_matches_eager_without_padding(mode):
    # no padding: the token sums are the all-row sums, which the native kernels compute once
    gen = torch.Generator().manual_seed(7)
    batches = [(x, None, dy) for x, _, dy in (random_batch(gen) for _ in range(3))]
    results = []
    for backend in ("eager", "native"):
        pn = PowerNorm(C, mode=mode, warmup_updates=1, backend=backend).double()
        results.append(run_module_steps(pn, batches))
    for e, n in zip(*results):
        torch.testing.assert_close(n, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode,groups,dtype,C_big", [
    ("paper", None, torch.float32, 1027), ("vanilla", 13, torch.float32, 1027),
    ("official", None, torch.bfloat16, 2054)])
def test_native_matches_eager_on_outputs_written_with_streaming_stores(mode, groups, dtype, C_big):
    # Outputs of 4 MiB and more take the kernels' non-temporal stores (kStreamBytes in
    # power_norm_cpu.cpp); an odd row length makes rows start off the 32-byte boundary.
    T_big, B_big = 33, 31
    assert T_big * B_big * C_big * dtype.itemsize >= 4 << 20
    gen = torch.Generator().manual_seed(3)
    pad = torch.zeros(B_big, T_big, dtype=torch.bool)
    pad[1:, -3:] = True
    batches = [((torch.randn(T_big, B_big, C_big, generator=gen) + 0.5).to(dtype), pad,
                torch.randn(T_big, B_big, C_big, generator=gen).to(dtype)) for _ in range(2)]
    results = []
    for backend in ("eager", "native"):
        pn = PowerNorm(C_big, mode=mode, group_num=groups, backend=backend).to(dtype)
        results.append(run_module_steps(pn, batches))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for e, n in zip(*results):
        torch.testing.assert_close(n.float(), e.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("features,groups", [(256, 8), (512, 8), (512, 4)])
def test_native_group_spans_compiled_as_constants_match_eager(mode, features, groups):
    # float input with 32, 64 or 128 channels per group runs kernels compiled for that span
    # (with_span in power_norm_cpu.cpp); a warm-up step, then a step on running statistics
    gen = torch.Generator().manual_seed(8)
    batches = [random_batch(gen, torch.float32, features=features) for _ in range(2)]
    results = []
    for backend in ("eager", "native"):
        pn = PowerNorm(features, mode=mode, group_num=groups, warmup_updates=1, backend=backend)
        results.append(run_module_steps(pn, batches))
    for e, n in zip(*results):
        torch.testing.assert_close(n, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode,groups", [("paper", None), ("vanilla", 3), ("official", 3)])
def test_native_results_do_not_depend_on_the_thread_count(mode, groups):
    # 1,200 rows: the kernels' column sums run in 19 blocks of 64 rows (a pass has at least
    # 64 rows a block), which two threads share
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(40, 30, C, generator=gen) + 0.5
    pad = torch.zeros(30, 40, dtype=torch.bool)
    pad[1::2, 33:] = True
    batch = (x, pad, torch.randn(40, 30, C, generator=gen))
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            pn = PowerNorm(C, mode=mode, group_num=groups, backend="native")
            runs.append(run_module_steps(pn, [batch] * 2))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*runs):
        assert torch.equal(one, two)


def test_auto_backend_falls_back_with_a_warning_where_kernels_cannot_be_built(monkeypatch, caplog):
    from powernorm_plugin.modules import kernels

    monkeypatch.delenv("POWERNORM_BACKEND", raising=False)
    monkeypatch.setitem(kernels._built, "native", RuntimeError("CalledProcessError: no compiler"))
    monkeypatch.setitem(kernels._built, "compiled", RuntimeError("InductorError: no compiler"))
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "_chosen", {})
    with caplog.at_level("WARNING"):
        assert kernels.kernels_for("auto") is kernels.EAGER
        assert kernels.kernels_for("auto") is kernels.EAGER
    warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 2 and "no compiler" in warnings[0]  # once per backend, not per call
    with pytest.raises(RuntimeError, match="backend='native' is unavailable here.*no compiler"):
        kernels.kernels_for("native")
    pn = PowerNorm(C)  # and the layer still trains, on the eager kernels
    x = torch.randn(3, 2, C, requires_grad=True)
    pn(x).sum().backward()
    assert torch.isfinite(x.grad).all() and int(pn.num_steps) == 1


@pytest.mark.parametrize("mode,groups,affine", [
    ("paper", None, False), ("official", 3, True), ("vanilla", 3, False)])
@pytest.mark.parametrize("backend", ["native", "native-python"])
def test_native_step_on_a_batch_of_padding_only(backend, mode, groups, affine, monkeypatch):
    # no tokens: y takes psi_{t-1}, nothing moves; affine=False: no parameter gradients
    backend = layer_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(8)
    x, _, dy = random_batch(gen)
    pad = torch.ones(B, T, dtype=torch.bool)
    results = []
    for name in ("eager", backend):
        pn = PowerNorm(C, mode=mode, group_num=groups, affine=affine, warmup_updates=2,
                       backend=name).double()
        pn.running_phi.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(1))
        pn.running_nu.fill_(0.25)
        xg = x.clone().requires_grad_(True)
        y = pn(xg, pad)
        y.backward(dy)
        grads = [pn.weight.grad, pn.bias.grad] if affine else []
        results.append([y, xg.grad, *grads, pn.running_phi, pn.running_nu, pn.num_steps])
    for e, n in zip(*results):
        torch.testing.assert_close(n, e, rtol=1e-12, atol=1e-12)
    assert int(results[1][-1]) == 0


def test_native_step_declines_calls_without_fused_kernels():
    # the C++ step takes no call that none of its fused steps handles (here: float64 input
    # with float32 running buffers, and a device without kernels); it then does nothing and
    # returns nothing, and the layer runs the Python step instead
    from powernorm_plugin.modules.native_kernels import NativeKernels

    ops = NativeKernels().ops
    phi, nu, steps = torch.ones(C), torch.zeros(C), torch.zeros((), dtype=torch.long)
    args = (None, 4, 0, False, False, NativeKernels.step_settings(0, None, 1e-5, 0.9, 0.9))
    for x in (torch.ones(4, C, dtype=torch.float64), torch.ones(4, C, device="meta")):
        assert ops.train_step(x, None, None, phi, nu, steps, *args) == (None, None)
    assert int(steps) == 0 and bool(phi.eq(1).all()) and bool(nu.eq(0).all())
    bad_settings = [
        (NativeKernels.step_settings(3, None, 1e-5, 0.9, 0.9), r"settings\[0\] must be a mode"),
        (NativeKernels.step_settings(0, 5, 1e-5, 0.9, 0.9), "groups=5 must be 0 or divide"),
        (NativeKernels.step_settings(0, None, 0.0, 0.9, 0.9), "eps > 0 and rates in"),
        (NativeKernels.step_settings(0, None, 1e-5, 0.9, 0.9).float(), "settings must be a"),
    ]
    for settings, message in bad_settings:
        with pytest.raises(RuntimeError, match=message):
            ops.train_step(torch.ones(4, C), None, None, phi, nu, steps, *args[:-1], settings)

    x, pad, dy = random_batch(torch.Generator().manual_seed(3))  # float64, into float32 layers
    results = []
    for backend in ("eager", "native"):
        pn = PowerNorm(C, group_num=3, warmup_updates=1, backend=backend)
        results.append(run_module_steps(pn, [(x, pad, dy)] * 2))
    for e, n in zip(*results):
        torch.testing.assert_close(n, e, rtol=1e-12, atol=1e-12)


def test_first_training_call_under_another_default_device_runs_on_the_input_device():
    # the layer's settings for the C++ step are made at its first training call: on the CPU,
    # whatever torch's default device is then
    x, pad, _ = random_batch(torch.Generator().manual_seed(8), dtype=torch.float32)
    pn, ref = PowerNorm(C), PowerNorm(C)
    with torch.device("meta"):
        y = pn(x, pad)
    torch.testing.assert_close(y, ref(x, pad), rtol=0, atol=0)


def test_native_step_refuses_tensors_of_the_wrong_size_naming_them():
    # the fused steps read these through raw pointers: a wrong size is an error, not a read
    # past the end
    from powernorm_plugin.modules.native_kernels import NativeKernels

    ops = NativeKernels().ops
    settings = NativeKernels.step_settings(0, None, 1e-5, 0.9, 0.9)
    x = torch.ones(2, 3, C)
    good = dict(weight=torch.ones(C), bias=torch.zeros(C), running_phi=torch.ones(C),
                running_nu=torch.zeros(C), num_steps=torch.zeros((), dtype=torch.long),
                token_weights=torch.ones(6), count=6)
    bad = [
        ("weight", torch.ones(C + 1), "weight must be a vector of the 12 features"),
        ("bias", torch.zeros(1, C), "bias must be a vector of the 12 features"),
        ("running_phi", torch.ones(C - 1), "running_phi must be a vector"),
        ("running_nu", torch.zeros(2 * C), "running_nu must be a vector"),
        ("num_steps", torch.zeros(2, dtype=torch.long), "num_steps must be one int64"),
        ("token_weights", torch.ones(5), "token_weights must be a contiguous Float vector of"),
        ("token_weights", torch.ones(6, dtype=torch.float64), "token_weights must be"),
        ("count", 7, "count=7 tokens do not fit x's 6 rows"),
    ]
    for name, value, message in bad:
        call = dict(good, **{name: value})
        with pytest.raises(RuntimeError, match=message):
            ops.train_step(x, *call.values(), 0, False, False, settings)
    with pytest.raises(RuntimeError, match="without token_weights every row is a token"):
        ops.train_step(x, None, None, torch.ones(C), torch.zeros(C),
                       torch.zeros((), dtype=torch.long), None, 5, 0, False, False, settings)
    assert int(good["num_steps"]) == 0 and bool(good["running_phi"].eq(1).all())
    y, ok = ops.train_step(x, *good.values(), 0, False, False, settings)
    # ok: None, psi_B^2 being finite (known on the host)
    assert y.shape == x.shape and ok is None and int(good["num_steps"]) == 1
    x[0, 0, 0] = float("nan")
    y, ok = ops.train_step(x, *good.values(), 0, False, False, settings)
    assert not ok and int(good["num_steps"]) == 1 and bool(good["running_phi"].isfinite().all())


@pytest.mark.parametrize("backend", ["native", "native-python", "eager"])
def test_backward_runs_once_per_graph_and_is_not_differentiated_twice(backend, monkeypatch):
    backend = layer_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(6)
    x, pad, dy = random_batch(gen, dtype=torch.float32)
    pn = PowerNorm(C, backend=backend)
    ref = copy.deepcopy(pn)
    y = pn(x.clone().requires_grad_(True), pad)
    y.backward(dy)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"), \
            warnings.catch_warnings():
        warnings.simplefilter("error")  # not the warning of a second pass that does run
        y.backward(dy)
    # an input changed in place between the call and its backward is caught
    xg = x.clone().requires_grad_(True)
    leaf = xg * 1
    y = pn(leaf, pad)
    leaf.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    # with create_graph=True the gradients are the same, and differentiating them raises
    # (the paper's backward has no derivative of its own)
    pn, ref = copy.deepcopy(ref), copy.deepcopy(ref)
    grads = []
    for layer, create in ((pn, True), (ref, False)):
        xg = x.clone().requires_grad_(True)
        dyg = dy.clone().requires_grad_(create)  # as from layers above, under create_graph
        (dx,) = torch.autograd.grad(layer(xg, pad), xg, dyg, create_graph=create)
        grads.append(dx)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(pn.running_nu, ref.running_nu, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="differentiate twice|differentiable once"):
        grads[0].sum().backward()


@pytest.mark.parametrize("backend", ["native", "native-python", "eager"])
def test_padding_rows_gradient_is_exact_beside_huge_activations(backend, monkeypatch):
    """A padding row's input gradient is gamma * dy / sqrt(psi + eps) (paper mode): the nu
    term is not formed there, so huge activations (|x| ~ 1e18) cannot cancel it away."""
    backend = layer_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    pn = PowerNorm(64, backend=backend)
    pn.running_nu.fill_(0.5)
    x = (torch.randn(6, 2, 64, generator=gen) * 1e18).requires_grad_(True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    dy = torch.randn(6, 2, 64, generator=gen)
    pn(x, pad).backward(dy)
    expect = dy[3:, 1] * pn.weight.detach() / math.sqrt(1 + pn.eps)
    torch.testing.assert_close(x.grad[3:, 1], expect, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["paper", "official", "vanilla"])
@pytest.mark.parametrize("backend", ["native", "native-python", "eager"])
def test_a_second_backward_pass_through_one_call_warns_where_it_is_not_additive(
        backend, mode, monkeypatch):
    """The paper's backward subtracts nu * x_hat whatever gradient comes in and moves nu, so
    two backward passes through one call (retain_graph=True) are not one pass of the summed
    gradient: that warns. PN-V's exact gradient adds up, and does not warn."""
    backend = layer_backend(backend, monkeypatch)
    gen = torch.Generator().manual_seed(7)
    x, pad, dy = random_batch(gen, dtype=torch.float32)
    pn = PowerNorm(C, mode=mode, backend=backend)
    for _ in range(2):  # a nonzero nu
        pn(x.clone().requires_grad_(True), pad).backward(dy)
    once, twice = copy.deepcopy(pn), pn
    xo = x.clone().requires_grad_(True)
    once(xo, pad).backward(2 * dy)
    xt = x.clone().requires_grad_(True)
    y = twice(xt, pad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y.backward(dy, retain_graph=True)
    if mode == "vanilla":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y.backward(dy)
        torch.testing.assert_close(xt.grad, xo.grad)
    else:
        with pytest.warns(UserWarning, match="second backward pass through one training call"):
            y.backward(dy)
        assert not torch.allclose(xt.grad, xo.grad, atol=1e-3)
        assert not torch.allclose(twice.running_nu, once.running_nu, atol=1e-6)


class Doubled(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_parametrized_weight_is_the_one_a_call_uses(backend):
    # a call reads gamma from the module's parameter dict, and from the attribute where a
    # parametrization has moved it out of there
    from torch.nn.utils import parametrize

    gen = torch.Generator().manual_seed(4)
    batches = [random_batch(gen, dtype=torch.float32) for _ in range(2)]
    plain = PowerNorm(C, backend=backend)
    param = PowerNorm(C, backend=backend)
    parametrize.register_parametrization(param, "weight", Doubled())
    with torch.no_grad():
        plain.weight.fill_(2.0)  # what param's weight, 2 * 1, is
    for x, pad, dy in batches:
        outs = []
        for pn in (plain, param):
            xg = x.clone().requires_grad_(True)
            pn.zero_grad()
            pn(xg, pad).backward(dy)
            outs.append((xg.grad, pn.bias.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    # gamma's gradient reaches the parametrization's original tensor: d(2 w)/dw = 2
    torch.testing.assert_close(param.parametrizations.weight.original.grad, 2 * plain.weight.grad)
    x = batches[0][0]
    torch.testing.assert_close(param.eval()(x), plain.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_functional_call_tensors_are_the_ones_a_call_uses_and_moves(backend):
    # torch.func.functional_call swaps in other parameters and buffers for one call: the call
    # normalizes with those and moves the given running statistics, not the module's
    from torch.func import functional_call

    x, pad, _ = random_batch(torch.Generator().manual_seed(5), dtype=torch.float32)
    pn, ref = PowerNorm(C, backend=backend), PowerNorm(C, backend=backend)
    with torch.no_grad():
        ref.weight.fill_(2.0)
        ref.running_phi.fill_(4.0)
    given = {"weight": torch.full((C,), 2.0), "running_phi": torch.full((C,), 4.0),
             "running_nu": torch.zeros(C), "num_steps": torch.zeros((), dtype=torch.long)}
    y = functional_call(pn, given, (x, pad))
    torch.testing.assert_close(y, ref(x, pad), rtol=0, atol=0)
    torch.testing.assert_close(given["running_phi"], ref.running_phi, rtol=0, atol=0)
    assert int(given["num_steps"]) == 1 and bool(pn.running_phi.eq(1).all())
    pn.eval(), ref.eval()
    y = functional_call(pn, {"weight": given["weight"], "running_phi": given["running_phi"]}, (x,))
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_build_norm_kinds():
    assert isinstance(build_norm("power", C, group_num=3), PowerNorm)
    assert build_norm("power_vanilla", C).mode == "vanilla"
    assert build_norm("power", C, mode="official").mode == "official"
    ln = build_norm("layer", C, group_num=3)  # power options are ignored for other kinds
    x = torch.randn(2, 3, C)
    torch.testing.assert_close(ln(x, padding_mask=None), torch.nn.functional.layer_norm(x, (C,)))
    rms = build_norm("rms", C)
    torch.testing.assert_close(rms(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["native", "native-python"])
def test_model_under_torch_compile_trains_as_in_eager(backend, monkeypatch):
    # torch.compile stops in front of the native step (a graph break) and runs it eagerly; it
    # traces the Python step (synchronized statistics, calls the C++ step declines), its pass
    # operators through their fake kernels
    layer_backend(backend, monkeypatch)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(C, C)
            self.norm = PowerNorm(C, group_num=3, warmup_updates=2)

        def forward(self, x, pad):
            return self.norm(self.lin(x), pad)

    torch.manual_seed(0)
    eager = Block()
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled)
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        x, pad, dy = random_batch(gen, torch.float32)
        for model, call in ((eager, eager), (compiled, step)):
            model.zero_grad()
            call(x, pad).backward(dy)
    torch.testing.assert_close(compiled.lin.weight.grad, eager.lin.weight.grad)
    for name, buffer in eager.norm.named_buffers():
        torch.testing.assert_close(getattr(compiled.norm, name), buffer)
    assert int(compiled.norm.num_steps) == 3


@pytest.mark.slow
def test_pass_operators_state_their_result_shapes_for_torch_compile():
    # torch.compile traces the Python step's C++ passes on tensors without data, through fake
    # kernels that must give each result's shape and dtype and keep results from aliasing
    # (opcheck runs each operator for real and traced, and compares)
    from powernorm_plugin.modules.native_kernels import load_library

    ops = load_library()
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(2, 3, C, generator=gen), torch.randn(2, 3, C, generator=gen)
    mask = torch.tensor([1.0, 1, 0, 1, 1, 0])

    def vectors(wanted):
        if not wanted:
            return None, None
        return torch.rand(C, generator=gen) + 0.5, torch.rand(C, generator=gen)

    for weights, groups, scaled, sums, all_rows in itertools.product(
            [None, mask], [0, 3], [False, True], [False, True], [False, True]):
        if not (scaled or sums):
            continue  # (nothing to compute: refused)
        torch.library.opcheck(ops.forward.default,
                              (x, weights, groups, 1e-5, *vectors(scaled), sums, all_rows))
        r = ops.forward(x, weights, groups, 1e-5, None, None, True, False)[3] if groups else None
        torch.library.opcheck(ops.backward.default, (dy, x, r, weights, groups, *vectors(scaled),
                                                     all_rows, sums, not all_rows))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "native-python", "eager"])
def test_training_under_compiled_autograd_matches_eager(backend, device, monkeypatch):
    # torch's compiled autograd records the step's backward in its graph (the C++ step's node
    # as one opaque call) and gives the gradients and running nu of an eager backward; a
    # batch's token count is an input of the graph, not a reason to record it again
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(22)  # batches of 22, 26 and 16 tokens
    pn = PowerNorm(C, backend=layer_backend(backend, monkeypatch), group_num=3,
                   warmup_updates=1).to(device)
    ref = copy.deepcopy(pn)
    compiled_autograd.reset()
    captures = []
    for _ in range(3):  # a warm-up call, then two after it
        x, pad, dy = (t.to(device) for t in random_batch(gen, torch.float32))
        results = []
        for layer, compiled in ((pn, True), (ref, False)):
            xg = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(xg, pad)
            if compiled:
                # (the C++ step's node, where it ran)
                assert (y.grad_fn.name() == "PowerNormBackward") == (backend == "native")
                with compiled_autograd._enable(torch.compile(backend="eager")):
                    y.backward(dy)
            else:
                y.backward(dy)
            results.append((xg.grad, layer.weight.grad, layer.bias.grad, layer.running_nu))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        captures.append(counters["compiled_autograd"]["captures"])
    assert captures[2] == captures[1] > 0
    if backend == "native":
        # a second backward pass through one call warns here too (the C++ node)
        y = pn(x.clone().requires_grad_(True), pad)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                y.backward(dy, retain_graph=True)
            with pytest.warns(UserWarning, match="second backward pass through one training call"):
                y.backward(dy)
        # under create_graph=True, as in eager: the gradients, and differentiating them raises
        xg = x.clone().requires_grad_(True)
        with compiled_autograd._enable(torch.compile(backend="eager")):
            (dx,) = torch.autograd.grad(pn(xg, pad), xg, dy, create_graph=True)
        with pytest.raises(RuntimeError, match="differentiable once"):
            dx.sum().backward()
