//! The bundle marker: a file in a container's bundle that tells `shim
//! delete` (run when the shim is gone) which sandbox state folder the
//! container had, and whether the container owned it. Written by Create,
//! read by `shim delete`, removed by both on the way out.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The marker's file name in the bundle.
pub use husk_runtime_config::state::BUNDLE_MARKER;
/// Longest marker read back (it holds a path and a word).
const MAX_MARKER: u64 = 4096;

/// Writes the marker: `state`'s path, then "owner" or "member". Its path.
pub fn write(bundle: &Path, state: &Path, owner: bool) -> io::Result<PathBuf> {
    let marker = bundle.join(BUNDLE_MARKER);
    let owner_word = if owner { "owner" } else { "member" };
    std::fs::write(&marker, format!("{}\n{owner_word}\n", state.display()))?;
    Ok(marker)
}

/// Reads the marker: (state folder, whether the container owned it).
pub fn read(bundle: &Path) -> Option<(PathBuf, bool)> {
    let mut text = String::new();
    std::fs::File::open(bundle.join(BUNDLE_MARKER))
        .ok()?
        .take(MAX_MARKER)
        .read_to_string(&mut text)
        .ok()?;
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next()?);
    let owner = lines.next()? == "owner";
    dir.is_absolute().then_some((dir, owner))
}

/// Removes the marker, if there is one.
pub fn remove(bundle: &Path) {
    let _ = std::fs::remove_file(bundle.join(BUNDLE_MARKER));
}
