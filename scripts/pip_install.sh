#!/usr/bin/env bash
# `PYTHON -m pip install ARGS...` with pip's whole output kept in a log file. On success it
# prints only pip's warnings (less the expected ones below); on failure one line naming the
# package (and version) that could not be installed, never pip's traceback, e.g.
#   pip_install.sh: could not install torch==2.14.1 into .venv-312: Could not find a version ... (pip's log: results/pip/pip-ab12.log)
#
# Usage: scripts/pip_install.sh PYTHON [pip install options and requirements...]
# Environment: PIP_LOG_DIR (default results/pip), PIP_INSTALL_FAILED_FILE (when set, the
# package that failed is appended to it: the matrix puts it in its table).
# Exit status: pip's.
set -uo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 PYTHON [pip install args...]" >&2
    exit 2
fi
python="$1"
shift

# What was asked for, for the message: the requirements, not the options ("-e ." is the project).
requested=()
prev=""
for arg in "$@"; do
    if [[ "$prev" == "-e" || "$prev" == "--editable" ]]; then
        requested+=("megatron-densemixer (-e $arg)")
    elif [[ "$arg" != -* ]]; then
        requested+=("$arg")
    fi
    prev="$arg"
done
venv="$(dirname "$(dirname "$python")")"

log_dir="${PIP_LOG_DIR:-results/pip}"
mkdir -p "$log_dir"
log="$(mktemp "$log_dir/pip-XXXXXX.log")"
{
    echo "# $python -m pip install $*"
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$log"

rc=0
"$python" -m pip install --progress-bar off "$@" >>"$log" 2>&1 || rc=$?

if [[ "$rc" -eq 0 ]]; then
    # What `pip -q` would have shown, less what the matrix expects: pip's resolver lists
    # every Megatron-Bridge / verl dependency left out on purpose, and this machine's pip
    # config names local indexes that are absent for some packages.
    grep -e "^WARNING" -e "^ERROR" "$log" \
        | grep -v -e "^WARNING: Location" -e "requires .*, which is not installed" \
            -e "but you have .* which is incompatible" -e "dependency resolver does not" \
        || true
    exit 0
fi

# Which package: pip's own words where it names one, else the download or build in flight
# when it stopped (a registry outage mid-download), else everything that was asked for.
failed="$(sed -n -e 's/.*No matching distribution found for \([^ ]*\).*/\1/p' \
    -e 's/.*Could not find a version that satisfies the requirement \([^ ]*\).*/\1/p' \
    "$log" | head -n 1)"
if [[ -z "$failed" ]]; then
    failed="$(sed -n -e 's/^ *Collecting \([^ ]*\).*/\1/p' -e 's/^ *Downloading \([^ ]*\).*/\1/p' \
        -e 's/^ *Processing \([^ ]*\).*/\1/p' -e 's/^ *Obtaining \([^ ]*\).*/\1/p' \
        -e 's/^ *Building wheel for \([^ ]*\).*/\1/p' \
        "$log" | tail -n 1)"
    # A download line names a wheel or an address: keep the file name.
    failed="${failed##*/}"
fi
if [[ -z "$failed" ]]; then
    failed="${requested[*]:-?}"
fi

# pip's reason: the line naming the package, else its first ERROR line, else the last line of
# its traceback (the exception); with what it said about the index when it could not reach it.
reason="$(grep -m 1 -e "^ERROR: No matching distribution" -e "^ERROR: Could not find a version" \
    "$log" | sed -e 's/^ERROR: //' -e 's/ (from versions: .*)$//')"
if [[ -z "$reason" ]]; then
    reason="$(grep -m 1 "^ERROR: " "$log" | sed 's/^ERROR: //')"
fi
if [[ -z "$reason" || "$reason" == "Exception:" ]]; then
    reason="$(grep -v "^ *$" "$log" | tail -n 1)"
fi
reason="${reason:0:200}"
network="$(grep -o -e "Failed to establish a new connection: [^')]*" -e "Read timed out[^')]*" \
    -e "Connection \(reset\|aborted\|refused\)[^')]*" -e "Temporary failure in name resolution" \
    -e "Name or service not known" -e "HTTP error [0-9]* while getting [^ ]*" \
    -e "[0-9][0-9][0-9] Server Error[^']*" -e "Could not fetch URL [^:]*" "$log" | tail -n 1 || true)"
if [[ -n "$network" ]]; then
    reason="$reason; the package index could not be reached (${network:0:160})"
elif grep -q "(from versions: none)" "$log"; then
    reason="$reason; no index listed any release of it (is the package index reachable?)"
fi

echo "pip_install.sh: could not install $failed into $venv (asked for: ${requested[*]:-?}): $reason (pip's log: $log)" >&2
if [[ -n "${PIP_INSTALL_FAILED_FILE:-}" ]]; then
    echo "$failed" >>"$PIP_INSTALL_FAILED_FILE"
fi
exit "$rc"
