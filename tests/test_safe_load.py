"""Weights-only checkpoint loading: fairseq's checkpoints load, anything else is refused.

Checkpoints come from a real ``fairseq-train`` run (with ``--eval-bleu``, so the
checkpoint's meters hold numpy arrays as users' checkpoints do); the malicious one is that
checkpoint plus one object whose unpickling would create a marker file.
"""
import os
import pathlib
import random
import re
import shlex
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
ENV_VAR = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

TINY_TRANSFORMER = (
    "--arch transformer --encoder-layers 1 --decoder-layers 1 "
    "--encoder-embed-dim 16 --encoder-ffn-embed-dim 32 --encoder-attention-heads 2 "
    "--decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2"
).split()


def run_fairseq(tool, *args, check=True):
    """Run ``python -m fairseq_cli.<tool>`` with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD unset."""
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention on 2 cores
    result = subprocess.run(
        [sys.executable, "-m", f"fairseq_cli.{tool}", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fairseq_cli.{tool} failed:\n{result.stderr[-4000:]}")
    return result


def write_reversal_corpus(folder, seed=0):
    """Random sentences over 20 words; the target is the source reversed."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(20)]
    for split, lines in (("train", 200), ("valid", 16), ("test", 12)):
        with open(folder / f"{split}.src", "w") as src, open(folder / f"{split}.tgt", "w") as tgt:
            for _ in range(lines):
                sentence = [rng.choice(words) for _ in range(rng.randint(3, 8))]
                src.write(" ".join(sentence) + "\n")
                tgt.write(" ".join(reversed(sentence)) + "\n")


class CreatesMarker:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, user_dir):
    """A data-bin and a checkpoint from stock fairseq-train, plus a malicious copy of it."""
    root = tmp_path_factory.mktemp("safe_load")
    write_reversal_corpus(root)
    data = root / "data-bin"
    run_fairseq(
        "preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", root / "train", "--validpref", root / "valid", "--testpref", root / "test",
        "--destdir", data, "--joined-dictionary", "--workers", "1",
    )
    save_dir = root / "checkpoints"
    run_fairseq(
        "train", data, "--cpu", *TINY_TRANSFORMER, "--optimizer", "adam", "--lr", "0.005",
        "--max-tokens", "1000", "--max-update", "3", "--save-dir", save_dir,
        "--num-workers", "0", "--no-epoch-checkpoints", "--log-format", "json",
        "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 10}',
        "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
    )
    good = save_dir / "checkpoint_last.pt"
    marker = root / "payload-ran"

    from powernorm_plugin.checkpoint.safe_load import safe_load

    state = safe_load(good)  # our own, just-written file
    state["extra_state"]["payload"] = CreatesMarker(marker)
    evil = root / "malicious.pt"
    torch.save(state, evil)
    evil_legacy = root / "malicious_legacy_format.pt"
    torch.save(state, evil_legacy, _use_new_zipfile_serialization=False)
    return {"data": data, "good": good, "evil": evil, "evil_legacy": evil_legacy,
            "marker": marker, "user_dir": user_dir, "root": root}


def refusal(path):
    """The start of the refusal message for a checkpoint carrying ``os.system``."""
    return (
        rf"refusing to load {re.escape(str(path))}: it holds pickled "
        r"object '(posix|os|nt)\.system', which is not in the allowlist"
    )


@pytest.mark.slow
def test_plugin_import_makes_plain_torch_load_work_without_env_var(trained):
    # Baseline: stock torch.load (weights_only by default) refuses fairseq's checkpoint;
    # after importing the plugin the same call loads it, and the escape-hatch variable
    # is still unset.
    probe = (
        "import os, pickle, sys, torch\n"
        "try:\n    torch.load(sys.argv[1])\nexcept pickle.UnpicklingError as e:\n"
        "    print('BEFORE: refused', e)\n"
        "import powernorm_plugin\n"
        "state = torch.load(sys.argv[1])\n"
        "print('AFTER: loaded', sorted(state))\n"
        f"print('ENV:', os.environ.get('{ENV_VAR}'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != ENV_VAR}
    result = subprocess.run([sys.executable, "-c", probe, str(trained["good"])],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BEFORE: refused" in result.stdout and "argparse.Namespace" in result.stdout
    assert "AFTER: loaded ['args', 'cfg', 'criterion', 'extra_state'" in result.stdout
    assert "ENV: None" in result.stdout


@pytest.mark.slow
def test_checkpoint_holds_numpy_arrays_and_loads_from_python(trained):
    import numpy
    from fairseq import checkpoint_utils

    import powernorm_plugin  # noqa: F401  (installs safe loading)

    state = checkpoint_utils.load_checkpoint_to_cpu(str(trained["good"]))
    meters = state["extra_state"]["metrics"]["valid"]
    assert any(
        isinstance(meter_state.get("sum"), numpy.ndarray) for *_, meter_state in meters
    ), "the --eval-bleu checkpoint should carry numpy arrays; the numpy allowlist is untested"

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(trained["good"])])
    assert cfg.model.encoder_embed_dim == 16
    reloaded = models[0].state_dict()
    for key, value in state["model"].items():
        assert torch.equal(reloaded[key], value), key


@pytest.mark.slow
def test_generate_loads_the_checkpoint_without_env_var(trained):
    result = run_fairseq(
        "generate", trained["data"], "--path", trained["good"], "--user-dir", trained["user_dir"],
        "--cpu", "--beam", "2", "--batch-size", "8", "--gen-subset", "test",
        # fairseq main drops a last batch smaller than this multiple (default 8).
        "--required-batch-size-multiple", "1",
    )
    hypotheses = [line for line in result.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 12
    assert "Generate test with beam=2" in result.stdout


@pytest.mark.slow
def test_generate_refuses_malicious_checkpoint(trained):
    result = run_fairseq(
        "generate", trained["data"], "--path", trained["evil"], "--user-dir", trained["user_dir"],
        "--cpu", "--beam", "2", "--batch-size", "8", "--gen-subset", "test", check=False,
    )
    assert result.returncode != 0
    expected = "UnsafeCheckpointError: " + refusal(trained["evil"])
    assert re.search(expected, result.stderr), result.stderr[-3000:]
    assert not trained["marker"].exists()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["evil", "evil_legacy"])
def test_python_loaders_refuse_malicious_checkpoint(trained, which, monkeypatch):
    from fairseq import checkpoint_utils

    from powernorm_plugin.checkpoint import UnsafeCheckpointError, safe_load

    path = str(trained[which])
    # Even a user who set the escape hatch gets the refusal: the file is checked first.
    monkeypatch.setenv(ENV_VAR, "1")
    for load in (
        lambda: checkpoint_utils.load_model_ensemble_and_task([path]),
        lambda: checkpoint_utils.load_checkpoint_to_cpu(path),
        lambda: safe_load(path),
    ):
        with pytest.raises(UnsafeCheckpointError, match=refusal(path)):
            load()
    assert not trained["marker"].exists()


@pytest.mark.slow
def test_restore_file_resumes_and_refuses_malicious(trained):
    common = [
        trained["data"], "--user-dir", trained["user_dir"], "--cpu", *TINY_TRANSFORMER,
        "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1000",
        "--num-workers", "0", "--no-epoch-checkpoints", "--disable-validation",
    ]
    refused = run_fairseq(
        "train", *common, "--restore-file", trained["evil"], "--max-update", "4",
        "--save-dir", trained["root"] / "from_evil", check=False,
    )
    assert refused.returncode != 0
    expected = "UnsafeCheckpointError: " + refusal(trained["evil"])
    assert re.search(expected, refused.stderr), refused.stderr[-3000:]
    assert not trained["marker"].exists()

    resumed = run_fairseq(
        "train", *common, "--restore-file", trained["good"], "--max-update", "4",
        "--save-dir", trained["root"] / "resumed",
    )
    log = resumed.stdout + resumed.stderr
    loaded = r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 3 updates\)"
    assert re.search(loaded, log), log[-3000:]
    from powernorm_plugin.checkpoint import safe_load

    state = safe_load(trained["root"] / "resumed" / "checkpoint_last.pt")
    assert state["optimizer_history"][-1]["num_updates"] == 4


def test_plugin_source_never_sets_the_no_weights_only_env_var():
    writes = re.compile(
        rf"(environ\s*\[\s*['\"]{ENV_VAR}['\"]\s*\]\s*=|setdefault\(\s*['\"]{ENV_VAR}|"
        rf"putenv\(\s*['\"]{ENV_VAR}|environ\.update\([^)]*{ENV_VAR})"
    )
    sources = list((REPO / "powernorm_plugin").rglob("*.py"))
    assert sources
    offenders = [str(path) for path in sources if writes.search(path.read_text(encoding="utf-8"))]
    assert offenders == []


def test_broadcast_allowlist_is_for_the_call_only_and_keeps_what_was_there():
    # fairseq's broadcast of a loaded checkpoint between data-parallel ranks unpickles
    # omegaconf types; allowing them for the call must not take away globals that the
    # process (a user, omegaconf's own users) had allowlisted before
    import collections
    import io
    import typing

    from omegaconf import DictConfig, OmegaConf

    import powernorm_plugin  # noqa: F401
    from fairseq.distributed import utils as distributed_utils
    from powernorm_plugin.checkpoint.safe_load import _with_broadcast_globals

    saved = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals([DictConfig, typing.Any])
        before = {repr(entry) for entry in torch.serialization.get_safe_globals()}
        state = {"cfg": OmegaConf.create({"lr": [0.1], "arch": "x"}),
                 "meters": collections.defaultdict(int)}
        buffer = io.BytesIO()
        torch.save(state, buffer)

        def unpickle(*args):  # what a receiving rank does with the bytes
            return torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu")

        assert getattr(distributed_utils._broadcast_object_slow, "_powernorm_safe_load", False)
        loaded = _with_broadcast_globals(unpickle)()  # what install() wraps fairseq's with
        assert loaded["cfg"].lr == [0.1]
        assert {repr(entry) for entry in torch.serialization.get_safe_globals()} == before
        with pytest.raises(Exception, match="Unsupported global"):  # outside the call
            unpickle()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_a_checkpoint_cut_anywhere_is_an_unreadable_checkpoint(tmp_path):
    # torch's zip reader raises RuntimeError or, where the cut leaves a central directory
    # that points past the end (most lengths), OSError EINVAL
    from powernorm_plugin.checkpoint.safe_load import UnreadableCheckpointError, safe_load

    path = tmp_path / "full.pt"
    torch.save({"model": {f"w{i}": torch.randn(100, 100) for i in range(2)}}, path)
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    for length in range(500, len(data), 2500):
        cut.write_bytes(data[:length])
        with pytest.raises(UnreadableCheckpointError, match="as a torch checkpoint"):
            safe_load(cut)
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "missing.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_errors_that_are_not_about_the_file_stay_as_they_are(tmp_path):
    # only a truncated or foreign file becomes UnreadableCheckpointError
    from powernorm_plugin.checkpoint.safe_load import UnreadableCheckpointError, safe_load

    for zipped in (True, False):
        path = tmp_path / f"ok{zipped}.pt"
        torch.save({"model": {"w": torch.ones(2)}}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(RuntimeError, match="CUDA device"):
            safe_load(path, map_location="cuda")
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(UnreadableCheckpointError, match="as a torch checkpoint"):
            safe_load(path)
