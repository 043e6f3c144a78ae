"""``python -m powernorm_plugin.cli.fold_norms`` on checkpoints trained by fairseq-train."""
import os
import re
import stat
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_fairseq

pytestmark = pytest.mark.slow


def _fold(src, dst):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "powernorm_plugin.cli.fold_norms", "--input", src,
                           "--output", dst], env=env, capture_output=True, text=True, timeout=300)


def _hypotheses(out):
    rows = [line.split("\t") for line in out.splitlines() if line.startswith("H-")]
    return {int(r[0][2:]): (float(r[1]), r[2]) for r in rows}


def _load(ckpt, data):
    from powernorm_plugin.models import PowerNormTransformerModel

    hub = PowerNormTransformerModel.from_pretrained(os.path.dirname(ckpt),
                                                    checkpoint_file=os.path.basename(ckpt),
                                                    data_name_or_path=data)
    return hub.models[0]


def _count(model, *types):
    return sum(isinstance(m, types) for m in model.modules())


@pytest.fixture(scope="module")
def folded_power(trained_models, tmp_path_factory):
    src = os.path.join(trained_models["power"]["dir"], "checkpoint_best.pt")
    dst = str(tmp_path_factory.mktemp("folded") / "folded.pt")
    proc = _fold(src, dst)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, dst


def test_folded_checkpoint_generates_identical_translations(trained_models, folded_power, user_dir):
    outputs = []
    for ckpt in folded_power:
        out = run_fairseq("generate", trained_models["reverse_task"]["data"], "--user-dir", user_dir,
                          "--cpu", "--path", ckpt, "--beam", "5", "--batch-size", "64").stdout
        outputs.append(_hypotheses(out))
    before, after = outputs
    assert len(before) == len(trained_models["reverse_task"]["test_pairs"])
    assert {k: v[1] for k, v in before.items()} == {k: v[1] for k, v in after.items()}
    for k in before:
        assert after[k][0] == pytest.approx(before[k][0], abs=1e-4)


def test_folded_checkpoint_has_fewer_norm_ops(trained_models, folded_power):
    from powernorm_plugin.modules import GroupScaling, PowerNorm

    data = trained_models["reverse_task"]["data"]
    original, folded = (_load(c, data) for c in folded_power)
    assert _count(original, PowerNorm) == 5  # 2 encoder layers x 2 sites + the final norm
    assert _count(folded, PowerNorm) == 0
    assert _count(folded, GroupScaling) == 5  # only the parameter-free group scaling is left


def test_batchnorm_fold_keeps_model_outputs(trained_models, tmp_path):
    from powernorm_plugin.modules import IdentityNorm, MaskedBatchNorm

    src = os.path.join(trained_models["batch"]["dir"], "checkpoint_best.pt")
    dst = str(tmp_path / "folded.pt")
    assert _fold(src, dst).returncode == 0
    data = trained_models["reverse_task"]["data"]
    original, folded = _load(src, data), _load(dst, data)
    assert _count(original, MaskedBatchNorm) == 5 and _count(folded, MaskedBatchNorm) == 0
    assert _count(folded, IdentityNorm) == 5
    d = original.encoder.dictionary
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(d.nspecial, len(d), (4, 6), generator=g)
    tokens[0, :2] = d.pad()
    prev = torch.randint(d.nspecial, len(d), (4, 5), generator=g)
    lengths = tokens.ne(d.pad()).sum(1)
    with torch.no_grad():
        a = original(tokens, lengths, prev)[0]
        b = folded(tokens, lengths, prev)[0]
    assert torch.allclose(a, b, atol=1e-4)


def test_fold_refuses_what_it_cannot_fold(trained_models, folded_power, tmp_path, capsys):
    from powernorm_plugin.cli.fold_norms import main

    assert main(["--input", os.path.join(trained_models["layer"]["dir"], "checkpoint_best.pt"),
                 "--output", str(tmp_path / "x.pt")]) == 1
    assert "nothing to fold" in capsys.readouterr().err
    assert main(["--input", folded_power[1], "--output", str(tmp_path / "y.pt")]) == 1
    assert "already folded" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "y.pt")


def test_fold_never_overwrites_its_input_and_names_unreadable_files(folded_power, tmp_path,
                                                                     capsys):
    from powernorm_plugin.cli.fold_norms import main

    src = folded_power[0]
    before = open(src, "rb").read()
    link = tmp_path / "model.pt"
    link.symlink_to(src)
    for output in (src, str(link)):  # the input itself, or under another name
        with pytest.raises(SystemExit) as exit_:
            main(["--input", str(link) if output == src else src, "--output", output])
        assert exit_.value.code == 2
        assert "is the input" in capsys.readouterr().err
    assert open(src, "rb").read() == before
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pt").write_bytes(before[: len(before) // 2])
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    for name, message in (("text.pt", "(cannot read|refusing to load) .*"),
                          ("cut.pt", "cannot read .* as a torch checkpoint"),
                          ("tensor.pt", "not a fairseq checkpoint")):
        assert main(["--input", str(tmp_path / name), "--output", str(tmp_path / "out.pt")]) == 1
        assert re.search(f"--input .*{name}: {message}", capsys.readouterr().err), name
    assert not os.path.exists(tmp_path / "out.pt")


def test_folded_checkpoint_refused_by_a_trainable_model_naming_fold_norms(trained_models,
                                                                          folded_power):
    # (--restore-file, a folded file left in --save-dir, --finetune-from-model)
    from powernorm_plugin.checkpoint.safe_load import safe_load

    model = _load(folded_power[0], trained_models["reverse_task"]["data"])
    folded_state = safe_load(folded_power[1])["model"]
    with pytest.raises(RuntimeError, match="it was written by fold_norms, for inference only"):
        model.load_state_dict(folded_state, strict=True)
    model.load_state_dict(safe_load(folded_power[0])["model"], strict=True)


def test_folded_language_model_refused_by_a_trainable_model_naming_fold_norms(trained_models):
    # the decoder's final norm is not folded (it feeds the output projection), so the folded
    # file still holds some of the model's statistics
    from powernorm_plugin.checkpoint.safe_load import safe_load
    from powernorm_plugin.models import PowerNormTransformerLanguageModel
    from powernorm_plugin.models.folding import fold_checkpoint_state

    path = os.path.join(trained_models["lm"]["dir"], "checkpoint_last.pt")
    checkpoint = safe_load(path)
    fold_checkpoint_state(checkpoint)
    assert "decoder.layer_norm.running_phi" in checkpoint["model"]
    model = PowerNormTransformerLanguageModel.from_pretrained(
        trained_models["lm"]["dir"], checkpoint_file="checkpoint_last.pt",
        data_name_or_path=trained_models["lm_data"]).models[0]
    with pytest.raises(RuntimeError, match="it was written by fold_norms, for inference only"):
        model.load_state_dict(checkpoint["model"], strict=True)


def test_fold_refuses_a_model_with_cross_self_attention(trained_models):
    # there the decoder's self-attention reads the encoder's output through its k and v
    # projections too: folding the encoder's final norm into encoder_attn alone changed the
    # translations
    from powernorm_plugin.checkpoint.safe_load import safe_load
    from powernorm_plugin.models.folding import FoldError, cfg_set, fold_checkpoint_state

    checkpoint = safe_load(os.path.join(trained_models["power"]["dir"], "checkpoint_best.pt"))
    cfg_set(checkpoint["cfg"]["model"], "cross_self_attention", True)
    with pytest.raises(FoldError, match="--cross-self-attention.*encoder.layer_norm"):
        fold_checkpoint_state(checkpoint)


def test_folded_checkpoint_is_written_with_the_usual_permissions(folded_power):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(folded_power[1]).st_mode) == 0o666 & ~umask
