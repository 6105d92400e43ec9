#!/usr/bin/env bash
# Installs husk on a containerd host (as root), from a build (scripts/build.sh):
#
#   $PREFIX/bin/containerd-shim-husk-v2   the shim (runtime io.containerd.husk.v2)
#   $PREFIX/bin/husk-vmm                  the VMM (the static build)
#   $PREFIX/bin/husk                      the operator's command (when built)
#   $DATADIR/bzImage, vmlinux, kernel.release, husk-agent.initrd
#                                         the guest kernel and the agent initramfs
#   $DATADIR/containerd-husk.toml, runtimeclass.yaml
#                                         the containerd snippet and the RuntimeClass
#   $SYSCONFDIR/husk/configuration.toml   configs/configuration.toml with its
#                                         paths pointed at the files above
#
#   configs/install.sh [options]
#     --prefix DIR         default /usr/local
#     --datadir DIR        default /usr/share/husk
#     --sysconfdir DIR     default /etc
#     --destdir DIR        stage everything under DIR (also $DESTDIR); the
#                          paths written into files stay without it
#     --artifacts FILE     the build's outputs (default target/husk-artifacts.env)
#     --kata               also install the shim as containerd-shim-kata-v2, so
#                          that runtime io.containerd.kata.v2 (an existing Kata
#                          set-up's CRI handler) runs husk
#     --containerd-config FILE
#                          register husk in containerd's config FILE (created
#                          if missing; backup FILE.husk-bak): appends
#                          configs/containerd-husk.toml, and the runc runtime
#                          entry the CRI plugin then needs if FILE has none.
#                          Restart containerd afterwards.
#     --force-config       replace an existing configuration.toml that differs
#                          (by default it is kept, and the new one written
#                          next to it as configuration.toml.new)
#
# Idempotent: a second run with the same inputs changes nothing, and says so.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)

prefix=/usr/local datadir=/usr/share/husk sysconfdir=/etc destdir=${DESTDIR:-}
artifacts=$repo/target/husk-artifacts.env kata=0 ctrd_config='' force_config=0
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift ;;
    --datadir) datadir=$2; shift ;;
    --sysconfdir) sysconfdir=$2; shift ;;
    --destdir) destdir=$2; shift ;;
    --artifacts) artifacts=$2; shift ;;
    --kata) kata=1 ;;
    --containerd-config) ctrd_config=$2; shift ;;
    --force-config) force_config=1 ;;
    -h | --help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
for d in "$prefix" "$datadir" "$sysconfdir"; do
  case "$d" in /*) ;; *) echo "install.sh: $d: paths must be absolute" >&2; exit 2 ;; esac
done
[ -f "$artifacts" ] || { echo "install.sh: no $artifacts: run scripts/build.sh first" >&2; exit 1; }
# shellcheck source=/dev/null
source "$artifacts"
shim=$HUSK_BIN/containerd-shim-husk-v2
for f in "$shim" "$HUSK_VMM" "$HUSK_GUEST_KERNEL/bzImage" "$HUSK_GUEST_KERNEL/vmlinux" "$HUSK_INITRD" \
  "$here/configuration.toml" "$here/containerd-husk.toml" "$here/runtimeclass.yaml"; do
  [ -f "$f" ] || { echo "install.sh: missing $f" >&2; exit 1; }
done

changed=0 put_changed=0
say() { echo "[install] $*"; }
# put SRC DEST MODE: installs SRC as DEST (under destdir) unless identical.
put() {
  local src=$1 dest=$destdir$2 mode=$3
  put_changed=0
  if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$src" "$dest" &&
    [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  # Into a temporary name first, then renamed: a running shim or VMM keeps
  # its (old) file, and no one sees a half-written one.
  install -m "$mode" "$src" "$dest.husk-tmp"
  mv -f "$dest.husk-tmp" "$dest"
  say "installed $2"
  changed=1 put_changed=1
}

bindir=$prefix/bin
put "$shim" "$bindir/containerd-shim-husk-v2" 0755
put "$HUSK_VMM" "$bindir/husk-vmm" 0755
# The operator's command (cli/); a build from before it has none.
[ ! -f "$HUSK_BIN/husk" ] || put "$HUSK_BIN/husk" "$bindir/husk" 0755
if [ "$kata" = 1 ]; then
  link=$destdir$bindir/containerd-shim-kata-v2
  if [ "$(readlink "$link" 2>/dev/null)" != containerd-shim-husk-v2 ]; then
    if [ -e "$link" ] && [ ! -L "$link" ]; then
      mv -f "$link" "$link.kata-orig"
      say "kept the existing $bindir/containerd-shim-kata-v2 as containerd-shim-kata-v2.kata-orig"
    fi
    ln -sfn containerd-shim-husk-v2 "$link"
    say "installed $bindir/containerd-shim-kata-v2 -> containerd-shim-husk-v2"
    changed=1
  fi
fi
put "$HUSK_GUEST_KERNEL/bzImage" "$datadir/bzImage" 0644
put "$HUSK_GUEST_KERNEL/vmlinux" "$datadir/vmlinux" 0644
[ ! -f "$HUSK_GUEST_KERNEL/kernel.release" ] || put "$HUSK_GUEST_KERNEL/kernel.release" "$datadir/kernel.release" 0644
put "$HUSK_INITRD" "$datadir/husk-agent.initrd" 0644

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
config=$sysconfdir/husk/configuration.toml
# The shipped configuration, its paths pointed at the installed files.
python3 - "$here/configuration.toml" "$tmp/configuration.toml" \
  "vmm_path=$bindir/husk-vmm" "kernel_path=$datadir/bzImage" "initrd_path=$datadir/husk-agent.initrd" <<'PY'
import re, sys
src, out, *sets = sys.argv[1:]
text = open(src).read()
for kv in sets:
    key, value = kv.split("=", 1)
    text, n = re.subn(rf"(?m)^{key}\s*=.*$", f'{key} = "{value}"', text, count=1)
    if n != 1:
        sys.exit(f"install.sh: configs/configuration.toml has no top-level {key}")
open(out, "w").write(text)
PY
sed "s|/etc/husk/configuration.toml|$config|g" "$here/containerd-husk.toml" >"$tmp/containerd-husk.toml"
put "$tmp/containerd-husk.toml" "$datadir/containerd-husk.toml" 0644
put "$here/runtimeclass.yaml" "$datadir/runtimeclass.yaml" 0644
if [ ! -f "$destdir$config" ] || [ "$force_config" = 1 ]; then
  put "$tmp/configuration.toml" "$config" 0644
elif ! cmp -s "$tmp/configuration.toml" "$destdir$config"; then
  # Someone edited it: theirs stays.
  put "$tmp/configuration.toml" "$config.new" 0644
  [ "$put_changed" = 0 ] || say "kept $config (it differs from this release's); the new one is $config.new"
fi

if [ -n "$ctrd_config" ]; then
  f=$destdir$ctrd_config
  if [ -f "$f" ] && grep -qE '^\s*\[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.husk\]' "$f"; then
    : # registered already
  else
    if [ -f "$f" ]; then
      grep -qE '^\s*version\s*=\s*2\s*$' "$f" || {
        echo "install.sh: $ctrd_config is not a version 2 containerd config (containerd 1.6/1.7); add $datadir/containerd-husk.toml by hand" >&2
        exit 1
      }
      cp -p "$f" "$f.husk-bak"
    else
      mkdir -p "$(dirname "$f")"
      echo "version = 2" >"$f"
    fi
    if ! grep -qE '^\s*\[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.runc\]' "$f"; then
      # Naming any CRI runtime replaces containerd's built-in list, which
      # holds the default runtime runc: name it again.
      cat >>"$f" <<'EOF'

# Added by husk's install.sh: the CRI plugin's default runtime (naming any
# runtime, as husk's entry below does, replaces the built-in list).
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
EOF
    fi
    { echo; cat "$tmp/containerd-husk.toml"; } >>"$f"
    say "registered husk in $ctrd_config; restart containerd"
    changed=1
  fi
fi

if [ "$kata" = 1 ] && [ -n "$ctrd_config" ] && grep -qE 'runtimes\.kata' "$destdir$ctrd_config" &&
  grep -A6 -E 'runtimes\.kata' "$destdir$ctrd_config" | grep -q ConfigPath; then
  say "note: $ctrd_config gives the kata runtime a ConfigPath; husk reads that file as its own configuration:"
  say "      point it at $config"
fi
[ "$changed" = 1 ] || say "nothing to do: husk is installed and up to date"
