#!/usr/bin/env bash
# Runs shellcheck over every shell script of the repository: the *.sh files and
# the files without an extension whose first line runs a shell (.ci/run),
# outside target/, fuzz/target/, fuzz/corpus/ and .git/. Sourced files are
# followed (paths relative to the script:
# `# shellcheck source=../shim/lib.sh`). scripts/test.sh runs it;
# `scripts/shellcheck.sh --list` prints the files.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

files=()
while IFS= read -r -d '' f; do
  case "$f" in
    *.sh) files+=("$f") ;;
    *) head -n 1 "$f" | grep -qE '^#!.*[/ ](ba|da|k)?sh( |$)' && files+=("$f") ;;
  esac
done < <(find . \( -path ./target -o -path ./fuzz/target -o -path ./fuzz/corpus -o -path ./.git \) -prune -o -type f \( -name '*.sh' -o ! -name '*.*' \) -print0 | sort -z)

if [ "${1:-}" = --list ]; then
  printf '%s\n' "${files[@]}"
  exit 0
fi
command -v shellcheck >/dev/null || { echo "shellcheck is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
echo "shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${#files[@]} files" >&2
shellcheck --external-sources --source-path=SCRIPTDIR "${files[@]}"
