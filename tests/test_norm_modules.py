"""MaskedBatchNorm, group scaling, folding into linear layers, and bad-input handling."""
import warnings

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
    eps = 0.3  # not the default, so that a layer ignoring its setting fails
    bn = MaskedBatchNorm(C, momentum=0.2, eps=eps).double()
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
        yr = (xr - mean) / torch.sqrt(var + eps) * bn.weight + bn.bias
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
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_batch_norm_under_autocast_keeps_fp32_statistics(dtype):
    # under torch.autocast a matrix product runs in fp16/bf16: the statistics' sums of many
    # tokens must not (fp16 overflows past 65504, and bf16 keeps 8 bits)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, C, generator=gen) + 30.0
    pad = torch.zeros(64, 64, dtype=torch.bool)
    pad[::2, 40:] = True
    plain, cast = MaskedBatchNorm(C), MaskedBatchNorm(C)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = plain(xa, pad)
    y.sum().backward()
    with torch.autocast("cpu", dtype=dtype):
        y_cast = cast(xb, pad)
    y_cast.sum().backward()
    torch.testing.assert_close(y_cast, y)
    torch.testing.assert_close(xb.grad, xa.grad)
    for name, buffer in plain.state_dict().items():
        torch.testing.assert_close(cast.state_dict()[name], buffer)


def test_masked_batch_norm_padding_only_call_then_another_before_backward(batch):
    # the padding-only call normalizes by the running statistics: what it saves for its
    # backward must not change when the next call moves them
    x, pad = batch
    bn, ref = MaskedBatchNorm(C).double(), MaskedBatchNorm(C).double()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = bn(x1, torch.ones_like(pad))
    y2 = bn(x2, pad)
    (y1.sum() + y2.sum()).backward()
    r1 = x.clone().requires_grad_(True)
    ref(r1, torch.ones_like(pad)).sum().backward()
    torch.testing.assert_close(x1.grad, r1.grad)


@pytest.mark.parametrize("make", [lambda: PowerNorm(C), lambda: MaskedBatchNorm(C)])
def test_padding_mask_made_in_inference_mode_and_masks_changed_in_place(make, batch):
    # an inference tensor has no version counter, so its token count is not cached; a mask
    # whose memory is replaced (.data) is counted again
    x, pad = batch
    with torch.inference_mode():
        frozen = pad.clone()
    a, b = make().double(), make().double()
    torch.testing.assert_close(a(x, frozen), b(x, pad.clone()))
    mask = torch.zeros_like(pad)
    torch.testing.assert_close(a(x, mask), b(x, torch.zeros_like(pad)))
    mask.data = pad.clone()
    torch.testing.assert_close(a(x, mask), b(x, pad.clone()))
    for name, buffer in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[name], buffer)


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


@pytest.mark.parametrize("make", [
    lambda: PowerNorm(C, group_num=2),
    lambda: PowerNorm(C, mode="vanilla"),
    lambda: MaskedBatchNorm(C),
    lambda: GroupScaling(C, 4),
])
def test_eval_norms_trace_save_reload_and_export(make, batch, tmp_path):
    # deployment: torch.jit.trace + torch.jit.save, and torch.export, of an inference model.
    # The group scaling's autograd.Function could not be saved.
    x, pad = batch
    norm = make().double()
    for _ in range(2):
        norm(x.clone().requires_grad_(), pad).sum().backward()
    norm.eval()
    with warnings.catch_warnings():  # torch.jit's deprecation; check_input's size test
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(norm, (x,))
    torch.jit.save(traced, tmp_path / "norm.pt")
    reloaded = torch.jit.load(tmp_path / "norm.pt")
    other = torch.randn(3, 5, C, dtype=torch.float64)  # another T and B
    torch.testing.assert_close(reloaded(other), norm(other))
    exported = torch.export.export(norm, (x,)).module()
    torch.testing.assert_close(exported(x), norm(x))


def test_fold_refuses_training_mode_and_other_layers():
    with pytest.raises(ValueError, match="eval"):
        fold_norm_into_linear(PowerNorm(C), torch.nn.Linear(C, 2))
    with pytest.raises(TypeError, match="PowerNorm or MaskedBatchNorm"):
        fold_norm_into_linear(torch.nn.LayerNorm(C), torch.nn.Linear(C, 2))
    with pytest.raises(ValueError, match="in_features"):
        fold_norm_into_linear(PowerNorm(C).eval(), torch.nn.Linear(C + 1, 2))


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: PowerNorm(C), lambda: MaskedBatchNorm(C),
                                  lambda: GroupScaling(C, 2), lambda: GroupScaling(C, 2).eval()])
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
        for eps in (0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=f"{make.__name__} eps must be a positive finite"):
                make(C, eps=eps)
    with pytest.raises(ValueError, match=r"momentum must be a number in \(0, 1\], got 0"):
        MaskedBatchNorm(C, momentum=0)


@pytest.mark.parametrize("name,value,message", [
    ("alpha_fwd", 1.5, r"PowerNorm alpha_fwd must be a number in \[0, 1\), got 1.5"),
    ("alpha_bkw", "0.9", "PowerNorm alpha_bkw must be a number in"),
    ("eps", 0, "PowerNorm eps must be a positive finite number, got 0"),
    ("warmup_updates", 2.7, "PowerNorm warmup_updates must be an integer >= 0, got 2.7"),
    ("warmup_updates", None, "PowerNorm warmup_updates must be an integer >= 0, got None"),
    ("mode", "fast", "PowerNorm mode must be one of paper, official, vanilla; got 'fast'"),
    ("group_num", 3, "group_num=3 must divide num_features=8"),
    ("group_num", 2.0, r"group_num \(None: no scaling\) must be an integer >= 1, got 2.0"),
])
def test_settings_are_checked_when_given_and_when_assigned_later(name, value, message, batch):
    # a trained layer's settings may change between calls: a bad value must be refused there
    # too, before any backend (the Python ones check nothing themselves) trains with it
    with pytest.raises(ValueError, match=message):
        PowerNorm(C, **{name: value})
    for backend in ("native", "eager"):
        norm = PowerNorm(C, backend=backend)
        norm(batch[0].float(), batch[1])
        with pytest.raises(ValueError, match=message):
            setattr(norm, name, value)
        assert getattr(norm, name) == getattr(PowerNorm(C), name)


def test_mode_and_causal_checked_together_at_the_next_call(batch):
    norm = PowerNorm(C, causal=True)
    norm.mode = "vanilla"  # (the two may change one after the other)
    with pytest.raises(ValueError, match="mode='vanilla' .* cannot be causal"):
        norm(batch[0].float(), batch[1])


def test_numpy_integers_are_accepted_and_bools_refused():
    np = pytest.importorskip("numpy")
    norm = PowerNorm(np.int64(C), group_num=np.int64(2), warmup_updates=np.int32(3))
    assert (norm.num_features, norm.group_num, norm.warmup_updates) == (C, 2, 3)
    assert type(norm.num_features) is int and norm.running_phi.shape == (C,)
    for make in (PowerNorm, MaskedBatchNorm):
        with pytest.raises(ValueError, match=f"{make.__name__} num_features must be an integer"):
            make(True)


def test_group_scaling_refuses_an_eps_that_gives_nan():
    with pytest.raises(ValueError, match="GroupScaling eps must be a positive finite number"):
        GroupScaling(C, 2, eps=0.0)  # a group of zeros would be 0 / 0


def test_masked_batch_norm_settings_are_checked_when_assigned():
    bn = MaskedBatchNorm(C)
    with pytest.raises(ValueError, match=r"momentum must be a number in \(0, 1\], got None"):
        bn.momentum = None  # (torch's cumulative average: not implemented)
    with pytest.raises(ValueError, match="eps must be a positive finite number, got -1"):
        bn.eps = -1
    assert (bn.momentum, bn.eps) == (0.1, 1e-5)


@pytest.mark.parametrize("backend", ["native", "eager"])
def test_forward_mode_ad_and_torch_func_raise_in_training_and_work_in_eval(backend, batch):
    # the native step has no forward derivative: a tangent must not be silently dropped
    norm = PowerNorm(C, backend=backend).double()
    x, tangent = batch[0], torch.randn_like(batch[0])
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="jvp"):
            norm(torch.autograd.forward_ad.make_dual(x, tangent))
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda t: norm(t).sum())(x)
    norm.eval()
    out, jvp = torch.func.jvp(norm, (x,), (tangent,))
    scale, _ = norm.affine_parameters()
    torch.testing.assert_close(jvp, tangent * scale)


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("backend", ["native", "eager"])
def test_power_norm_refuses_recomputation_by_activation_checkpointing(reentrant, backend, batch):
    # the recomputed forward would move the statistics again and normalize by the moved psi
    norm = PowerNorm(C, backend=backend)
    norm.name = "encoder.layers.1.final_layer_norm"
    x = batch[0].float().requires_grad_(True)
    y = torch.utils.checkpoint.checkpoint(norm, x, batch[1], use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match="encoder.layers.1.final_layer_norm: a training call "
                                           "during a backward pass"):
        y.sum().backward()
    assert int(norm.num_steps) == 1
