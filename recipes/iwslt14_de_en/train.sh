#!/usr/bin/env bash
# Train one normalization variant on IWSLT14 German-English (Table 1, small transformer).
#
# Defaults: transformer_iwslt_de_en, pre-norm, Adam lr 0.0015, 8000 warm-up updates, 4096 tokens per
#   update (1 GPU), until the validation loss stalls for 5 epochs.
# --norm ln|bn|pnv|pn picks the norm (PowerNorm variants sit where the paper puts them); --nap
# switches to Normalize-and-Project. Re-running resumes an interrupted training from its last
# checkpoint; a finished one (checkpoints/VARIANT/training_done.json) is not run again.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/iwslt14_de_en/train.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--gpus N] [--max-tokens N]
       [--update-freq N] [--dry-run] [-- FAIRSEQ_TRAIN_ARGS...]"
recipe_main train iwslt14_de_en "$USAGE" "$@"
