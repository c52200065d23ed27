#!/bin/sh
# spec/run.sh FILE...: runs each spec file in its own busted process, so that a
# crash fails that file and not the whole run, and ends with the one line CI
# reads: "N passed, N failed". Exits non-zero when anything failed.
LUA=${LUA:-lua5.4}
BUSTED=${BUSTED:-$(command -v busted)}
passed=0
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for f in "$@"; do
  echo "== $f"
  # $LUA may be a command with arguments (valgrind ..., env LD_PRELOAD=...).
  $LUA "$BUSTED" --ignore-lua -o TAP $BUSTED_ARGS "$f" >"$out"
  rc=$?
  cat "$out"
  ok=$(grep -c '^ok ' "$out")
  bad=$(grep -c '^not ok ' "$out")
  if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then
    echo "# $f: busted exited with status $rc and reported no failure: counted as one"
    bad=1
  fi
  passed=$((passed + ok))
  failed=$((failed + bad))
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
