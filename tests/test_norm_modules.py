"""MaskedBatchNorm, group scaling, folding into linear layers, and bad-input handling."""
import pytest
import torch

from powernorm_plugin.modules import (
    GroupScaling, MaskedBatchNorm, PowerNorm, build_norm, fold_norm_into_linear, group_rms_scale,
    norm_residual,
)

T, B, C = 6, 4, 8


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, C, generator=gen, dtype=torch.float64) * 3 + 1
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    pad[3, 2:] = True
    return x, pad


@pytest.fixture(params=["padding", "dense"])
def bn_batch(request, batch):
    """The batch with its padding, or with none (MaskedBatchNorm then runs torch's kernels)."""
    x, pad = batch
    return x, pad if request.param == "padding" else torch.zeros_like(pad)


@pytest.mark.parametrize("backend", ["native", "compiled", "eager"])
def test_masked_batch_norm_matches_token_statistics(bn_batch, backend, monkeypatch):
    monkeypatch.setenv("POWERNORM_BACKEND", backend)  # the passes behind the padded calls
    x, pad = bn_batch
    bn = MaskedBatchNorm(C, momentum=0.2).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    gen = torch.Generator().manual_seed(1)
    dys = [torch.randn(T, B, C, generator=gen, dtype=torch.float64) for _ in range(2)]
    mean_r, var_r = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step, dy in enumerate(dys):  # two steps: the running statistics move from their last
        xa = (x * (1 + step)).requires_grad_(True)
        bn.zero_grad()
        y = bn(xa, pad)
        y.backward(dy)
        xr = (x * (1 + step)).requires_grad_(True)
        tok = xr[~pad.t()]  # (N, C)
        mean, var = tok.mean(0), tok.var(0, unbiased=False)
        yr = (xr - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias
        want = torch.autograd.grad(yr, (xr, bn.weight, bn.bias), dy)
        torch.testing.assert_close(y, yr)
        for got, w in zip((xa.grad, bn.weight.grad, bn.bias.grad), want):
            torch.testing.assert_close(got, w)
        mean_r = 0.8 * mean_r + 0.2 * mean.detach()
        var_r = 0.8 * var_r + 0.2 * tok.detach().var(0, unbiased=True)
        torch.testing.assert_close(bn.running_mean, mean_r)
        torch.testing.assert_close(bn.running_var, var_r)
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), want)


def test_masked_batch_norm_gradcheck(bn_batch):
    x, pad = bn_batch
    bn = MaskedBatchNorm(C).double()
    xg = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, w, b: bn(t, pad), (xg, bn.weight, bn.bias))
    # second derivatives too (the closed-form backward recomputes a differentiable graph)
    assert torch.autograd.gradgradcheck(lambda t, w, b: bn(t, pad), (xg, bn.weight, bn.bias))


def test_masked_batch_norm_low_precision_input(bn_batch):
    x, pad = bn_batch
    bn, ref = MaskedBatchNorm(C).bfloat16(), MaskedBatchNorm(C)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    xf = xb.detach().float().requires_grad_(True)
    y, yf = bn(xb, pad), ref(xf, pad)
    y.backward(torch.ones_like(y))
    yf.backward(torch.ones_like(yf))
    assert y.dtype == xb.grad.dtype == bn.weight.grad.dtype == torch.bfloat16
    assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
    torch.testing.assert_close(bn.running_var, ref.running_var)  # statistics in fp32
    torch.testing.assert_close(y.float(), yf, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=1e-2, atol=1e-2)


def test_masked_batch_norm_under_torch_compile_trains_as_in_eager(bn_batch):
    import copy

    x, pad = bn_batch
    eager = MaskedBatchNorm(C).double()
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, backend="eager")
    for step in range(2):
        xe, xc = (x.clone().requires_grad_(True) for _ in range(2))
        eager(xe * (1 + step), pad).backward(torch.cos(x))
        run(xc * (1 + step), pad).backward(torch.cos(x))
        torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=0)
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=0, atol=0)


def test_masked_batch_norm_training_call_reads_no_device_value(bn_batch, monkeypatch):
    # On a GPU, a value read on the host waits for the device. Without sync, the only read
    # left in a training call is the previous call's finite flag, which on CUDA is a copy in
    # pinned host memory (the token count is read once per padding mask, by token_mask).
    from torch.utils._python_dispatch import TorchDispatchMode

    from powernorm_plugin.modules import masked_batch_norm

    monkeypatch.setattr(masked_batch_norm, "defers_checks", lambda x: True)

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.read = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.read.append(args[0])
            return func(*args, **(kwargs or {}))

    x, pad = bn_batch
    bn = MaskedBatchNorm(C).double()
    bn(x, pad).sum().backward()  # counts the mask's tokens
    for _ in range(2):
        flag = bn._checks._flag
        with HostReads() as mode:
            bn(x, pad).sum().backward()
        assert len(mode.read) == 1 and mode.read[0] is flag


def test_group_scaling_equation_and_gradcheck():
    x = torch.randn(3, 2, C, dtype=torch.float64, requires_grad=True)
    z = group_rms_scale(x, 2)
    xg = x.view(3, 2, 2, C // 2)
    want = (xg / torch.sqrt((xg ** 2).mean(-1, keepdim=True) + 1e-5)).view(3, 2, C)
    torch.testing.assert_close(z, want)
    assert torch.autograd.gradcheck(lambda t: group_rms_scale(t, 4), (x,))


@pytest.mark.parametrize("make", [
    lambda: PowerNorm(C, group_num=2),
    lambda: PowerNorm(C, mode="official"),
    lambda: MaskedBatchNorm(C),
])
def test_fold_into_following_linear_is_exact(make, batch):
    x, pad = batch
    norm = make().double()
    for _ in range(3):
        norm(x * torch.rand(1, dtype=torch.float64) + 0.3, pad).sum().backward()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    norm.eval()
    linear = torch.nn.Linear(C, 5).double()
    folded = fold_norm_into_linear(norm, linear)
    residual = norm_residual(norm)
    expected_type = GroupScaling if getattr(norm, "group_num", None) else torch.nn.Module
    assert isinstance(residual, expected_type)
    torch.testing.assert_close(folded(residual(x)), linear(norm(x)))


def test_fold_refuses_training_mode_and_other_layers():
    with pytest.raises(ValueError, match="eval"):
        fold_norm_into_linear(PowerNorm(C), torch.nn.Linear(C, 2))
    with pytest.raises(TypeError, match="PowerNorm or MaskedBatchNorm"):
        fold_norm_into_linear(torch.nn.LayerNorm(C), torch.nn.Linear(C, 2))
    with pytest.raises(ValueError, match="in_features"):
        fold_norm_into_linear(PowerNorm(C).eval(), torch.nn.Linear(C + 1, 2))


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: PowerNorm(C), lambda: MaskedBatchNorm(C)])
def test_wrong_rank_and_feature_size(make):
    norm = make()
    with pytest.raises(ValueError, match=r"\(T, B, C\)"):
        norm(torch.randn(4, C))
    with pytest.raises(ValueError, match="expected num_features=8"):
        norm(torch.randn(2, 3, C + 1))
    with pytest.raises(TypeError, match="floating-point"):
        norm(torch.ones(2, 3, C, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda: PowerNorm(C), lambda: MaskedBatchNorm(C)])
def test_padding_mask_wrong_shape_or_dtype(make):
    norm = make()
    x = torch.randn(T, B, C)
    with pytest.raises(ValueError, match=r"padding_mask must have shape \(B, T\) = \(4, 6\)"):
        norm(x, torch.zeros(T, B, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        norm(x, torch.zeros(B, T))


@pytest.mark.parametrize("make", [
    lambda: PowerNorm(C), lambda: PowerNorm(C, mode="official", warmup_updates=3),
    lambda: PowerNorm(C, mode="vanilla", group_num=2), lambda: MaskedBatchNorm(C),
])
def test_all_padding_batch_gives_finite_output_and_leaves_statistics(make):
    norm = make()
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(T, B, C, requires_grad=True)
    y = norm(x, torch.ones(B, T, dtype=torch.bool))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in norm.parameters())
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("make", [lambda: PowerNorm(C), lambda: PowerNorm(C, mode="vanilla"),
                                  lambda: MaskedBatchNorm(C)])
def test_nan_input_is_refused_not_folded_into_statistics(make):
    norm = make()
    norm.name = "encoder.layers.0.final_layer_norm"
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = torch.randn(T, B, C)
    x[2, 1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="encoder.layers.0.final_layer_norm"):
        norm(x)
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("make", [
    lambda: PowerNorm(C, mode="paper", warmup_updates=2),
    lambda: PowerNorm(C, mode="official", warmup_updates=2),
    lambda: PowerNorm(C, mode="vanilla", warmup_updates=2),
    lambda: MaskedBatchNorm(C),
], ids=["paper", "official", "vanilla", "batch"])
def test_deferred_nan_report_keeps_statistics_clean_and_names_the_layer(make, bn_batch,
                                                                        monkeypatch):
    # what a CUDA device does (reporting at the next call, so that no step waits for the
    # device), run here on the CPU
    from powernorm_plugin.modules import masked_batch_norm, power_norm

    for module in (power_norm, masked_batch_norm):
        monkeypatch.setattr(module, "defers_checks", lambda x: True)
    x, pad = bn_batch
    norm = make().double()
    norm.name = "encoder.layers.0.final_layer_norm"
    norm(x, pad)  # one clean step
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    bad = x.clone()
    bad[0, 0, 3] = float("nan")  # a token row, with padding and without
    norm(bad, pad)  # no error yet, and nothing folded into the statistics
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(FloatingPointError, match="encoder.layers.0.final_layer_norm.*previous"):
        norm(x, pad)
    clean = make().double()  # the layer goes on from its clean state
    clean.load_state_dict(before)
    torch.testing.assert_close(norm(x * 2, pad), clean(x * 2, pad))
    for k, v in norm.state_dict().items():
        assert torch.equal(v, clean.state_dict()[k]), k
    steps = "num_steps" if isinstance(norm, PowerNorm) else "num_batches_tracked"
    assert int(norm.state_dict()[steps]) == 2


def test_unknown_mode_kind_and_options():
    with pytest.raises(ValueError, match="paper, official, vanilla"):
        PowerNorm(C, mode="fast")
    with pytest.raises(ValueError, match="layer, rms, batch, power, power_vanilla"):
        build_norm("group", C)
    with pytest.raises(TypeError, match="alpha_fw"):
        build_norm("power", C, alpha_fw=0.5)
    with pytest.raises(ValueError, match="group_num=3 must divide num_features=8"):
        PowerNorm(C, group_num=3)
    with pytest.raises(ValueError, match="alpha_fwd"):
        PowerNorm(C, alpha_fwd=1.0)
    for make in (PowerNorm, MaskedBatchNorm):
        for eps in (0, float("nan")):
            with pytest.raises(ValueError, match=f"{make.__name__} eps must be positive, got"):
                make(C, eps=eps)
    with pytest.raises(ValueError, match=r"momentum must lie in \(0, 1\], got 0"):
        MaskedBatchNorm(C, momentum=0)
