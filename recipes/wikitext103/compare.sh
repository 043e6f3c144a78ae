#!/usr/bin/env bash
# Train and evaluate several variants of WikiText-103 language modelling (Table 2) and print the paper-style table
# (ours next to the paper's). Variants with a result file are skipped (--force evaluates them
# again); a finished training is not run again.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wikitext103/compare.sh [--norms ln,bn,pnv,pn] [--nap] [--workdir DIR] [--gpus N]
       [--max-tokens N] [--update-freq N] [--num-checkpoints N] [--eval-args STR] [--force]
       [-- FAIRSEQ_TRAIN_ARGS...]"
recipe_main compare wikitext103 "$USAGE" "$@"
