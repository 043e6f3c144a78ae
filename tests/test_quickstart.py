"""Tests of the quickstart (``recipes/quickstart/run.sh``): the synthetic corpus, the curve
reader, the PNG, and a shortened end-to-end run."""
import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from powernorm_plugin.recipes import quickstart, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_synthetic_corpus_is_deterministic_and_follows_its_grammar():
    lex = synthetic.Lexicon()
    pairs = synthetic.corpus(3, 400, lex)
    assert pairs == synthetic.corpus(3, 400) and pairs != synthetic.corpus(4, 400)
    src_to_tgt = {}
    for cat in ("noun", "adj", "verb", "prep", "det"):
        src_to_tgt.update(zip(lex.source[cat], lex.target[cat]))
        src_to_tgt.update(zip(lex.source["det_plural"], lex.target["det"]))
    verbs = set(lex.source["verb"])
    for src, tgt in pairs:
        s, t = src.split(), tgt.split()
        assert len(s) == len(t)  # one target word per source word
        verb = next(w for w in s if w in verbs)
        plural = s[0] in lex.source["det_plural"]
        assert t[-1] == src_to_tgt[verb] + ("en" if plural else "")  # verb last, agrees
        assert t[0] == src_to_tgt[s[0]]  # sentences open with the subject's determiner
        # same words up to plural endings: the target is a reordering of the mapped source
        mapped = sorted(src_to_tgt[w] for w in s)
        assert sorted(w if w in src_to_tgt.values() else w[:-2] if w[:-2] in src_to_tgt.values()
                      else w[:-1] for w in t) == mapped


def test_valid_curve_reads_fairseq_validation_lines(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026 | INFO | train_inner | epoch 001:  10 / 11 loss=8.1, num_updates=10\n"
        "2026 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 7.5 | nll_loss 7.4 | "
        "ppl 181 | wps 0 | num_updates 10\n"
        "2026 | INFO | valid | epoch 002 | valid on 'valid' subset | loss 6.25 | nll_loss 6.1 | "
        "ppl 70 | num_updates 20 | best_loss 6.25\n", encoding="utf-8")
    assert quickstart.valid_curve(str(log)) == [(10, 7.5), (20, 6.25)]


def read_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = size
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    pixels = set()
    for y in range(height):
        row = raw[y * (1 + 3 * width) + 1:(y + 1) * (1 + 3 * width)]
        pixels.update(row[i:i + 3] for i in range(0, len(row), 3))
    return width, height, pixels


def test_plot_draws_one_colored_curve_per_model(tmp_path):
    from powernorm_plugin.cli.plot_nap import COLORS

    out = str(tmp_path / "curves.png")
    quickstart.plot_curves({"LayerNorm": [(100, 5.0), (200, 3.0)], "PowerNorm": [(100, 4.5), (200, 2.5)]}, out)
    width, height, pixels = read_png(out)
    assert (width, height) == (900, 560)
    assert bytes(COLORS[0]) in pixels and bytes(COLORS[1]) in pixels
    with pytest.raises(ValueError, match="no validation loss"):
        quickstart.plot_curves({"LayerNorm": []}, out)


def test_settings_are_recorded_and_a_rerun_with_others_is_refused(tmp_path):
    work = str(tmp_path / "qs")
    settings = {"train_pairs": 300, "max_update": 20, "seed": 1}
    quickstart.check_settings(work, settings)
    assert json.loads((tmp_path / "qs" / "settings.json").read_text()) == settings
    quickstart.check_settings(work, dict(settings))  # the same settings: fine
    with pytest.raises(quickstart.SettingsMismatch) as err:
        quickstart.check_settings(work, dict(settings, train_pairs=500, max_update=100))
    msg = str(err.value)
    assert "--train-pairs 300 (requested: 500)" in msg and "--max-update 20 (requested: 100)" in msg
    assert "--seed" not in msg and "another --workdir" in msg
    old = tmp_path / "old"
    (old / "corpus").mkdir(parents=True)  # made before settings were recorded
    with pytest.raises(quickstart.SettingsMismatch, match="no settings.json"):
        quickstart.check_settings(str(old), settings)


TINY = ["--train-pairs", "300", "--test-pairs", "40", "--max-update", "20", "--validate-every", "10"]


def run_quickstart(work, *args):
    env = dict(os.environ, PYTHON=sys.executable, POWERNORM_BACKEND="eager", OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", os.path.join(REPO, "recipes", "quickstart", "run.sh"), "--workdir", str(work), *args],
        cwd=os.path.dirname(str(work)), env=env, capture_output=True, text=True, timeout=600)


def trained_state(work):
    """(bytes hash, num_updates) of each model's checkpoint_last.pt."""
    import torch

    state = {}
    for norm in ("ln", "pn"):
        path = work / "checkpoints" / norm / "checkpoint_last.pt"
        ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
        state[norm] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                       ckpt["optimizer_history"][-1]["num_updates"])
    return state


@pytest.fixture(scope="module")
def finished_quickstart(tmp_path_factory):
    """A tiny quickstart run to the end: (work folder, its process, results.json, checkpoints)."""
    work = tmp_path_factory.mktemp("quickstart") / "qs"
    proc = run_quickstart(work, *TINY)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work, proc, json.loads((work / "results.json").read_text()), trained_state(work)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reports_bleu_and_curves(finished_quickstart):
    work, proc, record, state = finished_quickstart
    assert "[quickstart] 3/4 training the PowerNorm transformer" in proc.stderr  # progress
    assert set(record["models"]) == {"ln", "pn"}
    for model in record["models"].values():
        assert 0.0 <= model["bleu"] <= 100.0
        assert [x for x, _ in model["valid_loss"]] == [10, 20]
        (_, at_10), (_, at_20) = model["valid_loss"]
        assert at_20 < at_10  # both models learn (BLEU after 20 updates says little)
    assert {n: u for n, (_, u) in state.items()} == {"ln": 20, "pn": 20}
    table = (work / "results.md").read_text()
    assert "| LayerNorm |" in table and "| PowerNorm |" in table
    assert table in proc.stdout
    width, height, pixels = read_png(str(work / "valid_loss.png"))
    assert len(pixels) > 3
    assert (work / "corpus" / "train.src").read_text().count("\n") == 300


@pytest.mark.slow
def test_quickstart_rerun_reuses_finished_trainings_and_reports_the_same(finished_quickstart):
    work, _, record, state = finished_quickstart
    table = (work / "results.md").read_text()
    proc = run_quickstart(work, *TINY)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "+ fairseq-train" not in proc.stderr and "+ fairseq-generate" not in proc.stderr
    assert "finished training in an earlier run" in proc.stderr
    assert trained_state(work) == state  # checkpoints untouched: no extra update
    again = json.loads((work / "results.json").read_text())
    for norm, model in record["models"].items():
        for key in ("bleu", "sacrebleu", "train_seconds", "valid_loss"):
            assert again["models"][norm][key] == model[key], (norm, key)
    assert (work / "results.md").read_text() == table  # final loss and training time too


@pytest.mark.slow
def test_quickstart_rerun_with_other_settings_stops_and_names_them(finished_quickstart):
    work, _, record, state = finished_quickstart
    results = (work / "results.json").read_text()
    proc = run_quickstart(work, *TINY, "--train-pairs", "500", "--max-update", "30")
    assert proc.returncode == 1
    assert "--train-pairs 300 (requested: 500)" in proc.stderr
    assert "--max-update 20 (requested: 30)" in proc.stderr
    assert "another --workdir" in proc.stderr and "Traceback" not in proc.stderr
    assert "[quickstart]" not in proc.stderr and "+ fairseq" not in proc.stderr  # at once
    assert trained_state(work) == state and (work / "results.json").read_text() == results


@pytest.mark.slow
def test_quickstart_stopped_after_its_last_checkpoint_trains_no_further(finished_quickstart):
    # stopped between fairseq-train's last checkpoint and finished.json: fairseq-train
    # resumed from that checkpoint would make one update more (21 of 20)
    work, _, _, state = finished_quickstart
    (work / "checkpoints" / "ln" / "finished.json").unlink()
    proc = run_quickstart(work, *TINY)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "reached 20 updates in an earlier run" in proc.stderr
    assert trained_state(work) == state
    record = json.loads((work / "results.json").read_text())
    assert record["models"]["ln"]["train_seconds"] is None
    assert "| LayerNorm |" in (work / "results.md").read_text()
    assert "| unknown |" in (work / "results.md").read_text()
