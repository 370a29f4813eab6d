#!/usr/bin/env bash
# The test suite on every megatron-core version the package supports, with a table at the end.
#
# Lanes (MATRIX_VERSIONS picks a subset, e.g. MATRIX_VERSIONS=0.19.2):
#   0.16.1  Python 3.11: `make test` itself (.venv, torch CPU wheel).
#   0.17.1, 0.18.2, 0.19.2  Python 3.12 (megatron-core >= 0.17 requires it): one venv,
#           $VENV312 (default .venv-312), megatron-core swapped in turn with pip, each with a
#           Megatron-Bridge release where one supports it (installed --no-deps: its full
#           dependency list pulls Transformer Engine, flashinfer, wandb...; the tests import
#           Bridge on CPU with a Transformer Engine stub, tests/support/transformer_engine_stub.py):
#             0.17.1 alone (Bridge 0.5+ needs megatron-core >= 0.18),
#             0.18.2 + Bridge 0.5.1 + verl 0.9.1 + mbridge 0.15.1 (verl 0.9's own pins:
#             core_v0.18 and Bridge 0.5.x), 0.19.2 + Bridge 0.6.2 (the newest).
# PyPI has torch for 3.12 only as the CUDA build (several GB with its nvidia-* wheels); the
# suite runs on CPU with it. The venv is kept between runs: only the first pays the download.
#
# Usage: scripts/test_matrix.sh [pytest args...]
# Environment: MATRIX_VERSIONS, VENV312, PYTHON312 (default: pyenv's 3.12, else python3.12).
# Exit status: non-zero when a lane fails or errors; skips are expected (see the reasons).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV312="${VENV312:-.venv-312}"
MATRIX_VERSIONS="${MATRIX_VERSIONS:-0.16.1 0.17.1 0.18.2 0.19.2}"
RESULTS="${MATRIX_RESULTS:-results/matrix}"
TORCH312_VERSION="2.14.1"

# Pure-Python dependencies Bridge 0.5.1 and 0.6.2 import, at versions both accept
# (transformers: 0.5.1 wants >=5.8.1,<5.9, 0.6.2 >=5.8,<=5.12.1, verl 0.9.1 <5.11).
BRIDGE_DEPS=(
    "transformers==5.8.1" "omegaconf>=2.3" "hydra-core==1.3.2" einops rich six regex pyyaml tqdm
    requests "nvidia-modelopt==0.44.0"
)
# verl 0.9.1 goes in --no-deps, with what importing its Megatron model code needs (ray: the
# verl package imports verl.protocol, which imports ray); left out: vLLM/SGLang, flash-attn,
# apex, Transformer Engine, which its megatron extra pins for GPUs.
VERL_DEPS=("tensordict==0.10.0" codetiming dill pandas "pyarrow>=19" ray orjson)
MBRIDGE_VERSION="0.15.1"

# Bridge 0.5.x and 0.6.x import megatron.core._rank_utils.safe_get_world_size, which arrived
# in megatron-core 0.18: no Bridge release with apply_overrides_and_finalize runs on 0.17.
bridge_for() {
    case "$1" in
        0.18.*) echo "0.5.1" ;;
        0.19.*) echo "0.6.2" ;;
        *) echo "" ;;
    esac
}

verl_for() {
    case "$1" in
        0.18.*) echo "0.9.1" ;;
        *) echo "" ;;
    esac
}

find_python312() {
    if [[ -n "${PYTHON312:-}" ]]; then
        echo "$PYTHON312"
        return
    fi
    local candidate
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    if command -v python3.12 >/dev/null 2>&1; then
        command -v python3.12
        return
    fi
    echo "test_matrix.sh: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
    exit 2
}

pip312() {
    # pip's resolver lists every Bridge dependency left out on purpose: keep its other lines.
    local log rc=0
    log="$("$VENV312/bin/python" -m pip install -q "$@" 2>&1)" || rc=$?
    grep -v -e "^WARNING: Location" -e "requires .*, which is not installed" \
        -e "but you have .* which is incompatible" -e "dependency resolver does not" \
        <<<"$log" || true
    return "$rc"
}

setup_312() {
    if [[ ! -f "$VENV312/.installed" ]]; then
        rm -rf "$VENV312"
        "$(find_python312)" -m venv "$VENV312"
        # torch first and pinned: megatron-core would otherwise pick its own torch.
        pip312 "torch==$TORCH312_VERSION"
        pip312 pytest numpy packaging "${BRIDGE_DEPS[@]}"
        pip312 --no-deps -e .
        touch "$VENV312/.installed"
    fi
}

# Installs megatron-core $1 with Bridge $2 and verl $3 (empty: uninstalled) in the 3.12 venv.
swap_312() {
    pip312 "megatron-core==$1"
    if [[ -n "$2" ]]; then
        pip312 --no-deps "megatron-bridge==$2"
    else
        "$VENV312/bin/python" -m pip uninstall -q -y megatron-bridge >/dev/null 2>&1 || true
    fi
    if [[ -n "$3" ]]; then
        if [[ ! -f "$VENV312/.verl-deps" ]]; then
            pip312 "${VERL_DEPS[@]}"
            touch "$VENV312/.verl-deps"
        fi
        pip312 --no-deps "verl==$3" "mbridge==$MBRIDGE_VERSION"
    else
        "$VENV312/bin/python" -m pip uninstall -q -y verl mbridge >/dev/null 2>&1 || true
    fi
}

mkdir -p "$RESULTS"
status=0
lanes=()
for version in $MATRIX_VERSIONS; do
    xml="$RESULTS/$version.xml"
    rm -f "$xml"
    echo "=== megatron-core $version"
    if [[ "$version" == 0.16.* ]]; then
        # The README's test command, as CI has always run it.
        PYTEST_ADDOPTS="--junitxml=$xml ${PYTEST_ADDOPTS:-}" make test || status=1
        python="./.venv/bin/python"
        extras="-"
    else
        setup_312
        swap_312 "$version" "$(bridge_for "$version")" "$(verl_for "$version")"
        python="$VENV312/bin/python"
        extras="$("$python" -m pip list 2>/dev/null \
            | awk '$1=="megatron-bridge"||$1=="verl"||$1=="mbridge"{printf "%s%s %s", s, $1, $2; s=", "}')"
        "$python" -m pytest tests -q --junitxml="$xml" "$@" || status=1
    fi
    lanes+=("$version|$python|${extras:--}")
done

# The table: one row per lane, counts from its JUnit XML (a lane that never ran shows as such).
python3 - "$RESULTS" "${lanes[@]}" <<'EOF'
import subprocess
import sys
import xml.etree.ElementTree as ET

results, lanes = sys.argv[1], sys.argv[2:]
print()
print("| megatron-core | Python | torch | also installed | passed | failed | skipped |")
print("|---|---|---|---|--:|--:|--:|")
totals = [0, 0, 0]
for lane in lanes:
    version, python, extras = lane.split("|")
    probe = "import sys, torch; print(sys.version.split()[0], torch.__version__)"
    try:
        py, torch = subprocess.run(
            [python, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        py = torch = "?"
    try:
        suite = ET.parse(f"{results}/{version}.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        passed = tests - failed - skipped
        counts = [passed, failed, skipped]
    except (OSError, ET.ParseError, AttributeError, TypeError):
        counts = None
    if counts is None:
        print(f"| {version} | {py} | {torch} | {extras} | did not run | | |")
        totals[1] += 1
        continue
    totals = [t + c for t, c in zip(totals, counts)]
    print(f"| {version} | {py} | {torch} | {extras} | {counts[0]} | {counts[1]} | {counts[2]} |")
print()
print(f"matrix: {totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
EOF
exit "$status"
