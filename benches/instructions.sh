#!/usr/bin/env bash
# Instructions per request of the fast path's own work, counted by callgrind: a figure that
# does not move with the machine's speed, unlike criterion's time on a shared VM.
#
#   benches/instructions.sh [CASE ...]
#
# CASE: without_inbound_credentials, with_authorization_only, with_inbound_credentials
# (default: all three). Runs `benches/hot_path.rs`'s `fast_path/CASE` under
# `valgrind --tool=callgrind` for 2 s of criterion's profile mode and divides the instructions
# spent inside `tokengate::proxy::fast_path::own_work` (inclusive: httparse, route lookup,
# copies, metrics) by the number of calls, and splits off what httparse (parsing the request
# and response heads) takes of it. Installs valgrind from Debian when missing.
# Under valgrind httparse takes its SWAR path for field names (and AVX2 for values), so its
# share is about what it is natively.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind
fi

cases="${*:-without_inbound_credentials with_authorization_only with_inbound_credentials}"
for c in $cases; do
    case "$c" in
    without_inbound_credentials | with_authorization_only | with_inbound_credentials) ;;
    *)
        echo "instructions.sh: unknown case '$c' (without_inbound_credentials, with_authorization_only, with_inbound_credentials)" >&2
        exit 2
        ;;
    esac
done

cargo bench --bench hot_path --no-run
bench=$(ls -t "${CARGO_TARGET_DIR:-target}"/release/deps/hot_path-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for c in $cases; do
    valgrind --tool=callgrind --callgrind-out-file="$out/$c" "$bench" \
        --bench "^fast_path/$c\$" --profile-time 2 >/dev/null 2>&1
    # The caller line of own_work from criterion's timing loop: "<inclusive Ir> ... (<calls>x)".
    read -r total calls < <(callgrind_annotate --inclusive=yes --tree=caller "$out/$c" 2>/dev/null |
        grep -B4 '\* .*fast_path::own_work' | grep '< .*Bencher.*iter' |
        sed -E 's/^ *([0-9,]+).*\(([0-9,]+)x\).*/\1 \2/' | tr -d ,)
    # own_work's callees in httparse (both heads): the HTTP/1 parsing every proxy does, which
    # is the library's code, not tokengate's.
    parse=$(callgrind_annotate --inclusive=yes --tree=calling "$out/$c" 2>/dev/null |
        awk '/^ *[0-9,]+ .*\*  .*fast_path::own_work /{f=1; next} f && !/^ *[0-9,]+ .*>/{f=0}
             f && /> .*:httparse::/{gsub(",", "", $1); s += $1} END {print s + 0}')
    awk -v c="$c" -v t="$total" -v n="$calls" -v p="$parse" 'BEGIN {
        printf "fast_path/%s: %.0f instructions per request (%d calls), of which httparse %.0f, tokengate %.0f\n",
            c, t / n, n, p / n, (t - p) / n }'
done
