#!/usr/bin/env bash
# The timing-sensitive tests, run again and again on a loaded machine: two busy loops take the
# CPU's cores while pytest runs the tests N times in a row (default 20), stopping at the first
# failure. A test that passes only when the machine is idle fails here.
#
#   scripts/flake_check.sh [N] [PYTEST ARGS...]
#
# Without PYTEST ARGS it runs the replica and turn tests and the other tests that wait on
# threads, servers, a browser or the engine (FLAKE_TESTS below). The busy loops are killed on
# exit, however the script ends. Prints one line per run and a summary:
#   flake_check: 20/20 runs passed in 812 s
# and exits non-zero when a run failed (its output's tail is printed).
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
runs="${1:-20}"
[ $# -gt 0 ] && shift
case "$runs" in ''|*[!0-9]*|0) echo "flake_check: N must be a positive number, not '$runs'" >&2; exit 2 ;; esac
python="${PYTHON:-$repo/.venv/bin/python}"

FLAKE_TESTS=(
    tests/test_cluster.py
    tests/test_turns.py
    tests/test_store.py
    tests/test_chat_page.py
    tests/test_horde_worker.py
    tests/test_ops.py
    # Batched rows held together with tests/model_probe.py, and the option-name tests.
    "tests/test_engine.py::test_batched_decoding_matches_single_stream"
    "tests/test_engine.py::test_phrase_bans_in_a_batch_match_the_single_stream"
    "tests/test_guidance.py::test_guided_rows_in_a_busy_batch_match_running_alone"
    "tests/test_context_shift.py::test_shift_while_other_rows_decode"
    "tests/test_context_shift.py::test_plan_with_two_dropped_spans_and_none"
    "tests/test_kobold_api.py::test_concurrent_requests_match_solo_runs"
    "tests/test_kobold_api.py::test_text_completion_spellings_act_like_the_kobold_names"
    "tests/test_ollama_api.py::test_ollama_option_names_and_defaults_are_read"
    # Servers started in another process, on ports picked before they bind them.
    "tests/test_cli.py::test_serve_starts_a_real_server"
    "tests/test_security.py::test_serve_listens_on_loopback_and_warns_when_exposed"
)
if [ $# -gt 0 ]; then tests=("$@"); else tests=("${FLAKE_TESTS[@]}"); fi

busy=()
log="$(mktemp "${TMPDIR:-/tmp}/flake_check.XXXXXX")"
stop_busy() {
    local pid
    for pid in "${busy[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${busy[@]}"; do wait "$pid" 2>/dev/null; done
    busy=()
    rm -f "$log"
}
trap stop_busy EXIT
trap 'exit 130' INT TERM
for _ in 1 2; do
    (while :; do :; done) &
    busy+=("$!")
done
echo "flake_check: $runs runs of ${#tests[@]} test targets, with ${#busy[@]} busy loops (pids ${busy[*]}) on $(nproc) cores"

start=$SECONDS
passed=0
for run in $(seq 1 "$runs"); do
    began=$SECONDS
    if "$python" -m pytest -q -p no:cacheprovider "${tests[@]}" >"$log" 2>&1; then
        passed=$((passed + 1))
        echo "flake_check: run $run/$runs passed ($((SECONDS - began)) s): $(tail -n 1 "$log")"
    else
        echo "flake_check: run $run/$runs FAILED ($((SECONDS - began)) s); the end of its output:"
        tail -n 60 "$log"
        break
    fi
done
echo "flake_check: $passed/$runs runs passed in $((SECONDS - start)) s"
[ "$passed" -eq "$runs" ]
