#!/usr/bin/env bash
# Prepare Penn Treebank language modelling (Table 2).
#
# Archives: simple-examples.tgz (Mikolov; data/ptb.{train,valid,test}.txt).
# Downloads them into WORKDIR/downloads, or takes them from --archives DIR (no download);
# verifies each (complete archive, expected members, optional --sha256 NAME=HEX); then
# binarizes the 10k-word text as is;
# binarizes with fairseq-preprocess into WORKDIR/data-bin. Finished stages are skipped on a re-run.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/ptb/prepare.sh [--workdir DIR] [--archives DIR] [--workers N] [--sha256 NAME=HEX]..."
recipe_main prepare ptb "$USAGE" "$@"
