"""Training and generation speed of the PowerNorm and LayerNorm transformers, through fairseq.

    python benchmarks/train_speed.py                      # defaults: a reduced iwslt model
    python benchmarks/train_speed.py --embed-dim 512 --ffn-dim 1024 --layers 6 --repeats 5
    python benchmarks/train_speed.py --device cuda --fp16 --embed-dim 512 --ffn-dim 2048 --layers 6

Training: ``fairseq-train --arch powernorm_transformer_iwslt_de_en`` at the same size with
the encoder norms set to each of ``--norms`` (default ``layer``, LayerNorm, fairseq's own, and
``power``, PowerNorm, the architecture's default; ``batch`` is MaskedBatchNorm), on a generated
corpus. Runs alternate (layer, power, layer, power, ...) so that load changes on the machine
hit all alike; each run's words per second is the
median of its ``train_inner`` logs after the first (which pays start-up and compilation); the
table reports the median over runs. PowerNorm's warm-up is set short (--powernorm-warmup)
so that the runs measure its steady state.

Generation: ``fairseq-generate`` (beam 4) with each norm's last checkpoint and, for PowerNorm
and MaskedBatchNorm, that checkpoint folded by ``python -m powernorm_plugin.cli.fold_norms``;
tokens per second as fairseq reports it, median over ``--repeats`` runs.

Prints a markdown table, with the machine's load average before and after.
"""
import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the encoder norms this benchmark can compare (fairseq flag value -> table label)
LABELS = {"layer": "LayerNorm", "power": "PowerNorm", "batch": "MaskedBatchNorm",
          "power_vanilla": "PowerNorm (PN-V)", "rms": "RMSNorm"}
FOLDABLE = ("power", "batch", "power_vanilla")  # fold_norms folds these into linear layers
USER_DIR = os.path.join(REPO, "powernorm_plugin")


def run(cmd, threads):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def fairseq(tool, *args, threads):
    return run([sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)], threads)


def make_corpus(root, vocab, sentences, threads):
    """A translation corpus of random sentences (target: the source reversed), binarized."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(vocab)]
    for split, n in (("train", sentences), ("valid", 200), ("test", 200)):
        with open(os.path.join(root, f"{split}.src"), "w") as fs, \
                open(os.path.join(root, f"{split}.tgt"), "w") as ft:
            for _ in range(n):
                s = [rng.choice(words) for _ in range(rng.randint(10, 30))]
                fs.write(" ".join(s) + "\n")
                ft.write(" ".join(reversed(s)) + "\n")
    data = os.path.join(root, "bin")
    fairseq("preprocess", "--source-lang", "src", "--target-lang", "tgt",
            "--trainpref", os.path.join(root, "train"), "--validpref", os.path.join(root, "valid"),
            "--testpref", os.path.join(root, "test"), "--destdir", data, "--joined-dictionary",
            "--workers", "1", threads=threads)
    return data


def device_flags(a):
    """fairseq's flags for ``--device`` (and ``--fp16``)."""
    if a.device == "cpu":
        return ["--cpu"]
    return ["--fp16"] if a.fp16 else []


def train(data, save_dir, norm, a):
    log = fairseq(
        "train", data, "--user-dir", USER_DIR, *device_flags(a), "--arch", "powernorm_transformer_iwslt_de_en",
        "--encoder-embed-dim", a.embed_dim, "--decoder-embed-dim", a.embed_dim,
        "--encoder-ffn-embed-dim", a.ffn_dim, "--decoder-ffn-embed-dim", a.ffn_dim,
        "--encoder-layers", a.layers, "--decoder-layers", a.layers,
        "--encoder-attention-heads", a.heads, "--decoder-attention-heads", a.heads,
        "--encoder-norm-self", norm, "--encoder-norm-ff", norm, "--powernorm-warmup", "5",
        "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.001",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", a.max_tokens, "--max-update", a.updates, "--log-format", "simple",
        "--log-interval", a.log_interval, "--num-workers", "0", "--disable-validation",
        "--save-dir", save_dir, "--no-epoch-checkpoints", "--seed", "1", threads=a.threads,
    )
    wps = [float(x) for x in re.findall(r"train_inner \|.*?wps=([\d.]+)", log)]
    if len(wps) < 2:
        sys.exit(f"too few train_inner logs to measure ({len(wps)}); raise --updates\n{log[-2000:]}")
    return statistics.median(wps[1:])


def generate(data, ckpt, a):
    out = fairseq("generate", data, "--user-dir", USER_DIR, *device_flags(a), "--path", ckpt, "--beam", "4",
                  "--batch-size", "50", "--max-len-b", "40", threads=a.threads)
    return float(re.search(r"Translated .* ([\d.]+) tokens/s\)", out).group(1))


def device_name(a):
    if a.device == "cpu":
        return "CPU"
    import torch

    return torch.cuda.get_device_name() + (", fp16" if a.fp16 else ", fp32")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--norms", nargs="+", default=["layer", "power"], choices=list(LABELS),
                   help="encoder norms to compare (LayerNorm first, whether named or not)")
    p.add_argument("--fp16", action="store_true", help="with --device cuda: fairseq's --fp16")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--updates", type=int, default=60, help="updates per training run")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="runs per variant (alternating)")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--sentences", type=int, default=20000)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default=None,
                   help="keep the corpus and checkpoints here (default: a temporary folder, "
                   "removed at the end)")
    a = p.parse_args(argv)
    if a.fp16 and a.device != "cuda":
        p.error("--fp16 needs --device cuda")
    if a.workdir is not None:
        os.makedirs(a.workdir, exist_ok=True)
        return measure(a, a.workdir)
    with tempfile.TemporaryDirectory(prefix="powernorm_speed_") as root:
        return measure(a, root)


def measure(a, root):
    """Train and generate with each norm in ``root``; print the tables."""
    load_before = os.getloadavg()
    started = time.time()
    data = make_corpus(root, a.vocab, a.sentences, a.threads)

    norms = ["layer"] + [n for n in a.norms if n != "layer"]
    wps = {norm: [] for norm in norms}
    for r in range(a.repeats):
        for norm in norms:
            save = os.path.join(root, f"{norm}_{r}")
            wps[norm].append(train(data, save, norm, a))
            print(f"run {r + 1}/{a.repeats} {norm}: {wps[norm][-1]:.0f} wps", file=sys.stderr)

    ckpt = {norm: os.path.join(root, f"{norm}_{a.repeats - 1}", "checkpoint_last.pt") for norm in wps}
    for norm in [n for n in norms if n in FOLDABLE]:
        ckpt[f"{norm} folded"] = os.path.join(root, f"{norm}_folded.pt")
        run([sys.executable, "-m", "powernorm_plugin.cli.fold_norms", "--input", ckpt[norm],
             "--output", ckpt[f"{norm} folded"]], a.threads)
    gen = {name: [] for name in ckpt}
    for _ in range(a.repeats):
        for name, path in ckpt.items():
            gen[name].append(generate(data, path, a))

    med = {k: statistics.median(v) for k, v in wps.items()}
    gmed = {k: statistics.median(v) for k, v in gen.items()}
    print(f"\nModel: powernorm_transformer_iwslt_de_en, embed {a.embed_dim}, ffn {a.ffn_dim}, "
          f"{a.layers}+{a.layers} layers, {a.heads} heads; max-tokens {a.max_tokens}; "
          f"{a.threads} threads; {a.repeats} alternating runs of {a.updates} updates each; "
          f"{device_name(a)}.\n")
    print("| encoder norm | train wps (median) | runs | vs LayerNorm |")
    print("|---|---|---|---|")
    for norm in norms:
        runs = ", ".join(f"{x:.0f}" for x in wps[norm])
        print(f"| {LABELS[norm]} | {med[norm]:.0f} | {runs} | {med[norm] / med['layer']:.3f}x |")
    print("\n| checkpoint | generate tokens/s (median, beam 4) | vs LayerNorm |")
    print("|---|---|---|")
    for name in gen:
        norm, _, folded = name.partition(" ")
        label = LABELS[norm] + (", folded" if folded else "")
        print(f"| {label} | {gmed[name]:.1f} | {gmed[name] / gmed['layer']:.3f}x |")
    load_after = os.getloadavg()
    print(f"\nLoad average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f}, after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f}; "
          f"{os.cpu_count()} CPUs; wall {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
