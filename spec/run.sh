#!/bin/sh
# spec/run.sh FILE...: runs each spec file in its own busted process, so that a
# crash fails that file and not the whole run, and ends with the one line CI
# reads: "N passed, N failed". Exits non-zero when anything failed.
#
# The output is the tests (TAP). Each file's stderr, where the tracebacks of
# the errors specs provoke on purpose go (and sanitizer and valgrind reports),
# is kept in $SPEC_LOGS/<name>.stderr; when a file fails, its tail is printed
# under the file's results so the output still says why.
LUA=${LUA:-lua5.4}
BUSTED=${BUSTED:-$(command -v busted)}
SPEC_LOGS=${SPEC_LOGS:-build/spec-logs}
TAIL_LINES=${TAIL_LINES:-60}
passed=0
failed=0
mkdir -p "$SPEC_LOGS" || exit 1
rm -f "$SPEC_LOGS"/*.stderr
out=$(mktemp)
trap 'rm -f "$out"' EXIT
echo "# stderr of each spec file: $SPEC_LOGS/"
for f in "$@"; do
  echo "== $f"
  log=$SPEC_LOGS/$(basename "$f" .lua).stderr
  # $LUA may be a command with arguments (valgrind ..., env LD_PRELOAD=...).
  $LUA "$BUSTED" --ignore-lua -o TAP $BUSTED_ARGS "$f" >"$out" 2>"$log"
  rc=$?
  cat "$out"
  ok=$(grep -c '^ok ' "$out")
  bad=$(grep -c '^not ok ' "$out")
  if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
    echo "# $f: busted exited with status $rc and reported no failure: counted as one"
    bad=1
  fi
  if [ "$bad" -ne 0 ] && [ -s "$log" ]; then
    echo "# last $TAIL_LINES lines of $log:"
    tail -n "$TAIL_LINES" "$log" | sed 's/^/#   /'
  fi
  passed=$((passed + ok))
  failed=$((failed + bad))
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
