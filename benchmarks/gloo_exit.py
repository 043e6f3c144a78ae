"""How often a data-parallel run aborts at exit when its gloo process group is left alive.

Each trial starts W gloo ranks with torch.multiprocessing.spawn, runs a few all-reduces and a
barrier, and returns without destroying the process group, as fairseq's ``distributed_main``
does. A rank whose group is torn down during interpreter shutdown sometimes aborts
("terminate called without an active exception", SIGABRT) and the trial then fails
(``ProcessExitedException``). With ``--plugin`` each rank imports ``powernorm_plugin`` after
its group exists, as fairseq's ``main`` does in a spawned worker, so the plugin's exit handler
(``powernorm_plugin/process_group_exit.py``) destroys the group first. Run:

    python benchmarks/gloo_exit.py --ranks 4 --trials 15 --alternate

(``--alternate`` runs the trials with and without ``--plugin`` in turn.)
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rank_main(rank, world_size, store, plugin):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    if plugin:
        sys.path.insert(0, REPO)
        import powernorm_plugin  # noqa: F401  (registers its exit handler)
    t = torch.full((1000,), float(rank))
    for _ in range(20):
        dist.all_reduce(t)
    dist.barrier()


def trial(ranks, plugin):
    """One trial in a fresh process: "aborted" (a rank died by SIGABRT or printed std::terminate's
    message), "ok", or "failed" (anything else: not what this script counts)."""
    argv = [sys.executable, os.path.abspath(__file__), "--one", "--ranks", str(ranks)]
    try:
        run = subprocess.run(argv + (["--plugin"] if plugin else []), capture_output=True,
                             text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "failed"
    if "terminate called" in run.stderr or "signal SIGABRT" in run.stderr:
        return "aborted"
    return "ok" if run.returncode == 0 else "failed"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--plugin", action="store_true", help="ranks import powernorm_plugin")
    p.add_argument("--alternate", action="store_true", help="trials with and without --plugin")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ranks < 2 or args.trials < 1:
        p.error("--ranks must be at least 2 and --trials at least 1")
    if args.one:
        with tempfile.TemporaryDirectory() as folder:  # a file store: no port to race for
            mp.spawn(rank_main, args=(args.ranks, os.path.join(folder, "store"), args.plugin),
                     nprocs=args.ranks)
        return
    variants = [False, True] if args.alternate else [args.plugin]
    outcomes = {v: collections.Counter() for v in variants}
    for _ in range(args.trials):
        for v in variants:
            outcomes[v][trial(args.ranks, v)] += 1
    print(f"load average before the last trial: {os.getloadavg()[0]:.1f}")
    for v in variants:
        name = "with the plugin" if v else "without the plugin"
        failed = outcomes[v]["failed"]
        print(f"{args.ranks} gloo ranks, {name}: {outcomes[v]['aborted']}/{args.trials} trials "
              f"aborted at exit" + (f" ({failed} failed otherwise)" if failed else ""))


if __name__ == "__main__":
    main()
