"""Data preparation of the recipes, in stages that a re-run skips once finished.

Folders under the recipe's work directory (each built as ``X.tmp`` and renamed when done):

``raw/``       sentences extracted from the verified archives, untokenized, plus
               ``manifest.json`` (archives used, their sizes and SHA-256)
``tok/``       (translation) Moses-tokenized train/valid/test; train cleaned by length
``bpe/``       (translation) joint sentencepiece BPE model ``spm.model`` and segmented text
``data-bin/``  fairseq-preprocess output, with the manifest (and, for translation,
               ``spm.model`` and the raw test sides ``test.raw.<lang>`` for sacreBLEU)

Translation:

* IWSLT14 de-en (the canonical IWSLT14 preparation): Moses tokenization, lowercasing,
  train pairs kept with 1-175 tokens per side and length ratio <= 1.5, every 23rd
  training pair held out for validation; test = dev2010 + dev2012 + tst2010-2012;
  joint BPE vocabulary of 10000.
* WMT14 en-de: Europarl v7 + CommonCrawl + News Commentary v9 for training (Moses
  punctuation normalization, non-printing characters removed, aggressive hyphen
  splitting; pairs kept with 1-250 tokens and ratio <= 1.5), newstest2013 for validation,
  newstest2014 (full, 3003 sentences) for test; joint BPE vocabulary of 32000.
"""
import codecs
import logging
import os
import shutil
import tempfile
from typing import Dict, Mapping, Optional, Sequence

from . import archives as arc
from . import bpe, text
from .definitions import IWSLT14_TEST_SETS, Recipe, get_recipe
from .stages import read_json, run_stage, write_json

logger = logging.getLogger(__name__)


def _write_manifest(folder: str, recipe: str, fetched: Mapping) -> None:
    manifest = {"recipe": recipe, "archives": {
        name: {"sha256": info["sha256"], "bytes": info["bytes"]} for name, info in fetched.items()
    }}
    write_json(os.path.join(folder, "manifest.json"), manifest)


def _extract_to(tmp: str, path: str, members: Sequence[str]) -> Dict[str, str]:
    """Extract ``members`` of archive ``path`` to files under ``tmp``; returns member -> file."""
    out = {}
    for i, member in enumerate(members):
        out[member] = os.path.join(tmp, f"{i:02d}_" + os.path.basename(member))
    arc.extract(path, out)
    return out


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text: {exc}") from exc


def _check_utf8(path: str, what: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{what} is not UTF-8 text (byte {offset + exc.start})") from exc
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text (it ends inside a character)") from exc


def _raw_iwslt14(folder: str, fetched: Mapping) -> None:
    src, tgt = "de", "en"
    path = fetched["de-en.tgz"]["path"]
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        members = get_recipe("iwslt14_de_en").archives[0].members
        files = _extract_to(scratch, path, members)
        train = {}
        for lang in (src, tgt):
            member = f"de-en/train.tags.de-en.{lang}"
            # split on "\n" only: str.splitlines() would also split at U+2028 and friends,
            # which can occur inside a sentence on one side and misalign the pair
            lines = _read_text(files[member], member).split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            train[lang] = list(text.iwslt_tags_sentences(lines))
        text.check_parallel(train[src], train[tgt], "de-en.tgz: train.tags.de-en.{de,en}")
        test = {src: [], tgt: []}
        for name in IWSLT14_TEST_SETS:
            segs = {}
            for lang in (src, tgt):
                member = f"de-en/{name}.de-en.{lang}.xml"
                # fairseq's prepare-iwslt14.sh writes the test sets' right single quotes as
                # apostrophes (its training text keeps them): the references BLEU is taken on
                segs[lang] = [s.replace("\u2019", "'") for s in
                              text.seg_sentences(_read_text(files[member], member))]
            text.check_parallel(segs[src], segs[tgt], f"de-en.tgz: {name}.de-en.{{de,en}}.xml")
            for lang in (src, tgt):
                test[lang] += segs[lang]
    for lang in (src, tgt):
        text.write_lines(os.path.join(folder, f"train.{lang}"), train[lang])
        text.write_lines(os.path.join(folder, f"test.{lang}"), test[lang])
    logger.info("IWSLT14: %d training and %d test pairs extracted", len(train[src]), len(test[src]))


def _raw_wmt14(folder: str, fetched: Mapping) -> None:
    src, tgt = "en", "de"
    recipe = get_recipe("wmt14_en_de")
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        files = {}
        for spec in recipe.archives:
            files.update(_extract_to(scratch, fetched[spec.filename]["path"], spec.members))
        n_train = 0
        with open(os.path.join(folder, f"train.{src}"), "w", encoding="utf-8") as fs, \
                open(os.path.join(folder, f"train.{tgt}"), "w", encoding="utf-8") as ft:
            for corpus in ("training/europarl-v7.de-en", "commoncrawl.de-en",
                           "training/news-commentary-v9.de-en"):
                s = _read_text(files[f"{corpus}.{src}"], f"{corpus}.{src}").split("\n")
                t = _read_text(files[f"{corpus}.{tgt}"], f"{corpus}.{tgt}").split("\n")
                if s and s[-1] == "" and t and t[-1] == "":
                    s, t = s[:-1], t[:-1]
                text.check_parallel(s, t, f"{corpus}.{{{src},{tgt}}}")
                for a, b in zip(s, t):
                    fs.write(a.rstrip("\r").replace("\n", " ") + "\n")
                    ft.write(b.rstrip("\r").replace("\n", " ") + "\n")
                n_train += len(s)
        for split, (s_member, t_member) in {
            "valid": ("dev/newstest2013-src.en.sgm", "dev/newstest2013-ref.de.sgm"),
            "test": ("test-full/newstest2014-deen-src.en.sgm", "test-full/newstest2014-deen-ref.de.sgm"),
        }.items():
            s = text.seg_sentences(_read_text(files[s_member], s_member))
            t = text.seg_sentences(_read_text(files[t_member], t_member))
            text.check_parallel(s, t, f"{s_member} / {t_member}")
            text.write_lines(os.path.join(folder, f"{split}.{src}"), s)
            text.write_lines(os.path.join(folder, f"{split}.{tgt}"), t)
    logger.info("WMT14: %d training pairs extracted", n_train)


def _tokenize_translation(recipe: Recipe, raw: str, folder: str, workers: int,
                          valid_every: int, max_len: int) -> None:
    src, tgt = recipe.source, recipe.target
    wmt = recipe.name == "wmt14_en_de"

    def tok(lines, lang):
        return text.moses_tokenize(lines, lang, aggressive=wmt, lowercase=recipe.lowercase,
                                   normalize_punctuation=wmt, workers=workers)

    train_s = tok(text.read_lines(os.path.join(raw, f"train.{src}")), src)
    train_t = tok(text.read_lines(os.path.join(raw, f"train.{tgt}")), tgt)
    pairs = list(text.clean_pairs(zip(train_s, train_t), 1, max_len, 1.5))
    logger.info("cleaning kept %d of %d training pairs", len(pairs), len(train_s))
    if not pairs:
        raise ValueError("no training pair survived the length filter")
    splits = {}
    if os.path.exists(os.path.join(raw, f"valid.{src}")):
        splits["train"] = pairs
        splits["valid"] = list(zip(tok(text.read_lines(os.path.join(raw, f"valid.{src}")), src),
                                   tok(text.read_lines(os.path.join(raw, f"valid.{tgt}")), tgt)))
    else:
        splits["valid"], splits["train"] = text.split_every(pairs, valid_every)
    splits["test"] = list(zip(tok(text.read_lines(os.path.join(raw, f"test.{src}")), src),
                              tok(text.read_lines(os.path.join(raw, f"test.{tgt}")), tgt)))
    for split, split_pairs in splits.items():
        if not split_pairs:
            raise ValueError(f"the {split} set is empty")
        text.write_lines(os.path.join(folder, f"{split}.{src}"), (p[0] for p in split_pairs))
        text.write_lines(os.path.join(folder, f"{split}.{tgt}"), (p[1] for p in split_pairs))
        logger.info("%s: %d pairs", split, len(split_pairs))


def _bpe_translation(recipe: Recipe, tok: str, folder: str, bpe_size: int, workers: int,
                     bpe_sample: int) -> None:
    src, tgt = recipe.source, recipe.target
    model = bpe.learn([os.path.join(tok, f"train.{src}"), os.path.join(tok, f"train.{tgt}")],
                      os.path.join(folder, "spm"), bpe_size, threads=workers, max_sentences=bpe_sample)
    for split in ("train", "valid", "test"):
        for lang in (src, tgt):
            lines = text.read_lines(os.path.join(tok, f"{split}.{lang}"))
            text.write_lines(os.path.join(folder, f"{split}.{lang}"), bpe.encode(model, lines, workers))


def _binarize_translation(recipe: Recipe, workdir: str, folder: str, workers: int) -> None:
    from . import fairseq_run

    src, tgt = recipe.source, recipe.target
    pieces = os.path.join(workdir, "bpe")
    fairseq_run.preprocess([
        "--source-lang", src, "--target-lang", tgt,
        "--trainpref", os.path.join(pieces, "train"),
        "--validpref", os.path.join(pieces, "valid"),
        "--testpref", os.path.join(pieces, "test"),
        "--destdir", folder, "--joined-dictionary", "--workers", str(workers),
    ])
    shutil.copy(os.path.join(pieces, "spm.model"), os.path.join(folder, "spm.model"))
    for lang in (src, tgt):
        shutil.copy(os.path.join(workdir, "raw", f"test.{lang}"), os.path.join(folder, f"test.raw.{lang}"))
    shutil.copy(os.path.join(workdir, "raw", "manifest.json"), os.path.join(folder, "manifest.json"))


def _raw_lm(recipe: Recipe, folder: str, fetched: Mapping) -> None:
    spec = recipe.archives[0]
    # ptb.train.txt -> "train", wiki.train.tokens -> "train"
    targets = {m: os.path.join(folder, os.path.basename(m).split(".")[1] + ".txt") for m in spec.members}
    arc.extract(fetched[spec.filename]["path"], targets)
    for member, path in targets.items():
        _check_utf8(path, member)  # fail here, not in the middle of binarizing


def _binarize_lm(workdir: str, folder: str, workers: int) -> None:
    from . import fairseq_run

    raw = os.path.join(workdir, "raw")
    fairseq_run.preprocess([
        "--only-source",
        "--trainpref", os.path.join(raw, "train.txt"),
        "--validpref", os.path.join(raw, "valid.txt"),
        "--testpref", os.path.join(raw, "test.txt"),
        "--destdir", folder, "--workers", str(workers),
    ])
    shutil.copy(os.path.join(raw, "manifest.json"), os.path.join(folder, "manifest.json"))


def _check_archives(raw: str, recipe: Recipe, archive_dir: Optional[str],
                    sha256: Mapping[str, str]) -> None:
    """On a re-run: the archives that ``--sha256`` and ``--archives`` name must be the ones
    the finished ``raw/`` stage was extracted from (by the SHA-256 and the sizes that its
    manifest records)."""
    used = read_json(os.path.join(raw, "manifest.json"))["archives"]
    remedy = f"use another --workdir, or delete {raw} and the stages after it"
    arc.check_sha256_names(recipe.archives, sha256)
    for filename, digest in sha256.items():
        recorded = used[filename]["sha256"]
        if recorded != digest:
            raise arc.ArchiveError(f"--sha256 {filename}={digest}, but {raw} was extracted from "
                                   f"a {filename} with SHA-256 {recorded}: {remedy}")
    for spec in recipe.archives if archive_dir is not None else ():
        path = os.path.join(archive_dir, spec.filename)
        recorded = used.get(spec.filename, {}).get("bytes")
        if os.path.isfile(path) and os.path.getsize(path) != recorded:
            raise arc.ArchiveError(
                f"{path} ({os.path.getsize(path)} bytes) is not the {spec.filename} that {raw} "
                f"was extracted from ({recorded} bytes): {remedy}")


def prepare(
    name: str,
    workdir: str,
    archive_dir: Optional[str] = None,
    sha256: Optional[Mapping[str, str]] = None,
    workers: int = 1,
    bpe_size: Optional[int] = None,
    bpe_sample: Optional[int] = None,
    valid_every: int = 23,
) -> str:
    """Prepare recipe ``name``'s data under ``workdir``; returns the data-bin folder."""
    recipe = get_recipe(name)
    if bpe_sample is None:  # sentences the BPE model learns from (0: all)
        bpe_sample = 5_000_000 if recipe.name == "wmt14_en_de" else 0
    if archive_dir is not None and not os.path.isdir(archive_dir):
        raise FileNotFoundError(f"--archives {archive_dir} is not a folder")
    os.makedirs(workdir, exist_ok=True)
    raw = os.path.join(workdir, "raw")

    def build_raw(tmp):
        fetched = arc.fetch_all(recipe.archives, os.path.join(workdir, "downloads"),
                                archive_dir, sha256 or {})
        if recipe.name == "iwslt14_de_en":
            _raw_iwslt14(tmp, fetched)
        elif recipe.name == "wmt14_en_de":
            _raw_wmt14(tmp, fetched)
        else:
            _raw_lm(recipe, tmp, fetched)
        _write_manifest(tmp, recipe.name, fetched)

    if os.path.isdir(raw):
        _check_archives(raw, recipe, archive_dir, sha256 or {})
    run_stage(raw, "extract", build_raw)
    databin = os.path.join(workdir, "data-bin")
    if recipe.kind == "translation":
        max_len = 175 if recipe.name == "iwslt14_de_en" else 250
        tok = os.path.join(workdir, "tok")
        run_stage(tok, "tokenize", lambda tmp: _tokenize_translation(
            recipe, raw, tmp, workers, valid_every, max_len))
        run_stage(os.path.join(workdir, "bpe"), "bpe", lambda tmp: _bpe_translation(
            recipe, tok, tmp, bpe_size or recipe.bpe_size, workers, bpe_sample),
            settings={"--bpe-size": bpe_size or recipe.bpe_size, "--bpe-sample": bpe_sample})
        run_stage(databin, "binarize", lambda tmp: _binarize_translation(recipe, workdir, tmp, workers))
    else:
        run_stage(databin, "binarize", lambda tmp: _binarize_lm(workdir, tmp, workers))
    return databin
