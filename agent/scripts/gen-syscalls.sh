#!/usr/bin/env bash
# Regenerates agent/src/syscalls_x86_64.rs, the x86_64 system call table the
# seccomp compiler looks names up in:
#
#     agent/scripts/gen-syscalls.sh > agent/src/syscalls_x86_64.rs
#
# Source: the SYS_* constants of the libc crate (the version in Cargo.lock,
# read from cargo's registry: `cargo fetch` first on a fresh machine) for
# x86_64 glibc, which follow Linux's arch/x86/entry/syscalls/syscall_64.tbl
# without the calls removed from the kernel; plus the calls Linux added up
# to 6.15 that libc may lack yet (from syscall_64.tbl, listed below).
# Sorted by name in byte order (a space sorts before any name character, so
# sorting whole lines sorts by name). The output depends only on those
# inputs: with none changed, a run reproduces the committed file byte for
# byte.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
version=$(awk '/^name = "libc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' "$root/Cargo.lock")
[ -n "$version" ] || { echo "no libc in $root/Cargo.lock" >&2; exit 1; }
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
src=$(find "$registry" -mindepth 2 -maxdepth 2 -type d -name "libc-$version" -print -quit 2>/dev/null || true)
[ -n "$src" ] || { echo "libc $version is not in $registry: run cargo fetch" >&2; exit 1; }
table=$src/src/unix/linux_like/linux/gnu/b64/x86_64/not_x32.rs
[ -f "$table" ] || { echo "$table is missing" >&2; exit 1; }

# Added after the libc table was taken: Linux 6.5 to 6.15 (name number).
added() {
    cat <<'TBL'
cachestat 451
fchmodat2 452
map_shadow_stack 453
futex_wake 454
futex_wait 455
futex_requeue 456
statmount 457
listmount 458
lsm_get_self_attr 459
lsm_set_self_attr 460
lsm_list_modules 461
mseal 462
setxattrat 463
getxattrat 464
listxattrat 465
removexattrat 466
open_tree_attr 467
TBL
}

entries=$(
    {
        sed -nE 's/^pub const SYS_([a-z0-9_]+): c_long = ([0-9]+);$/\1 \2/p' "$table"
        added
    } | LC_ALL=C sort -u
)
# A name with two numbers would mean the sources disagree: refuse.
dups=$(printf '%s\n' "$entries" | awk '{ print $1 }' | LC_ALL=C uniq -d)
[ -z "$dups" ] || { echo "conflicting numbers for: $dups" >&2; exit 1; }

cat <<'HEAD'
//! x86_64 system call numbers by name, for seccomp filters (the table of
//! Linux's arch/x86/entry/syscalls/syscall_64.tbl, as the libc crate has
//! it, plus the calls added up to Linux 6.15). Generated; sorted by name.
//! Regenerate with `agent/scripts/gen-syscalls.sh > agent/src/syscalls_x86_64.rs`.

pub const SYSCALLS: &[(&str, u32)] = &[
HEAD
printf '%s\n' "$entries" | awk '{ printf "    (\"%s\", %s),\n", $1, $2 }'
echo '];'
