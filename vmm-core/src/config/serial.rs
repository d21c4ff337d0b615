//! `--serial`: where the console goes, a backend chardevd serves.

use super::ConfigError;

/// A console backend, as chardevd opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Null,
    Stdio,
    Pty,
    File { path: String, append: bool },
    Ring(u32),
    UnixServer(String),
    UnixClient { path: String, reconnect_ms: u32 },
}

/// A backend in chardevd, or None for `direct` (stdio inside vmm-core).
pub fn parse_serial(s: &str) -> Result<Option<Backend>, ConfigError> {
    let bad = || ConfigError::Serial(s.to_string());
    if s == "direct" {
        return Ok(None);
    }
    let rest = s;
    let backend = if rest == "null" {
        Backend::Null
    } else if rest == "stdio" {
        Backend::Stdio
    } else if rest == "pty" {
        Backend::Pty
    } else if let Some(spec) = rest.strip_prefix("unix-connect=") {
        let (path, reconnect_ms) = match spec.split_once(",reconnect=") {
            Some((p, ms)) => (
                p,
                ms.parse::<u32>().ok().filter(|&m| m > 0).ok_or_else(bad)?,
            ),
            None => (spec, 500),
        };
        if path.is_empty() || path.contains(',') {
            return Err(bad());
        }
        Backend::UnixClient {
            path: path.to_string(),
            reconnect_ms,
        }
    } else if let Some(spec) = rest.strip_prefix("file=") {
        let (path, append) = match spec.strip_suffix(",append") {
            Some(p) => (p, true),
            None => (spec, false),
        };
        if path.is_empty() {
            return Err(bad());
        }
        Backend::File {
            path: path.to_string(),
            append,
        }
    } else if let Some(size) = rest.strip_prefix("ring=") {
        let bytes = vmm_proto::size::parse(size, 1).map_err(|_| bad())?;
        Backend::Ring(
            u32::try_from(bytes)
                .ok()
                .filter(|&b| b > 0)
                .ok_or_else(bad)?,
        )
    } else if let Some(path) = rest.strip_prefix("unix=") {
        if path.is_empty() {
            return Err(bad());
        }
        Backend::UnixServer(path.to_string())
    } else {
        return Err(bad());
    };
    Ok(Some(backend))
}
