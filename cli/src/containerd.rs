//! What containerd's configuration says about husk: the CRI handlers whose
//! runtime is `io.containerd.husk.v2`, and the `ConfigPath` each gives the
//! shim; and containerd's version.

use std::path::{Path, PathBuf};

/// containerd's configuration file when none is named.
pub const DEFAULT_CONFIG: &str = "/etc/containerd/config.toml";
/// husk's runtime type.
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
/// Largest configuration read.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("reading containerd's configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("containerd's configuration {path} is larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("containerd's configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

/// A runtime table whose runtime_type is husk's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The table's name (the CRI handler, e.g. `husk`).
    pub name: String,
    /// Its `options.ConfigPath`, if set.
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    pub path: PathBuf,
    pub husk_handlers: Vec<Handler>,
}

/// Reads containerd's configuration at `path`.
pub fn read_config(path: &Path) -> Result<ContainerdConfig, ContainerdError> {
    let read = |source| ContainerdError::Read {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).map_err(read)?.len() > MAX_FILE {
        return Err(ContainerdError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    parse_config(&text, path)
}

/// Parses containerd's configuration text: every table anywhere whose
/// `runtime_type` is husk's (version 1 and 2 files alike).
pub fn parse_config(text: &str, path: &Path) -> Result<ContainerdConfig, ContainerdError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ContainerdError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().replace('\n', " "),
    })?;
    let mut husk_handlers = Vec::new();
    walk(&table, "", 0, &mut husk_handlers);
    Ok(ContainerdConfig {
        path: path.to_path_buf(),
        husk_handlers,
    })
}

fn walk(table: &toml::Table, name: &str, depth: usize, out: &mut Vec<Handler>) {
    // containerd's tables nest 6 deep; a deeper file is not containerd's.
    if depth > 16 {
        return;
    }
    if table.get("runtime_type").and_then(|v| v.as_str()) == Some(RUNTIME_TYPE) {
        out.push(Handler {
            name: name.to_string(),
            config_path: table
                .get("options")
                .and_then(|o| o.get("ConfigPath"))
                .and_then(|p| p.as_str())
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        });
    }
    for (k, v) in table {
        if let Some(t) = v.as_table() {
            walk(t, k, depth + 1, out);
        }
    }
}

/// The (major, minor) of `containerd --version`'s output, e.g.
/// `containerd github.com/containerd/containerd 1.6.20~ds1 ...`.
pub fn parse_version(text: &str) -> Option<(u32, u32)> {
    text.split_whitespace().find_map(|w| {
        let w = w.strip_prefix('v').unwrap_or(w);
        let mut parts = w.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some((major, minor.parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read() {
        assert_eq!(
            parse_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n"
            ),
            Some((1, 6))
        );
        assert_eq!(
            parse_version("containerd containerd.io v1.7.2 abc"),
            Some((1, 7))
        );
        assert_eq!(parse_version("nothing here"), None);
    }

    #[test]
    fn husk_handlers_are_found() {
        let text = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk]
  runtime_type = "io.containerd.husk.v2"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.husk.options]
  ConfigPath = "/etc/husk/configuration.toml"
"#;
        let c = parse_config(text, Path::new("/c.toml")).unwrap();
        assert_eq!(
            c.husk_handlers,
            [Handler {
                name: "husk".into(),
                config_path: Some("/etc/husk/configuration.toml".into())
            }]
        );
        assert!(parse_config("version = 2\n", Path::new("/c"))
            .unwrap()
            .husk_handlers
            .is_empty());
        let e = parse_config("[[", Path::new("/c")).unwrap_err().to_string();
        assert!(e.contains("/c"), "{e}");
    }
}
