"""Shared pytest fixtures for the powernorm-fairseq test-suite."""
import os
import sys

import pytest

# Every test, the command-line ones included, runs PowerNorm's default backend (the native
# CPU kernels, built once into the torch extensions cache); the tests that name
# backend="eager" or "compiled" check those against the same equations.

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


# --- fairseq entry points forked from one warm process (reliability tests) ---
# Every fairseq command-line run costs ~10 s of imports in a fresh interpreter. The
# reliability tests run dozens of short fairseq-train / fairseq-generate commands, so a
# session-scoped server imports fairseq once and forks one child per command: the child calls
# the tool's ``cli_main`` (what the ``fairseq-train`` console script calls) with the command's
# argv, its stdout/stderr going to a log file, exactly as a fresh process would after imports.
# The plugin is not imported by the server: children load it through ``--user-dir``.
# A job may name a test-side ``hook`` (fault injection, state dumps) applied before cli_main.
import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402


def _hook_dump_state(path):
    """On every ``checkpoint_utils.save_checkpoint`` call (fairseq makes it on every rank), save
    this rank's model state_dict to ``path.format(rank=R)``: the last call leaves the final state."""
    import torch
    from fairseq import checkpoint_utils

    original = checkpoint_utils.save_checkpoint

    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        state = {k: v.detach().clone() for k, v in trainer.get_model().state_dict().items()}
        torch.save({"model": state, "num_updates": trainer.get_num_updates()},
                   path.format(rank=trainer.data_parallel_rank))
        return original(cfg, trainer, epoch_itr, val_loss)

    checkpoint_utils.save_checkpoint = save_checkpoint


def _hook_kill_in_copy(k):
    """SIGKILL this process in the middle of the k-th ``shutil.copyfile`` (what fairseq's
    checkpoint copy and the plugin's atomic copy use): half of the destination written."""
    import shutil

    calls = [0]

    def copyfile(src, dst, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(k):
            with open(src, "rb") as f:
                data = f.read()
            with open(dst, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst, *args, **kwargs)

    original = shutil.copyfile
    shutil.copyfile = copyfile


def _hook_kill_in_torch_save(k):
    """SIGKILL this process in the middle of the k-th ``torch.save``: half of it written."""
    import io

    import torch

    calls = [0]
    original = torch.save

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(k):
            buf = io.BytesIO()
            original(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, f, *args, **kwargs)

    torch.save = save


def _hook_kill_randomly(spec):
    """``seed,lo,hi``: SIGKILL this process lo..hi seconds (uniform, seeded) after its first
    training step starts."""
    import threading

    from fairseq.trainer import Trainer

    seed, lo, hi = spec.split(",")
    delay = random.Random(int(seed)).uniform(float(lo), float(hi))
    original = Trainer.train_step
    started = []

    def killer():
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGKILL)

    def train_step(self, *args, **kwargs):
        if not started:
            started.append(True)
            threading.Thread(target=killer, daemon=True).start()
        return original(self, *args, **kwargs)

    Trainer.train_step = train_step


def _hook_stock_copy(_):
    """Undo the plugin's atomic checkpoint copy (to show what stock fairseq leaves behind)."""
    import powernorm_plugin  # noqa: F401  (what --user-dir imports; installs the copy)
    from powernorm_plugin.checkpoint import atomic_save

    atomic_save.uninstall()


FORK_HOOKS = {
    "dump_state": _hook_dump_state,
    "kill_in_copy": _hook_kill_in_copy,
    "kill_in_torch_save": _hook_kill_in_torch_save,
    "kill_randomly": _hook_kill_randomly,
    "stock_copy": _hook_stock_copy,
}


def _fork_child(job, proto_fd):
    os.close(proto_fd)
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.environ.update(job.get("env", {}))
    if job.get("cwd"):
        os.chdir(job["cwd"])
    code = 1
    try:
        import functools
        import importlib
        import traceback

        if "call" in job:  # "module:function", called with argv (test-side work, warm imports)
            module, _, function = job["call"].partition(":")
            entry = functools.partial(getattr(importlib.import_module(module), function), *job["argv"])
        else:
            entry = importlib.import_module(f"fairseq_cli.{job['tool']}").cli_main
            sys.argv = [f"fairseq-{job['tool'].replace('_', '-')}", *job["argv"]]
        for hook in job.get("hooks", []):
            name, _, arg = hook.partition(":")
            FORK_HOOKS[name](arg)
        try:
            entry()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork_server_main():
    """Serve job batches read as JSON lines on stdin; answer each with a JSON line of exit codes.

    A batch: {"jobs": [{"tool", "argv", "log", "hooks", "env", "cwd"}], "parallel": P,
    "timeout": S}. Exit codes: the process's (negative: killed by that signal; None: timed out).
    """
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints of the server never reach the protocol stream
    import fairseq_cli.train  # noqa: F401  (the expensive imports, done once)
    import fairseq_cli.generate  # noqa: F401

    proto = os.fdopen(proto_fd, "w")
    proto.write(json.dumps({"ready": True}) + "\n")
    proto.flush()
    for line in sys.stdin:
        batch = json.loads(line)
        jobs = batch["jobs"]
        codes = [None] * len(jobs)
        pending, running = list(range(len(jobs))), {}
        deadline = time.monotonic() + batch.get("timeout", 600)
        while pending or running:
            while pending and len(running) < batch.get("parallel", 2):
                i = pending.pop(0)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _fork_child(jobs[i], proto_fd)
                running[pid] = i
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                if time.monotonic() > deadline:
                    for p in running:
                        os.kill(p, signal.SIGKILL)
                        os.waitpid(p, 0)
                    running.clear()
                    pending.clear()
                time.sleep(0.02)
                continue
            if pid in running:
                codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        proto.write(json.dumps({"codes": codes}) + "\n")
        proto.flush()


class FairseqForkServer:
    """Client of :func:`_fork_server_main` (see the ``fairseq_fork`` fixture)."""

    def __init__(self):
        tests = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([tests, REPO, os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import conftest; conftest._fork_server_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, cwd=tests,
        )
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the fairseq fork server failed to start")

    def run(self, jobs, parallel=2, timeout=600):
        """Run jobs; return [(exit code, log text)] in order.

        A job is a dict: ``tool`` (fairseq_cli module: train, generate, ...) or ``call``
        ("module:function" importable from tests/, called with argv), ``argv``, ``log``, and
        optional ``hooks`` (names in FORK_HOOKS, "name:arg"), ``env`` and ``cwd``.
        """
        for job in jobs:
            job["argv"] = [str(a) for a in job["argv"]]
            job["log"] = str(job["log"])
        self.proc.stdin.write(json.dumps({"jobs": jobs, "parallel": parallel, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the fairseq fork server died")
        codes = json.loads(answer)["codes"]
        out = []
        for job, code in zip(jobs, codes):
            with open(job["log"]) as f:
                out.append((code, f.read()))
        return out

    def run_ok(self, jobs, parallel=2, timeout=600):
        """run(), raising with the log of any job that did not exit 0; returns the log texts."""
        results = self.run(jobs, parallel, timeout)
        for job, (code, log) in zip(jobs, results):
            if code != 0:
                raise AssertionError(
                    f"{job.get('call') or 'fairseq-' + job['tool']} {' '.join(job['argv'])} exited "
                    f"with {code}:\n{log[-6000:]}"
                )
        return [log for _, log in results]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def fairseq_fork():
    """A :class:`FairseqForkServer`: fairseq command-line runs without the import cost each."""
    server = FairseqForkServer()
    yield server
    server.close()


#: A tiny PowerNorm translation model (1+1 layers, 16 dims, 2 heads) for the reliability tests.
RELIABILITY_TRANSLATION_FLAGS = [
    "--task", "translation", "--arch", "powernorm_transformer_iwslt_de_en",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
    "--share-all-embeddings", "--criterion", "label_smoothed_cross_entropy",
    "--label-smoothing", "0.1", "--max-tokens", "800",
]
#: A tiny PowerNorm language model (1 layer, 16 dims, 2 heads).
RELIABILITY_LM_FLAGS = [
    "--task", "language_modeling", "--arch", "powernorm_transformer_lm",
    "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32", "--decoder-layers", "1",
    "--decoder-attention-heads", "2", "--tokens-per-sample", "16",
    "--sample-break-mode", "complete", "--criterion", "cross_entropy", "--max-tokens", "256",
]


def train_argv(data, save_dir, *flags, max_update, optimizer="adam"):
    """fairseq-train arguments for the reliability tests: CPU, plugin, seeded, no validation."""
    return [
        data, "--user-dir", USER_DIR, "--cpu", "--optimizer", optimizer,
        "--adam-betas", "(0.9,0.98)", "--lr-scheduler", "inverse_sqrt",
        "--warmup-init-lr", "1e-7", "--max-update", max_update, "--seed", "3",
        "--save-dir", save_dir, "--log-format", "simple", "--log-interval", "10",
        "--num-workers", "0", "--disable-validation", "--no-epoch-checkpoints", *flags,
    ]


def assert_same_state(a, b, where="checkpoint"):
    """Assert two nested checkpoint structures hold identical tensors (torch.equal) and values."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b)) if isinstance(b, dict) else b}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
