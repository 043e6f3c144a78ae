"""Train, evaluate and compare the normalization variants of a recipe.

Work-directory layout (besides the data stages of :mod:`.prepare`)::

    checkpoints/<variant>/     fairseq checkpoints and train.log of one variant,
                               training_started.json while its training is under way (or
                               interrupted), training_done.json once it has finished
    results/<variant>/         generate-test.txt (translation) of the averaged model
    results/<variant>.json     the variant's figures; results/<variant>.md its table row

A variant is a norm (``ln``, ``bn``, ``pnv``, ``pn``) with ``-nap`` appended for
Normalize-and-Project. Translation models put the variant's norm in the encoder (its
self-attention and FFN inputs and its final norm) and LayerNorm throughout the decoder, as
the paper's Table 1 runs; language models put it at every decoder norm.
"""
import difflib
import glob
import logging
import math
import os
import shlex
from typing import Dict, List, Optional, Sequence

from . import results as res
from . import scoring, text
from .definitions import Recipe, get_recipe
from .stages import read_json, write_json

logger = logging.getLogger(__name__)

#: Norm kinds that normalize by the current batch; in a decoder they leak later tokens.
_NONCAUSAL = ("batch", "power_vanilla")

#: Written into a variant's checkpoint folder when its training has finished.
TRAINING_DONE = "training_done.json"
#: Written there when its training starts: a resumed training must have the same arguments.
TRAINING_STARTED = "training_started.json"


def _user_dir() -> str:
    import powernorm_plugin

    return powernorm_plugin.USER_DIR


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def databin(workdir: str) -> str:
    path = os.path.join(workdir, "data-bin")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} does not exist: run the recipe's prepare step with --workdir "
            f"{shlex.quote(workdir)} first"
        )
    return path


def norm_flags(recipe: Recipe, norm: str) -> List[str]:
    kind = res.NORMS[norm][1]
    if recipe.kind == "translation":
        return ["--encoder-norm-self", kind, "--encoder-norm-ff", kind,
                "--decoder-norm-self", "layer", "--decoder-norm-ff", "layer"]
    flags = ["--decoder-norm-self", kind, "--decoder-norm-ff", kind]
    if kind in _NONCAUSAL:
        # The paper's BN and PN-V language-model rows normalize by batch statistics that
        # include later tokens; the plugin refuses this unless asked explicitly.
        flags.append("--allow-noncausal-decoder-norm")
    return flags


def update_freq_for(recipe: Recipe, gpus: int, max_tokens: int) -> int:
    """Update frequency that gives the authors' tokens per update on ``gpus`` workers:
    ceil(tokens_per_update / (max(gpus, 1) * max_tokens))."""
    return max(1, math.ceil(recipe.tokens_per_update / (max(gpus, 1) * max_tokens)))


def train_command(
    name: str,
    workdir: str,
    norm: str,
    nap: bool = False,
    gpus: Optional[int] = None,
    max_tokens: Optional[int] = None,
    update_freq: Optional[int] = None,
    nap_activation_norm: str = "layer",
    log_interval: int = 50,
    extra: Sequence[str] = (),
    announce: bool = True,
) -> List[str]:
    """The fairseq-train arguments of a variant (authors' settings, then ``extra``); with
    ``announce``, logs its tokens per update against the authors'."""
    recipe = get_recipe(name)
    variant = res.variant_name(norm, nap)
    gpus = _gpu_count() if gpus is None else gpus
    if gpus < 0:
        raise ValueError(f"--gpus must be >= 0, got {gpus}")
    max_tokens = max_tokens or recipe.max_tokens
    freq = update_freq or update_freq_for(recipe, gpus, max_tokens)
    tokens = max(gpus, 1) * max_tokens * freq
    logger.log(
        logging.DEBUG if not announce else
        logging.INFO if tokens == recipe.tokens_per_update else logging.WARNING,
        "%s %s: %d tokens per update (%d worker(s) x %d tokens x update-freq %d); authors: %d "
        "(%s)%s", name, variant, tokens, max(gpus, 1), max_tokens, freq,
        recipe.tokens_per_update, recipe.reference_hardware,
        "" if tokens == recipe.tokens_per_update else
        ": not the authors' batch, which their learning rate and warm-up were tuned for (choose "
        "--max-tokens and --update-freq so that workers x max-tokens x update-freq matches)",
    )
    argv = [databin(workdir), "--user-dir", _user_dir(), "--arch", recipe.arch]
    argv += norm_flags(recipe, norm)
    if nap:
        # NaP = a norm before each nonlinearity + projection after every step.
        argv += ["--optimizer", "nap_" + recipe.optimizer, "--ffn-activation-norm", nap_activation_norm]
    else:
        argv += ["--optimizer", recipe.optimizer]
    argv += list(recipe.train_args)
    argv += ["--max-tokens", str(max_tokens), "--update-freq", str(freq)]
    if gpus == 0:
        argv += ["--cpu"]
    else:  # fairseq would otherwise start a worker on every visible GPU
        argv += ["--distributed-world-size", str(gpus)]
        if gpus > 1:
            argv += ["--ddp-backend", "legacy_ddp"]
    argv += ["--save-dir", os.path.join(workdir, "checkpoints", variant),
             "--log-format", "simple", "--log-interval", str(log_interval)]
    return argv + list(extra)


def train(name: str, workdir: str, norm: str, nap: bool = False, dry_run: bool = False, **kwargs) -> List[str]:
    """Train a variant: an interrupted training resumes from its last checkpoint (as
    fairseq-train does), a finished one is not run again.

    fairseq does not keep its early-stopping count in the checkpoints, so resuming a training
    that stopped early would train at least --patience more epochs; a finished training is
    recorded in ``training_done.json`` instead, and skipped while that file exists. The
    arguments a training started with are kept in ``training_started.json`` until it
    finishes: an interrupted training is resumed only with the same ones (other batch sizes,
    models or schedules for its last epochs would be credited to the whole run).
    """
    from . import fairseq_run

    save_dir = os.path.join(workdir, "checkpoints", res.variant_name(norm, nap))
    done = os.path.join(save_dir, TRAINING_DONE)
    finished = None
    if os.path.exists(done) and not dry_run:
        finished = read_json(done)["argv"]
    argv = train_command(name, workdir, norm, nap, announce=finished is None, **kwargs)
    if dry_run:
        fairseq_run._announce("fairseq-train", argv)
        return argv
    if finished is not None:
        same = _comparable(finished) == _comparable(argv)
        logger.log(
            logging.INFO if same else logging.WARNING,
            "%s: its training finished already (%s)%s; delete that file to train on from its "
            "last checkpoint", save_dir, done,
            "" if same else ", with other arguments than these, which are not applied",
        )
        return argv
    started = os.path.join(save_dir, TRAINING_STARTED)
    if os.path.exists(started) and os.path.exists(os.path.join(save_dir, "checkpoint_last.pt")):
        before = read_json(started)["argv"]
        if _comparable(before) != _comparable(argv):
            raise ValueError(
                f"{save_dir} holds an interrupted training started with other arguments "
                f"({_difference(_comparable(before), _comparable(argv))}): resuming it with "
                f"these would credit the whole run to them. Run it again as it started, or "
                f"delete {save_dir} to start over")
    os.makedirs(save_dir, exist_ok=True)
    record = {"argv": argv, "command": shlex.join(["fairseq-train", *argv])}
    write_json(started, record)
    fairseq_run.train(argv, log_path=os.path.join(save_dir, "train.log"))
    write_json(done, record)
    os.remove(started)  # (training on after deleting the done file may take other arguments)
    return argv


def _difference(before: Sequence[str], now: Sequence[str]) -> str:
    """The arguments that differ between two argument lists, as ``was: ...; now: ...``."""
    parts = []
    matcher = difflib.SequenceMatcher(a=before, b=now, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            parts.append(f"was: {shlex.join(before[max(i1 - 1, 0):i2]) or '-'}; "
                         f"now: {shlex.join(now[max(j1 - 1, 0):j2]) or '-'}")
    return " | ".join(parts)


def _comparable(argv: Sequence[str]) -> List[str]:
    """fairseq-train arguments as two runs of one training compare them: paths resolved (the
    same work folder may be named another way) and the plugin's own folder left out."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--user-dir" or (i and argv[i - 1] == "--user-dir"):
            continue
        out.append(os.path.realpath(arg) if os.path.exists(arg) else arg)
    return out


def _average(save_dir: str, count: int) -> str:
    from . import fairseq_run

    if not os.path.isdir(save_dir):
        raise FileNotFoundError(f"{save_dir} does not exist: train this variant first")
    out = os.path.join(save_dir, f"checkpoint.avg{count}.pt")
    fairseq_run.average_checkpoints(["--inputs", save_dir, "--num-epoch-checkpoints", str(count),
                                     "--output", out])
    return out


def evaluate(
    name: str,
    workdir: str,
    norm: str,
    nap: bool = False,
    num_checkpoints: Optional[int] = None,
    gpus: Optional[int] = None,
    extra: Sequence[str] = (),
) -> Dict:
    """Average the variant's last epoch checkpoints, score the test set, write the results."""
    from . import fairseq_run

    recipe = get_recipe(name)
    variant = res.variant_name(norm, nap)
    data = databin(workdir)
    count = num_checkpoints or recipe.average_last
    avg = _average(os.path.join(workdir, "checkpoints", variant), count)
    gpus = _gpu_count() if gpus is None else gpus
    device = ["--cpu"] if gpus == 0 else []
    record = {"recipe": name, "norm": norm, "nap": nap, "variant": variant,
              "checkpoint": os.path.abspath(avg), "averaged_checkpoints": count}
    if recipe.kind == "translation":
        out_dir = os.path.join(workdir, "results", variant)
        os.makedirs(out_dir, exist_ok=True)
        fairseq_run.generate([
            data, "--user-dir", _user_dir(), "--path", avg, "--gen-subset", "test",
            "--source-lang", recipe.source, "--target-lang", recipe.target,
            "--post-process", "sentencepiece", "--results-path", out_dir,
            # fairseq's batching drops the last (batch size mod this multiple) sentences
            # of the test set when the multiple is > 1 (its default for generate is 8)
            "--required-batch-size-multiple", "1",
            *recipe.eval_args, *device, *extra,
        ])
        record.update(score_translation(recipe, os.path.join(out_dir, "generate-test.txt"),
                                        os.path.join(data, f"test.raw.{recipe.target}")))
        record["generate_args"] = list(recipe.eval_args) + list(extra)
    else:
        lm = fairseq_run.eval_lm([data, "--user-dir", _user_dir(), "--path", avg, "--gen-subset", "test",
                                  *recipe.eval_args, *device, *extra])
        record.update({"metric": "ppl", "ppl": lm["perplexity"], "loss_base2": lm["loss"],
                       "eval_args": list(recipe.eval_args) + list(extra)})
    results_dir = os.path.join(workdir, "results")
    res.write_result(record, os.path.join(results_dir, variant + ".json"),
                     os.path.join(results_dir, variant + ".md"))
    print(res.markdown_header(record["metric"]))
    print(res.markdown_row(record), flush=True)
    return record


def score_translation(recipe: Recipe, generate_output: str, raw_reference: str) -> Dict:
    """Tokenized (or compound-split) BLEU and detokenized sacreBLEU of a generate output."""
    _, refs_tok, hyps_tok = scoring.parse_generate(generate_output)
    raw_refs = text.read_lines(raw_reference)
    if len(raw_refs) != len(hyps_tok):
        raise ValueError(f"{raw_reference} has {len(raw_refs)} lines but {generate_output} "
                         f"translates {len(hyps_tok)} sentences")
    hyps_detok = text.moses_detokenize(hyps_tok, recipe.target)
    if recipe.bleu == "compound":
        retok = lambda lines: [scoring.compound_split(l) for l in  # noqa: E731
                               text.moses_tokenize(lines, recipe.target)]
        bleu = scoring.tokenized_bleu(retok(hyps_detok), retok(raw_refs))
        bleu_kind = "compound-split tokenized BLEU (Moses tokenizer, ##AT## hyphens)"
    else:
        bleu = scoring.tokenized_bleu(hyps_tok, refs_tok)
        bleu_kind = "tokenized BLEU" + (" (lowercased)" if recipe.lowercase else "")
    sacre, signature = scoring.sacrebleu_score(hyps_detok, raw_refs, lowercase=recipe.lowercase)
    return {"metric": "bleu", "bleu": bleu, "bleu_kind": bleu_kind, "sacrebleu": sacre,
            "sacrebleu_signature": signature, "sentences": len(hyps_tok)}


def result_files(workdir: str, variants: Optional[Sequence[str]] = None) -> List[str]:
    folder = os.path.join(workdir, "results")
    if variants is None:
        return sorted(glob.glob(os.path.join(folder, "*.json")))
    return [os.path.join(folder, v + ".json") for v in variants]


def compare(
    name: str,
    workdir: str,
    norms: Sequence[str],
    nap: bool = False,
    force: bool = False,
    train_kwargs: Optional[Dict] = None,
    eval_kwargs: Optional[Dict] = None,
) -> str:
    """Train and evaluate every norm in ``norms`` (skipping variants that have a result
    file, unless ``force``; :func:`train` skips a finished training), then return the
    paper-style table of their results."""
    variants = []
    for norm in norms:
        variant = res.variant_name(norm, nap)
        variants.append(variant)
        done = os.path.join(workdir, "results", variant + ".json")
        if os.path.exists(done) and not force:
            logger.info("%s: %s exists, not evaluated again (--force to redo)", variant, done)
            continue
        train(name, workdir, norm, nap, **(train_kwargs or {}))
        evaluate(name, workdir, norm, nap, **(eval_kwargs or {}))
    table = res.comparison_table([res.read_result(p) for p in result_files(workdir, variants)])
    print(table, flush=True)
    return table
