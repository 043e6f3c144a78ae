#!/usr/bin/env bash
# Prepare IWSLT14 German-English (Table 1, small transformer).
#
# Archives: de-en.tgz (dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz).
# Downloads them into WORKDIR/downloads, or takes them from --archives DIR (no download);
# verifies each (complete archive, expected members, optional --sha256 NAME=HEX); then
# Moses tokenization, lowercasing, length filter (1-175, ratio 1.5), every 23rd training pair
#   held out for validation, test = dev2010+dev2012+tst2010-2012, joint BPE of 10000 (sentencepiece);
# binarizes with fairseq-preprocess into WORKDIR/data-bin. Finished stages are skipped on a re-run.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/iwslt14_de_en/prepare.sh [--workdir DIR] [--archives DIR] [--workers N] [--sha256 NAME=HEX]..."
recipe_main prepare iwslt14_de_en "$USAGE" "$@"
