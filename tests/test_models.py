"""The plugin's architectures: defaults, flags, padding masks, scale invariance (in-process)."""
import copy

import pytest
import torch
from fairseq import options

from powernorm_plugin.modules import GroupScaling, IdentityNorm, MaskedBatchNorm, PowerNorm

SMALL = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
         "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2", "--decoder-layers", "2"]
SMALL_LM = ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-layers", "2",
            "--tokens-per-sample", "64"]


def _norm_sites(stack):
    sites = {}
    for i, layer in enumerate(stack.layers):
        sites[f"layers.{i}.self"] = layer.self_attn_layer_norm
        sites[f"layers.{i}.ff"] = layer.final_layer_norm
    sites["final"] = stack.layer_norm
    return sites


@pytest.mark.parametrize("arch,heads", [
    ("powernorm_transformer_iwslt_de_en", 4),
    ("powernorm_transformer_wmt_en_de", 8),
    ("powernorm_transformer_vaswani_wmt_en_de_big", 16),
    ("powernorm_transformer_wmt_en_de_big_t2t", 16),
])
def test_translation_architectures_default_to_table1(build_plugin_model, arch, heads):
    model, args, _ = build_plugin_model(arch, *SMALL, "--lr-scheduler", "inverse_sqrt",
                                        "--warmup-updates", "8000")
    assert args.encoder_normalize_before and args.decoder_normalize_before
    for site, norm in _norm_sites(model.encoder).items():
        assert isinstance(norm, PowerNorm), site
        assert norm.group_num == heads and norm.warmup_updates == 8000 and not norm.causal
        assert norm.mode == "paper" and norm.alpha_fwd == 0.9 and norm.alpha_bkw == 0.9
    for site, norm in _norm_sites(model.decoder).items():
        assert isinstance(norm, torch.nn.LayerNorm), site
    assert all(isinstance(layer.encoder_attn_layer_norm, torch.nn.LayerNorm) for layer in model.decoder.layers)
    assert model.encoder.layers[1].self_attn_layer_norm.name == "encoder.layers.1.self_attn_layer_norm"


def test_language_model_architectures(build_plugin_model):
    model, _, d = build_plugin_model("powernorm_transformer_lm", *SMALL_LM, task="language_modeling")
    for site, norm in _norm_sites(model.decoder).items():
        assert isinstance(norm, PowerNorm) and norm.causal and norm.group_num == 8, site
    wiki, _, _ = build_plugin_model(
        "powernorm_transformer_lm_wiki103", *SMALL_LM, "--decoder-input-dim", "32",
        "--decoder-output-dim", "32", "--adaptive-input-cutoff", "8", "--adaptive-softmax-cutoff", "8",
        task="language_modeling")
    assert type(wiki.decoder.embed_tokens).__name__ == "AdaptiveInput"
    assert wiki.decoder.adaptive_softmax is not None and len(wiki.decoder.layers) == 2
    # wiki103 has no final decoder norm (as fairseq's); its layer norms are PowerNorm
    assert wiki.decoder.layer_norm is None
    assert isinstance(wiki.decoder.layers[0].final_layer_norm, PowerNorm)
    ptb, args, _ = build_plugin_model("powernorm_transformer_lm_ptb", task="language_modeling")
    assert len(ptb.decoder.layers) == 4 and args.dropout == 0.3
    assert isinstance(ptb.decoder.layers[3].self_attn_layer_norm, PowerNorm)


@pytest.mark.parametrize("arch,flags,task", [
    ("powernorm_transformer", ["--encoder-layerdrop", "0.5", "--decoder-layerdrop", "0.5",
                               "--decoder-norm-self", "power", "--decoder-norm-ff", "power"],
     "translation"),
    ("powernorm_transformer_lm", ["--decoder-layerdrop", "0.5"], "language_modeling"),
])
def test_layerdrop_keeps_the_chosen_norm_in_every_layer(build_plugin_model, arch, flags, task):
    # with layerdrop, iterating fairseq's LayerDropModuleList in training mode skips a random
    # subset of the layers: the norms went into some layers only, and the checkpoint then
    # loaded only under the seed it was built with
    six = ["--encoder-layers", "6", "--decoder-layers", "6"] if task == "translation" else [
        "--decoder-layers", "6"]
    sizes = SMALL if task == "translation" else SMALL_LM
    for seed in range(3):
        torch.manual_seed(seed)
        model, _, _ = build_plugin_model(arch, *sizes, *six, *flags, task=task)
        stacks = [model.decoder] + ([model.encoder] if task == "translation" else [])
        for stack in stacks:
            assert type(stack.layers).__name__ == "LayerDropModuleList"
            for i in range(len(stack.layers)):
                layer = stack.layers[i]
                assert isinstance(layer.self_attn_layer_norm, PowerNorm), (seed, i)
                assert isinstance(layer.final_layer_norm, PowerNorm), (seed, i)


def test_site_flags_groups_warmup_and_mode(build_plugin_model):
    model, _, _ = build_plugin_model(
        "powernorm_transformer_iwslt_de_en", *SMALL, "--encoder-norm-self", "rms",
        "--encoder-norm-ff", "batch", "--decoder-norm-self", "power", "--decoder-norm-ff", "layer",
        "--powernorm-groups", "0", "--powernorm-warmup", "7", "--powernorm-mode", "official",
        "--powernorm-alpha-fwd", "0.8", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "99")
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    assert isinstance(enc.self_attn_layer_norm, torch.nn.RMSNorm)
    assert isinstance(enc.final_layer_norm, MaskedBatchNorm)
    assert isinstance(model.encoder.layer_norm, MaskedBatchNorm)  # the final norm follows -ff
    pn = dec.self_attn_layer_norm
    assert isinstance(pn, PowerNorm) and pn.causal and pn.group_num is None
    assert pn.warmup_updates == 7 and pn.mode == "official" and pn.alpha_fwd == 0.8
    assert isinstance(dec.final_layer_norm, torch.nn.LayerNorm)


def test_warmup_follows_lr_warmup_times_update_freq(build_plugin_model):
    model, _, _ = build_plugin_model("powernorm_transformer_iwslt_de_en", *SMALL, "--lr-scheduler",
                                     "inverse_sqrt", "--warmup-updates", "50", "--update-freq", "4")
    assert model.encoder.layers[0].self_attn_layer_norm.warmup_updates == 200


@pytest.mark.parametrize("flag", ["--encoder-norm-self", "--decoder-norm-ff", "--powernorm-mode",
                                  "--ffn-activation-norm"])
def test_unknown_choice_fails_at_parsing_with_the_choices(capsys, flag):
    import powernorm_plugin  # noqa: F401

    arch = "powernorm_transformer_lm" if flag == "--decoder-norm-ff" else "powernorm_transformer"
    task = "language_modeling" if flag == "--decoder-norm-ff" else "translation"
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(options.get_training_parser(),
                                    ["/x", "--task", task, "--arch", arch, flag, "bogus"])
    err = capsys.readouterr().err
    assert flag in err and "invalid choice: 'bogus'" in err


def test_bad_option_values_name_the_flag(build_plugin_model):
    with pytest.raises(ValueError, match="--powernorm-alpha-bkw"):
        build_plugin_model("powernorm_transformer", *SMALL, "--powernorm-alpha-bkw", "1.5")
    with pytest.raises(ValueError, match="--powernorm-groups"):
        build_plugin_model("powernorm_transformer", *SMALL, "--powernorm-groups", "-1")
    with pytest.raises(ValueError, match="group_num=3 must divide"):
        build_plugin_model("powernorm_transformer", *SMALL, "--powernorm-groups", "3")
    with pytest.raises(ValueError, match="--checkpoint-activations"):
        build_plugin_model("powernorm_transformer", *SMALL, "--checkpoint-activations")
    with pytest.raises(ValueError, match="--offload-activations"):  # turns checkpointing on
        build_plugin_model("powernorm_transformer", *SMALL, "--offload-activations")
    with pytest.raises(ValueError, match="--powernorm-sync with --encoder-layerdrop"):
        build_plugin_model("powernorm_transformer", *SMALL, "--powernorm-sync",
                           "--encoder-layerdrop", "0.2")
    build_plugin_model("powernorm_transformer", *SMALL, "--powernorm-sync",
                       "--decoder-layerdrop", "0.2")  # a LayerNorm decoder: nothing to pair


def _padded(tokens, pad, extra, left):
    cols = torch.full((tokens.size(0), extra), pad, dtype=tokens.dtype)
    return torch.cat([cols, tokens], 1) if left else torch.cat([tokens, cols], 1)


@pytest.mark.parametrize("kind", ["power", "batch"])
def test_padding_reaches_every_norm(build_plugin_model, kind):
    """Extra padding columns change no statistic of any norm, encoder and decoder alike.

    Each run is on a deep copy of the model (as fairseq's EMA makes), so this also checks that
    a copy's norms get their padding mask from the copy's own stack.
    """
    flags = ["--encoder-norm-self", kind, "--encoder-norm-ff", kind, "--powernorm-warmup", "10"]
    if kind == "power":
        flags += ["--decoder-norm-self", "power", "--decoder-norm-ff", "power"]
    model, _, d = build_plugin_model("powernorm_transformer_iwslt_de_en", *SMALL, "--dropout", "0", *flags)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (3, 5), generator=g)
    src[0, :2] = d.pad()  # left-padded source, as fairseq batches it
    prev = torch.randint(d.nspecial, len(d), (3, 6), generator=g)
    prev[:, 0] = d.eos()
    prev[1, 4:] = d.pad()  # right-padded target
    runs = []
    for extra in (0, 3):
        m = copy.deepcopy(model).train()
        s, p = _padded(src, d.pad(), extra, left=True), _padded(prev, d.pad(), extra, left=False)
        enc = m.encoder(s, src_lengths=s.ne(d.pad()).sum(1))
        logits = m.decoder(p, encoder_out=enc)[0]
        runs.append((m, enc["encoder_out"][0][extra:], logits[:, : prev.size(1)]))
    (m0, enc0, out0), (m3, enc3, out3) = runs
    stats = [n for n in m0.modules() if isinstance(n, (PowerNorm, MaskedBatchNorm))]
    assert len(stats) == (10 if kind == "power" else 5)
    for (name, a), b in zip(m0.named_buffers(), m3.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    real = src.ne(d.pad()).t().unsqueeze(-1)
    assert torch.allclose(enc0 * real, enc3 * real, atol=1e-5)
    tgt_real = prev.ne(d.pad()).unsqueeze(-1)
    assert torch.allclose(out0 * tgt_real, out3 * tgt_real, atol=1e-5)


@pytest.mark.parametrize("act_norm", ["layer", "rms"])
@pytest.mark.parametrize("arch", ["powernorm_transformer_iwslt_de_en", "powernorm_transformer_lm"])
def test_ffn_activation_norm_makes_fc1_scale_invariant(build_plugin_model, act_norm, arch):
    task = "language_modeling" if arch.endswith("_lm") else "translation"
    model, _, d = build_plugin_model(arch, *(SMALL_LM if task != "translation" else SMALL),
                                     "--dropout", "0", "--ffn-activation-norm", act_norm, task=task)
    fc1 = [m.fc1 for m in model.modules() if hasattr(m, "fc1")]
    assert fc1 and all(f.bias is None for f in fc1)
    tokens = torch.randint(d.nspecial, len(d), (2, 7), generator=torch.Generator().manual_seed(3))
    model.eval()

    def run(m):
        if task == "translation":
            return m(tokens, torch.tensor([7, 7]), tokens)[0]
        return m(tokens)[0]

    before = run(model)
    with torch.no_grad():
        for f in fc1:
            f.weight.mul_(5.0)
    assert torch.allclose(run(model), before, atol=1e-4)
    # without the activation norm the same rescaling changes the output
    plain, _, _ = build_plugin_model(arch, *(SMALL_LM if task != "translation" else SMALL),
                                     "--dropout", "0", task=task)
    plain.eval()
    before = run(plain)
    with torch.no_grad():
        for m in plain.modules():
            if hasattr(m, "fc1"):
                m.fc1.weight.mul_(5.0)
    assert not torch.allclose(run(plain), before, atol=1e-4)


def test_folded_model_builds_remainders_and_refuses_training(build_plugin_model):
    model, _, _ = build_plugin_model("powernorm_transformer_iwslt_de_en", *SMALL, "--encoder-norm-self",
                                     "batch", "--folded-norms")
    enc = model.encoder.layers[0]
    assert isinstance(enc.self_attn_layer_norm, IdentityNorm)
    assert isinstance(enc.final_layer_norm, GroupScaling)
    assert isinstance(model.encoder.layer_norm, GroupScaling)
    with pytest.raises(RuntimeError, match="fold_norms"):
        model.train()
