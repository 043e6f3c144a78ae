#!/usr/bin/env bash
# The quickstart: trains a small LayerNorm and a small PowerNorm transformer on a synthetic
# translation task that it generates (nothing is downloaded), reports BLEU for each and draws
# their validation-loss curves. About 3-4 minutes on 2 CPU cores.
#
# Writes WORKDIR/results.md, results.json and valid_loss.png (WORKDIR: runs/quickstart).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../common.sh"

for arg in "$@"; do
    case "$arg" in
        -h|--help)
            echo "usage: recipes/quickstart/run.sh [--workdir DIR] [--train-pairs N] [--test-pairs N]"
            echo "       [--max-update N] [--validate-every N] [--seed N] [--beam N] [--threads N]"
            echo
            exec "$PYTHON" -m powernorm_plugin.recipes.quickstart --help ;;
    esac
done
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
exec "$PYTHON" -m powernorm_plugin.recipes.quickstart "$@"
