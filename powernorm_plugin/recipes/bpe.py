"""Joint subword vocabulary with sentencepiece in BPE mode.

The model is learned on the tokenized training text of both languages together (one joint
vocabulary, as the papers' shared embeddings need), with the identity normalization, so
that decoding the pieces (fairseq's ``--post-process sentencepiece``) gives back exactly
the tokenized text, and full character coverage, so that no character of the training
text maps to ``<unk>``.
"""
import os
from typing import List, Sequence


def _spm():
    try:
        import sentencepiece
    except ImportError as exc:
        raise ImportError(
            "subword segmentation needs sentencepiece: pip install 'powernorm-fairseq[fairseq]'"
        ) from exc
    return sentencepiece


def learn(
    inputs: Sequence[str],
    model_prefix: str,
    vocab_size: int,
    threads: int = 1,
    max_sentences: int = 0,
    seed_sentencepiece_size: int = 1000000,
) -> str:
    """Learn a BPE model with ``vocab_size`` pieces (at most: ``vocab_size`` is a soft
    limit, so small corpora get as many as they support) from the text files ``inputs``.
    ``max_sentences`` > 0 trains on that many randomly sampled lines. Returns the path of
    the ``.model`` file."""
    if vocab_size < 8:
        raise ValueError(f"--bpe-size must be at least 8, got {vocab_size}")
    _spm().SentencePieceTrainer.train(
        input=list(inputs),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        hard_vocab_limit=False,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=max(1, threads),
        minloglevel=2,
    )
    return model_prefix + ".model"


def encode(model: str, lines: Sequence[str], threads: int = 1) -> List[str]:
    """Segment each line into pieces, joined by spaces."""
    sp = _spm().SentencePieceProcessor(model_file=model)
    out = []
    step = 100000
    for i in range(0, len(lines), step):
        pieces = sp.encode(list(lines[i : i + step]), out_type=str, num_threads=max(1, threads))
        out.extend(" ".join(p) for p in pieces)
    return out


def decode_pieces(line: str) -> str:
    """Join pieces back into words: what fairseq's ``--post-process sentencepiece`` does."""
    return line.replace(" ", "").replace("\u2581", " ").strip()


def model_path(folder: str) -> str:
    return os.path.join(folder, "spm.model")
