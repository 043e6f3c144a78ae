#!/usr/bin/env bash
# Prepare WMT14 English-German (Table 1, big transformer).
#
# Archives: training-parallel-europarl-v7.tgz, training-parallel-commoncrawl.tgz, training-parallel-nc-v9.tgz,
#   dev.tgz, test-full.tgz (statmt.org).
# Downloads them into WORKDIR/downloads, or takes them from --archives DIR (no download);
# verifies each (complete archive, expected members, optional --sha256 NAME=HEX); then
# Moses punctuation normalization and tokenization (aggressive hyphen splitting), length filter
#   (1-250, ratio 1.5), newstest2013 valid, newstest2014 (full) test, joint BPE of 32000;
# binarizes with fairseq-preprocess into WORKDIR/data-bin. Finished stages are skipped on a re-run.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wmt14_en_de/prepare.sh [--workdir DIR] [--archives DIR] [--workers N] [--sha256 NAME=HEX]..."
recipe_main prepare wmt14_en_de "$USAGE" "$@"
