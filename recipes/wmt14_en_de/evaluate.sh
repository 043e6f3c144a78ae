#!/usr/bin/env bash
# Evaluate one trained variant on WMT14 English-German (Table 1, big transformer):
# averages the last 10 epoch checkpoints, beam 4, lenpen 0.6; compound-split tokenized BLEU
#   (paper) and detokenized sacreBLEU.
# Writes WORKDIR/results/VARIANT.json and VARIANT.md.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wmt14_en_de/evaluate.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--num-checkpoints N]
       [--gpus N] [-- FAIRSEQ_ARGS...]"
recipe_main evaluate wmt14_en_de "$USAGE" "$@"
