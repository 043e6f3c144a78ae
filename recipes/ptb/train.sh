#!/usr/bin/env bash
# Train one normalization variant on Penn Treebank language modelling (Table 2).
#
# Defaults: powernorm_transformer_lm_ptb (4 layers, 512/2048), Adam lr 5e-4, 512-token samples (our
#   settings: the paper's Tensorized Transformer is not in fairseq).
# --norm ln|bn|pnv|pn picks the norm (PowerNorm variants sit where the paper puts them); --nap
# switches to Normalize-and-Project. Re-running resumes an interrupted training from its last
# checkpoint; a finished one (checkpoints/VARIANT/training_done.json) is not run again.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/ptb/train.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--gpus N] [--max-tokens N]
       [--update-freq N] [--dry-run] [-- FAIRSEQ_TRAIN_ARGS...]"
recipe_main train ptb "$USAGE" "$@"
