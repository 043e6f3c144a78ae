"""The quickstart: a small LayerNorm and a small PowerNorm transformer on a synthetic task.

    python -m powernorm_plugin.recipes.quickstart --workdir runs/quickstart

Generates a parallel corpus (:mod:`.synthetic`; nothing is downloaded), binarizes it,
trains two 2-layer transformers that differ only in the encoder's norms (LayerNorm, or
PowerNorm as in the paper's Table 1 runs; LayerNorm in both decoders), translates the test
set with each, and reports BLEU. Writes ``results.json``, ``results.md`` and
``valid_loss.png`` (validation loss against updates for both models) into the work folder.
Sized for about 3-4 minutes on 2 CPU cores; every stage logs its progress.

A re-run in the same work folder reuses the corpus, the binarized data, the translations
and every finished training (one with a ``finished.json`` next to its checkpoints, written
when fairseq-train succeeded: it keeps the training time and validation curve), so it
rescores to the same figures without training again; an interrupted training resumes from
its last checkpoint (its reported training time is then the last part's), and one stopped
after its last checkpoint but before ``finished.json`` is recorded without another update.
The folder's ``settings.json`` records the settings it was made with: a re-run that asks
for other settings stops with an error before doing anything.
(``seconds`` in ``results.json`` is the time of the run that wrote it.)
"""
import argparse
import logging
import os
import re
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from . import scoring, synthetic, text
from .stages import atomic_file, read_json, run_stage, write_json

logger = logging.getLogger("powernorm_plugin.recipes.quickstart")

VARIANTS = (("ln", "LayerNorm", "layer"), ("pn", "PowerNorm", "power"))

_VALID = re.compile(r"valid on 'valid' subset \| (.*)$")


class SettingsMismatch(ValueError):
    """A re-run asks for other settings than those its work folder was made with."""


def _step(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def write_corpus(folder: str, train: int, valid: int, test: int, seed: int) -> None:
    lex = synthetic.Lexicon()
    for split, count, offset in (("train", train, 0), ("valid", valid, 1), ("test", test, 2)):
        pairs = synthetic.corpus(seed * 1000 + offset, count, lex)
        text.write_lines(os.path.join(folder, f"{split}.src"), (p[0] for p in pairs))
        text.write_lines(os.path.join(folder, f"{split}.tgt"), (p[1] for p in pairs))


def check_settings(workdir: str, settings: Dict) -> None:
    """Record ``settings`` in ``workdir/settings.json``, or, when the folder has them
    already, check that they are the same: its corpus and models belong to those settings."""
    path = os.path.join(workdir, "settings.json")
    if not os.path.exists(path):
        made = [n for n in ("corpus", "data-bin", "checkpoints", "results.json")
                if os.path.lexists(os.path.join(workdir, n))]
        if made:
            raise SettingsMismatch(
                f"{workdir} holds {', '.join(made)} but no settings.json (an older version made "
                f"it?): its settings are unknown; use another --workdir, or delete {workdir}")
        os.makedirs(workdir, exist_ok=True)
        write_json(path, settings)
        return
    stored = read_json(path)
    differ = [f"--{k.replace('_', '-')} {stored.get(k)} (requested: {v})"
              for k, v in settings.items() if stored.get(k) != v]
    if differ:
        raise SettingsMismatch(
            f"{workdir} was made with other settings: {'; '.join(differ)}. Its corpus and models "
            f"belong to those; use another --workdir, or delete {workdir} to start over")


def _updates(checkpoint: str) -> int:
    """The update count a fairseq checkpoint was saved at."""
    from ..checkpoint.safe_load import safe_load

    return int(safe_load(checkpoint)["optimizer_history"][-1]["num_updates"])


def _training_time(model: Dict) -> str:
    """A model's training time for the results: a resumed training's is its last part's."""
    if model["train_seconds"] is None:
        return "unknown"
    resumed = " (its last part: resumed)" if model["resumed"] else ""
    return f"{model['train_seconds']:.0f} s{resumed}"


def train_args(data: str, save_dir: str, norm_kind: str, max_update: int, validate_every: int,
               user_dir: str) -> List[str]:
    return [
        data, "--user-dir", user_dir, "--arch", "powernorm_transformer_iwslt_de_en",
        "--encoder-norm-self", norm_kind, "--encoder-norm-ff", norm_kind,
        "--decoder-norm-self", "layer", "--decoder-norm-ff", "layer",
        "--encoder-layers", "2", "--decoder-layers", "2",
        "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
        "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
        "--share-all-embeddings", "--dropout", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "200",
        "--warmup-init-lr", "1e-07",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "2048", "--max-update", str(max_update), "--seed", "1", "--cpu",
        "--validate-interval-updates", str(validate_every), "--validate-interval", "1000",
        "--save-interval", "1000", "--no-epoch-checkpoints",
        # a checkpoint at each validation, so that an interrupted training resumes from it
        "--save-interval-updates", str(validate_every), "--keep-interval-updates", "1",
        "--save-dir", save_dir, "--log-format", "simple", "--log-interval", "50",
    ]


def valid_curve(log_path: str) -> List[Tuple[int, float]]:
    """(updates, validation loss) points logged by fairseq-train, in order."""
    points = {}
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            m = _VALID.search(line.rstrip("\n"))
            if m is None:
                continue
            fields = dict(kv.strip().split(" ", 1) for kv in m.group(1).split(" | ") if " " in kv.strip())
            if "loss" in fields and "num_updates" in fields:
                points[int(fields["num_updates"])] = float(fields["loss"])
    return sorted(points.items())


def plot_curves(curves: Dict[str, List[Tuple[int, float]]], out: str) -> None:
    """PNG of validation loss against updates, one line per model."""
    from powernorm_plugin.cli._png import Canvas
    from powernorm_plugin.cli.plot_nap import COLORS, Panel

    points = [p for c in curves.values() for p in c]
    if not points:
        raise ValueError("no validation loss was logged: nothing to plot")
    width, height = 900, 560
    c = Canvas(width, height)
    lo, hi = min(y for _, y in points), max(y for _, y in points)
    pad = (hi - lo) * 0.05 or 0.1
    panel = Panel(c, 110, 60, width - 30, height - 110, (0.0, float(max(x for x, _ in points))),
                  (max(lo - pad, 0.0), hi + pad))
    panel.frame("VALIDATION LOSS (BASE 2) OF THE QUICKSTART MODELS", "UPDATES")
    lx = 130
    for i, (label, curve) in enumerate(curves.items()):
        col = COLORS[i % len(COLORS)]
        if len(curve) == 1:
            x, y = panel.px(*curve[0])
            c.rect(x - 3, y - 3, x + 3, y + 3, col)
        panel.curve([x for x, _ in curve], [y for _, y in curve], col)
        c.line(lx, height - 35, lx + 40, height - 35, col, 3)
        lx += 50 + c.text(lx + 50, height - 42, label) + 40
    c.save(out)


def run(workdir: str, train_pairs: int = 6000, max_update: int = 1000, validate_every: int = 100,
        seed: int = 1, beam: int = 5, test_pairs: int = 500) -> Dict:
    from . import fairseq_run
    import powernorm_plugin

    start = time.time()
    settings = {"train_pairs": train_pairs, "test_pairs": test_pairs, "max_update": max_update,
                "validate_every": validate_every, "seed": seed, "beam": beam}
    check_settings(workdir, settings)
    corpus = os.path.join(workdir, "corpus")
    _step(f"1/4 synthetic parallel corpus: {train_pairs} training pairs -> {corpus}")
    run_stage(corpus, "corpus", lambda tmp: write_corpus(tmp, train_pairs, 300, test_pairs, seed))
    data = os.path.join(workdir, "data-bin")
    _step(f"2/4 binarizing -> {data}")
    run_stage(data, "binarize", lambda tmp: fairseq_run.preprocess([
        "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", os.path.join(corpus, "train"), "--validpref", os.path.join(corpus, "valid"),
        "--testpref", os.path.join(corpus, "test"), "--destdir", tmp, "--joined-dictionary",
    ]))
    refs = text.read_lines(os.path.join(corpus, "test.tgt"))
    record = {"recipe": "quickstart", **settings, "models": {}}
    curves = {}
    for i, (norm, label, kind) in enumerate(VARIANTS):
        save_dir = os.path.join(workdir, "checkpoints", norm)
        finished = os.path.join(save_dir, "finished.json")
        out_dir = os.path.join(workdir, "results", norm)
        log_path = os.path.join(save_dir, "train.log")
        last = os.path.join(save_dir, "checkpoint_last.pt")
        if os.path.exists(finished):
            _step(f"3/4 the {label} transformer finished training in an earlier run ({finished}): reused")
        elif os.path.exists(last) and _updates(last) >= max_update:
            # (fairseq-train resumed from there would make one update more)
            _step(f"3/4 the {label} transformer reached {max_update} updates in an earlier run "
                  f"that stopped before recording it: recorded now, its training time unknown")
            write_json(finished, {"train_seconds": None, "resumed": True,
                                  "valid_loss": valid_curve(log_path)})
        else:
            shutil.rmtree(out_dir, ignore_errors=True)  # translations of an older checkpoint
            os.makedirs(save_dir, exist_ok=True)
            resumed = os.path.exists(last)
            t0 = time.time()
            _step(f"3/4 training the {label} transformer ({i + 1}/{len(VARIANTS)}, {max_update} updates; "
                  f"fairseq logs every 50 updates)" + (", resumed" if resumed else ""))
            fairseq_run.train(train_args(data, save_dir, kind, max_update, validate_every,
                                         powernorm_plugin.USER_DIR), log_path=log_path)
            write_json(finished, {"train_seconds": round(time.time() - t0, 1), "resumed": resumed,
                                  "valid_loss": valid_curve(log_path)})
        trained = read_json(finished)
        train_s = trained["train_seconds"]
        _step(f"4/4 the {label} model's translations of the test set: reused ({out_dir})"
              if os.path.isdir(out_dir) else f"4/4 translating the test set with the {label} model")
        run_stage(out_dir, f"translate ({label})", lambda tmp: fairseq_run.generate([
            data, "--user-dir", powernorm_plugin.USER_DIR, "--path",
            os.path.join(save_dir, "checkpoint_last.pt"), "--gen-subset", "test", "--cpu",
            "--beam", str(beam), "--batch-size", "128", "--required-batch-size-multiple", "1",
            # a translation is as long as its source: this bound only stops runaway outputs
            "--max-len-a", "1.2", "--max-len-b", "10",
            "--results-path", tmp,
        ]))
        _, _, hyps = scoring.parse_generate(os.path.join(out_dir, "generate-test.txt"))
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} translations for {len(refs)} test sentences")
        bleu = scoring.tokenized_bleu(hyps, refs)
        sacre, signature = scoring.sacrebleu_score(hyps, refs)
        curves[label] = [tuple(p) for p in trained["valid_loss"]]
        record["models"][norm] = {"label": label, "bleu": bleu, "sacrebleu": sacre,
                                  "sacrebleu_signature": signature, "train_seconds": train_s,
                                  "resumed": bool(trained.get("resumed")),
                                  "valid_loss": curves[label]}
        _step(f"{label}: BLEU {bleu:.2f} (sacreBLEU {sacre:.2f}), trained in "
              f"{_training_time(record['models'][norm])}")
    png = os.path.join(workdir, "valid_loss.png")
    plot_curves(curves, png)
    record["seconds"] = round(time.time() - start, 1)
    write_json(os.path.join(workdir, "results.json"), record)
    table = ["| model | BLEU | sacreBLEU | final valid loss | training time |", "|---|---|---|---|---|"]
    for norm, m in record["models"].items():
        final = m["valid_loss"][-1][1] if m["valid_loss"] else None
        table.append(f"| {m['label']} | {m['bleu']:.2f} | {m['sacrebleu']:.2f} | "
                     f"{'-' if final is None else f'{final:.3f}'} | {_training_time(m)} |")
    with atomic_file(os.path.join(workdir, "results.md")) as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"validation-loss curves: {png}; this run took {record['seconds']:.0f} s", flush=True)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m powernorm_plugin.recipes.quickstart",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/quickstart", help="output folder (default runs/quickstart)")
    p.add_argument("--train-pairs", type=int, default=6000, help="synthetic training pairs (default 6000)")
    p.add_argument("--test-pairs", type=int, default=500, help="synthetic test pairs (default 500)")
    p.add_argument("--max-update", type=int, default=1000, help="updates per model (default 1000)")
    p.add_argument("--validate-every", type=int, default=100,
                   help="validate every N updates: the points of the curves (default 100)")
    p.add_argument("--seed", type=int, default=1, help="corpus seed (default 1)")
    p.add_argument("--beam", type=int, default=5, help="beam size of the test translations (default 5)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for PyTorch (default 1: these models are too small to gain "
                        "from more, and one thread does not stall when other work shares the cores)")
    a = p.parse_args(argv)
    for flag in ("train_pairs", "test_pairs", "max_update", "validate_every", "beam", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr, force=True)
    import torch

    torch.set_num_threads(a.threads)
    try:
        run(a.workdir, a.train_pairs, a.max_update, a.validate_every, a.seed, a.beam, a.test_pairs)
    except SettingsMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
