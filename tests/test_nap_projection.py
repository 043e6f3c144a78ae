"""NaP projection math (powernorm_plugin.nap): pure PyTorch, no fairseq."""
import math

import pytest
import torch
from torch import nn

from powernorm_plugin.nap import (
    NormProjector,
    classify_by_name,
    classify_parameters,
    named_parameter_list,
    select_groups,
)


class TinyLM(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.zero_proj = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.zero_proj.weight)
        self.output_projection = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        h = self.embed_tokens(x)
        h = h + self.fc2(torch.relu(self.fc1(h))) + self.zero_proj(h)
        return self.output_projection(self.final_layer_norm(h))


def _names(model):
    return named_parameter_list([("", model)])


def test_classify_parameters_by_module_type():
    kinds = classify_parameters(TinyLM())
    assert kinds["embed_tokens.weight"] == "embedding"
    assert kinds["fc1.weight"] == "matrix"
    assert kinds["fc1.bias"] == "vector"
    assert kinds["final_layer_norm.weight"] == "norm_scale"
    assert kinds["final_layer_norm.bias"] == "norm_offset"
    assert kinds["output_projection.weight"] == "output"


def test_vectors_stored_with_extra_dimensions_of_one_are_left_free():
    # attention's extra key/value biases are (1, 1, E): biases, not matrices
    kinds = classify_parameters(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    assert kinds["bias_k"] == kinds["bias_v"] == "vector"
    assert kinds["in_proj_weight"] == kinds["out_proj.weight"] == "matrix"
    assert classify_by_name("fc.weight_g", (5, 1)) == "vector"  # weight norm's magnitudes
    assert classify_by_name("conv.weight", (8, 1, 3)) == "matrix"


def test_classify_by_name_fairseq_names():
    assert classify_by_name("decoder.output_projection.weight", (10, 4)) == "output"
    assert classify_by_name("encoder.embed_tokens.weight", (10, 4)) == "embedding"
    assert classify_by_name("encoder.layers.0.self_attn.out_proj.weight", (4, 4)) == "matrix"
    assert classify_by_name("encoder.layers.0.self_attn_layer_norm.weight", (4,)) == "norm_scale"
    assert classify_by_name("encoder.layers.0.final_layer_norm.bias", (4,)) == "norm_offset"
    assert classify_by_name("encoder.layers.0.fc1.bias", (4,)) == "vector"


def test_tied_embedding_is_not_projected():
    m = TinyLM()
    m.output_projection.weight = m.embed_tokens.weight
    names, params, kinds = _names(m)
    groups = select_groups(names, kinds)
    assert "embed_tokens.weight" not in [g.name for g in groups]
    assert len(params) == len(set(map(id, params)))


def test_default_selection_and_regexes():
    names, _, kinds = _names(TinyLM())
    g = [x.name for x in select_groups(names, kinds)]
    assert g == ["fc1.weight", "fc2.weight", "zero_proj.weight"]
    g = [x.name for x in select_groups(names, kinds, include=r"embed_tokens|fc1\.bias", exclude="fc2")]
    assert g == ["embed_tokens.weight", "fc1.weight", "fc1.bias", "zero_proj.weight"]
    g = [x.name for x in select_groups(names, kinds, norm_params="joint")]
    assert "final_layer_norm.{weight+bias}" in g
    joint = [x for x in select_groups(names, kinds, norm_params="joint") if "norm" in x.name][0]
    assert [names[i] for i in joint.members] == ["final_layer_norm.weight", "final_layer_norm.bias"]
    g = [x.name for x in select_groups(names, kinds, norm_params="joint", exclude="layer_norm")]
    assert not any("norm" in n for n in g)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(include="does_not_exist"), "--nap-include 'does_not_exist' matches no parameter"),
        (dict(exclude="^nothing$"), "--nap-exclude '\\^nothing\\$' matches no parameter"),
        (dict(include="fc1[("), "invalid regular expression"),
        (dict(norm_params="both"), "--nap-norm-params"),
    ],
)
def test_selection_errors(kwargs, msg):
    names, _, kinds = _names(TinyLM())
    with pytest.raises(ValueError, match=msg):
        select_groups(names, kinds, **kwargs)


def test_projection_restores_initial_norms_and_skips_zero():
    torch.manual_seed(0)
    m = TinyLM()
    proj = NormProjector.from_module(m, norm_params="joint")
    assert proj.skipped == ["zero_proj.weight"]
    assert "zero_proj.weight" not in proj.names
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0).add_(torch.randn_like(p))
    pre = proj.project_()
    assert torch.all(pre / proj.targets > 1.5)
    rel = (proj.norms() / proj.targets - 1).abs().max().item()
    assert rel < 1e-6
    # the zero-initialised weight was never divided by zero, nothing became NaN
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # joint: the pair (gain, offset) has its initial joint norm
    ln = m.final_layer_norm
    joint0 = math.sqrt(w0["final_layer_norm.weight"].norm() ** 2 + w0["final_layer_norm.bias"].norm() ** 2)
    joint = math.sqrt(ln.weight.detach().norm() ** 2 + ln.bias.detach().norm() ** 2)
    assert joint == pytest.approx(joint0, rel=1e-6)


def test_projection_direction_is_preserved():
    torch.manual_seed(1)
    a = torch.randn(5, 7)
    proj = NormProjector([[a]], ["a"])
    b = torch.randn(5, 7) * 4
    a.copy_(b)
    proj.project_()
    assert torch.allclose(a, b * (proj.targets[0] / b.norm()), rtol=1e-6, atol=1e-7)


def test_zero_current_norm_is_left_alone():
    a = torch.randn(3, 3)
    proj = NormProjector([[a]], ["a"])
    a.zero_()
    proj.project_()
    assert torch.equal(a, torch.zeros(3, 3))


def test_zero_target_is_an_error():
    a = torch.randn(3, 3)
    with pytest.raises(ValueError, match="projection target of zero"):
        NormProjector([[a]], ["a"], targets=torch.tensor([0.0]))
    proj = NormProjector([[a]], ["a"])
    with pytest.raises(ValueError, match="projection target of zero"):
        proj.set_targets([float("nan")])
    with pytest.raises(ValueError, match="projection target of zero"):
        NormProjector([[torch.zeros(2, 2)]], ["z"], skip_zero=False)


def test_low_precision_and_flat_views():
    torch.manual_seed(0)
    shapes = [(4, 6), (6,), (3, 2, 2)]
    flat = torch.randn(sum(math.prod(s) for s in shapes))
    views, off = [], 0
    for s in shapes:
        n = math.prod(s)
        views.append(flat[off : off + n].view(s))
        off += n
    proj = NormProjector([[views[0]], [views[1], views[2]]], ["a", "bc"])
    t0 = proj.targets.clone()
    flat.mul_(2.5)
    proj.project_()
    assert torch.allclose(proj.norms(), t0, rtol=1e-6)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(16, 16).to(dtype)
        p = NormProjector([[x]], ["x"])
        x.mul_(2)
        p.project_()
        assert x.dtype == dtype
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-6}[dtype]
        assert p.norms()[0].item() == pytest.approx(p.targets[0].item(), rel=tol)
    # a group of float64 and float32 tensors together (a model partly in float64)
    a, b = torch.randn(5, 5, dtype=torch.float64), torch.randn(7)
    p = NormProjector([[a, b]], ["ab"])
    a.mul_(3), b.mul_(3)
    p.project_()
    assert math.hypot(a.norm().item(), b.norm().item()) == pytest.approx(
        p.targets[0].item(), rel=1e-6)


def test_multi_tensor_ops_no_per_parameter_python_loop(monkeypatch):
    """One _foreach_norm and one _foreach_mul_ per device, whatever the number of groups."""
    tensors = [torch.randn(4, 4) for _ in range(50)]
    proj = NormProjector([[t] for t in tensors], [str(i) for i in range(50)])
    calls = {"norm": 0, "mul": 0}
    real_norm, real_mul = torch._foreach_norm, torch._foreach_mul_

    def norm(*a, **k):
        calls["norm"] += 1
        return real_norm(*a, **k)

    def mul(*a, **k):
        calls["mul"] += 1
        return real_mul(*a, **k)

    monkeypatch.setattr(torch, "_foreach_norm", norm)
    monkeypatch.setattr(torch, "_foreach_mul_", mul)
    proj.project_()
    assert calls == {"norm": 1, "mul": 1}


def test_stats():
    a = torch.randn(3, 3)
    b = torch.randn(2, 5)
    proj = NormProjector([[a], [b]], ["a", "b"])
    a.mul_(2)
    norms = proj.norms()
    s = proj.stats(norms, lr=0.1, projected=False)
    assert s["nap_ratio_max"].item() == pytest.approx(2.0, rel=1e-5)
    assert s["nap_ratio_min"].item() == pytest.approx(1.0, rel=1e-5)
    s = proj.stats(norms, lr=0.1, projected=True)
    expect = 0.1 / proj.targets**2
    assert s["nap_elr_mean"].item() == pytest.approx(expect.mean().item(), rel=1e-5)
    assert s["nap_elr_min"].item() == pytest.approx(expect.min().item(), rel=1e-5)
    assert s["nap_elr_max"].item() == pytest.approx(expect.max().item(), rel=1e-5)


def test_state_dict_roundtrip_by_name():
    a, b = torch.randn(3, 3), torch.randn(4)
    p1 = NormProjector([[a], [b]], ["a", "b"])
    sd = p1.state_dict()
    a.mul_(5)
    c = torch.randn(2, 2)
    p2 = NormProjector([[a], [c]], ["a", "c"])  # "b" gone, "c" new
    missing = p2.load_state_dict(sd)
    assert missing == ["c"]
    assert p2.targets[0].item() == p1.targets[0].item()
    assert p2.targets[1].item() == pytest.approx(c.norm().item())
    with pytest.raises(KeyError):
        p2.load_state_dict(sd, strict=True)


def test_groups_skipped_at_zero_stay_skipped_after_a_resume():
    # a zero-initialised matrix is never projected in an uninterrupted run; a resumed run
    # records targets from weights that have trained away from zero, and must drop it again
    a, z = torch.randn(3, 3), torch.zeros(4, 4)
    p1 = NormProjector([[a], [z]], ["a", "z"])
    assert p1.names == ["a"] and p1.skipped == ["z"]
    sd = p1.state_dict()
    z.add_(0.5)  # trained since
    p2 = NormProjector([[a], [z]], ["a", "z"])
    assert p2.names == ["a", "z"]
    assert p2.load_state_dict(sd) == []
    assert p2.names == ["a"] and p2.skipped == ["z"] and p2.num_tensors == 1
    a.mul_(3)
    p2.project_()
    assert a.norm().item() == pytest.approx(p1.targets[0].item(), rel=1e-6)
    assert torch.equal(z, torch.full((4, 4), 0.5))


def test_projector_under_a_float64_default_dtype():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
        proj = NormProjector.from_module(m)
        with torch.no_grad():
            m[0].weight.mul_(2)
        proj.project_()
        assert proj.targets.dtype == torch.float32
        assert (proj.norms() / proj.targets - 1).abs().max().item() < 1e-6
    finally:
        torch.set_default_dtype(default)


def test_attach_every_n_steps_keeps_its_phase_across_a_resume():
    torch.manual_seed(0)
    steps = []
    for run in ("whole", "resumed"):
        m = nn.Linear(4, 4)
        w0 = m.weight.detach().clone()
        proj = NormProjector.from_module(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        handle = proj.attach(opt, every=3)
        projected = []
        for step in range(1, 8):
            if run == "resumed" and step == 5:  # a new projector and hook, from the state
                state = proj.state_dict()
                handle.remove()
                proj = NormProjector.from_module(m)
                proj.load_state_dict(state)
                handle = proj.attach(opt, every=3)
            opt.zero_grad()
            m.weight.grad = torch.ones_like(m.weight)
            opt.step()
            projected.append(abs(m.weight.norm().item() - w0.norm().item()) < 1e-6)
        steps.append(projected)
    assert steps[0] == steps[1] and steps[0][2] and steps[0][5] and not steps[0][3]


def test_attach_to_plain_torch_optimizer():
    torch.manual_seed(0)
    m = TinyLM()
    proj = NormProjector.from_module(m)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    handle = proj.attach(opt)
    x = torch.randint(0, 11, (6,))
    for _ in range(20):
        opt.zero_grad()
        m(x).logsumexp(-1).sum().backward()
        opt.step()
    assert (proj.norms() / proj.targets - 1).abs().max().item() < 1e-6
    handle.remove()
    for _ in range(20):
        opt.zero_grad()
        m(x).logsumexp(-1).sum().backward()
        opt.step()
    assert (proj.norms() / proj.targets - 1).abs().max().item() > 1e-4
