#!/usr/bin/env bash
# Train one normalization variant on WikiText-103 language modelling (Table 2).
#
# Defaults: powernorm_transformer_lm_wiki103 (adaptive input/softmax), fairseq's published settings for it:
#   NAG lr 1.0, cosine schedule, 286k updates, 73728 tokens per update (8 GPUs x 3072 x 3).
# --norm ln|bn|pnv|pn picks the norm (PowerNorm variants sit where the paper puts them); --nap
# switches to Normalize-and-Project. Re-running resumes an interrupted training from its last
# checkpoint; a finished one (checkpoints/VARIANT/training_done.json) is not run again.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wikitext103/train.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--gpus N] [--max-tokens N]
       [--update-freq N] [--dry-run] [-- FAIRSEQ_TRAIN_ARGS...]"
recipe_main train wikitext103 "$USAGE" "$@"
