#!/usr/bin/env bash
# Set up and run the test suite: for each Python version given (default: python3), make a
# virtual environment .venv-<version>, install asyncdiag with its test extra (a real,
# non-editable install, as a user gets it), then lint, type-check and run pytest.
#
#   bash scripts/test.sh                 # with python3
#   bash scripts/test.sh 3.10 3.13       # what CI runs (pyenv-installed interpreters)
#   PYTEST_ARGS="-k lifecycle" bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local version="$1" candidate
    if [[ "$version" == python* || "$version" == /* ]]; then
        command -v "$version" && return 0
    fi
    for candidate in "python$version" \
        "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$version"*/bin/python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "no Python $version found (install it, e.g. with pyenv)" >&2
    return 1
}

pip_install() {
    # The machine's pip configuration may list local mirrors that do not exist everywhere;
    # their "is ignored" warnings are noise, real errors still fail the step.
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if [[ "${1:-}" == "--which" ]]; then  # print the interpreter a version resolves to
    find_python "$2"
    exit
fi

versions=("$@")
[[ ${#versions[@]} -eq 0 ]] && versions=(python3)

status=0
for version in "${versions[@]}"; do
    python="$(find_python "$version")"
    label="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    venv=".venv-$label"
    echo "=== Python $label ($python) ==="
    [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
    pip_install --upgrade pip
    # Non-editable: the tests exercise the wheel's files, .pth included.
    pip_install ".[test]"
    pip_install --force-reinstall --no-deps .
    "$venv/bin/ruff" check .
    "$venv/bin/mypy"
    # shellcheck disable=SC2086
    if ! "$venv/bin/python" -m pytest -q ${PYTEST_ARGS:-} tests; then
        status=1
    fi
done
exit $status
