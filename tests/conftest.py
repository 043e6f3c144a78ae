"""Shared pytest fixtures for the powernorm-fairseq test-suite."""
import os
import sys

import pytest

# The compiled PowerNorm kernels cost seconds of compilation per process; the command-line
# tests exercise the model plumbing with the eager kernels, and the tests that name
# backend="compiled" check the compiled kernels against the same equations.
os.environ.setdefault("POWERNORM_BACKEND", "eager")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "powernorm_plugin")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture(scope="session")
def user_dir():
    """The plugin folder to pass to ``--user-dir``."""
    return USER_DIR


# --- fairseq command-line helpers and tiny generated corpora (models / entry-point tests) ---
import random  # noqa: E402
import subprocess  # noqa: E402

#: Words of the generated corpora: a small vocabulary, so tiny models learn in seconds.
TINY_WORDS = [f"w{i}" for i in range(12)]


def run_fairseq(tool, *args, cwd=None, timeout=600, check=True):
    """Run ``python -m fairseq_cli.<tool> *args``; on failure raise with its output.

    Returns the CompletedProcess (stdout and stderr as text).
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def reverse_task(tmp_path_factory):
    """A binarized translation task: the target is the source sentence reversed.

    Returns a dict: ``data`` (fairseq-preprocess output, joined dictionary, langs src/tgt),
    ``raw`` (folder with test.src / test.tgt) and ``test_pairs`` [(src, tgt), ...].
    """
    root = tmp_path_factory.mktemp("reverse_task")
    rng = random.Random(1234)
    splits = {}
    for split, n in (("train", 1500), ("valid", 100), ("test", 40)):
        src = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 7))) for _ in range(n)]
        splits[split] = [(s, " ".join(reversed(s.split()))) for s in src]
        _write_lines(root / f"{split}.src", [s for s, _ in splits[split]])
        _write_lines(root / f"{split}.tgt", [t for _, t in splits[split]])
    data = root / "bin"
    run_fairseq(
        "preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
        "--destdir", data, "--joined-dictionary", "--workers", "1",
    )
    return {"data": str(data), "raw": str(root), "test_pairs": splits["test"]}


@pytest.fixture(scope="session")
def counting_lm_task(tmp_path_factory):
    """A binarized language-modelling corpus of counting sequences (w3 w4 w5 ... mod 12).

    Each line starts at a random word and counts on for 4-12 words, so every next word but
    the first is predictable: a model that learns lowers perplexity far below the vocabulary
    size. Returns the data folder.
    """
    root = tmp_path_factory.mktemp("counting_lm")
    rng = random.Random(99)
    n = len(TINY_WORDS)

    def line():
        start, length = rng.randrange(n), rng.randint(4, 12)
        return " ".join(TINY_WORDS[(start + k) % n] for k in range(length))

    for split, count in (("train", 1200), ("valid", 80), ("test", 80)):
        _write_lines(root / f"{split}.txt", [line() for _ in range(count)])
    data = root / "bin"
    run_fairseq(
        "preprocess", "--only-source", "--trainpref", root / "train.txt",
        "--validpref", root / "valid.txt", "--testpref", root / "test.txt",
        "--destdir", data, "--workers", "1",
    )
    return str(data)


#: Flags shrinking powernorm_transformer_iwslt_de_en to a model that learns the reverse task.
TINY_TRANSLATION_FLAGS = [
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]
#: encoder norm per variant of the end-to-end runs (the decoder stays LayerNorm, as in Table 1)
TRANSLATION_VARIANTS = {"layer": "layer", "batch": "batch", "power": "power"}


def _train_cmd(data, save_dir, *flags, max_update):
    return [
        sys.executable, "-m", "fairseq_cli.train", data, "--user-dir", USER_DIR, "--cpu",
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr-scheduler", "inverse_sqrt",
        "--warmup-init-lr", "1e-7", "--max-update", str(max_update), "--seed", "1",
        "--save-dir", save_dir, "--log-format", "simple", "--log-interval", "50",
        "--num-workers", "0", "--validate-interval", "4", "--save-interval", "4", *flags,
    ]


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, reverse_task, counting_lm_task):
    """Train, through fairseq-train, the LayerNorm / BatchNorm / PowerNorm variants of a tiny
    ``powernorm_transformer_iwslt_de_en`` on the reverse task and a tiny PowerNorm
    ``powernorm_transformer_lm`` on the counting corpus (two runs at a time).

    Returns {"layer"|"batch"|"power"|"lm": {"dir": save dir, "log": training log text}},
    plus "reverse_task" and "lm_data".
    """
    root = tmp_path_factory.mktemp("trained")
    jobs = {}
    for name, enc in TRANSLATION_VARIANTS.items():
        jobs[name] = _train_cmd(
            reverse_task["data"], str(root / name), "--arch", "powernorm_transformer_iwslt_de_en",
            *TINY_TRANSLATION_FLAGS, "--encoder-norm-self", enc, "--encoder-norm-ff", enc,
            "--share-all-embeddings", "--lr", "0.007", "--warmup-updates", "50",
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--dropout", "0.0", "--max-tokens", "1000", max_update=200,
        )
    jobs["lm"] = _train_cmd(
        counting_lm_task, str(root / "lm"), "--task", "language_modeling",
        "--arch", "powernorm_transformer_lm", "--decoder-embed-dim", "32",
        "--decoder-ffn-embed-dim", "64", "--decoder-layers", "2", "--decoder-attention-heads", "4",
        "--tokens-per-sample", "16", "--sample-break-mode", "complete", "--lr", "0.005",
        "--warmup-updates", "20", "--dropout", "0.0", "--max-tokens", "512",
        "--criterion", "cross_entropy", "--save-interval-updates", "10", max_update=120,
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    results, pending, running = {}, list(jobs.items()), []
    while pending or running:
        while pending and len(running) < 2:
            name, cmd = pending.pop(0)
            log = open(root / f"{name}.log", "w+")
            running.append((name, cmd, log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        name, cmd, log, proc = running.pop(0)
        rc = proc.wait(timeout=900)
        log.seek(0)
        text = log.read()
        log.close()
        if rc != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {rc}:\n{text[-6000:]}")
        results[name] = {"dir": str(root / name), "log": text}
    results["reverse_task"] = reverse_task
    results["lm_data"] = counting_lm_task
    return results


@pytest.fixture(scope="session")
def build_plugin_model():
    """A function building a plugin model in-process from command-line flags.

    ``build_plugin_model(arch, *flags, task="translation")`` parses the flags as fairseq-train
    would (architecture defaults included) and builds the model on a dictionary of
    TINY_WORDS; returns (model, args, dictionary).
    """
    from types import SimpleNamespace

    from fairseq import options
    from fairseq.data import Dictionary
    from fairseq.models import ARCH_MODEL_REGISTRY

    import powernorm_plugin  # noqa: F401  (registers the models)

    def build(arch, *flags, task="translation"):
        dictionary = Dictionary()
        for w in TINY_WORDS:
            dictionary.add_symbol(w)
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(
            parser, ["/nonexistent-data", "--task", task, "--arch", arch, *map(str, flags)]
        )
        fake_task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)
        model = ARCH_MODEL_REGISTRY[arch].build_model(args, fake_task)
        return model, args, dictionary

    return build
