"""fairseq's command-line tools and from_pretrained with the plugin's models, end to end.

The ``trained_models`` fixture (conftest.py) trains, through fairseq-train, LayerNorm /
BatchNorm / PowerNorm encoders of a tiny powernorm_transformer_iwslt_de_en on a generated
reverse-the-sentence task, and a tiny PowerNorm language model on counting sequences.
"""
import os
import re

import pytest
import sacrebleu
import torch

from conftest import run_fairseq

pytestmark = pytest.mark.slow

VALID_LOSS = re.compile(r"valid on 'valid' subset \| loss ([\d.]+)")


def _valid_losses(log):
    return [float(x) for x in VALID_LOSS.findall(log)]


def _bleu(hyps, refs):
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score


@pytest.mark.parametrize("variant", ["layer", "batch", "power"])
def test_training_lowers_validation_loss_and_translates(trained_models, variant, user_dir):
    from powernorm_plugin.models import PowerNormTransformerModel
    from powernorm_plugin.modules import MaskedBatchNorm, PowerNorm

    run = trained_models[variant]
    losses = _valid_losses(run["log"])
    assert len(losses) >= 4, run["log"][-3000:]
    assert losses[-1] < losses[0] - 1.0, losses
    hub = PowerNormTransformerModel.from_pretrained(
        run["dir"], checkpoint_file="checkpoint_best.pt",
        data_name_or_path=trained_models["reverse_task"]["data"])
    expected = {"layer": torch.nn.LayerNorm, "batch": MaskedBatchNorm, "power": PowerNorm}[variant]
    assert isinstance(hub.models[0].encoder.layers[0].self_attn_layer_norm, expected)
    pairs = trained_models["reverse_task"]["test_pairs"]
    hyps = hub.translate([s for s, _ in pairs], beam=4)
    assert _bleu(hyps, [t for _, t in pairs]) > 30


def test_generate_translates(trained_models, user_dir):
    run = trained_models["power"]
    out = run_fairseq("generate", trained_models["reverse_task"]["data"], "--user-dir", user_dir,
                      "--cpu", "--path", os.path.join(run["dir"], "checkpoint_best.pt"),
                      "--beam", "5", "--batch-size", "64").stdout
    bleu = float(re.search(r"BLEU4 = ([\d.]+)", out).group(1))
    assert bleu > 50, out[-2000:]


def test_interactive_translates_stdin(trained_models, user_dir, tmp_path):
    pairs = trained_models["reverse_task"]["test_pairs"][:6]
    src = tmp_path / "input.txt"
    src.write_text("\n".join(s for s, _ in pairs) + "\n")
    out = run_fairseq("interactive", trained_models["reverse_task"]["data"], "--user-dir", user_dir,
                      "--cpu", "--path", os.path.join(trained_models["power"]["dir"], "checkpoint_best.pt"),
                      "--input", src, "--beam", "4", "--source-lang", "src", "--target-lang", "tgt").stdout
    hyps = [line.split("\t")[2] for line in out.splitlines() if line.startswith("H-")]
    assert len(hyps) == len(pairs)
    assert _bleu(hyps, [t for _, t in pairs]) > 50


def test_validate_reports_the_trained_loss(trained_models, user_dir):
    run = trained_models["power"]
    out = run_fairseq("validate", trained_models["reverse_task"]["data"], "--user-dir", user_dir,
                      "--cpu", "--path", os.path.join(run["dir"], "checkpoint_best.pt"),
                      "--task", "translation", "--valid-subset", "valid", "--max-tokens", "1000")
    text = out.stdout + out.stderr
    loss = float(re.search(r"valid on 'valid' subset \| loss ([\d.]+)", text).group(1))
    # the best checkpoint's validation loss, as fairseq-train logged it
    assert loss == pytest.approx(min(_valid_losses(run["log"])), abs=0.01)


def test_eval_lm_perplexity_drops_with_training(trained_models, user_dir):
    run = trained_models["lm"]
    ppl = {}
    for ckpt in ("checkpoint_1_10.pt", "checkpoint_last.pt"):
        out = run_fairseq("eval_lm", trained_models["lm_data"], "--user-dir", user_dir, "--cpu",
                          "--path", os.path.join(run["dir"], ckpt), "--gen-subset", "test",
                          "--tokens-per-sample", "16", "--sample-break-mode", "complete",
                          "--max-tokens", "512")
        text = out.stdout + out.stderr
        ppl[ckpt] = float(re.search(r"Perplexity: ([\d.]+)", text).group(1))
    # 16 symbols: a uniform guess has perplexity 16; counting is predictable after one word
    assert ppl["checkpoint_last.pt"] < 0.6 * ppl["checkpoint_1_10.pt"], ppl
    assert ppl["checkpoint_last.pt"] < 5, ppl


def test_language_model_from_pretrained_scores(trained_models):
    from powernorm_plugin.models import PowerNormTransformerLanguageModel
    from powernorm_plugin.modules import PowerNorm

    hub = PowerNormTransformerLanguageModel.from_pretrained(
        trained_models["lm"]["dir"], checkpoint_file="checkpoint_last.pt",
        data_name_or_path=trained_models["lm_data"])
    assert isinstance(hub.models[0].decoder.layers[0].self_attn_layer_norm, PowerNorm)
    model, d = hub.models[0], hub.task.source_dictionary

    def mean_logprob(sentence):
        target = hub.encode(sentence)  # ends with </s>
        inputs = torch.cat([target.new_tensor([d.eos()]), target[:-1]])
        with torch.no_grad():
            lprobs = model.get_normalized_probs(model(inputs[None]), log_probs=True)[0]
        return lprobs.gather(1, target[:, None]).mean().item()

    assert mean_logprob("w3 w4 w5 w6 w7 w8 w9") > mean_logprob("w3 w9 w5 w8 w4 w7 w6") + 1.0


HYDRA_CONFIG = """\
common: {{user_dir: {user_dir}, cpu: true, seed: 1, log_format: simple}}
checkpoint: {{save_dir: {save_dir}, no_epoch_checkpoints: true}}
task: {{_name: translation, data: {data}}}
criterion: cross_entropy
model:
  _name: powernorm_transformer_iwslt_de_en
  encoder_embed_dim: 16
  decoder_embed_dim: 16
  encoder_ffn_embed_dim: 32
  decoder_ffn_embed_dim: 32
  encoder_layers: 1
  decoder_layers: 1
  encoder_attention_heads: 2
  decoder_attention_heads: 2
optimizer: {{_name: adam}}
lr_scheduler: {{_name: inverse_sqrt, warmup_updates: 3}}
optimization: {{lr: [0.005], max_update: 2, update_freq: [2]}}
dataset: {{max_tokens: 256, num_workers: 0}}
"""


def test_hydra_train_takes_the_powernorm_warmup_from_the_lr_scheduler(reverse_task, user_dir,
                                                                       tmp_path):
    # fairseq-hydra-train gives the model its own fields only: the warm-up (3 updates x
    # update_freq 2 = 6 forward passes) is read from the run's config. It was 0, silently.
    (tmp_path / "run.yaml").write_text(HYDRA_CONFIG.format(
        user_dir=user_dir, save_dir=tmp_path / "ckpt", data=reverse_task["data"]))
    out = run_fairseq("hydra_train", "--config-dir", tmp_path, "--config-name", "run",
                      f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    log = out.stdout + out.stderr
    norms = re.findall(r"PowerNorm\(16, .*warmup_updates=(\d+)", log)
    assert norms and set(norms) == {"6"}, log[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
