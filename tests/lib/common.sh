# Helpers shared by scenarios (source it).

# fail MSG: prints a FAIL line and exits 1.
fail() { echo "FAIL: $*"; exit 1; }

# now_ms: wall clock in milliseconds.
now_ms() { date +%s%3N; }

# expect_line FILE PATTERN: the first line of FILE matching the extended
# regex PATTERN, or a failure naming it.
expect_line() {
  local line
  line=$(tr -d '\r' <"$1" | grep -a -m1 -E "$2") || fail "no line matching /$2/ in $1"
  printf '%s\n' "$line"
}

# no_leftovers NAME PATH...: fails if a process called NAME still runs or any
# PATH still exists.
no_leftovers() {
  local name=$1 p
  shift
  if pgrep -x "$name" >/dev/null; then fail "a $name process is left: $(pgrep -a -x "$name")"; fi
  for p in "$@"; do [ ! -e "$p" ] || fail "$p is left behind"; done
}
