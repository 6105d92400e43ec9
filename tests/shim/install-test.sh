#!/usr/bin/env bash
# Host test of configs/install.sh (no KVM, no build needed: it installs
# stand-in artifacts into temporary DESTDIRs). Checks the installed tree,
# the paths written into configuration.toml and containerd's config, --kata,
# --prefix, idempotence, a user-edited configuration kept, an updated binary
# replaced, and that containerd (Debian's config plus husk's registration)
# loads its CRI plugin with the husk runtime. scripts/test.sh runs it.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
install=$repo/configs/install.sh
t=$(mktemp -d /tmp/husk-install-test.XXXXXX)
ctrd_pid=
cleanup() {
  [ -z "$ctrd_pid" ] || { kill "$ctrd_pid" 2>/dev/null; wait "$ctrd_pid" 2>/dev/null; }
  rm -rf "$t"
}
trap cleanup EXIT
fails=0
ok() { echo "  ok   $*"; }
want() { local d=$1; shift; if "$@"; then ok "$d"; else echo "  FAIL $d"; fails=$((fails + 1)); fi; }
not_grep() { ! grep -q "$@"; }
tree_sum() { (cd "$1" && find . -printf '%p %m %y %l\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

# Stand-in build outputs.
a=$t/artifacts
mkdir -p "$a/bin" "$a/kernel"
printf '#!/bin/sh\necho shim\n' >"$a/bin/containerd-shim-husk-v2"
printf 'vmm-1\n' >"$a/husk-vmm"
printf 'bz\n' >"$a/kernel/bzImage"
printf 'elf\n' >"$a/kernel/vmlinux"
printf '6.1.0-test\n' >"$a/kernel/kernel.release"
printf 'initrd\n' >"$a/initrd.gz"
chmod 0755 "$a/bin/containerd-shim-husk-v2" "$a/husk-vmm"
cat >"$t/artifacts.env" <<EOF
export HUSK_GUEST_KERNEL=$a/kernel
export HUSK_INITRD=$a/initrd.gz
export HUSK_BIN=$a/bin
export HUSK_VMM=$a/husk-vmm
EOF

echo "== default layout, --kata, --containerd-config on Debian's config.toml"
d=$t/root
mkdir -p "$d/etc/containerd"
if [ -f /etc/containerd/config.toml ]; then cp /etc/containerd/config.toml "$d/etc/containerd/"; else
  printf 'version = 2\n\n[plugins]\n  [plugins."io.containerd.internal.v1.opt"]\n    path = "/var/lib/containerd/opt"\n' \
    >"$d/etc/containerd/config.toml"
fi
"$install" --destdir "$d" --artifacts "$t/artifacts.env" --kata --containerd-config /etc/containerd/config.toml >"$t/1.log" 2>&1
rc=$?
sed 's/^/    /' "$t/1.log"
want "install exits 0" [ "$rc" = 0 ]
for f in usr/local/bin/containerd-shim-husk-v2 usr/local/bin/husk-vmm; do
  want "$f is an executable (0755)" [ "$(stat -c %a "$d/$f" 2>/dev/null)" = 755 ]
done
for f in bzImage vmlinux kernel.release husk-agent.initrd containerd-husk.toml runtimeclass.yaml; do
  want "usr/share/husk/$f (0644)" [ "$(stat -c %a "$d/usr/share/husk/$f" 2>/dev/null)" = 644 ]
done
want "the initrd is the build's" cmp -s "$a/initrd.gz" "$d/usr/share/husk/husk-agent.initrd"
want "containerd-shim-kata-v2 -> containerd-shim-husk-v2" [ "$(readlink "$d/usr/local/bin/containerd-shim-kata-v2")" = containerd-shim-husk-v2 ]
c=$d/etc/husk/configuration.toml
want "configuration.toml installed" [ -f "$c" ]
want "vmm_path is the installed VMM" grep -qx 'vmm_path = "/usr/local/bin/husk-vmm"' "$c"
want "kernel_path is the installed bzImage" grep -qx 'kernel_path = "/usr/share/husk/bzImage"' "$c"
want "initrd_path is the installed initrd" grep -qx 'initrd_path = "/usr/share/husk/husk-agent.initrd"' "$c"
want "no DESTDIR in any installed file" not_grep -rF "$d" "$d"
want "the rest of configuration.toml is the shipped one" \
  diff <(grep -vE '^(vmm_path|kernel_path|initrd_path) =' "$repo/configs/configuration.toml") <(grep -vE '^(vmm_path|kernel_path|initrd_path) =' "$c")
cc=$d/etc/containerd/config.toml
want "containerd config backed up" [ -f "$cc.husk-bak" ]
want "containerd config registers runtimes.husk" grep -q 'runtimes.husk]' "$cc"
want "... with runtime_type io.containerd.husk.v2" grep -q 'runtime_type = "io.containerd.husk.v2"' "$cc"
want "... and ConfigPath /etc/husk/configuration.toml" grep -q 'ConfigPath = "/etc/husk/configuration.toml"' "$cc"
want "... and names runc again" grep -q 'runtimes.runc]' "$cc"

echo "== containerd loads that config, CRI plugin included"
if command -v containerd >/dev/null; then
  # The same config, with the one host path it names (opt) moved into the test folder.
  sed "s|/var/lib/containerd/opt|$t/ctrd/opt|" "$cc" >"$t/ctrd.toml"
  mkdir -p "$t/ctrd"
  containerd --config "$t/ctrd.toml" --root "$t/ctrd/root" --state "$t/ctrd/state" \
    --address "$t/ctrd/c.sock" >"$t/ctrd.log" 2>&1 &
  ctrd_pid=$!
  for _ in $(seq 100); do ctr --address "$t/ctrd/c.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
  want "CRI plugin ok" bash -c "ctr --address '$t/ctrd/c.sock' plugins ls | grep -E '\\bcri\\b' | grep -qw ok"
  want "CRI config has husk -> io.containerd.husk.v2 with ConfigPath" \
    grep -q 'husk:{Type:io.containerd.husk.v2 .*Options:map\[ConfigPath:/etc/husk/configuration.toml\]' "$t/ctrd.log"
  kill "$ctrd_pid"; wait "$ctrd_pid" 2>/dev/null; ctrd_pid=
else
  echo "  skip (no containerd)"
fi

echo "== a second run changes nothing"
before=$(tree_sum "$d")
"$install" --destdir "$d" --artifacts "$t/artifacts.env" --kata --containerd-config /etc/containerd/config.toml >"$t/2.log" 2>&1
rc=$?
sed 's/^/    /' "$t/2.log"
want "exit 0" [ "$rc" = 0 ]
want "says nothing to do" grep -q 'nothing to do' "$t/2.log"
want "tree unchanged (names, modes, links, contents)" [ "$before" = "$(tree_sum "$d")" ]
want "husk registered once" [ "$(grep -cE '^\s*\[plugins.*runtimes\.husk\]' "$cc")" = 1 ]

echo "== an edited configuration is kept; a new VMM replaces the old"
sed -i 's/^vcpus = .*/vcpus = 2/' "$c"
printf 'vmm-2\n' >"$a/husk-vmm"
"$install" --destdir "$d" --artifacts "$t/artifacts.env" --kata >"$t/3.log" 2>&1
rc=$?
sed 's/^/    /' "$t/3.log"
want "exit 0" [ "$rc" = 0 ]
want "the user's vcpus = 2 stays" grep -qx 'vcpus = 2' "$c"
want "configuration.toml.new holds the release's" [ -f "$c.new" ]
want "husk-vmm is the new one" grep -qx vmm-2 "$d/usr/local/bin/husk-vmm"
want "only husk-vmm and configuration.toml.new changed" \
  [ "$(grep -c '^\[install\] installed' "$t/3.log")" = 2 ]
"$install" --destdir "$d" --artifacts "$t/artifacts.env" --kata >"$t/4.log" 2>&1
want "then again nothing to do" grep -q 'nothing to do' "$t/4.log"

echo "== --prefix /opt/husk, --sysconfdir /opt/husk/etc, DESTDIR from the environment"
d2=$t/root2
DESTDIR=$d2 "$install" --prefix /opt/husk --sysconfdir /opt/husk/etc --datadir /opt/husk/share \
  --artifacts "$t/artifacts.env" >"$t/5.log" 2>&1
rc=$?
want "exit 0" [ "$rc" = 0 ]
want "shim in /opt/husk/bin" [ -x "$d2/opt/husk/bin/containerd-shim-husk-v2" ]
want "no kata link without --kata" [ ! -e "$d2/opt/husk/bin/containerd-shim-kata-v2" ]
want "vmm_path /opt/husk/bin/husk-vmm" grep -qx 'vmm_path = "/opt/husk/bin/husk-vmm"' "$d2/opt/husk/etc/husk/configuration.toml"
want "kernel_path /opt/husk/share/bzImage" grep -qx 'kernel_path = "/opt/husk/share/bzImage"' "$d2/opt/husk/etc/husk/configuration.toml"
want "the snippet's ConfigPath follows sysconfdir" grep -q 'ConfigPath = "/opt/husk/etc/husk/configuration.toml"' "$d2/opt/husk/share/containerd-husk.toml"

echo "== refuses a relative path and a missing build"
"$install" --destdir "$t/x" --prefix usr --artifacts "$t/artifacts.env" >/dev/null 2>&1
want "relative --prefix fails" [ $? != 0 ]
"$install" --destdir "$t/x" --artifacts "$t/none.env" >/dev/null 2>&1
want "missing artifacts fail" [ $? != 0 ]

if [ "$fails" = 0 ]; then echo "PASS install-test"; else echo "FAIL install-test: $fails failed"; exit 1; fi
