"""``python -m powernorm_plugin.recipes``: prepare, train, evaluate and compare the recipes.

The shell scripts under ``recipes/`` call these commands; see ``--help`` of each.
Arguments after a lone ``--`` go unchanged to fairseq-train (``train``, ``compare``) or to
fairseq-generate / fairseq-eval-lm (``evaluate``), after the recipe's own, so they override.
"""
import argparse
import logging
import os
import shlex
import sys
from typing import List, Optional, Tuple

from .definitions import RECIPES
from .results import NORMS


def _split_extra(argv: List[str]) -> Tuple[List[str], List[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _norms(value: str) -> List[str]:
    norms = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in norms if n not in NORMS]
    if bad or not norms:
        raise argparse.ArgumentTypeError(
            f"--norms takes a comma-separated list of {', '.join(NORMS)}; got {value!r}")
    twice = sorted({n for n in norms if norms.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"--norms names {', '.join(twice)} more than once")
    return norms


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _nonnegative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return n


def _add_workdir(p, required=True):
    p.add_argument("--workdir", required=required,
                   help="the recipe's work folder (downloads, data, checkpoints, results)")


def _add_train_flags(p):
    p.add_argument("--nap", action="store_true",
                   help="Normalize-and-Project: a norm before the FFN nonlinearity "
                        "(--ffn-activation-norm) and the nap_ variant of the recipe's optimizer")
    p.add_argument("--nap-activation-norm", default="layer", choices=("layer", "rms"),
                   help="the norm NaP puts before each FFN nonlinearity (default: layer)")
    p.add_argument("--gpus", type=_nonnegative, default=None,
                   help="GPUs to train on (0 = CPU); default: all visible GPUs")
    p.add_argument("--max-tokens", type=_positive, default=None,
                   help="tokens per batch per GPU (default: the authors')")
    p.add_argument("--update-freq", type=_positive, default=None,
                   help="batches per update (default: what reproduces the authors' tokens "
                        "per update with --gpus and --max-tokens)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m powernorm_plugin.recipes",
        description="Reproduction recipes for PowerNorm (Shen et al. 2020) with fairseq.",
        epilog="Arguments after a lone -- are passed on to fairseq (see each command's help).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    recipes = sorted(RECIPES)

    p = sub.add_parser("prepare", help="download (or take), verify, tokenize and binarize a data set")
    p.add_argument("recipe", choices=recipes)
    _add_workdir(p)
    p.add_argument("--archives", default=None,
                   help="folder holding the already-downloaded archives (nothing is downloaded)")
    p.add_argument("--sha256", action="append", default=[], metavar="ARCHIVE=HEX",
                   help="expected SHA-256 of an archive (repeatable)")
    p.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                   help="parallel processes for tokenization, BPE and binarization "
                        "(default: all CPU cores)")
    p.add_argument("--bpe-size", type=_positive, default=None,
                   help="joint BPE vocabulary size (default: 10000 IWSLT14, 32000 WMT14)")
    p.add_argument("--bpe-sample", type=_nonnegative, default=None,
                   help="learn BPE on this many random lines (0 = all; default: all for IWSLT14, "
                        "5000000 for WMT14)")

    p = sub.add_parser("train", help="train one variant with the authors' settings",
                       epilog="Arguments after -- go to fairseq-train, after the recipe's.")
    p.add_argument("recipe", choices=recipes)
    _add_workdir(p)
    p.add_argument("--norm", required=True, choices=list(NORMS),
                   help="ln (LayerNorm), bn (BatchNorm), pnv (PowerNorm, vanilla backward), pn (PowerNorm)")
    _add_train_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the fairseq-train command, run nothing")

    p = sub.add_parser("evaluate", help="average the last checkpoints, score the test set, write results",
                       epilog="Arguments after -- go to fairseq-generate / fairseq-eval-lm.")
    p.add_argument("recipe", choices=recipes)
    _add_workdir(p)
    p.add_argument("--norm", required=True, choices=list(NORMS))
    p.add_argument("--nap", action="store_true", help="evaluate the NaP variant")
    p.add_argument("--num-checkpoints", type=_positive, default=None,
                   help="epoch checkpoints to average (default: the authors' 5, or 10 for WMT14)")
    p.add_argument("--gpus", type=_nonnegative, default=None, help="0 = evaluate on CPU")

    p = sub.add_parser("compare", help="train and evaluate several variants, print the paper's table",
                       epilog="Arguments after -- go to fairseq-train, after the recipe's.")
    p.add_argument("recipe", choices=recipes)
    _add_workdir(p)
    p.add_argument("--norms", type=_norms, default=list(NORMS),
                   help="comma-separated variants to run (default: ln,bn,pnv,pn)")
    _add_train_flags(p)
    p.add_argument("--num-checkpoints", type=_positive, default=None,
                   help="epoch checkpoints to average (default: the recipe's)")
    p.add_argument("--eval-args", default="",
                   help="extra arguments for fairseq-generate / fairseq-eval-lm, as one string")
    p.add_argument("--force", action="store_true",
                   help="re-evaluate variants that already have a result file (a finished "
                        "training is not run again while its training_done.json exists)")

    p = sub.add_parser("table", help="print the paper-style table of result files")
    p.add_argument("results", nargs="+", help="results/<variant>.json files of one or more recipes")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = _split_extra(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if extra and args.command not in ("train", "evaluate", "compare"):
        parser.error(f"{args.command} takes no arguments after --")
    # force: importing fairseq leaves the root logger at DEBUG with a bare handler
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr,
                        force=True)
    from . import archives
    from . import results as res
    from .fairseq_run import ToolFailed

    try:
        if args.command == "prepare":
            from .prepare import prepare

            out = prepare(args.recipe, args.workdir, args.archives,
                          archives.parse_sha256_flags(args.sha256), args.workers,
                          args.bpe_size, args.bpe_sample)
            print(f"data ready: {out}")
        elif args.command == "train":
            from .run import train

            train(args.recipe, args.workdir, args.norm, args.nap, dry_run=args.dry_run,
                  gpus=args.gpus, max_tokens=args.max_tokens, update_freq=args.update_freq,
                  nap_activation_norm=args.nap_activation_norm, extra=extra)
        elif args.command == "evaluate":
            from .run import evaluate

            evaluate(args.recipe, args.workdir, args.norm, args.nap, args.num_checkpoints,
                     args.gpus, extra)
        elif args.command == "compare":
            from .run import compare

            compare(args.recipe, args.workdir, args.norms, args.nap, args.force,
                    train_kwargs=dict(gpus=args.gpus, max_tokens=args.max_tokens,
                                      update_freq=args.update_freq,
                                      nap_activation_norm=args.nap_activation_norm, extra=extra),
                    eval_kwargs=dict(num_checkpoints=args.num_checkpoints, gpus=args.gpus,
                                     extra=shlex.split(args.eval_args)))
        elif args.command == "table":
            print(res.comparison_table([res.read_result(p) for p in args.results]))
    except (archives.ArchiveError, FileNotFoundError, FileExistsError, ValueError, ImportError,
            ToolFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished stages and the last checkpoint are kept, and a re-run "
              "goes on from them", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
