#!/usr/bin/env bash
# Prepare WikiText-103 language modelling (Table 2).
#
# Archives: wikitext-103-v1.zip (wikitext.smerity.com).
# Downloads them into WORKDIR/downloads, or takes them from --archives DIR (no download);
# verifies each (complete archive, expected members, optional --sha256 NAME=HEX); then
# binarizes wiki.{train,valid,test}.tokens as they are;
# binarizes with fairseq-preprocess into WORKDIR/data-bin. Finished stages are skipped on a re-run.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

USAGE="usage: recipes/wikitext103/prepare.sh [--workdir DIR] [--archives DIR] [--workers N] [--sha256 NAME=HEX]..."
recipe_main prepare wikitext103 "$USAGE" "$@"
