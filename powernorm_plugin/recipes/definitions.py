"""The four reproduction recipes: data archives, the authors' training settings, evaluation.

Translation (Table 1 of Shen et al. 2020) follows the authors' released commands:

* IWSLT14 de-en: ``transformer_iwslt_de_en`` pre-norm, shared embeddings, Adam (0.9, 0.98),
  lr 0.0015, inverse_sqrt with 8000 warm-up updates from 1e-7, dropout 0.3 (attention and
  activation 0.1), label smoothing 0.1, weight decay 1e-4, 4096 tokens per update on one
  GPU, training until the validation loss has not improved for 5 epochs; the last 5 epoch
  checkpoints averaged, beam 5, length penalty 1.0, tokenized BLEU.
* WMT14 en-de: ``transformer_wmt_en_de_big_t2t``, lr 0.003, no weight decay, 32 GPUs x 4096
  tokens per update, patience and averaging 10; beam 4, length penalty 0.6,
  compound-split BLEU.

Language modelling (Table 2) ran on a Tensorized Transformer codebase that fairseq does not
have; these recipes train fairseq transformer LMs instead, so their perplexities are not the
paper's models' (the comparison between norms is what carries over):

* WikiText-103: ``transformer_lm_wiki103`` (Baevski & Auli's adaptive-input model) with
  fairseq's published settings for it: NAG, lr 1.0, cosine schedule (period 270k, t-mult 2,
  shrink 0.75), 16000 warm-up updates, clip-norm 0.1, 286k updates, 8 GPUs x 3072 tokens x
  update-freq 3; evaluation with a 2560-token context window.
* PTB: ``powernorm_transformer_lm_ptb`` (4 layers, 512/2048) with settings of our choosing:
  Adam, lr 5e-4, inverse_sqrt with 2000 warm-up updates, weight decay 0.01, 512-token
  samples, 4096 tokens per update, patience 10 epochs.
"""
import dataclasses
from typing import Dict, Tuple

from .archives import ArchiveSpec

IWSLT14_TEST_SETS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)

IWSLT14_ARCHIVES = (
    ArchiveSpec(
        filename="de-en.tgz",
        urls=("https://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz",),
        members=("de-en/train.tags.de-en.de", "de-en/train.tags.de-en.en")
        + tuple(f"de-en/{t}.de-en.{l}.xml" for t in IWSLT14_TEST_SETS for l in ("de", "en")),
    ),
)


def _statmt(path: str) -> Tuple[str, ...]:
    return (f"https://www.statmt.org/{path}", f"http://statmt.org/{path}")


WMT14_ARCHIVES = (
    ArchiveSpec(
        "training-parallel-europarl-v7.tgz",
        _statmt("wmt13/training-parallel-europarl-v7.tgz"),
        ("training/europarl-v7.de-en.de", "training/europarl-v7.de-en.en"),
    ),
    ArchiveSpec(
        "training-parallel-commoncrawl.tgz",
        _statmt("wmt13/training-parallel-commoncrawl.tgz"),
        ("commoncrawl.de-en.de", "commoncrawl.de-en.en"),
    ),
    ArchiveSpec(
        "training-parallel-nc-v9.tgz",
        _statmt("wmt14/training-parallel-nc-v9.tgz"),
        ("training/news-commentary-v9.de-en.de", "training/news-commentary-v9.de-en.en"),
    ),
    ArchiveSpec(
        "dev.tgz",
        _statmt("wmt14/dev.tgz"),
        ("dev/newstest2013-src.en.sgm", "dev/newstest2013-ref.de.sgm"),
    ),
    ArchiveSpec(
        "test-full.tgz",
        _statmt("wmt14/test-full.tgz"),
        ("test-full/newstest2014-deen-src.en.sgm", "test-full/newstest2014-deen-ref.de.sgm"),
    ),
)

PTB_ARCHIVES = (
    ArchiveSpec(
        "simple-examples.tgz",
        ("https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
         "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"),
        tuple(f"simple-examples/data/ptb.{s}.txt" for s in ("train", "valid", "test")),
    ),
)

WIKITEXT103_ARCHIVES = (
    ArchiveSpec(
        "wikitext-103-v1.zip",
        ("https://wikitext.smerity.com/wikitext-103-v1.zip",),
        tuple(f"wikitext-103/wiki.{s}.tokens" for s in ("train", "valid", "test")),
    ),
)


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "translation" or "lm"
    archives: Tuple[ArchiveSpec, ...]
    arch: str
    optimizer: str
    #: training flags besides data, arch, norms, optimizer name, batch size and save dir
    train_args: Tuple[str, ...]
    max_tokens: int
    #: tokens per update of the authors' runs (GPUs x max-tokens x update-freq)
    tokens_per_update: int
    reference_hardware: str
    average_last: int
    eval_args: Tuple[str, ...]
    source: str = ""
    target: str = ""
    bleu: str = ""  # "tokenized" or "compound" (translation)
    lowercase: bool = False
    bpe_size: int = 0


_TRANSLATION_COMMON = (
    "--share-all-embeddings",
    "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "8000", "--warmup-init-lr", "1e-07",
    "--stop-min-lr", "1e-09",
    "--dropout", "0.3", "--attention-dropout", "0.1", "--activation-dropout", "0.1",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--seed", "1",
)

RECIPES: Dict[str, Recipe] = {
    "iwslt14_de_en": Recipe(
        name="iwslt14_de_en",
        kind="translation",
        archives=IWSLT14_ARCHIVES,
        arch="powernorm_transformer_iwslt_de_en",
        optimizer="adam",
        train_args=_TRANSLATION_COMMON + (
            "--lr", "0.0015", "--weight-decay", "0.0001",
            "--keep-last-epochs", "5", "--patience", "5",
        ),
        max_tokens=4096,
        tokens_per_update=4096,
        reference_hardware="1 GPU x 4096 tokens",
        average_last=5,
        eval_args=("--beam", "5", "--lenpen", "1.0", "--batch-size", "128"),
        source="de",
        target="en",
        bleu="tokenized",
        lowercase=True,
        bpe_size=10000,
    ),
    "wmt14_en_de": Recipe(
        name="wmt14_en_de",
        kind="translation",
        archives=WMT14_ARCHIVES,
        arch="powernorm_transformer_wmt_en_de_big_t2t",
        optimizer="adam",
        train_args=_TRANSLATION_COMMON + (
            "--lr", "0.003", "--weight-decay", "0.0",
            "--keep-last-epochs", "10", "--patience", "10",
        ),
        max_tokens=4096,
        tokens_per_update=32 * 4096,
        reference_hardware="32 GPUs x 4096 tokens",
        average_last=10,
        eval_args=("--beam", "4", "--lenpen", "0.6", "--batch-size", "128"),
        source="en",
        target="de",
        bleu="compound",
        lowercase=False,
        bpe_size=32000,
    ),
    "ptb": Recipe(
        name="ptb",
        kind="lm",
        archives=PTB_ARCHIVES,
        arch="powernorm_transformer_lm_ptb",
        optimizer="adam",
        train_args=(
            "--task", "language_modeling", "--tokens-per-sample", "512",
            "--sample-break-mode", "none",
            "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
            "--lr", "0.0005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2000",
            "--warmup-init-lr", "1e-07", "--weight-decay", "0.01",
            "--criterion", "cross_entropy", "--seed", "1",
            "--keep-last-epochs", "5", "--patience", "10",
        ),
        max_tokens=4096,
        tokens_per_update=4096,
        reference_hardware="1 GPU x 4096 tokens (our choice)",
        average_last=5,
        eval_args=("--task", "language_modeling", "--tokens-per-sample", "512",
                   "--context-window", "256", "--max-tokens", "4096"),
    ),
    "wikitext103": Recipe(
        name="wikitext103",
        kind="lm",
        archives=WIKITEXT103_ARCHIVES,
        arch="powernorm_transformer_lm_wiki103",
        optimizer="nag",
        train_args=(
            "--task", "language_modeling", "--tokens-per-sample", "3072",
            "--sample-break-mode", "none", "--skip-invalid-size-inputs-valid-test",
            "--lr", "1.0", "--min-lr", "0.0001", "--lr-scheduler", "cosine",
            "--t-mult", "2", "--lr-period-updates", "270000", "--lr-shrink", "0.75",
            "--warmup-updates", "16000", "--warmup-init-lr", "1e-07", "--stop-min-lr", "1e-09",
            "--clip-norm", "0.1", "--criterion", "adaptive_loss", "--max-update", "286000",
            "--seed", "1", "--keep-last-epochs", "5", "--ddp-backend", "legacy_ddp",
        ),
        max_tokens=3072,
        tokens_per_update=8 * 3072 * 3,
        reference_hardware="8 GPUs x 3072 tokens x update-freq 3",
        average_last=5,
        eval_args=("--task", "language_modeling", "--tokens-per-sample", "3072",
                   "--context-window", "2560", "--max-tokens", "3072", "--softmax-batch", "1024"),
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
