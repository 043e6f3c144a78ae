#!/usr/bin/env bash
# Evaluate one trained variant on Penn Treebank language modelling (Table 2):
# averages the last 5 epoch checkpoints; test perplexity (fairseq-eval-lm, 256-token context).
# Writes WORKDIR/results/VARIANT.json and VARIANT.md.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/ptb/evaluate.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--num-checkpoints N]
       [--gpus N] [-- FAIRSEQ_ARGS...]"
recipe_main evaluate ptb "$USAGE" "$@"
