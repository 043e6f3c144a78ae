"""BLEU as the papers report it, next to detokenized sacreBLEU.

* Tokenized BLEU (IWSLT14): corpus BLEU-4 of fairseq-generate's hypotheses (``H-``) against
  its references (``T-``), both tokenized and with subwords removed, whitespace-split,
  without smoothing: the figure ``fairseq-generate --remove-bpe`` prints.
* Compound-split BLEU (WMT14): the hypothesis is detokenized, then hypothesis and raw
  reference are tokenized the same way (Moses, not aggressive) and every hyphen between
  two non-space characters ``a-b`` is rewritten ``a ##AT##-##AT## b`` (left to right,
  non-overlapping matches), then tokenized BLEU as above.
* sacreBLEU: detokenized hypotheses against the raw (untokenized) references with
  sacreBLEU's default ``13a`` tokenization, reported with its signature.
"""
import re
from typing import Dict, List, Sequence, Tuple

_LINE = re.compile(r"^([STHD])-(\d+)\t(.*)$")
_COMPOUND = re.compile(r"(\S)-(\S)")


def parse_generate(path: str) -> Tuple[List[str], List[str], List[str]]:
    """Sources, references and best hypotheses of a fairseq-generate output file, in the
    order of the test set (fairseq writes them in batch order, tagged with the line id)."""
    src: Dict[int, str] = {}
    ref: Dict[int, str] = {}
    hyp: Dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if m is None:
                continue
            kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "S":
                src[idx] = rest
            elif kind == "T":
                ref[idx] = rest
            elif kind == "H" and idx not in hyp:  # first H- line is the best beam
                hyp[idx] = rest.split("\t", 1)[1] if "\t" in rest else ""
    if not hyp:
        raise ValueError(f"{path} holds no hypotheses (H- lines): is it fairseq-generate output?")
    ids = sorted(hyp)
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: hypotheses for {len(ids)} sentences, but ids are not 0..{len(ids) - 1}")
    missing = [i for i in ids if i not in ref]
    if missing:
        raise ValueError(f"{path}: no reference (T- line) for sentence ids {missing[:5]}")
    return [src.get(i, "") for i in ids], [ref[i] for i in ids], [hyp[i] for i in ids]


def compound_split(line: str) -> str:
    """``a-b`` -> ``a ##AT##-##AT## b`` for every non-overlapping hyphen between non-spaces."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def tokenized_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 of whitespace-tokenized text, no smoothing (multi-bleu's figure)."""
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return float(bleu.corpus_score(list(hyps), [list(refs)]).score)


def sacrebleu_score(hyps: Sequence[str], refs: Sequence[str], lowercase: bool = False) -> Tuple[float, str]:
    """Detokenized corpus BLEU with sacreBLEU's defaults; returns (score, signature)."""
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    bleu = BLEU(lowercase=lowercase)
    score = bleu.corpus_score(list(hyps), [list(refs)])
    return float(score.score), str(bleu.get_signature())
