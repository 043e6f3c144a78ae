# Shared by the recipe scripts (sourced, not run): runs one command of
# `python -m powernorm_plugin.recipes` for the calling script's recipe.
#
# Environment: PYTHON (default: python3) is the interpreter with fairseq and the plugin.
# The repository root is put on PYTHONPATH, so the scripts also work from a checkout
# that was not pip-installed (fairseq, sacrebleu, sentencepiece and sacremoses must be).

RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$RECIPES_DIR/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() {
    echo "error: $*" >&2
    exit 1
}

# recipe_main COMMAND RECIPE USAGE_TEXT ARGS...
# Prints USAGE_TEXT (and the full option list) for -h/--help; adds --workdir runs/RECIPE
# when no --workdir is given; then runs the command.
recipe_main() {
    local command="$1" recipe="$2" usage="$3"
    shift 3
    local arg has_workdir=0
    for arg in "$@"; do
        case "$arg" in
            --) break ;;
            -h|--help)
                printf '%s\n\n' "$usage"
                echo "All options (python -m powernorm_plugin.recipes $command --help):"
                exec "$PYTHON" -m powernorm_plugin.recipes "$command" --help ;;
            --workdir|--workdir=*) has_workdir=1 ;;
        esac
    done
    command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
    local workdir=()
    if [ "$has_workdir" -eq 0 ]; then
        workdir=(--workdir "runs/$recipe")
    fi
    exec "$PYTHON" -m powernorm_plugin.recipes "$command" "$recipe" ${workdir[@]+"${workdir[@]}"} "$@"
}
