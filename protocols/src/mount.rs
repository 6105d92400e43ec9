//! The one reading of mount options (`"ro"`, `"rbind"`, `"rslave"`,
//! `"mode=755"`, ...) into what mount(2) takes, shared by the shim (the
//! rootfs mounts containerd hands it) and the agent (the OCI spec's mounts)
//! so that both read the same option the same way.
//!
//! The table is runc's parseMountOptions (libcontainer/specconv) for the
//! options either side knew: a flag option sets or clears its flag, in
//! order (`ro,rw` is read-write); a propagation option is kept, in order,
//! for a mount(2) call of its own after the mount; `remount` is a field of
//! its own (the caller decides how to remount); `defaults` means nothing;
//! everything else is file system data, in order. No option is refused:
//! whether the data is valid is the file system's business.

pub use rustix::mount::{MountFlags, MountPropagationFlags};

/// What a mount's options turn into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The MS_* flags the options leave set (MS_BIND and MS_REC included;
    /// MS_REMOUNT is `remount`).
    pub flags: MountFlags,
    /// `remount` was given: change the existing mount instead of making one.
    pub remount: bool,
    /// Propagation changes, each a mount(2) call after the mount.
    pub propagation: Vec<MountPropagationFlags>,
    /// File system data, one option each (join with "," for mount(2)).
    pub data: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MountFlags::empty(),
            remount: false,
            propagation: Vec::new(),
            data: Vec::new(),
        }
    }
}

impl MountOptions {
    /// A bind mount (`bind` or `rbind`).
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MountFlags::BIND)
    }

    /// A recursive one (`rbind`).
    pub fn is_recursive(&self) -> bool {
        self.flags.contains(MountFlags::REC)
    }

    /// A read-only bind: the kernel ignores MS_RDONLY on the bind itself,
    /// so it takes a remount after it.
    pub fn bind_ro(&self) -> bool {
        self.is_bind() && self.flags.contains(MountFlags::RDONLY)
    }

    /// The data as mount(2) takes it: the options joined with ",".
    pub fn data_string(&self) -> String {
        self.data.join(",")
    }
}

/// What one flag option does.
#[derive(Clone, Copy)]
enum Op {
    Set(MountFlags),
    Clear(MountFlags),
}

/// MS_MANDLOCK, by its name in mount(8).
const MANDLOCK: MountFlags = MountFlags::PERMIT_MANDATORY_FILE_LOCKING;

/// The flag options, as runc's mountFlags table has them.
const FLAG_OPTIONS: &[(&str, Op)] = &[
    ("ro", Op::Set(MountFlags::RDONLY)),
    ("rw", Op::Clear(MountFlags::RDONLY)),
    ("nosuid", Op::Set(MountFlags::NOSUID)),
    ("suid", Op::Clear(MountFlags::NOSUID)),
    ("nodev", Op::Set(MountFlags::NODEV)),
    ("dev", Op::Clear(MountFlags::NODEV)),
    ("noexec", Op::Set(MountFlags::NOEXEC)),
    ("exec", Op::Clear(MountFlags::NOEXEC)),
    ("sync", Op::Set(MountFlags::SYNCHRONOUS)),
    ("async", Op::Clear(MountFlags::SYNCHRONOUS)),
    ("dirsync", Op::Set(MountFlags::DIRSYNC)),
    ("mand", Op::Set(MANDLOCK)),
    ("nomand", Op::Clear(MANDLOCK)),
    ("atime", Op::Clear(MountFlags::NOATIME)),
    ("noatime", Op::Set(MountFlags::NOATIME)),
    ("diratime", Op::Clear(MountFlags::NODIRATIME)),
    ("nodiratime", Op::Set(MountFlags::NODIRATIME)),
    ("bind", Op::Set(MountFlags::BIND)),
    ("rbind", Op::Set(MountFlags::BIND.union(MountFlags::REC))),
    ("relatime", Op::Set(MountFlags::RELATIME)),
    ("norelatime", Op::Clear(MountFlags::RELATIME)),
    ("strictatime", Op::Set(MountFlags::STRICTATIME)),
    ("nostrictatime", Op::Clear(MountFlags::STRICTATIME)),
];

/// The propagation options.
const PROPAGATION_OPTIONS: &[(&str, MountPropagationFlags)] = &[
    ("private", MountPropagationFlags::PRIVATE),
    (
        "rprivate",
        MountPropagationFlags::PRIVATE.union(MountPropagationFlags::REC),
    ),
    ("shared", MountPropagationFlags::SHARED),
    (
        "rshared",
        MountPropagationFlags::SHARED.union(MountPropagationFlags::REC),
    ),
    ("slave", MountPropagationFlags::DOWNSTREAM),
    (
        "rslave",
        MountPropagationFlags::DOWNSTREAM.union(MountPropagationFlags::REC),
    ),
    ("unbindable", MountPropagationFlags::UNBINDABLE),
    (
        "runbindable",
        MountPropagationFlags::UNBINDABLE.union(MountPropagationFlags::REC),
    ),
];

/// Reads mount options (see the module's documentation).
pub fn parse<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut out = MountOptions::default();
    for o in options {
        let o = o.as_ref();
        if let Some((_, op)) = FLAG_OPTIONS.iter().find(|(name, _)| *name == o) {
            match *op {
                Op::Set(f) => out.flags.insert(f),
                Op::Clear(f) => out.flags.remove(f),
            }
        } else if let Some((_, p)) = PROPAGATION_OPTIONS.iter().find(|(name, _)| *name == o) {
            out.propagation.push(*p);
        } else if o == "remount" {
            out.remount = true;
        } else if o != "defaults" {
            out.data.push(o.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// linux/mount.h: the values mount(2) expects.
    const MS_RDONLY: u32 = 1;
    const MS_NOSUID: u32 = 2;
    const MS_NODEV: u32 = 4;
    const MS_NOEXEC: u32 = 8;
    const MS_SYNCHRONOUS: u32 = 16;
    const MS_MANDLOCK: u32 = 64;
    const MS_DIRSYNC: u32 = 128;
    const MS_NOATIME: u32 = 1024;
    const MS_NODIRATIME: u32 = 2048;
    const MS_BIND: u32 = 4096;
    const MS_REC: u32 = 16384;
    const MS_UNBINDABLE: u32 = 1 << 17;
    const MS_PRIVATE: u32 = 1 << 18;
    const MS_SLAVE: u32 = 1 << 19;
    const MS_SHARED: u32 = 1 << 20;
    const MS_RELATIME: u32 = 1 << 21;
    const MS_STRICTATIME: u32 = 1 << 24;

    fn flags(o: &[&str]) -> u32 {
        parse(o).flags.bits()
    }

    #[test]
    fn every_flag_option_sets_or_clears_its_flag() {
        let all = MS_RDONLY
            | MS_NOSUID
            | MS_NODEV
            | MS_NOEXEC
            | MS_SYNCHRONOUS
            | MS_MANDLOCK
            | MS_NOATIME
            | MS_NODIRATIME
            | MS_RELATIME
            | MS_STRICTATIME;
        for (set, clear, flag) in [
            ("ro", "rw", MS_RDONLY),
            ("nosuid", "suid", MS_NOSUID),
            ("nodev", "dev", MS_NODEV),
            ("noexec", "exec", MS_NOEXEC),
            ("sync", "async", MS_SYNCHRONOUS),
            ("mand", "nomand", MS_MANDLOCK),
            ("noatime", "atime", MS_NOATIME),
            ("nodiratime", "diratime", MS_NODIRATIME),
            ("relatime", "norelatime", MS_RELATIME),
            ("strictatime", "nostrictatime", MS_STRICTATIME),
        ] {
            assert_eq!(flags(&[set]), flag, "{set}");
            assert_eq!(flags(&[set, clear]), 0, "{set},{clear}");
            assert_eq!(flags(&[clear, set]), flag, "{clear},{set}");
            // Clearing leaves the other flags alone.
            let others: Vec<&str> = ["ro", "nosuid", "nodev", "noexec", "sync", "mand"]
                .into_iter()
                .chain(["noatime", "nodiratime", "relatime", "strictatime"])
                .chain([clear])
                .collect();
            assert_eq!(flags(&others), all & !flag, "all then {clear}");
        }
        for (o, flag) in [
            ("dirsync", MS_DIRSYNC),
            ("bind", MS_BIND),
            ("rbind", MS_BIND | MS_REC),
        ] {
            assert_eq!(flags(&[o]), flag, "{o}");
        }
        assert_eq!(flags(&["rbind", "bind"]), MS_BIND | MS_REC);
    }

    #[test]
    fn propagation_is_kept_in_order() {
        for (o, p) in [
            ("private", MS_PRIVATE),
            ("rprivate", MS_PRIVATE | MS_REC),
            ("shared", MS_SHARED),
            ("rshared", MS_SHARED | MS_REC),
            ("slave", MS_SLAVE),
            ("rslave", MS_SLAVE | MS_REC),
            ("unbindable", MS_UNBINDABLE),
            ("runbindable", MS_UNBINDABLE | MS_REC),
        ] {
            let m = parse(&[o]);
            assert_eq!(m.flags, MountFlags::empty(), "{o}");
            assert_eq!(m.propagation.len(), 1, "{o}");
            assert_eq!(m.propagation[0].bits(), p, "{o}");
        }
        let m = parse(&["shared", "rslave"]);
        let bits: Vec<u32> = m.propagation.iter().map(|p| p.bits()).collect();
        assert_eq!(bits, [MS_SHARED, MS_SLAVE | MS_REC]);
    }

    #[test]
    fn unknown_options_are_data_in_order() {
        let m = parse(&["nosuid", "mode=755", "strictatime", "size=65536k", "rslave"]);
        assert_eq!(m.flags.bits(), MS_NOSUID | MS_STRICTATIME);
        assert_eq!(m.data, ["mode=755", "size=65536k"]);
        assert_eq!(m.data_string(), "mode=755,size=65536k");
        let m = parse(&["index=off", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]);
        assert_eq!(m.flags, MountFlags::empty());
        assert_eq!(
            m.data_string(),
            "index=off,lowerdir=/a:/b,upperdir=/u,workdir=/w"
        );
        // Case matters, as in the kernel's own parsers.
        assert_eq!(parse(&["RO"]).data, ["RO"]);
        assert_eq!(parse(&[""]).data, [""]);
    }

    #[test]
    fn remount_and_defaults() {
        let m = parse(&["remount", "ro", "defaults"]);
        assert!(m.remount);
        assert_eq!(m.flags.bits(), MS_RDONLY);
        assert!(m.data.is_empty());
        assert_eq!(parse::<&str>(&[]), MountOptions::default());
    }

    #[test]
    fn bind_helpers() {
        let m = parse(&["rbind", "ro", "nosuid", "rprivate"]);
        assert!(m.is_bind() && m.is_recursive() && m.bind_ro());
        assert_eq!(m.flags.bits(), MS_BIND | MS_REC | MS_RDONLY | MS_NOSUID);
        let m = parse(&["bind", "ro", "rw"]);
        assert!(m.is_bind() && !m.is_recursive() && !m.bind_ro());
        assert!(!parse(&["ro"]).bind_ro());
    }
}
