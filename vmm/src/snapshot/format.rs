//! The state file's framing: a fixed header (magic, format version,
//! payload length, CRC-64 of the payload) and the JSON payload. A file of
//! another format version, a truncated file or a flipped byte is refused
//! here, before anything is parsed or handed to KVM.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// "HUSKSNAP": what every state file starts with.
pub const MAGIC: [u8; 8] = *b"HUSKSNAP";
/// Bumped whenever the payload's meaning changes; a VMM restores only its own.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version (u32), payload length (u64), CRC-64 (u64).
pub const HEADER_LEN: usize = 8 + 4 + 8 + 8;
/// A state file is small (registers, device registers, queue indexes);
/// anything past this is not one of ours.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors reading or writing the framed state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a husk snapshot state file (bad magic)")]
    Magic { path: PathBuf },
    #[error("{path}: snapshot format version {found}, this husk-vmm restores version {FORMAT_VERSION} only")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: header says {expected} payload bytes, the file has {found}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{path}: payload of {len} bytes is past the {MAX_PAYLOAD}-byte limit")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{path}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is corrupted")]
    Checksum {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
}

/// CRC-64 (ECMA) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u64 {
    crc64::crc64(0, bytes)
}

/// The header and payload as one buffer.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the framing of `bytes` (read from `path`) and returns the payload.
pub fn unframe<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], FormatError> {
    let path = || path.to_owned();
    let Some((header, payload)) = bytes.split_at_checked(HEADER_LEN) else {
        // Too short even for the header: a magic that matches is a
        // truncated file, anything else is not ours.
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC {
            return Err(FormatError::Truncated {
                path: path(),
                expected: HEADER_LEN as u64,
                found: bytes.len() as u64,
            });
        }
        return Err(FormatError::Magic { path: path() });
    };
    let field = |range: std::ops::Range<usize>| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..range.len()].copy_from_slice(&header[range]);
        b
    };
    if header[..8] != MAGIC {
        return Err(FormatError::Magic { path: path() });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version {
            path: path(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(field(12..20));
    let stored = u64::from_le_bytes(field(20..28));
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge { path: path(), len });
    }
    if payload.len() as u64 != len {
        return Err(FormatError::Truncated {
            path: path(),
            expected: len,
            found: payload.len() as u64,
        });
    }
    let computed = checksum(payload);
    if computed != stored {
        return Err(FormatError::Checksum {
            path: path(),
            stored,
            computed,
        });
    }
    Ok(payload)
}

/// Creates `path` (mode 0600, refusing an existing file) and writes the
/// framed `payload` to it, synced.
pub fn write_file(path: &Path, payload: &[u8]) -> Result<u64, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let framed = frame(payload);
    let mut file = create_private(path).map_err(io)?;
    file.write_all(&framed).map_err(io)?;
    file.sync_data().map_err(io)?;
    Ok(framed.len() as u64)
}

/// Reads and checks the state file at `path`; returns its payload.
pub fn read_file(path: &Path) -> Result<Vec<u8>, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    read_from(&file, path)
}

/// Reads and checks a state file already open as `file` (named `path` in
/// errors), from its start; returns its payload.
pub fn read_from(file: &File, path: &Path) -> Result<Vec<u8>, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    // Bounded: a huge file is refused after the limit, not read whole.
    file.take(MAX_PAYLOAD + HEADER_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    unframe(path, &bytes).map(<[u8]>::to_vec)
}

/// A new file only the VMM's user can read (0600); an existing one is an
/// error rather than overwritten.
pub fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("/snap/state")
    }

    #[test]
    fn round_trip() {
        let framed = frame(b"{\"a\":1}");
        assert_eq!(unframe(&p(), &framed).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let framed = frame(b"{\"vcpus\":[1,2,3],\"memory\":256}");
        for i in 0..framed.len() {
            let mut bad = framed.clone();
            bad[i] ^= 0x01;
            assert!(unframe(&p(), &bad).is_err(), "flip at byte {i} not caught");
        }
        let mut bad = framed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        let e = unframe(&p(), &bad).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn truncation_is_caught_at_every_length() {
        let framed = frame(b"0123456789abcdef");
        for len in 0..framed.len() {
            let e = unframe(&p(), &framed[..len]).unwrap_err();
            assert!(
                matches!(e, FormatError::Truncated { .. } | FormatError::Magic { .. }),
                "length {len}: {e}"
            );
        }
        let e = unframe(&p(), &framed[..framed.len() - 3])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    #[test]
    fn other_versions_and_magic_are_refused() {
        let mut framed = frame(b"{}");
        framed[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = unframe(&p(), &framed).unwrap_err().to_string();
        assert!(e.contains("format version 7"), "{e}");
        let e = unframe(&p(), b"ELF\x7f not a snapshot file at all")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad magic"), "{e}");
    }

    #[test]
    fn files_are_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("husk-snapfmt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("state");
        write_file(&path, b"{}").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_file(&path).unwrap(), b"{}");
        assert!(
            write_file(&path, b"{}").is_err(),
            "an existing file is kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
