#!/usr/bin/env bash
# Instructions per message of each measured path of benches/correlate.rs,
# counted by callgrind: unlike time, they do not move with the binary's code
# layout (the time of mail-parser alone moved between 1.12 and 1.30 ms per
# 200 messages across builds of unchanged mail-parser code). Ratios are
# against mail-parser alone, from the same run.
#
# Usage: benches/instructions.sh [TRACKED]   (default 10000; needs valgrind)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}
command -v valgrind >/dev/null || { echo "valgrind is missing" >&2; exit 1; }
bin=$(cargo bench --bench correlate --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "correlate" in m["target"]["name"]:
        print(m["executable"])' | tail -1)
[ -x "$bin" ] || { echo "bench binary not found" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# line name | function callgrind collects in | callee called once per message
lines=(
  "parse_only|mail_parser_parse|parse_"
  "parse_correlate|parse_and_correlate|parse_for"
  "parse_correlate_smart_off|parse_and_correlate|parse_for"
  "parse_correlate_sled|parse_and_correlate_store|parse_for"
  "parse_correlate_sled_smart_off|parse_and_correlate_store|parse_for"
)
base=""
for l in "${lines[@]}"; do
  IFS='|' read -r name fn callee <<<"$l"
  f="$out/$name"
  CORRELATE_BENCH_SIZES=$n valgrind --tool=callgrind --callgrind-out-file="$f" \
    --toggle-collect="correlate::$fn" \
    "$bin" --bench --profile-time 1 "tracked_$n/$name\$" >/dev/null 2>&1
  per=$(python3 - "$f" "$fn" "$callee" <<'PY'
import re, sys
path, fn, callee = sys.argv[1:]
text = open(path).read()
total = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
# Function names are written once, then referred to by number.
names = dict(re.findall(r"^c?fn=\((\d+)\) (.+)$", text, re.M))
calls = 0
current = counting = False
for line in text.splitlines():
    m = re.match(r"^(c?fn)=\((\d+)\)", line)
    if m:
        kind, ident = m.groups()
        if kind == "fn":
            current = names.get(ident, "").endswith("correlate::" + fn)
        else:
            callee_name = names.get(ident, "")
            counting = current and (callee_name.endswith("::" + callee))
        continue
    if line.startswith("calls=") and current and counting:
        calls += int(line.split("=")[1].split()[0])
        counting = False
print(total // calls if calls else 0)
PY
)
  [ -z "$base" ] && base=$per
  python3 -c "import sys; n,p,b=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]); print(f'{n:28} {p:>9} instructions/message  {p/b:.3f}x')" "$name" "$per" "$base"
done
