#!/usr/bin/env bash
# Evaluate one trained variant on IWSLT14 German-English (Table 1, small transformer):
# averages the last 5 epoch checkpoints, beam 5, lenpen 1.0; tokenized BLEU (paper) and
#   detokenized sacreBLEU (lowercased, as the model is).
# Writes WORKDIR/results/VARIANT.json and VARIANT.md.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/iwslt14_de_en/evaluate.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--num-checkpoints N]
       [--gpus N] [-- FAIRSEQ_ARGS...]"
recipe_main evaluate iwslt14_de_en "$USAGE" "$@"
