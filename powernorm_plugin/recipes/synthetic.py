"""A small deterministic "translation" task for the quickstart: no download needed.

The source language has its own words and order; the target is a word-level mapping with
reordering, so a model must learn both a lexicon and a syntax, and BLEU measures it:

    source:  DET NOUN ADJ1 ADJ2  VERB  DET NOUN ADJ*  [PREP DET NOUN ADJ*]
    target:  det adj2 adj1 noun  [prep det adj* noun]  det adj* noun  verb

Adjectives move before their noun in reverse order, the prepositional phrase moves before
the object, and the verb goes last.

Plural subjects (source determiners marked plural) change the target verb's form (``-en``).
Words are pronounceable nonsense built from syllables, the same for every seed; the seed
only picks the sentences.
"""
import random
from typing import Dict, List, Tuple

_ONSETS = "b d f g k l m n p r s t v z".split()
_VOWELS = "a e i o u".split()
_SOURCE_ONSETS = "br dr fl gr kl pl pr st tr sk".split()
_SOURCE_VOWELS = "a ai au e ei i o oe u".split()


def _words(n: int, onsets, vowels, syllables: int, offset: int) -> List[str]:
    out, k = [], offset
    while len(out) < n:
        parts, x = [], k
        for _ in range(syllables):
            parts.append(onsets[x % len(onsets)] + vowels[(x // len(onsets)) % len(vowels)])
            x //= len(onsets) * len(vowels)
            x += 7
        word = "".join(parts)
        if word not in out:
            out.append(word)
        k += 37
    return out


class Lexicon:
    """Source and target words of each category, in matching order."""

    def __init__(self, nouns: int = 120, adjectives: int = 40, verbs: int = 40, preps: int = 8):
        sizes = {"noun": nouns, "adj": adjectives, "verb": verbs, "prep": preps, "det": 3}
        self.source: Dict[str, List[str]] = {}
        self.target: Dict[str, List[str]] = {}
        offset = 0
        for cat, n in sizes.items():
            syll = 1 if cat in ("det", "prep") else 2
            self.source[cat] = _words(n, _SOURCE_ONSETS, _SOURCE_VOWELS, syll, offset)
            self.target[cat] = _words(n, _ONSETS, _VOWELS, syll, offset + 11)
            offset += 1000
        self.source["det_plural"] = [w + "s" for w in self.source["det"]]


def _noun_phrase(rng: random.Random, lex: Lexicon, max_adj: int) -> Tuple[Dict, List[str], List[str]]:
    det = rng.randrange(len(lex.source["det"]))
    plural = rng.random() < 0.3
    noun = rng.randrange(len(lex.source["noun"]))
    adjs = rng.sample(range(len(lex.source["adj"])), rng.randint(0, max_adj))
    src = [(lex.source["det_plural"] if plural else lex.source["det"])[det], lex.source["noun"][noun]]
    src += [lex.source["adj"][a] for a in adjs]
    tgt = [lex.target["det"][det]] + [lex.target["adj"][a] for a in reversed(adjs)]
    tgt += [lex.target["noun"][noun]]
    if plural:
        tgt[-1] += "s"
    return {"plural": plural}, src, tgt


def sentence_pair(rng: random.Random, lex: Lexicon, max_adj: int = 2) -> Tuple[str, str]:
    """One (source, target) pair of the grammar in the module docstring."""
    subj, s_src, s_tgt = _noun_phrase(rng, lex, max_adj)
    _, o_src, o_tgt = _noun_phrase(rng, lex, max_adj)
    verb = rng.randrange(len(lex.source["verb"]))
    src = s_src + [lex.source["verb"][verb]] + o_src
    verb_t = lex.target["verb"][verb] + ("en" if subj["plural"] else "")
    pp_tgt: List[str] = []
    if rng.random() < 0.5:
        prep = rng.randrange(len(lex.source["prep"]))
        _, p_src, p_np = _noun_phrase(rng, lex, 1)
        src += [lex.source["prep"][prep]] + p_src
        pp_tgt = [lex.target["prep"][prep]] + p_np
    tgt = s_tgt + pp_tgt + o_tgt + [verb_t]
    return " ".join(src), " ".join(tgt)


def corpus(seed: int, count: int, lex: Lexicon = None) -> List[Tuple[str, str]]:
    """``count`` sentence pairs drawn with ``seed`` (the same seed gives the same corpus)."""
    lex = lex or Lexicon()
    rng = random.Random(seed)
    return [sentence_pair(rng, lex) for _ in range(count)]
