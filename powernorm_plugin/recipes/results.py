"""Result files of the recipes (one JSON and one markdown row per evaluated variant) and the
paper-style comparison tables built from them."""
import os
from typing import Dict, List, Mapping, Optional, Sequence

from .stages import atomic_file, read_json, write_json

#: Normalization variants: recipe name -> (label in the tables, norm kind of the plugin).
NORMS = {
    "ln": ("LN", "layer"),
    "bn": ("BN", "batch"),
    "pnv": ("PN-V", "power_vanilla"),
    "pn": ("PN", "power"),
}

#: Shen et al. (2020), Table 1 (BLEU) and Table 2 (test perplexity).
PAPER = {
    "iwslt14_de_en": {"ln": 35.5, "bn": 34.4, "pnv": 35.5, "pn": 35.9},
    "wmt14_en_de": {"ln": 29.5, "bn": 28.1, "pnv": 28.5, "pn": 30.1},
    "ptb": {"ln": 53.2, "bn": 60.7, "pnv": 55.3, "pn": 47.6},
    "wikitext103": {"ln": 20.9, "bn": 27.2, "pnv": 21.3, "pn": 17.9},
}

TITLES = {
    "iwslt14_de_en": "IWSLT14 de-en",
    "wmt14_en_de": "WMT14 en-de",
    "ptb": "PTB",
    "wikitext103": "WikiText-103",
    "quickstart": "quickstart (synthetic)",
}


def variant_name(norm: str, nap: bool) -> str:
    """Folder/file name of a variant: ``pn``, ``pn-nap``, ..."""
    if norm not in NORMS:
        raise ValueError(f"--norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm + ("-nap" if nap else "")


def variant_label(norm: str, nap: bool) -> str:
    return f"Pre-norm {NORMS[norm][0]}" + (" + NaP" if nap else "")


def _cell(value: str) -> str:
    """Text safe inside a markdown table cell (sacreBLEU signatures contain ``|``)."""
    return value.replace("|", "\\|")


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_row(record: Mapping) -> str:
    """One markdown table row for a result record (see :func:`markdown_header`)."""
    label = variant_label(record["norm"], record["nap"])
    paper = PAPER.get(record["recipe"], {}).get(record["norm"]) if not record["nap"] else None
    if record["metric"] == "bleu":
        main = _fmt(record["bleu"])
        extra = f"{_fmt(record['sacrebleu'])} ({_cell(record['sacrebleu_signature'])})"
    else:
        main = _fmt(record["ppl"])
        extra = _fmt(record["loss_base2"], 4)
    return f"| {TITLES.get(record['recipe'], record['recipe'])} | {label} | {main} | {extra} | {_fmt(paper, 1)} |"


def markdown_header(metric: str) -> str:
    if metric == "bleu":
        cols = ("| data | model | BLEU (the paper's: tokenized; compound-split for WMT14) | "
                "sacreBLEU (signature) | paper |")
    else:
        cols = "| data | model | test perplexity | test loss (base 2) | paper |"
    return cols + "\n|---|---|---|---|---|"


def write_result(record: Mapping, json_path: str, md_path: str) -> None:
    """Write ``record`` to ``json_path`` and its markdown table (header + row) to ``md_path``."""
    for path in (json_path, md_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(json_path, dict(record))
    with atomic_file(md_path) as f:
        f.write(markdown_header(record["metric"]) + "\n" + markdown_row(record) + "\n")


_REQUIRED = {"bleu": ("bleu", "sacrebleu", "sacrebleu_signature"), "ppl": ("ppl", "loss_base2")}


def read_result(path: str) -> Dict:
    record = read_json(path)
    for key in ("recipe", "norm", "nap", "metric"):
        if key not in record:
            raise ValueError(f"{path} is not a recipe result file: it has no {key!r}")
    missing = [k for k in _REQUIRED.get(record["metric"], ()) if k not in record]
    if record["metric"] not in _REQUIRED or missing:
        raise ValueError(f"{path}: metric {record['metric']!r} without {missing or 'a known metric'}")
    return record


def comparison_table(records: Sequence[Mapping]) -> str:
    """Table 1 (BLEU) / Table 2 (perplexity) of the paper, with our figures next to the
    paper's: one row per variant, for each data set an "ours" and a "paper" column
    (and sacreBLEU for translation)."""
    if not records:
        raise ValueError("no result files to compare")
    metrics = {r["metric"] for r in records}
    if len(metrics) != 1:
        raise ValueError("cannot put BLEU and perplexity results in one table")
    metric = metrics.pop()
    recipes: List[str] = []
    for r in records:
        if r["recipe"] not in recipes:
            recipes.append(r["recipe"])
    order = list(NORMS)
    variants = sorted({(r["norm"], bool(r["nap"])) for r in records}, key=lambda v: (v[1], order.index(v[0])))
    by_key = {}
    for r in records:
        key = (r["recipe"], r["norm"], bool(r["nap"]))
        if key in by_key:
            raise ValueError(f"two results for {TITLES.get(key[0], key[0])} {variant_label(*key[1:])}")
        by_key[key] = r
    header = ["model"]
    for rec in recipes:
        title = TITLES.get(rec, rec)
        if metric == "bleu":
            header += [f"{title} BLEU", f"{title} sacreBLEU", f"{title} paper"]
        else:
            header += [f"{title} PPL", f"{title} paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for norm, nap in variants:
        row = [variant_label(norm, nap)]
        for rec in recipes:
            r = by_key.get((rec, norm, nap))
            paper = None if nap else PAPER.get(rec, {}).get(norm)
            if metric == "bleu":
                row += [_fmt(r and r["bleu"]), _fmt(r and r["sacrebleu"]), _fmt(paper, 1)]
            else:
                row += [_fmt(r and r["ppl"]), _fmt(paper, 1)]
        lines.append("| " + " | ".join(row) + " |")
    if metric == "bleu":
        sigs = sorted({r["sacrebleu_signature"] for r in records})
        lines.append("")
        lines += [f"sacreBLEU signature: {s}" for s in sigs]
    return "\n".join(lines)
