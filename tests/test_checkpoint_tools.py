"""Checkpoint averaging: the math on hand-built state dicts, input selection, and the
``python -m powernorm_plugin.cli.average_checkpoints`` command on real fairseq checkpoints."""
import os
import pathlib
import random
import re
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from powernorm_plugin.checkpoint.average import (
    StateDictMismatchError,
    average_state_dicts,
)
from powernorm_plugin.cli import average_checkpoints as cli

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY_TRANSFORMER = (
    "--arch transformer --encoder-layers 1 --decoder-layers 1 "
    "--encoder-embed-dim 16 --encoder-ffn-embed-dim 32 --encoder-attention-heads 2 "
    "--decoder-embed-dim 16 --decoder-ffn-embed-dim 32 --decoder-attention-heads 2"
).split()


def powernorm_like_state(scale, steps):
    """A state dict shaped like a model with one PowerNorm layer, values scaled by ``scale``."""
    return OrderedDict(
        [
            ("fc.weight", torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * scale),
            ("fc.bias", torch.tensor([0.5, -0.5], dtype=torch.float16) * scale),
            ("norm.running_phi", torch.tensor([1.0, 4.0]) * scale),
            ("norm.running_nu", torch.tensor([0.1, -0.2]) * scale),
            ("norm.num_steps", torch.tensor(steps, dtype=torch.int64)),
            ("mask", torch.tensor([True, scale > 1])),
        ]
    )


def test_average_means_floats_and_takes_integers_from_last():
    states = [powernorm_like_state(1.0, 100), powernorm_like_state(2.0, 200),
              powernorm_like_state(6.0, 300)]
    average = average_state_dicts(states)

    assert list(average) == list(states[0])
    assert torch.equal(average["fc.weight"], torch.tensor([[3.0, 6.0], [9.0, 12.0]]))
    assert average["fc.bias"].dtype == torch.float16
    assert torch.equal(average["fc.bias"], torch.tensor([1.5, -1.5], dtype=torch.float16))
    # psi^2 is a quadratic mean: its average is the arithmetic mean of psi^2, not of psi.
    assert torch.equal(average["norm.running_phi"], torch.tensor([3.0, 12.0]))
    assert torch.allclose(average["norm.running_nu"], torch.tensor([0.3, -0.6]))
    assert average["norm.num_steps"].dtype == torch.int64
    assert average["norm.num_steps"].item() == 300
    assert torch.equal(average["mask"], torch.tensor([True, True]))
    for key, value in average.items():
        assert value.dtype == states[0][key].dtype, key


def test_average_accumulates_in_float64():
    # 2049 is not representable in float16 (spacing 2 above 2048): a float16 running sum
    # of 2048 + 1 + 1 would stay at 2048; the float64 sum gives 2050 / 3.
    states = [{"w": torch.tensor([value], dtype=torch.float16)} for value in (2048.0, 1.0, 1.0)]
    average = average_state_dicts(states)
    assert average["w"].dtype == torch.float16
    assert average["w"].item() == torch.tensor(2050.0 / 3, dtype=torch.float16).item()


def test_average_does_not_alias_the_inputs():
    states = [powernorm_like_state(1.0, 1)]
    average = average_state_dicts(states)
    average["norm.num_steps"] += 5
    average["fc.weight"] += 1
    assert states[0]["norm.num_steps"].item() == 1
    assert states[0]["fc.weight"][0, 0].item() == 1.0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("norm.running_nu"),
         r"b\.pt: key 'norm\.running_nu' is missing; it is in a\.pt"),
        (lambda s: s.__setitem__("extra.bias", torch.zeros(2)),
         r"b\.pt: key 'extra\.bias' is not in a\.pt"),
        (lambda s: s.__setitem__("fc.weight", torch.zeros(2, 3)),
         r"b\.pt: key 'fc\.weight' has shape \[2, 3\], but \[2, 2\] in a\.pt"),
        (lambda s: s.__setitem__("fc.bias", torch.zeros(2)),
         r"b\.pt: key 'fc\.bias' has dtype torch\.float32, but torch\.float16 in a\.pt"),
    ],
)
def test_average_names_first_mismatching_key_and_file(change, message):
    other = powernorm_like_state(2.0, 2)
    change(other)
    with pytest.raises(StateDictMismatchError, match=message):
        average_state_dicts([powernorm_like_state(1.0, 1), other], names=["a.pt", "b.pt"])


def touch(folder, *names):
    for name in names:
        (folder / name).write_bytes(b"")


def test_directory_selection_takes_last_n_by_number(tmp_path):
    touch(tmp_path, "checkpoint2.pt", "checkpoint9.pt", "checkpoint10.pt", "checkpoint11.pt",
          "checkpoint_best.pt", "checkpoint_last.pt", "checkpoint_3_1500.pt",
          "checkpoint_2_900.pt", "checkpoint_3_1000.pt", "checkpoint.best_loss_4.1.pt")
    assert cli.last_checkpoints(str(tmp_path), 3, "epoch") == [
        str(tmp_path / name) for name in ("checkpoint9.pt", "checkpoint10.pt", "checkpoint11.pt")]
    assert cli.last_checkpoints(str(tmp_path), 2, "update") == [
        str(tmp_path / name) for name in ("checkpoint_3_1000.pt", "checkpoint_3_1500.pt")]
    assert cli.last_checkpoints(str(tmp_path), 2, "epoch", upper_bound=10) == [
        str(tmp_path / name) for name in ("checkpoint9.pt", "checkpoint10.pt")]
    with pytest.raises(cli.CheckpointSelectionError,
                       match=r"holds 3 update checkpoints .*--num-update-checkpoints asks for 4"):
        cli.last_checkpoints(str(tmp_path), 4, "update")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--inputs", "{dir}"], r"--inputs .* is a directory: add --num-epoch-checkpoints"),
        (["--inputs", "{dir}/checkpoint1.pt", "--num-epoch-checkpoints", "1"],
         r"--num-epoch-checkpoints needs --inputs to be one directory"),
        (["--inputs", "{dir}/missing.pt"], r"--inputs .*missing\.pt: no such file"),
        (["--inputs", "{dir}/checkpoint1.pt", "{dir}/checkpoint1.pt"], r"listed twice"),
        (["--inputs", "{dir}", "--num-epoch-checkpoints", "0"], r"must be >= 1"),
        (["--inputs", "{dir}/checkpoint1.pt", "--checkpoint-upper-bound", "3"],
         r"--checkpoint-upper-bound needs"),
    ],
)
def test_cli_rejects_bad_selection_naming_the_flag(tmp_path, capsys, arguments, message):
    touch(tmp_path, "checkpoint1.pt")
    argv = [a.format(dir=tmp_path) for a in arguments] + ["--output", str(tmp_path / "avg.pt")]
    assert cli.main(argv) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "avg.pt").exists()


def test_cli_rejects_missing_output_folder(tmp_path, capsys):
    touch(tmp_path, "checkpoint1.pt")
    with pytest.raises(SystemExit):
        cli.main(["--inputs", str(tmp_path / "checkpoint1.pt"),
                  "--output", str(tmp_path / "nowhere" / "avg.pt")])
    assert "--output" in capsys.readouterr().err


def test_cli_never_overwrites_an_input_and_names_unreadable_files(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint1.pt")
    (tmp_path / "link.pt").symlink_to(tmp_path / "checkpoint1.pt")
    before = (tmp_path / "checkpoint1.pt").read_bytes()
    with pytest.raises(SystemExit):
        cli.main(["--inputs", str(tmp_path / "checkpoint1.pt"),
                  "--output", str(tmp_path / "link.pt")])
    assert "is the input" in capsys.readouterr().err
    assert (tmp_path / "checkpoint1.pt").read_bytes() == before
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    (tmp_path / "cut.pt").write_bytes(before[: len(before) // 2])
    for name in ("text.pt", "cut.pt"):
        assert cli.main(["--inputs", str(tmp_path / name),
                         "--output", str(tmp_path / "avg.pt")]) == 1
        # (text may also read as a pickle opcode that weights-only loading refuses)
        assert re.search(f"(cannot read|refusing to load) .*{name}", capsys.readouterr().err)
    assert not (tmp_path / "avg.pt").exists()


def run_python_module(module, *args, check=True):
    env = {key: value for key, value in os.environ.items()
           if key != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only add contention on 2 cores
    result = subprocess.run([sys.executable, "-m", module, *map(str, args)],
                            capture_output=True, text=True, env=env, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed:\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def epoch_checkpoints(tmp_path_factory):
    """Three epoch checkpoints of a tiny transformer trained by stock fairseq-train."""
    root = tmp_path_factory.mktemp("averaging")
    rng = random.Random(1)
    words = [f"w{i}" for i in range(20)]
    for split, lines in (("train", 200), ("test", 12)):
        with open(root / f"{split}.src", "w") as src, open(root / f"{split}.tgt", "w") as tgt:
            for _ in range(lines):
                sentence = [rng.choice(words) for _ in range(rng.randint(3, 8))]
                src.write(" ".join(sentence) + "\n")
                tgt.write(" ".join(reversed(sentence)) + "\n")
    data = root / "data-bin"
    run_python_module(
        "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", root / "train", "--testpref", root / "test", "--destdir", data,
        "--joined-dictionary", "--workers", "1",
    )
    save_dir = root / "checkpoints"
    run_python_module(
        "fairseq_cli.train", data, "--cpu", *TINY_TRANSFORMER, "--optimizer", "adam",
        "--lr", "0.005", "--max-tokens", "1000", "--max-epoch", "3", "--save-dir", save_dir,
        "--num-workers", "0", "--disable-validation", "--log-format", "json",
    )
    return {"root": root, "data": data, "save_dir": save_dir}


@pytest.mark.slow
def test_cli_averages_last_epochs_and_generate_loads_it(epoch_checkpoints, user_dir):
    from powernorm_plugin.checkpoint import safe_load

    save_dir, output = epoch_checkpoints["save_dir"], epoch_checkpoints["root"] / "averaged.pt"
    run_python_module(
        "powernorm_plugin.cli.average_checkpoints", "--inputs", save_dir,
        "--num-epoch-checkpoints", "3", "--output", output,
    )
    inputs = [safe_load(save_dir / f"checkpoint{epoch}.pt") for epoch in (1, 2, 3)]
    averaged = safe_load(output)

    assert averaged["last_optimizer_state"] is None
    assert averaged["cfg"] == inputs[-1]["cfg"]
    assert averaged["optimizer_history"] == inputs[-1]["optimizer_history"]
    weight = "encoder.layers.0.fc1.weight"
    assert not torch.equal(inputs[0]["model"][weight], inputs[-1]["model"][weight])
    for key, value in averaged["model"].items():
        expected = sum(state["model"][key].double() for state in inputs) / 3
        assert value.dtype == inputs[-1]["model"][key].dtype, key
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    assert os.stat(output).st_mode & 0o777 == os.stat(save_dir / "checkpoint3.pt").st_mode & 0o777
    leftovers = [name for name in os.listdir(epoch_checkpoints["root"]) if name.endswith(".tmp")]
    assert leftovers == []

    result = run_python_module(
        "fairseq_cli.generate", epoch_checkpoints["data"], "--path", output,
        "--user-dir", user_dir, "--cpu", "--beam", "2", "--batch-size", "16",
        "--required-batch-size-multiple", "1", "--gen-subset", "test",
    )
    assert len([line for line in result.stdout.splitlines() if line.startswith("H-")]) == 12
    assert "Generate test with beam=2" in result.stdout


@pytest.mark.slow
def test_cli_names_key_and_file_of_mismatching_checkpoint(epoch_checkpoints, capsys):
    from powernorm_plugin.checkpoint import safe_load

    save_dir = epoch_checkpoints["save_dir"]
    state = safe_load(save_dir / "checkpoint2.pt")
    del state["model"]["decoder.layers.0.fc2.bias"]
    other = epoch_checkpoints["root"] / "pruned.pt"
    torch.save(state, other)
    output = epoch_checkpoints["root"] / "should-not-exist.pt"
    assert cli.main(["--inputs", str(save_dir / "checkpoint1.pt"), str(other),
                     "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert f"error: {other}: key 'decoder.layers.0.fc2.bias' is missing" in err
    assert not output.exists()
