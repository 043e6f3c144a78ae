"""A decoder position's training-mode output must not depend on later tokens of its batch.

Two copies of the same model (same parameters and running statistics) run one training-mode
forward on batches that differ only at a later position; every earlier position's output
must be identical, for PowerNorm in the LM and in the translation decoder, during the
PowerNorm warm-up and after it. A batch-statistic norm (allowed only with
--allow-noncausal-decoder-norm) fails the same check, which shows the check can fail.
"""
import copy

import pytest
import torch

TINY_LM = ["--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-layers", "2",
           "--decoder-attention-heads", "2", "--dropout", "0", "--tokens-per-sample", "32"]
TINY_MT = ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
           "--decoder-ffn-embed-dim", "32", "--encoder-layers", "1", "--decoder-layers", "2",
           "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--dropout", "0"]
WARMUP = 3
CHANGED = 5  # the position changed; positions 0..CHANGED-1 must not move


def _tokens(dictionary, batch=4, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(dictionary.nspecial, len(dictionary), (batch, length), generator=g)


def _alter(tokens, dictionary):
    altered = tokens.clone()
    span = len(dictionary) - dictionary.nspecial
    altered[:, CHANGED:] = (altered[:, CHANGED:] - dictionary.nspecial + 1) % span + dictionary.nspecial
    assert not torch.equal(altered[:, CHANGED:], tokens[:, CHANGED:])
    return altered


def _train_steps(model, run, steps):
    """Advance the model (and its norms' running statistics) by ``steps`` training updates."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        out = run(model, step)
        out.float().pow(2).mean().backward()
        opt.step()


def _earlier_outputs_unchanged(model, run_a, run_b):
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.train()
    b.train()
    out_a, out_b = run_a(a), run_b(b)
    return torch.allclose(out_a[:, :CHANGED], out_b[:, :CHANGED], atol=1e-6, rtol=0), out_a, out_b


def _lm(build_plugin_model, *flags):
    model, _, d = build_plugin_model("powernorm_transformer_lm", *TINY_LM,
                                     "--powernorm-warmup", WARMUP, *flags, task="language_modeling")
    tokens = _tokens(d)
    altered = _alter(tokens, d)
    return model, d, (lambda m: m(tokens)[0]), (lambda m: m(altered)[0]), \
        (lambda m, step: m(_tokens(d, seed=100 + step))[0])


def _mt(build_plugin_model, *flags):
    model, _, d = build_plugin_model("powernorm_transformer_iwslt_de_en", *TINY_MT,
                                     "--powernorm-warmup", WARMUP, *flags)
    src = _tokens(d, length=6, seed=1)
    lengths = torch.full((src.size(0),), src.size(1))
    prev = _tokens(d, seed=2)
    prev[:, 0] = d.eos()
    altered = _alter(prev, d)

    def run(prev_tokens):
        return lambda m: m(src, lengths, prev_tokens)[0]

    return model, d, run(prev), run(altered), (lambda m, step: m(src, lengths, _tokens(d, seed=200 + step))[0])


@pytest.mark.parametrize("make", [_lm, _mt], ids=["lm", "translation"])
def test_powernorm_decoder_is_causal_in_warmup_and_after(build_plugin_model, make):
    flags = [] if make is _lm else ["--decoder-norm-self", "power", "--decoder-norm-ff", "power"]
    model, _, run_a, run_b, run_train = make(build_plugin_model, *flags)
    norms = [m for n, m in model.decoder.named_modules() if type(m).__name__ == "PowerNorm"]
    assert norms and all(n.causal for n in norms)

    # first training call: inside the warm-up
    same, out_a, out_b = _earlier_outputs_unchanged(model, run_a, run_b)
    assert same, (out_a[:, :CHANGED] - out_b[:, :CHANGED]).abs().max()
    assert not torch.allclose(out_a[:, CHANGED:], out_b[:, CHANGED:])  # the change did reach later positions

    # after the warm-up, with running statistics and nu learned from several updates
    _train_steps(model, run_train, WARMUP + 3)
    assert all(int(n.num_steps) == WARMUP + 3 for n in norms)
    assert all(not torch.allclose(n.running_phi, torch.ones_like(n.running_phi)) for n in norms)
    same, out_a, out_b = _earlier_outputs_unchanged(model, run_a, run_b)
    assert same, (out_a[:, :CHANGED] - out_b[:, :CHANGED]).abs().max()


@pytest.mark.parametrize("kind", ["batch", "power_vanilla"])
def test_noncausal_decoder_norm_leaks_and_is_refused_without_flag(build_plugin_model, kind):
    with pytest.raises(ValueError, match="--decoder-norm-self .*--allow-noncausal-decoder-norm"):
        _lm(build_plugin_model, "--decoder-norm-self", kind)
    with pytest.raises(ValueError, match="--decoder-norm-ff"):
        _mt(build_plugin_model, "--decoder-norm-ff", kind)
    model, _, run_a, run_b, _ = _lm(build_plugin_model, "--decoder-norm-self", kind,
                                    "--allow-noncausal-decoder-norm")
    same, _, _ = _earlier_outputs_unchanged(model, run_a, run_b)
    assert not same  # the documented leak: earlier positions see the later tokens' statistics
