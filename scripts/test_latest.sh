#!/usr/bin/env bash
# Second test lane: the newest megatron-core (0.19.x) on Python 3.12.
#
# megatron-core >= 0.17 requires Python >= 3.12, and PyPI has torch for 3.12 only as the CUDA
# build (several GB with its nvidia-* wheels); the suite still runs on CPU with it. The venv is
# kept between runs, so only the first run pays for the download.
#
# Usage: scripts/test_latest.sh [pytest args...]
# Environment: PYTHON312 (interpreter, default: pyenv's 3.12 or python3.12 on PATH),
#              MCORE_SPEC (default "megatron-core==0.19.*"), VENV (default .venv-latest).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-latest}"
MCORE_SPEC="${MCORE_SPEC:-megatron-core==0.19.*}"

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        echo "$PYTHON312"
        return
    fi
    local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
    local candidate
    for candidate in "$pyenv_root"/versions/3.12*/bin/python3.12; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    if command -v python3.12 >/dev/null 2>&1; then
        command -v python3.12
        return
    fi
    echo "test_latest.sh: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 2
}

if [[ ! -f "$VENV/.installed" ]]; then
    PYTHON="$(find_python312)"
    "$PYTHON" -m venv "$VENV"
    # torch first, unpinned: the local CPU wheel is built for 3.11 only, so 3.12 gets PyPI's
    # CUDA build; megatron-core would otherwise pick its own torch pin.
    "$VENV/bin/python" -m pip install -q torch
    "$VENV/bin/python" -m pip install -q "$MCORE_SPEC" pytest numpy packaging
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    touch "$VENV/.installed"
fi

"$VENV/bin/python" -c "import megatron.core, torch; \
print('megatron-core', megatron.core.__version__, '| torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest tests -q "$@"
