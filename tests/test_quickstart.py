"""Tests of the quickstart (``recipes/quickstart/run.sh``): the synthetic corpus, the curve
reader, the PNG, and a shortened end-to-end run."""
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


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_reports_bleu_and_curves(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, POWERNORM_BACKEND="eager", OMP_NUM_THREADS="1")
    work = tmp_path / "qs"
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "recipes", "quickstart", "run.sh"), "--workdir", str(work),
         "--train-pairs", "300", "--test-pairs", "40", "--max-update", "20", "--validate-every", "10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "[quickstart] 3/4 training the PowerNorm transformer" in proc.stderr  # progress
    record = json.loads((work / "results.json").read_text())
    assert set(record["models"]) == {"ln", "pn"}
    for model in record["models"].values():
        assert 0.0 <= model["bleu"] <= 100.0
        assert [x for x, _ in model["valid_loss"]] == [10, 20]
        (_, at_10), (_, at_20) = model["valid_loss"]
        assert at_20 < at_10  # both models learn (BLEU after 20 updates says little)
    table = (work / "results.md").read_text()
    assert "| LayerNorm |" in table and "| PowerNorm |" in table
    assert table in proc.stdout
    width, height, pixels = read_png(str(work / "valid_loss.png"))
    assert len(pixels) > 3
    assert (work / "corpus" / "train.src").read_text().count("\n") == 300
