"""Tests of the reproduction recipes (``recipes/``, ``powernorm_plugin.recipes``).

Fake archives are built in tmp_path with the layout of the real ones (IWSLT's .tags and
.xml files in ``de-en/``, WMT's training text and .sgm test sets, PTB's simple-examples
tree, WikiText-103's zip); every recipe is prepared from them offline with its shell
script, then trained and evaluated for a few updates of a tiny model.
"""
import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import tarfile
import zipfile

import pytest

from powernorm_plugin.recipes import archives as arc
from powernorm_plugin.recipes import results as res
from powernorm_plugin.recipes import scoring, text
from powernorm_plugin.recipes.definitions import RECIPES
from powernorm_plugin.recipes.stages import atomic_dir, run_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- fake corpora in the real archives' formats ---------------------------------------

DE = ("der die das haus katze hund baum stadt kind mann frau buch tisch auto wasser "
      "sieht hat liest trinkt baut findet gross klein alt neu schnell rot gruen und mit "
      "ohne über für nicht sehr heute gestern schön straße").split()
EN = ("the a house cat dog tree city child man woman book table car water sees has "
      "reads drinks builds finds big small old new fast red green and with without "
      "over for not very today yesterday nice street").split()


def _sentence(rng, words, n):
    out = [rng.choice(words) for _ in range(n)]
    if rng.random() < 0.2:
        out[rng.randrange(n)] += "-" + rng.choice(words)  # compounds: hyphen splitting
    if rng.random() < 0.1:
        out.insert(rng.randrange(n), "&")  # escaped by the Moses tokenizer
    s = " ".join(out)
    return s[0].upper() + s[1:] + rng.choice([".", "!", "?", ", ja.", "."])


def parallel(seed, count, lo=3, hi=12):
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        n = rng.randint(lo, hi)
        pairs.append((_sentence(rng, DE, n), _sentence(rng, EN, n)))
    return pairs


def _add(tf, name, data):
    data = data.encode("utf-8") if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def iwslt_tags(sentences, lang):
    lines = []
    for talk in range(0, len(sentences), 40):
        lines += [
            f"<url>http://www.ted.com/talks/talk_{talk}.html</url>",
            "<keywords>talks, science</keywords>",
            "<speaker>Jane Doe</speaker>",
            f"<talkid>{talk + 1}</talkid>",
            f"<title>Titel {talk}</title>" if lang == "de" else f"<title>Title {talk}</title>",
            "<description>TED Talk Subtitles and Transcript: text</description>",
            '<reviewer href="http://www.ted.com/profiles/1">Rev Iewer</reviewer>',
            '<translator href="http://www.ted.com/profiles/2">Trans Lator</translator>',
        ]
        lines += sentences[talk:talk + 40]
    return "\n".join(lines) + "\n"


def mteval_xml(sentences, setid, lang, ref):
    kind, attr = ("refset", f'srclang="german" trglang="{lang}"') if ref else ("srcset", f'srclang="{lang}"')
    body = [f'<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", f'<{kind} setid="{setid}" {attr}>',
            '<doc docid="535" genre="lectures">', "<url>http://www.ted.com/talks/x.html</url>",
            "<talkid>535</talkid>", "<title>t</title>"]
    body += [f'<seg id="{i}"> {s.replace("&", "&amp;")} </seg>' for i, s in enumerate(sentences, 1)]
    body += ["</doc>", f"</{kind}>", "</mteval>"]
    return "\n".join(body) + "\n"


def make_iwslt14(folder, train=300, per_test=6, quote=""):
    """``quote``: a text added to the first training pair's and every test set's first
    sentence, on both sides."""
    pairs = parallel(1, train)
    # a line separator inside a sentence (real TED text has them) must not split the line
    pairs[5] = (pairs[5][0].replace(" ", " \u2028", 1), pairs[5][1])
    pairs[0] = (pairs[0][0] + quote, pairs[0][1] + quote)
    path = os.path.join(folder, "de-en.tgz")
    with tarfile.open(path, "w:gz") as tf:
        for i, lang in enumerate(("de", "en")):
            _add(tf, f"de-en/train.tags.de-en.{lang}", iwslt_tags([p[i] for p in pairs], lang))
            for j, name in enumerate(("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                                      "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012", "IWSLT14.TED.tst2013")):
                segs = [p[i] for p in parallel(100 + j, per_test)]
                segs[0] += quote
                _add(tf, f"de-en/{name}.de-en.{lang}.xml", mteval_xml(segs, name, lang, ref=lang == "en"))
        _add(tf, "de-en/README", "IWSLT 2014 de-en\n")
    return path


def sgm(sentences, setid, lang, ref):
    kind = "refset" if ref else "srcset"
    body = [f'<{kind} setid="{setid}" srclang="any" trglang="{lang}">',
            '<doc sysid="ref" docid="1012-bbc" genre="news" origlang="en">', "<p>"]
    body += [f'<seg id="{i}">{s.replace("&", "&amp;")}</seg>' for i, s in enumerate(sentences, 1)]
    body += ["</p>", "</doc>", f"</{kind}>"]
    return "\n".join(body) + "\n"


def make_wmt14(folder, per_corpus=120, test=8):
    paths = {}
    corpora = {
        "training-parallel-europarl-v7.tgz": "training/europarl-v7.de-en",
        "training-parallel-commoncrawl.tgz": "commoncrawl.de-en",
        "training-parallel-nc-v9.tgz": "training/news-commentary-v9.de-en",
    }
    for k, (archive, prefix) in enumerate(corpora.items()):
        pairs = parallel(10 + k, per_corpus)
        paths[archive] = os.path.join(folder, archive)
        with tarfile.open(paths[archive], "w:gz") as tf:
            _add(tf, prefix + ".de", "".join(p[0] + "\n" for p in pairs))
            _add(tf, prefix + ".en", "".join(p[1] + "\n" for p in pairs))
            if k == 0:
                _add(tf, "training/europarl-v7.fr-en.fr", "Bonjour.\n")
    for archive, top, setid in (("dev.tgz", "dev", "newstest2013"), ("test-full.tgz", "test-full", "newstest2014")):
        pairs = parallel(20 + len(setid), test)
        paths[archive] = os.path.join(folder, archive)
        stem = "newstest2013" if setid == "newstest2013" else "newstest2014-deen"
        with tarfile.open(paths[archive], "w:gz") as tf:
            _add(tf, f"{top}/{stem}-src.en.sgm", sgm([p[1] for p in pairs], setid, "en", False))
            _add(tf, f"{top}/{stem}-ref.de.sgm", sgm([p[0] for p in pairs], setid, "de", True))
            _add(tf, f"{top}/{stem}-src.de.sgm", sgm([p[0] for p in pairs], setid, "de", False))
            if top == "dev":
                _add(tf, "dev/newstest2013.en", "".join(p[1] + "\n" for p in pairs))
    return paths


def lm_text(seed, lines, words=8):
    rng = random.Random(seed)
    vocab = EN + ["<unk>", "N", "$"]
    return "".join(" " + " ".join(rng.choice(vocab) for _ in range(rng.randint(3, words))) + " \n"
                   for _ in range(lines))


def make_ptb(folder):
    path = os.path.join(folder, "simple-examples.tgz")
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", 400), ("valid", 40), ("test", 40)):
            _add(tf, f"./simple-examples/data/ptb.{split}.txt", lm_text(len(split), n))
            _add(tf, f"./simple-examples/data/ptb.char.{split}.txt", "a _ b\n")
        _add(tf, "./simple-examples/data/README", "Penn Treebank\n")
        _add(tf, "./simple-examples/1-train/README", "rnnlm\n")
    return path


def make_wikitext103(folder):
    path = os.path.join(folder, "wikitext-103-v1.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("wikitext-103/", "")
        for split, n in (("train", 300), ("valid", 30), ("test", 30)):
            zf.writestr(f"wikitext-103/wiki.{split}.tokens", " \n = Title = \n \n" + lm_text(7 + n, n, 14))
    return path


def truncate(path, keep=0.6):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


# --- text extraction, tokenization, scoring ---------------------------------------------

def test_iwslt_tags_keep_talk_text_and_drop_metadata():
    lines = iwslt_tags(["Erster Satz.", "Zweiter Satz."], "de").splitlines()
    assert list(text.iwslt_tags_sentences(lines)) == [
        "Titel 0", "TED Talk Subtitles and Transcript: text", "Erster Satz.", "Zweiter Satz."]


def test_iwslt14_test_sets_write_right_single_quotes_as_apostrophes(tmp_path):
    # as fairseq's prepare-iwslt14.sh does (sed "s/\u2019/'/g" on the test sets' segments
    # only): BLEU is taken on those references
    from powernorm_plugin.recipes.prepare import _raw_iwslt14

    path = make_iwslt14(str(tmp_path), train=30, per_test=2, quote=" it\u2019s")
    raw = tmp_path / "raw"
    raw.mkdir()
    _raw_iwslt14(str(raw), {"de-en.tgz": {"path": path}})
    for lang in ("de", "en"):
        test = text.read_lines(str(raw / f"test.{lang}"))
        assert len(test) == 10 and test[0].endswith(" it's") and "\u2019" not in "".join(test)
        assert any(line.endswith(" it\u2019s") for line in text.read_lines(str(raw / f"train.{lang}")))


def test_seg_sentences_reads_xml_and_sgm_in_order_and_decodes_entities():
    xml = mteval_xml(["A & B.", "Zwei"], "tst", "en", ref=True)
    assert text.seg_sentences(xml) == ["A & B.", "Zwei"]
    assert text.seg_sentences('<seg id="7">x &lt; y &#39;z&#39;</seg>\n<SEG id=8> w </SEG>') == ["x < y 'z'", "w"]
    doc = sgm(["Tom & Jerry.", "Zwei"], "newstest2014", "de", ref=True)
    assert text.seg_sentences(doc) == ["Tom & Jerry.", "Zwei"]


def test_clean_pairs_applies_length_limits_and_ratio():
    pairs = [("a b c", "x y z"), ("a", "x y"), ("a b", "x y z"), ("", "x"), ("a " * 6, "x " * 6)]
    kept = list(text.clean_pairs(pairs, min_len=1, max_len=5, ratio=1.5))
    # "a" vs "x y" has ratio 2; "a b" vs "x y z" has ratio 1.5 (kept); empty and too long dropped
    assert kept == [("a b c", "x y z"), ("a b", "x y z")]


def test_split_every_holds_out_every_nth_line():
    held, rest = text.split_every(list(range(1, 48)), 23)
    assert held == [23, 46] and len(rest) == 45 and 23 not in rest
    with pytest.raises(ValueError):
        text.split_every([1, 2], 1)


def test_moses_tokenization_escapes_and_detokenization_restores():
    tok = text.moses_tokenize(["Ein Haus-Boot & mehr."], "de", aggressive=True)
    assert tok == ["Ein Haus @-@ Boot &amp; mehr ."]
    assert text.moses_detokenize(tok, "de") == ["Ein Haus-Boot & mehr."]
    assert text.moses_tokenize(["It's OK."], "en", lowercase=True) == ["it &apos;s ok ."]


def test_compound_split_rewrites_hyphens_left_to_right():
    assert scoring.compound_split("ein Haus-Boot") == "ein Haus ##AT##-##AT## Boot"
    assert scoring.compound_split("a @-@ b") == "a @ ##AT##-##AT## @ b"
    # non-overlapping matches scanned left to right, as the paper's evaluation does
    assert scoring.compound_split("a-b-c") == "a ##AT##-##AT## b-c"
    assert scoring.compound_split("a - b") == "a - b"


def test_tokenized_bleu_matches_hand_computation():
    assert scoring.tokenized_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    # all n-gram precisions 1, brevity penalty exp(1 - 5/4)
    assert scoring.tokenized_bleu(["a b c d"], ["a b c d e"]) == pytest.approx(100 * math.exp(-0.25))
    score, sig = scoring.sacrebleu_score(["The cat sat on the mat."], ["the cat sat on the mat."], lowercase=True)
    assert score == pytest.approx(100.0) and "case:lc" in sig


def test_parse_generate_orders_by_id_and_rejects_missing_sentences(tmp_path):
    out = tmp_path / "generate-test.txt"
    out.write_text("S-1\tb\nT-1\tB\nH-1\t-0.5\tbb\nD-1\t-0.5\tbb\nS-0\ta\nT-0\tA\nH-0\t-0.1\taa\n"
                   "Generate test with beam=5: BLEU4 = 0.00\n", encoding="utf-8")
    assert scoring.parse_generate(str(out)) == (["a", "b"], ["A", "B"], ["aa", "bb"])
    out.write_text("S-2\tb\nT-2\tB\nH-2\t-0.5\tbb\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not 0..0"):
        scoring.parse_generate(str(out))


# --- stages and archives ------------------------------------------------------------------

def test_atomic_stage_leaves_nothing_behind_on_failure_and_skips_when_done(tmp_path):
    target = str(tmp_path / "stage")

    def fail(tmp):
        open(os.path.join(tmp, "half-written"), "w").close()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(target, "demo", fail)
    assert not os.path.exists(target) and not os.path.exists(target + ".tmp")
    assert run_stage(target, "demo", lambda tmp: open(os.path.join(tmp, "ok"), "w").close())
    assert os.listdir(target) == ["ok"]
    assert not run_stage(target, "demo", fail)  # finished: skipped, not rebuilt
    # a stage built with settings is skipped for the same ones, and refused for others
    built = str(tmp_path / "built")
    assert run_stage(built, "demo", lambda tmp: None, settings={"--size": 150, "--sample": 0})
    assert not run_stage(built, "demo", fail, settings={"--size": 150, "--sample": 0})
    with pytest.raises(ValueError, match=r"built was built with --size 150 \(asked for now: 200\): "
                                         "use another --workdir"):
        run_stage(built, "demo", fail, settings={"--size": 200, "--sample": 0})
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass


def test_verify_accepts_complete_archives_and_rejects_truncated_ones(tmp_path):
    spec = RECIPES["iwslt14_de_en"].archives[0]
    path = make_iwslt14(str(tmp_path), train=50)
    digest = arc.verify(path, spec)
    assert digest == arc.sha256sum(path)
    zpath = make_wikitext103(str(tmp_path))
    arc.verify(zpath, RECIPES["wikitext103"].archives[0])
    for p in (path, zpath):
        truncate(p)
        with pytest.raises(arc.ArchiveError, match="truncated or corrupt|CRC"):
            arc.list_members(p)


def test_a_damaged_byte_anywhere_in_the_compressed_data_is_reported(tmp_path):
    """A flipped byte may leave the tar headers readable and the members' data plausible:
    the gzip checksum at the end of the stream, or zlib's own check, must still catch it,
    as an ArchiveError with the remedy for where the file came from."""
    spec = RECIPES["iwslt14_de_en"].archives[0]
    path = make_iwslt14(str(tmp_path), train=50)
    data = open(path, "rb").read()
    causes = set()
    for i in range(len(data) // 5, len(data) - 10, len(data) // 150):
        damaged = bytearray(data)
        damaged[i] ^= 0x55
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(arc.ArchiveError, match="truncated or corrupt") as caught:
            arc.list_members(path)
        causes.add(type(caught.value.__cause__).__name__)
    assert {"error", "BadGzipFile"} <= causes  # zlib.error; the gzip checksum at the end
    with pytest.raises(arc.ArchiveError, match="replace it with a good copy from http"):
        arc.fetch(spec, str(tmp_path / "downloads"), archive_dir=str(tmp_path))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    os.replace(path, downloads / spec.filename)
    with pytest.raises(arc.ArchiveError, match="delete it, and the next run downloads it again"):
        arc.fetch(spec, str(downloads))


def test_every_missing_archive_is_named_at_once(tmp_path):
    specs = RECIPES["wmt14_en_de"].archives
    with pytest.raises(arc.ArchiveError) as caught:
        arc.fetch_all(specs, str(tmp_path / "downloads"), str(tmp_path), {})
    lines = str(caught.value).splitlines()
    assert len(lines) == len(specs) == 5
    for spec, line in zip(specs, lines):
        assert f"holds no {spec.filename}; download it from {spec.urls[0]}" in line


def test_a_failed_tool_is_an_error_line_not_a_traceback(tmp_path, capsys):
    from powernorm_plugin.recipes.__main__ import main

    (tmp_path / "data-bin").mkdir()
    (tmp_path / "checkpoints" / "pn").mkdir(parents=True)  # no epoch checkpoints in it
    assert main(["evaluate", "ptb", "--workdir", str(tmp_path), "--norm", "pn", "--gpus", "0"]) == 1
    err = capsys.readouterr().err
    assert "error: averaging checkpoints failed (exit status 1)" in err
    assert "Traceback" not in err


def test_compare_refuses_a_norm_named_twice_before_any_work(tmp_path, capsys):
    from powernorm_plugin.recipes.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["compare", "ptb", "--workdir", str(tmp_path), "--norms", "ln,bn,ln", "--gpus", "0"])
    assert exit_.value.code == 2
    assert "--norms names ln more than once" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_verify_rejects_wrong_checksum_and_missing_members(tmp_path):
    path = make_ptb(str(tmp_path))
    spec = RECIPES["ptb"].archives[0]
    with pytest.raises(arc.ArchiveError, match="SHA-256"):
        arc.verify(path, spec, expected_sha256="0" * 64)
    wrong = RECIPES["iwslt14_de_en"].archives[0]
    with pytest.raises(arc.ArchiveError, match="lacks de-en/train.tags.de-en.de"):
        arc.verify(path, arc.ArchiveSpec(wrong.filename, wrong.urls, wrong.members))
    with pytest.raises(ValueError, match="--sha256"):
        arc.parse_sha256_flags(["simple-examples.tgz=xyz"])


def test_failed_or_truncated_download_leaves_no_file(tmp_path):
    source = tmp_path / "server"
    source.mkdir()
    good = make_ptb(str(source))
    spec = RECIPES["ptb"].archives[0]
    downloads = tmp_path / "downloads"
    missing = arc.ArchiveSpec(spec.filename, ((source / "nothing.tgz").as_uri(),), spec.members)
    with pytest.raises(arc.ArchiveError, match="could not download simple-examples.tgz"):
        arc.fetch(missing, str(downloads))
    assert os.listdir(downloads) == []
    truncate(good)
    served = arc.ArchiveSpec(spec.filename, (source.joinpath(spec.filename).as_uri(),), spec.members)
    with pytest.raises(arc.ArchiveError, match="truncated or corrupt"):
        arc.fetch(served, str(downloads))
    assert os.listdir(downloads) == []


def test_prepare_with_a_truncated_archive_fails_with_no_output(tmp_path):
    from powernorm_plugin.recipes.prepare import prepare

    archives = tmp_path / "archives"
    archives.mkdir()
    truncate(make_ptb(str(archives)))
    work = tmp_path / "work"
    with pytest.raises(arc.ArchiveError, match="simple-examples.tgz is truncated or corrupt"):
        prepare("ptb", str(work), archive_dir=str(archives))
    assert sorted(os.listdir(work)) == []
    with pytest.raises(arc.ArchiveError, match="holds no wikitext-103-v1.zip"):
        prepare("wikitext103", str(work), archive_dir=str(archives))
    assert sorted(os.listdir(work)) == []


# --- training commands and result tables --------------------------------------------------

def _flag(argv, name):
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


def test_train_command_carries_the_authors_settings_and_scales_the_batch(tmp_path):
    from powernorm_plugin.recipes.run import train_command

    (tmp_path / "data-bin").mkdir()
    work = str(tmp_path)
    argv = train_command("iwslt14_de_en", work, "pn", gpus=1)
    for name, value in (("--arch", "powernorm_transformer_iwslt_de_en"), ("--lr", "0.0015"),
                        ("--warmup-updates", "8000"), ("--warmup-init-lr", "1e-07"),
                        ("--dropout", "0.3"), ("--weight-decay", "0.0001"), ("--max-tokens", "4096"),
                        ("--update-freq", "1"), ("--optimizer", "adam"), ("--label-smoothing", "0.1"),
                        ("--encoder-norm-self", "power"), ("--encoder-norm-ff", "power"),
                        ("--decoder-norm-self", "layer"), ("--adam-betas", "(0.9, 0.98)")):
        assert _flag(argv, name) == value, name
    assert "--share-all-embeddings" in argv and "--cpu" not in argv
    assert argv[-2:] == ["--log-interval", "50"]
    # WMT14: the authors' 32 x 4096 tokens per update from 8 GPUs, or from 1 GPU with 2048 tokens
    assert _flag(train_command("wmt14_en_de", work, "ln", gpus=8), "--update-freq") == "4"
    wmt = train_command("wmt14_en_de", work, "bn", gpus=1, max_tokens=2048, extra=["--max-update", "5"])
    assert _flag(wmt, "--update-freq") == "64" and _flag(wmt, "--encoder-norm-self") == "batch"
    assert wmt[-2:] == ["--max-update", "5"] and _flag(wmt, "--lr") == "0.003"
    nap = train_command("iwslt14_de_en", work, "pnv", nap=True, gpus=0)
    assert _flag(nap, "--optimizer") == "nap_adam" and _flag(nap, "--ffn-activation-norm") == "layer"
    assert _flag(nap, "--encoder-norm-self") == "power_vanilla" and "--cpu" in nap
    lm = train_command("wikitext103", work, "bn", gpus=0, nap=True)
    assert _flag(lm, "--decoder-norm-self") == "batch" and "--allow-noncausal-decoder-norm" in lm
    assert _flag(lm, "--optimizer") == "nap_nag" and _flag(lm, "--update-freq") == "24"
    assert "--allow-noncausal-decoder-norm" not in train_command("ptb", work, "pn", gpus=0)
    # one GPU means one worker, whatever the machine has (fairseq's default: every GPU)
    assert _flag(argv, "--distributed-world-size") == "1" and "--ddp-backend" not in argv
    assert "--distributed-world-size" not in nap
    with pytest.raises(ValueError, match="--norm"):
        train_command("ptb", work, "rms", gpus=0)
    with pytest.raises(FileNotFoundError, match="prepare"):
        train_command("ptb", str(tmp_path / "elsewhere"), "pn", gpus=0)


def test_a_batch_other_than_the_authors_is_a_warning(tmp_path, caplog):
    from powernorm_plugin.recipes.run import train_command

    (tmp_path / "data-bin").mkdir()
    with caplog.at_level(logging.INFO, logger="powernorm_plugin.recipes.run"):
        train_command("iwslt14_de_en", str(tmp_path), "ln", gpus=1)
        train_command("wmt14_en_de", str(tmp_path), "ln", gpus=8, max_tokens=2048)
        train_command("iwslt14_de_en", str(tmp_path), "ln", gpus=2)
        train_command("wmt14_en_de", str(tmp_path), "ln", gpus=8, update_freq=1)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in levels] == [logging.INFO] * 2 + [logging.WARNING] * 2
    assert "8192 tokens per update (2 worker(s) x 4096 tokens x update-freq 1); authors: 4096" in (
        levels[2][1]) and "not the authors' batch" in levels[2][1]
    assert "32768 tokens per update" in levels[3][1]


def test_a_finished_training_is_not_run_again(tmp_path, monkeypatch, caplog):
    # fairseq keeps no early-stopping count in its checkpoints: resuming a finished training
    # would train --patience more epochs and change the checkpoints that get averaged
    from powernorm_plugin.recipes import fairseq_run
    from powernorm_plugin.recipes.run import TRAINING_DONE, train

    (tmp_path / "data-bin").mkdir()
    runs = []

    def fake_train(argv, log_path=None):
        runs.append(list(argv))
        if "--fail" in argv:
            raise RuntimeError("interrupted")

    monkeypatch.setattr(fairseq_run, "train", fake_train)
    done = tmp_path / "checkpoints" / "pn" / TRAINING_DONE
    with pytest.raises(RuntimeError, match="interrupted"):
        train("ptb", str(tmp_path), "pn", gpus=0, extra=["--fail"])
    assert not done.exists()  # an interrupted training resumes on the next run
    argv = train("ptb", str(tmp_path), "pn", gpus=0)
    assert len(runs) == 2 and json.loads(done.read_text())["argv"] == argv
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="powernorm_plugin.recipes.run"):
        # the same work folder named another way is the same training
        train("ptb", os.path.join(str(tmp_path), ".", ""), "pn", gpus=0)
        train("ptb", str(tmp_path), "pn", gpus=0, extra=["--max-epoch", "99"])
    assert len(runs) == 2
    skipped = [r for r in caplog.records if "finished already" in r.getMessage()]
    assert [r.levelno for r in skipped] == [logging.INFO, logging.WARNING]
    assert "other arguments than these, which are not applied" in skipped[1].getMessage()
    assert not [r for r in caplog.records if "tokens per update" in r.getMessage()]
    done.unlink()  # to train on
    train("ptb", str(tmp_path), "pn", gpus=0, extra=["--max-epoch", "99"])
    assert len(runs) == 3


def test_an_interrupted_training_resumes_only_with_the_arguments_it_started_with(tmp_path,
                                                                                  monkeypatch):
    from powernorm_plugin.recipes import fairseq_run
    from powernorm_plugin.recipes.run import TRAINING_DONE, TRAINING_STARTED, train

    (tmp_path / "data-bin").mkdir()
    save_dir = tmp_path / "checkpoints" / "pn"
    runs = []

    def fake_train(argv, log_path=None):
        runs.append(list(argv))
        (save_dir / "checkpoint_last.pt").write_bytes(b"")
        if len(runs) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(fairseq_run, "train", fake_train)
    with pytest.raises(KeyboardInterrupt):
        train("ptb", str(tmp_path), "pn", gpus=0, max_tokens=256)
    with pytest.raises(ValueError, match=r"interrupted training started with other arguments "
                                         r"\(was: --max-tokens 256; now: --max-tokens 128 \| "
                                         r"was: --update-freq \d+; now: --update-freq 3\)"):
        train("ptb", str(tmp_path), "pn", gpus=0, max_tokens=128, update_freq=3)
    assert len(runs) == 1
    argv = train("ptb", str(tmp_path), "pn", gpus=0, max_tokens=256)  # as it started
    assert runs[1] == argv and (save_dir / TRAINING_DONE).exists()
    assert not (save_dir / TRAINING_STARTED).exists()
    (save_dir / TRAINING_DONE).unlink()  # to train on, with other arguments
    train("ptb", str(tmp_path), "pn", gpus=0, max_tokens=256, extra=["--max-epoch", "99"])
    assert len(runs) == 3


def _record(recipe, norm, nap, value):
    if recipe in ("ptb", "wikitext103"):
        return {"recipe": recipe, "norm": norm, "nap": nap, "metric": "ppl", "ppl": value, "loss_base2": 5.0}
    return {"recipe": recipe, "norm": norm, "nap": nap, "metric": "bleu", "bleu": value,
            "sacrebleu": value - 1, "sacrebleu_signature": "nrefs:1|case:mixed|tok:13a"}


def test_comparison_table_puts_ours_next_to_the_paper(tmp_path):
    records = [_record("iwslt14_de_en", "pn", False, 35.1), _record("iwslt14_de_en", "ln", False, 34.2),
               _record("wmt14_en_de", "ln", False, 27.0), _record("iwslt14_de_en", "pn", True, 35.4)]
    paths = []
    for i, r in enumerate(records):
        res.write_result(r, str(tmp_path / f"{i}.json"), str(tmp_path / f"{i}.md"))
        paths.append(str(tmp_path / f"{i}.json"))
    md = (tmp_path / "0.md").read_text()
    assert "| IWSLT14 de-en | Pre-norm PN | 35.10 | 34.10 (nrefs:1\\|case:mixed\\|tok:13a) | 35.9 |" in md
    table = res.comparison_table([res.read_result(p) for p in paths]).splitlines()
    assert table[0] == ("| model | IWSLT14 de-en BLEU | IWSLT14 de-en sacreBLEU | IWSLT14 de-en paper | "
                        "WMT14 en-de BLEU | WMT14 en-de sacreBLEU | WMT14 en-de paper |")
    assert table[2] == "| Pre-norm LN | 34.20 | 33.20 | 35.5 | 27.00 | 26.00 | 29.5 |"
    assert table[3] == "| Pre-norm PN | 35.10 | 34.10 | 35.9 | - | - | 30.1 |"
    assert table[4] == "| Pre-norm PN + NaP | 35.40 | 34.40 | - | - | - | - |"
    lm = res.comparison_table([_record("ptb", "bn", False, 70.0)]).splitlines()
    assert lm[0] == "| model | PTB PPL | PTB paper |" and lm[2] == "| Pre-norm BN | 70.00 | 60.7 |"
    with pytest.raises(ValueError, match="BLEU and perplexity"):
        res.comparison_table([_record("ptb", "bn", False, 70.0), records[0]])


# --- every recipe end to end on fake archives, offline ---------------------------------------

TINY_TRANSLATION = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
                    "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32",
                    "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2", "--max-epoch", "2", "--warmup-updates", "4",
                    "--num-workers", "0"]
TINY_LM = ["--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
           "--decoder-attention-heads", "2", "--tokens-per-sample", "32", "--max-epoch", "2",
           "--warmup-updates", "4", "--num-workers", "0"]
TINY_LM_EVAL = "--tokens-per-sample 32 --context-window 16 --max-tokens 512"


def run_script(recipe, script, *args, cwd):
    # one thread: these models are tiny, and threads stall when other work shares the cores
    env = dict(os.environ, PYTHON=sys.executable, POWERNORM_BACKEND="eager", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "recipes", recipe, script + ".sh"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{recipe}/{script}.sh {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def prepared(recipe, make, tmp_path, *flags):
    archives = tmp_path / "archives"
    archives.mkdir()
    make(str(archives))
    work = tmp_path / "work"
    out = run_script(recipe, "prepare", "--workdir", str(work), "--archives", str(archives),
                     "--workers", "1", *flags, cwd=tmp_path)
    manifest = json.loads((work / "data-bin" / "manifest.json").read_text())
    for spec in RECIPES[recipe].archives:
        assert manifest["archives"][spec.filename]["sha256"] == arc.sha256sum(str(archives / spec.filename))
    assert not [p for p in os.listdir(work) if p.endswith(".tmp")]
    return work, archives, out


def check_bleu_result(work, variant, recipe, sentences):
    record = json.loads((work / "results" / f"{variant}.json").read_text())
    assert record["recipe"] == recipe and record["variant"] == variant and record["metric"] == "bleu"
    assert 0.0 <= record["bleu"] <= 100.0 and 0.0 <= record["sacrebleu"] <= 100.0
    assert record["sacrebleu_signature"].startswith("nrefs:1|") and record["sentences"] == sentences
    assert (work / "results" / f"{variant}.md").read_text().count("\n") == 3
    return record


@pytest.mark.slow
def test_iwslt14_recipe_prepares_trains_and_evaluates_offline(tmp_path):
    work, archives, _ = prepared("iwslt14_de_en", make_iwslt14, tmp_path, "--bpe-size", "150")
    # canonical split: every 23rd cleaned training pair is validation; 5 test sets x 6 segments
    n_valid = len(text.read_lines(str(work / "tok" / "valid.en")))
    n_train = len(text.read_lines(str(work / "tok" / "train.en")))
    assert n_valid == (n_train + n_valid) // 23 and n_valid > 0
    assert text.read_lines(str(work / "tok" / "test.de"))[0] == text.moses_tokenize(
        [parallel(100, 6)[0][0]], "de", lowercase=True)[0]
    assert len(text.read_lines(str(work / "data-bin" / "test.raw.en"))) == 30
    # a re-run skips every finished stage and touches nothing
    before = {p: os.path.getmtime(work / p) for p in ("raw", "tok", "bpe", "data-bin")}
    from powernorm_plugin.recipes.prepare import prepare

    prepare("iwslt14_de_en", str(work), archive_dir=str(archives), bpe_size=150)
    assert before == {p: os.path.getmtime(work / p) for p in before}
    # ... and refuses to skip stages that were built from other archives or settings
    with pytest.raises(ValueError, match=r"bpe was built with --bpe-size 150 \(asked for now: 200\)"):
        prepare("iwslt14_de_en", str(work), archive_dir=str(archives), bpe_size=200)
    with pytest.raises(arc.ArchiveError, match="--sha256 de-en.tgz=0{64}, but .* was extracted "
                                               "from a de-en.tgz with SHA-256 [0-9a-f]{64}"):
        prepare("iwslt14_de_en", str(work), sha256={"de-en.tgz": "0" * 64}, bpe_size=150)
    other = tmp_path / "other"
    other.mkdir()
    make_iwslt14(str(other), train=20)
    with pytest.raises(arc.ArchiveError, match="is not the de-en.tgz that .* was extracted from"):
        prepare("iwslt14_de_en", str(work), archive_dir=str(other), bpe_size=150)
    assert before == {p: os.path.getmtime(work / p) for p in before}

    run_script("iwslt14_de_en", "train", "--workdir", str(work), "--norm", "pn", "--gpus", "0",
               "--max-tokens", "1024", "--", *TINY_TRANSLATION, cwd=tmp_path)
    assert (work / "checkpoints" / "pn" / "checkpoint2.pt").exists()
    assert "valid on 'valid' subset" in (work / "checkpoints" / "pn" / "train.log").read_text()
    # a re-run does not resume the finished training
    last = work / "checkpoints" / "pn" / "checkpoint_last.pt"
    before = (last.read_bytes(), (work / "checkpoints" / "pn" / "train.log").read_text())
    out = run_script("iwslt14_de_en", "train", "--workdir", str(work), "--norm", "pn", "--gpus", "0",
                     "--max-tokens", "1024", "--", *TINY_TRANSLATION, cwd=tmp_path)
    assert "its training finished already" in out and "+ fairseq-train" not in out
    assert before == (last.read_bytes(), (work / "checkpoints" / "pn" / "train.log").read_text())
    out = run_script("iwslt14_de_en", "evaluate", "--workdir", str(work), "--norm", "pn", "--gpus", "0",
                     "--num-checkpoints", "2", cwd=tmp_path)
    assert "| IWSLT14 de-en | Pre-norm PN |" in out
    record = check_bleu_result(work, "pn", "iwslt14_de_en", 30)
    assert "case:lc" in record["sacrebleu_signature"]


@pytest.mark.slow
def test_wmt14_recipe_prepares_and_compares_offline(tmp_path):
    work, _, _ = prepared("wmt14_en_de", make_wmt14, tmp_path, "--bpe-size", "150")
    assert len(text.read_lines(str(work / "tok" / "train.en"))) <= 360
    assert len(text.read_lines(str(work / "tok" / "valid.de"))) == 8  # newstest2013
    assert "@-@" in (work / "tok" / "train.de").read_text()  # aggressive hyphen splitting
    out = run_script("wmt14_en_de", "compare", "--workdir", str(work), "--norms", "pn", "--gpus", "0",
                     "--max-tokens", "1024", "--num-checkpoints", "2", "--", *TINY_TRANSLATION,
                     cwd=tmp_path)
    record = check_bleu_result(work, "pn", "wmt14_en_de", 8)
    assert record["bleu_kind"].startswith("compound-split")
    assert "| model | WMT14 en-de BLEU | WMT14 en-de sacreBLEU | WMT14 en-de paper |" in out
    assert f"| Pre-norm PN | {record['bleu']:.2f} | {record['sacrebleu']:.2f} | 30.1 |" in out


@pytest.mark.slow
def test_ptb_recipe_prepares_and_compares_two_norms_offline(tmp_path):
    work, _, _ = prepared("ptb", make_ptb, tmp_path)
    assert (work / "raw" / "test.txt").read_text().startswith(" ")
    out = run_script("ptb", "compare", "--workdir", str(work), "--norms", "ln,bn", "--gpus", "0",
                     "--max-tokens", "256", "--num-checkpoints", "2", "--eval-args", TINY_LM_EVAL,
                     "--", *TINY_LM, cwd=tmp_path)
    for norm in ("ln", "bn"):
        record = json.loads((work / "results" / f"{norm}.json").read_text())
        assert record["metric"] == "ppl" and 1.0 < record["ppl"] < 1e4
        assert record["ppl"] == pytest.approx(2 ** record["loss_base2"], rel=1e-6)
        assert f"| Pre-norm {res.NORMS[norm][0]} | {record['ppl']:.2f} | {res.PAPER['ptb'][norm]} |" in out


@pytest.mark.slow
def test_wikitext103_recipe_prepares_and_runs_nap_offline(tmp_path):
    work, _, _ = prepared("wikitext103", make_wikitext103, tmp_path)
    assert " = Title = " in (work / "raw" / "train.txt").read_text()
    out = run_script("wikitext103", "compare", "--workdir", str(work), "--norms", "pn", "--nap",
                     "--gpus", "0", "--max-tokens", "256", "--num-checkpoints", "2",
                     "--eval-args", TINY_LM_EVAL, "--",
                     *TINY_LM, "--adaptive-input-cutoff", "20,40", "--adaptive-softmax-cutoff", "20,40",
                     "--decoder-input-dim", "16", "--decoder-output-dim", "16", cwd=tmp_path)
    record = json.loads((work / "results" / "pn-nap.json").read_text())
    assert record["nap"] is True and 1.0 < record["ppl"] < 1e4
    assert "| Pre-norm PN + NaP |" in out
    assert "--optimizer nap_nag" in out and "--ffn-activation-norm layer" in out
