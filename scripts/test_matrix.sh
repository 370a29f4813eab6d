#!/usr/bin/env bash
# The test suite on every megatron-core version the package supports, with a table at the end.
# CI runs this (.ci/run -> make test-matrix), every lane, from a clean checkout.
#
# Lanes, in this order (MATRIX_VERSIONS picks a subset, e.g. MATRIX_VERSIONS=0.19.2):
#   0.16.1  Python 3.11: `make test` itself, the README's test command (.venv, torch CPU wheel).
#   0.17.1, 0.18.2, 0.19.2  Python 3.12 (megatron-core >= 0.17 requires it): one venv,
#           $VENV312 (default .venv-312), built once with torch and the shared dependencies,
#           then megatron-core swapped in turn with pip, each with a Megatron-Bridge release
#           where one supports it (installed --no-deps: its full dependency list pulls
#           Transformer Engine, flashinfer, wandb...; the tests import Bridge on CPU with a
#           Transformer Engine stub, tests/support/transformer_engine_stub.py):
#             0.17.1 alone (Bridge 0.5+ needs megatron-core >= 0.18),
#             0.18.2 + Bridge 0.5.1 + verl 0.9.1 + mbridge 0.15.1 (verl 0.9's own pins:
#             core_v0.18 and Bridge 0.5.x), 0.19.2 + Bridge 0.6.2 (the newest).
# PyPI has torch for 3.12 only as the CUDA build (several GB with its nvidia-* wheels); the
# suite runs on CPU with it. It is installed once per venv, never per lane; the venv is kept
# between runs (rebuilt when what it is built from changes), so only the first run pays.
#
# Every pip call goes through scripts/pip_install.sh: a package that cannot be installed (a
# registry outage, a release withdrawn) is one line naming it, and its lane shows
# "install failed: PACKAGE" in the table; pip's own output is in results/matrix/pip/.
#
# Usage: scripts/test_matrix.sh [pytest args...]
# Environment: MATRIX_VERSIONS, VENV312, PYTHON312 (default: pyenv's 3.12, else python3.12),
#   MATRIX_RESULTS (default results/matrix: JUnit XML per lane, summary.md, pip logs).
# Exit status: non-zero when any lane fails, errors, runs no test or cannot install; skips are
# expected (their reasons are printed).
set -euo pipefail

cd "$(dirname "$0")/.."
START_EPOCH="$(date +%s)"
VENV312="${VENV312:-.venv-312}"
MATRIX_VERSIONS="${MATRIX_VERSIONS:-0.16.1 0.17.1 0.18.2 0.19.2}"
RESULTS="${MATRIX_RESULTS:-results/matrix}"
TORCH312_VERSION="2.14.1"
# Added to each lane's pytest: the 10 slowest tests (a slow one shows in CI's log) and the
# names of failed and errored tests besides the skip reasons in the short summary.
LANE_PYTEST_ARGS=("--durations=10" "-rfEs")

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
    return 1
}

export PIP_LOG_DIR="$RESULTS/pip"

pip312() {
    bash scripts/pip_install.sh "$VENV312/bin/python" "$@"
}

# What the 3.12 venv is built from: a change rebuilds it.
SPEC312="torch==$TORCH312_VERSION pytest numpy packaging ${BRIDGE_DEPS[*]}"

# Builds the 3.12 venv once (torch first and pinned: megatron-core would otherwise pick its own
# torch). Returns non-zero, having said why in one line, when it cannot.
setup_312() {
    if [[ -f "$VENV312/.installed" && "$(cat "$VENV312/.installed")" == "$SPEC312" ]]; then
        echo "--- $VENV312 is up to date: reused"
        setup312_reused=1
        return 0
    fi
    local python312
    if ! python312="$(find_python312)"; then
        echo "test_matrix.sh: no Python 3.12 found; set PYTHON312=/path/to/python3.12" >&2
        echo "python3.12" >>"$PIP_INSTALL_FAILED_FILE"
        return 1
    fi
    echo "--- building $VENV312 ($python312, torch $TORCH312_VERSION)"
    rm -rf "$VENV312"
    if ! "$python312" -m venv "$VENV312"; then
        echo "test_matrix.sh: could not create $VENV312 with $python312" >&2
        echo "venv" >>"$PIP_INSTALL_FAILED_FILE"
        return 1
    fi
    pip312 "torch==$TORCH312_VERSION" || return 1
    pip312 pytest numpy packaging "${BRIDGE_DEPS[@]}" || return 1
    # Compat mode, as make test installs it (Makefile): the checkout on sys.path.
    pip312 --no-deps --config-settings editable_mode=compat -e . || return 1
    echo "$SPEC312" >"$VENV312/.installed"
}

# Installs megatron-core $1 with Bridge $2 and verl $3 (empty: uninstalled) in the 3.12 venv.
swap_312() {
    pip312 "megatron-core==$1" || return 1
    if [[ -n "$2" ]]; then
        pip312 --no-deps "megatron-bridge==$2" || return 1
    else
        "$VENV312/bin/python" -m pip uninstall -q -y megatron-bridge >/dev/null 2>&1 || true
    fi
    if [[ -n "$3" ]]; then
        if [[ ! -f "$VENV312/.verl-deps" ]]; then
            pip312 "${VERL_DEPS[@]}" || return 1
            touch "$VENV312/.verl-deps"
        fi
        pip312 --no-deps "verl==$3" "mbridge==$MBRIDGE_VERSION" || return 1
    else
        "$VENV312/bin/python" -m pip uninstall -q -y verl mbridge >/dev/null 2>&1 || true
    fi
}

# "Python torch" of a lane's interpreter, "? ?" when it cannot import torch.
probe() {
    "$1" -c "import sys, torch; print(sys.version.split()[0], torch.__version__)" 2>/dev/null \
        || echo "? ?"
}

mkdir -p "$RESULTS"
rm -f "$RESULTS"/lanes.tsv "$RESULTS"/*.install-failed "$RESULTS"/summary.md
status=0
setup312_s=""
setup312_reused=""
setup312_failed=""
pytest_args=("${LANE_PYTEST_ARGS[@]}" "$@")
for version in $MATRIX_VERSIONS; do
    xml="$RESULTS/$version.xml"
    rm -f "$xml"
    export PIP_INSTALL_FAILED_FILE="$RESULTS/$version.install-failed"
    lane_start="$(date +%s)"
    note=""
    extras="-"
    if [[ "$version" == 0.16.* ]]; then
        echo "=== megatron-core $version, Python 3.11: make test"
        # The README's test command, as it is: only the JUnit XML and durations added.
        PYTEST_ADDOPTS="--junitxml=$xml $(printf '%q ' "${pytest_args[@]}")${PYTEST_ADDOPTS:-}" \
            make test || { status=1; note="make test exited non-zero"; }
        python="./.venv/bin/python"
    else
        echo "=== megatron-core $version, Python 3.12 ($VENV312)"
        python="$VENV312/bin/python"
        if [[ -n "$setup312_failed" ]]; then
            echo "$setup312_failed" >"$PIP_INSTALL_FAILED_FILE"
            status=1
        elif [[ -z "$setup312_s" ]]; then
            setup_start="$(date +%s)"
            if ! setup_312; then
                status=1
                setup312_failed="$(cat "$PIP_INSTALL_FAILED_FILE" 2>/dev/null || echo "$VENV312")"
            fi
            setup312_s="$(($(date +%s) - setup_start))"
        fi
        if [[ ! -s "$PIP_INSTALL_FAILED_FILE" ]]; then
            if swap_312 "$version" "$(bridge_for "$version")" "$(verl_for "$version")"; then
                extras="$("$python" -m pip list 2>/dev/null | awk \
                    '$1=="megatron-bridge"||$1=="verl"||$1=="mbridge"{printf "%s%s %s", s, $1, $2; s=", "}')"
                "$python" -m pytest tests -q --junitxml="$xml" "${pytest_args[@]}" \
                    || { status=1; note="pytest exited non-zero"; }
            else
                status=1
            fi
        fi
    fi
    if [[ -s "$PIP_INSTALL_FAILED_FILE" ]]; then
        note="install failed: $(paste -sd ' ' "$PIP_INSTALL_FAILED_FILE")"
    fi
    read -r py torch < <(probe "$python")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$version" "$py" "$torch" "${extras:--}" \
        "$(($(date +%s) - lane_start))" "${note:--}" >>"$RESULTS/lanes.tsv"
done
unset PIP_INSTALL_FAILED_FILE

# The table: one row per lane, counts from its JUnit XML (a lane that never ran, or could not
# install, shows as such and counts as failed). Printed and written to $RESULTS/summary.md.
if [[ -n "$setup312_reused" ]]; then
    setup312_s="reused"
fi
python3 - "$RESULTS" "$START_EPOCH" "${setup312_s:-}" "$VENV312" <<'EOF'
import datetime
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

results, start, setup312_s, venv312 = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
wall = int(time.time()) - start
lines = [
    "| megatron-core | Python | torch | also installed | passed | failed | skipped"
    " | pytest s | lane s |",
    "|---|---|---|---|--:|--:|--:|--:|--:|",
]
totals = [0, 0, 0]
notes = []
with open(f"{results}/lanes.tsv") as f:
    rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
for version, py, torch, extras, lane_s, note in rows:
    try:
        suite = ET.parse(f"{results}/{version}.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
        failed = int(suite.get("failures")) + int(suite.get("errors"))
        counts = [tests - failed - skipped, failed, skipped]
        pytest_s = f"{float(suite.get('time')):.0f}"
        if tests == 0:
            counts[1] = 1
            note = "ran no test"
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError):
        counts = None
    if counts is None or note.startswith("install failed"):
        what = note if note.startswith("install failed") else "did not run"
        lines.append(f"| {version} | {py} | {torch} | {extras} | {what} | | | | {lane_s} |")
        totals[1] += 1
        continue
    totals = [t + c for t, c in zip(totals, counts)]
    lines.append(
        f"| {version} | {py} | {torch} | {extras} | {counts[0]} | {counts[1]} | {counts[2]}"
        f" | {pytest_s} | {lane_s} |"
    )
footer = []
if setup312_s == "reused":
    footer.append(f"Python 3.12 venv ({venv312}): reused, built by an earlier run")
elif setup312_s:
    footer.append(
        f"Python 3.12 venv ({venv312}: torch and the shared dependencies, built once for the"
        f" 3.12 lanes, counted in the first one's lane s): {setup312_s} s"
    )
footer.append(f"wall time: {wall} s ({wall / 60:.1f} min)")
try:
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
    ).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    commit = "?"
closing = f"matrix: {totals[0]} passed, {totals[1]} failed, {totals[2]} skipped"
print()
print("\n".join(lines))
print()
print("\n".join(footer))
print(f"summary: {results}/summary.md")
print(closing)
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
with open(f"{results}/summary.md", "w") as f:
    f.write(f"Test matrix at {commit}, {date}\n\n")
    f.write("\n".join(lines) + "\n\n")
    f.write("\n\n".join(footer) + "\n\n" + closing + "\n")
EOF
exit "$status"
