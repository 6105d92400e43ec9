//! Whether an executable is a static 64-bit ELF: a jailed VMM must be, since
//! the jail holds no shared libraries.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a statically linked ELF executable")]
    NotStatic(PathBuf),
}

/// Checks that `path` is a 64-bit ELF executable with no program
/// interpreter (no dynamic loader).
pub fn check_static(path: &Path) -> Result<(), ElfError> {
    let io = |source| ElfError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut head = Vec::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(64 << 10)
        .read_to_end(&mut head)
        .map_err(io)?;
    if has_interpreter(&head) != Some(false) {
        return Err(ElfError::NotStatic(path.to_path_buf()));
    }
    Ok(())
}

/// Whether the 64-bit little-endian ELF image starting with `head` has a
/// PT_INTERP program header; `None` if it is not one, or its program
/// headers are not within `head`.
pub fn has_interpreter(head: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(head.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(head.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(head.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let entry = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(entry)? == PT_INTERP {
            return Some(true);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        let ls = Path::new("/bin/ls");
        if ls.exists() {
            let e = check_static(ls).unwrap_err();
            assert!(matches!(e, ElfError::NotStatic(_)), "{e}");
        }
        if Path::new("/bin/busybox").exists() {
            check_static(Path::new("/bin/busybox")).unwrap();
        }
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
        assert_eq!(has_interpreter(b"\x7fELF\x02\x01"), None, "truncated");
        let e = check_static(Path::new("/nonexistent/vmm")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmm"), "{e}");
    }
}
