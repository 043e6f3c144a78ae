"""What PN-V costs on the CPU beyond the paper's PowerNorm: two more sweeps over the rows.

PN-V (``mode="vanilla"``) normalizes by the current batch's psi_B and takes the exact gradient
through it, so each direction needs column sums over every row before it can write any row:
the forward reads x twice (the sums, then y) and the backward reads dy and x twice (the sums,
then dx). The paper's and the official modes normalize by the previous step's psi, and each
direction is one sweep. Nothing else differs between the modes' native steps.

This script times, side by side (interleaved rounds, median round, one thread, this process's
CPU time), a LayerNorm step, a native PowerNorm step in the paper's mode and in PN-V, and the
two sweeps PN-V adds on their own: the native kernels' sums-only passes over x (forward) and
over dy and x (backward). Each is given as a multiple of LayerNorm's time:

    python benchmarks/vanilla_sweeps.py --shapes 64x64x512 32x128x1024

Where "PN-V - paper" is about the two sweeps, PN-V's excess over LayerNorm is the memory
traffic its equations need, not overhead of the implementation.
"""
import argparse
import statistics
import time

import torch

from norm_speed import keep_freed_memory_mapped, padding_mask, step_fn
from powernorm_plugin.modules import PowerNorm
from powernorm_plugin.modules._util import token_mask
from powernorm_plugin.modules.native_kernels import load_library


def bench(shape, rounds, iters):
    T, B, C = shape
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(T, B, C, generator=gen) + 0.3).requires_grad_(True)
    dy = torch.randn(T, B, C, generator=gen)
    pad = padding_mask(T, B, "cpu")
    rows_x, rows_dy = x.detach().reshape(T * B, C), dy.reshape(T * B, C)
    weights = token_mask(pad, T, B, x.device, torch.float32, "PowerNorm").weights  # 1 on tokens
    ops = load_library()
    steps = {
        "LayerNorm step": step_fn(torch.nn.LayerNorm(C), x, dy, pad, False),
        "PowerNorm[paper] step": step_fn(PowerNorm(C, backend="native").train(), x, dy, pad, True),
        "PowerNorm[vanilla] step": step_fn(PowerNorm(C, mode="vanilla", backend="native").train(),
                                           x, dy, pad, True),
        "forward sums sweep (over x)": lambda: ops.forward(
            rows_x, weights, 0, 1e-5, None, None, True, False),
        "backward sums sweep (over dy, x)": lambda: ops.backward(
            rows_dy, rows_x, None, weights, 0, None, None, False, True, False),
    }
    times = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.process_time()
            for _ in range(iters):
                step()
            times[name].append((time.process_time() - t0) / iters * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["64x64x512", "32x128x1024"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    keep_freed_memory_mapped()
    torch.set_num_threads(1)
    for s in args.shapes:
        shape = tuple(int(v) for v in s.split("x"))
        med = bench(shape, args.rounds, args.iters)
        ln = med["LayerNorm step"]
        print(f"\nCPU, 1 thread, (T, B, C) = {shape}, median of {args.rounds} rounds")
        print("| what | median ms | x LayerNorm |")
        print("|---|---:|---:|")
        for name, ms in med.items():
            print(f"| {name} | {ms:.2f} | {ms / ln:.2f} |")
        excess = med["PowerNorm[vanilla] step"] - med["PowerNorm[paper] step"]
        sweeps = med["forward sums sweep (over x)"] + med["backward sums sweep (over dy, x)"]
        print(f"| PN-V - paper | {excess:.2f} | {excess / ln:.2f} |")
        print(f"| the two sweeps | {sweeps:.2f} | {sweeps / ln:.2f} |")


if __name__ == "__main__":
    main()
