"""Text extraction and cleaning for the translation corpora.

* IWSLT ``train.tags.*`` files: talk metadata lines (``<url>``, ``<talkid>``,
  ``<keywords>``, ``<speaker>``, ``<reviewer>``, ``<translator>``, ...) are dropped; the
  text inside ``<title>`` and ``<description>`` is kept as a sentence, as the canonical
  IWSLT14 preparation does; every other line is a sentence.
* IWSLT ``.xml`` and WMT ``.sgm`` files: the text of every ``<seg ...>...</seg>``, with
  XML character references decoded.
* Moses-compatible tokenization (sacremoses), lowercasing, and the length/ratio filter of
  Moses' corpus cleaning: a pair is dropped when either side has fewer than ``min_len``
  or more than ``max_len`` tokens, or when one side is more than ``ratio`` times longer.
"""
import html
import multiprocessing
import re
import unicodedata
from typing import Iterable, Iterator, List, Sequence, Tuple

_TAG_LINE = re.compile(r"^\s*<([A-Za-z][\w-]*)\b[^>]*>(.*)</\1>\s*$")
_LONE_TAG = re.compile(r"^\s*</?[A-Za-z][\w-]*\b[^>]*/?>\s*$")
_KEEP_TEXT_OF = {"title", "description"}
_SEG = re.compile(r"<seg\b[^>]*>(.*?)</seg>", re.IGNORECASE | re.DOTALL)


def iwslt_tags_sentences(lines: Iterable[str]) -> Iterator[str]:
    """Sentences of an IWSLT ``train.tags.<pair>.<lang>`` file (see the module doc)."""
    for line in lines:
        line = line.rstrip("\r\n")
        match = _TAG_LINE.match(line)
        if match is not None:
            if match.group(1).lower() in _KEEP_TEXT_OF:
                yield match.group(2).strip()
            continue
        if _LONE_TAG.match(line):
            continue
        yield line.strip()


def seg_sentences(text: str) -> List[str]:
    """The ``<seg>`` texts of an IWSLT ``.xml`` or WMT ``.sgm`` document, in order."""
    return [html.unescape(m.group(1)).strip() for m in _SEG.finditer(text)]


# --- Moses tokenization --------------------------------------------------------------

_WORKER = {}


def _init_worker(lang: str, aggressive: bool, lowercase: bool, normalize: bool) -> None:
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    _WORKER["tok"] = MosesTokenizer(lang=lang)
    _WORKER["norm"] = MosesPunctNormalizer(lang=lang) if normalize else None
    _WORKER["aggressive"] = aggressive
    _WORKER["lowercase"] = lowercase


def remove_non_printing(line: str) -> str:
    """Replace control and other non-printing characters (Unicode category C*) by spaces."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in line)


def _tokenize_one(line: str) -> str:
    if _WORKER["norm"] is not None:
        line = remove_non_printing(_WORKER["norm"].normalize(line))
    out = _WORKER["tok"].tokenize(
        line, aggressive_dash_splits=_WORKER["aggressive"], return_str=True, escape=True
    )
    out = " ".join(out.split())
    return out.lower() if _WORKER["lowercase"] else out


def moses_tokenize(
    lines: Sequence[str],
    lang: str,
    aggressive: bool = False,
    lowercase: bool = False,
    normalize_punctuation: bool = False,
    workers: int = 1,
) -> List[str]:
    """Tokenize ``lines`` like Moses' tokenizer.perl (``-a`` when ``aggressive``: split
    hyphens inside words into ``@-@``), escaping XML special characters as it does.
    ``normalize_punctuation`` first applies Moses' punctuation normalization and removes
    non-printing characters (the WMT preparation)."""
    try:
        import sacremoses  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "Moses tokenization needs sacremoses: pip install 'powernorm-fairseq[recipes]' "
            "(or pip install sacremoses)"
        ) from exc
    init = (lang, aggressive, lowercase, normalize_punctuation)
    if workers <= 1 or len(lines) < 2000:
        _init_worker(*init)
        return [_tokenize_one(line) for line in lines]
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, init) as pool:
        return pool.map(_tokenize_one, lines, chunksize=1000)


def moses_detokenize(lines: Sequence[str], lang: str) -> List[str]:
    """Undo Moses tokenization (XML escapes, ``@-@`` hyphens, spacing around punctuation)."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split(), unescape=True) for line in lines]


def clean_pairs(
    pairs: Iterable[Tuple[str, str]], min_len: int = 1, max_len: int = 175, ratio: float = 1.5
) -> Iterator[Tuple[str, str]]:
    """Keep the pairs whose token counts are within ``[min_len, max_len]`` on both sides
    and whose length ratio (longer / shorter) is at most ``ratio``."""
    for src, tgt in pairs:
        ns, nt = len(src.split()), len(tgt.split())
        if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
            continue
        if ns > ratio * nt or nt > ratio * ns:
            continue
        yield src, tgt


def split_every(items: Sequence, n: int) -> Tuple[List, List]:
    """Split ``items`` into (held-out, rest): every ``n``-th item (1-based: items n, 2n, ...)
    is held out, as IWSLT14's validation set is taken from its training data."""
    if n < 2:
        raise ValueError(f"every n-th line needs n >= 2, got {n}")
    held, rest = [], []
    for i, item in enumerate(items, start=1):
        (held if i % n == 0 else rest).append(item)
    return held, rest


def read_lines(path: str) -> List[str]:
    with open(path, encoding="utf-8", errors="strict", newline="\n") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f]


def write_lines(path: str, lines: Iterable[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            if "\n" in line:
                raise ValueError(f"{path}: a line to write contains a newline: {line!r}")
            f.write(line + "\n")
            n += 1
    return n


def check_parallel(src: Sequence[str], tgt: Sequence[str], what: str) -> None:
    if len(src) != len(tgt):
        raise ValueError(
            f"{what}: the two sides have {len(src)} and {len(tgt)} lines; a parallel corpus "
            "needs one line per sentence on each side"
        )


def nonempty_pairs(src: Sequence[str], tgt: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Drop pairs where either side is empty after stripping."""
    keep = [(s, t) for s, t in zip(src, tgt) if s.strip() and t.strip()]
    return [s for s, _ in keep], [t for _, t in keep]

