#!/usr/bin/env bash
# Train one normalization variant on WMT14 English-German (Table 1, big transformer).
#
# Defaults: transformer_wmt_en_de_big_t2t, pre-norm, Adam lr 0.003, 8000 warm-up updates, 131072 tokens per
#   update (the authors' 32 GPUs x 4096; --gpus/--max-tokens/--update-freq scale it).
# --norm ln|bn|pnv|pn picks the norm (PowerNorm variants sit where the paper puts them); --nap
# switches to Normalize-and-Project. Re-running resumes an interrupted training from its last
# checkpoint; a finished one (checkpoints/VARIANT/training_done.json) is not run again.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wmt14_en_de/train.sh --norm ln|bn|pnv|pn [--nap] [--workdir DIR] [--gpus N] [--max-tokens N]
       [--update-freq N] [--dry-run] [-- FAIRSEQ_TRAIN_ARGS...]"
recipe_main train wmt14_en_de "$USAGE" "$@"
