//! `vmm-core run --config FILE`: the run flags in a TOML file, each key a flag's long name
//! (`memory = "1G"`, `disk = ["path=/var/lib/vmm/vm1/root.img", "path=data.img,readonly=on"]`,
//! `no-sandbox = true`), so that a service manager passes one path instead of a
//! whitespace-split argument string (a kernel command line has spaces). Flags on the command
//! line override the file's single values and add to its lists.
//!
//! The file becomes command-line arguments placed before the user's own, and clap parses the
//! whole: one set of names, defaults, checks and error messages for both.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A config file that cannot be read or used, named with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config {path}: cannot read it ({1}); check the path", path = .0.display())]
    Read(PathBuf, std::io::Error),
    #[error("--config {path}: line {1}: {2}; the file is TOML (key = \"value\")", path = .0.display())]
    Syntax(PathBuf, usize, String),
    #[error("--config {path}: {1}: not a setting; the keys are `vmm-core run`'s flags without the dashes (vmm-core run --help)", path = .0.display())]
    Unknown(PathBuf, String),
    #[error("--config {path}: {1}: {2}", path = .0.display())]
    Value(PathBuf, String, &'static str),
}

/// How a flag takes its value, which decides the TOML types it accepts.
enum Kind {
    /// `--flag`: true or false.
    Switch,
    /// `--flag V`, once: a string or a number.
    One,
    /// `--flag V`, repeatable: a string, a number, or an array of them.
    Many,
}

/// The flags `run` takes, by long name.
fn kind(run: &clap::Command, key: &str) -> Option<Kind> {
    let arg = run
        .get_arguments()
        .find(|a| a.get_long() == Some(key) && key != "config")?;
    Some(match arg.get_action() {
        clap::ArgAction::SetTrue => Kind::Switch,
        clap::ArgAction::Append => Kind::Many,
        _ => Kind::One,
    })
}

/// One TOML value as a flag's argument.
fn scalar(v: &toml_edit::Value) -> Option<String> {
    match v {
        toml_edit::Value::String(s) => Some(s.value().clone()),
        toml_edit::Value::Integer(i) => Some(i.value().to_string()),
        _ => None,
    }
}

/// The file's settings as arguments, in the file's order.
pub fn arguments(path: &Path, run: &clap::Command) -> Result<Vec<OsString>, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigFileError::Read(path.into(), e))?;
    settings(&text, path, run)
}

/// The settings a snapshot's header carries (its VM's --config file), if it has them. A
/// file that is not a readable snapshot gives none: the restore itself says what is wrong.
pub fn snapshot_spec(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..8] != b"VMMSTATE" {
        return None;
    }
    let cfg_len = u32::from_le_bytes(head[16..20].try_into().ok()?) as usize;
    if cfg_len > 1 << 16 {
        return None;
    }
    let mut cfg = vec![0u8; cfg_len];
    f.read_exact(&mut cfg).ok()?;
    let n = u32::from_le_bytes(cfg.get(4..8)?.try_into().ok()?) as usize;
    let at = 8 + 16 * n;
    let len = u32::from_le_bytes(cfg.get(at..at + 4)?.try_into().ok()?) as usize;
    let spec = cfg.get(at + 4..at + 4 + len)?;
    String::from_utf8(spec.to_vec())
        .ok()
        .filter(|s| !s.is_empty())
}

/// The VM state a snapshot holds (its "vm" device section), found by walking the sections'
/// heads (RAM is skipped, not read). Only what a replay from the snapshot needs before the
/// VM is built: the restore itself reads and checks the whole file.
pub fn snapshot_state(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut head = [0u8; 20];
    f.read_exact(&mut head)?;
    if &head[..8] != b"VMMSTATE" {
        return Ok(None);
    }
    let cfg_len = u32::from_le_bytes(head[16..20].try_into().expect("4 bytes"));
    f.seek(SeekFrom::Current(i64::from(cfg_len) + 4))?;
    const DEVICE: u8 = 3;
    const END: u8 = 0xff;
    loop {
        let mut sect = [0u8; 9];
        f.read_exact(&mut sect)?;
        let len = u64::from_le_bytes(sect[1..].try_into().expect("8 bytes"));
        match sect[0] {
            END => return Ok(None),
            DEVICE if len <= 64 << 20 => {
                let mut payload = vec![0u8; len as usize];
                f.read_exact(&mut payload)?;
                let mut crc = [0u8; 4];
                f.read_exact(&mut crc)?;
                let mut h = crc32fast::Hasher::new();
                h.update(&sect);
                h.update(&payload);
                if h.finalize().to_le_bytes() != crc {
                    return Err(std::io::Error::other("its device state fails its checksum"));
                }
                let n = payload.get(..2).map_or(usize::MAX, |b| {
                    usize::from(u16::from_le_bytes([b[0], b[1]]))
                });
                if payload.get(2..2 + n.min(payload.len())) == Some(b"vm") {
                    return Ok(Some(payload[2 + n..].to_vec()));
                }
            }
            _ => {
                let skip = i64::try_from(len.saturating_add(4))
                    .map_err(|_| std::io::Error::other("a section's length is out of range"))?;
                f.seek_relative(skip)?;
            }
        }
    }
}

/// Settings in TOML text (from `path`, as errors name it) as arguments.
fn settings(
    text: &str,
    path: &Path,
    run: &clap::Command,
) -> Result<Vec<OsString>, ConfigFileError> {
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
        let at = e.span().map_or(0, |s| s.start);
        let line = text[..at.min(text.len())].matches('\n').count() + 1;
        ConfigFileError::Syntax(path.into(), line, e.message().trim().replace('\n', "; "))
    })?;
    let mut out = Vec::new();
    for (key, item) in doc.iter() {
        let bad = |why| ConfigFileError::Value(path.into(), key.to_string(), why);
        let kind =
            kind(run, key).ok_or_else(|| ConfigFileError::Unknown(path.into(), key.into()))?;
        let value = item
            .as_value()
            .ok_or_else(|| bad("a table; write key = value"))?;
        let flag = OsString::from(format!("--{key}"));
        match (kind, value) {
            (Kind::Switch, toml_edit::Value::Boolean(b)) => {
                if *b.value() {
                    out.push(flag);
                }
            }
            (Kind::Switch, _) => return Err(bad("write true or false")),
            (Kind::Many, toml_edit::Value::Array(a)) => {
                for v in a.iter() {
                    let v = scalar(v).ok_or_else(|| bad("write a list of strings"))?;
                    out.extend([flag.clone(), v.into()]);
                }
            }
            (Kind::One, toml_edit::Value::Array(_)) => {
                return Err(bad("takes one value, not a list"));
            }
            (_, v) => {
                let v = scalar(v).ok_or_else(|| bad("write a string or a number"))?;
                out.extend([flag, v.into()]);
            }
        }
    }
    Ok(out)
}

/// The value of `--flag V` or `--flag=V` among `args`.
fn flag_value(args: &[OsString], flag: &str) -> Option<String> {
    let long = format!("{flag}=");
    let mut it = args.iter().filter_map(|a| a.to_str());
    while let Some(s) = it.next() {
        if s == "--" {
            break;
        }
        if let Some(v) = s.strip_prefix(&long) {
            return Some(v.to_string());
        }
        if s == flag {
            return it.next().map(str::to_string);
        }
    }
    None
}

/// Drops `--flag V` pairs from `args`.
fn without(args: Vec<OsString>, flag: &str) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == flag {
            it.next();
        } else {
            kept.push(a);
        }
    }
    kept
}

/// The command line with settings spliced in right after `run`, weakest first: what a
/// `--restore file:P` snapshot says its VM is (its disks only when none is given), then a
/// `--config FILE`'s, then the user's own flags, which win; `--config` itself is left in
/// place. Anything else is returned as it was.
pub fn expand(argv: Vec<OsString>, run: &clap::Command) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(at) = argv.iter().position(|a| a == "run") else {
        return Ok(argv);
    };
    let user = &argv[at + 1..];
    let from_file = match flag_value(user, "--config") {
        Some(file) => arguments(Path::new(&file), run)?,
        None => Vec::new(),
    };
    let mut from_snapshot = Vec::new();
    let restore = flag_value(user, "--restore");
    if let Some(path) = restore.as_deref().and_then(|r| r.strip_prefix("file:")) {
        if let Some(spec) = snapshot_spec(Path::new(path)) {
            from_snapshot = settings(&spec, Path::new(path), run)?;
            // Disks given replace the snapshot's (they must match in number and order).
            if flag_value(user, "--disk").is_some() || flag_value(&from_file, "--disk").is_some() {
                from_snapshot = without(from_snapshot, "--disk");
            }
        }
    }
    if from_file.is_empty() && from_snapshot.is_empty() {
        return Ok(argv);
    }
    let mut out = argv[..=at].to_vec();
    out.extend(from_snapshot);
    out.extend(from_file);
    out.extend_from_slice(user);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// A snapshot's head and the sections given, each with its checksum, then END.
    fn snapshot_with(sections: &[(u8, &[u8])]) -> Vec<u8> {
        let mut f = b"VMMSTATE".to_vec();
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&4096u32.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        for (kind, payload) in sections.iter().chain([(0xff, &[][..])].iter()) {
            let mut head = vec![*kind];
            head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            let mut h = crc32fast::Hasher::new();
            h.update(&head);
            h.update(payload);
            f.extend_from_slice(&head);
            f.extend_from_slice(payload);
            f.extend_from_slice(&h.finalize().to_le_bytes());
        }
        f
    }

    #[test]
    fn a_snapshots_vm_state_is_found_past_ram_and_a_malformed_section_is_no_panic() {
        let dir = std::env::temp_dir().join(format!("vmm-snapstate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snap");
        let mut vm = 2u16.to_le_bytes().to_vec();
        vm.extend_from_slice(b"vm");
        vm.extend_from_slice(b"the state");
        // RAM is skipped; a device section too short to name its device is passed over.
        std::fs::write(
            &path,
            snapshot_with(&[(1, &[7u8; 4104]), (3, &[2]), (3, &vm)]),
        )
        .unwrap();
        assert_eq!(snapshot_state(&path).unwrap(), Some(b"the state".to_vec()));
        std::fs::write(&path, snapshot_with(&[(3, &[2])])).unwrap();
        assert_eq!(snapshot_state(&path).unwrap(), None);
        // A flipped byte in the state is said, not taken.
        let mut bad = snapshot_with(&[(3, &vm)]);
        let at = bad.len() - 13 - 5;
        bad[at] ^= 1;
        std::fs::write(&path, bad).unwrap();
        assert!(snapshot_state(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn run() -> clap::Command {
        crate::config::RunArgs::augment_args(clap::Command::new("run"))
    }

    fn file(text: &str) -> (PathBuf, impl Drop) {
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "vmm-config-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        (p.clone(), Gone(p))
    }

    fn strings(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn settings_become_flags_before_the_command_lines_own() {
        let (p, _g) = file(
            "kernel = \"/k\"\ncmdline = \"console=ttyS0 tg.scenario=idle\"\nmemory = 256\n\
             disk = [\"path=/a\", \"path=/b,readonly=on\"]\nno-sandbox = true\n",
        );
        let argv: Vec<OsString> = [
            "vmm-core",
            "run",
            "--config",
            p.to_str().unwrap(),
            "--memory",
            "1G",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = expand(argv, &run()).unwrap();
        assert_eq!(
            strings(&out),
            [
                "vmm-core",
                "run",
                "--kernel",
                "/k",
                "--cmdline",
                "console=ttyS0 tg.scenario=idle",
                "--memory",
                "256",
                "--disk",
                "path=/a",
                "--disk",
                "path=/b,readonly=on",
                "--no-sandbox",
                "--config",
                p.to_str().unwrap(),
                "--memory",
                "1G"
            ]
        );
    }

    #[test]
    fn mistakes_are_named_with_the_file_and_the_key() {
        let cases = [
            (
                "memroy = \"1G\"\n",
                "memroy: not a setting; the keys are `vmm-core run`'s flags without the dashes",
            ),
            ("memory = [\"1G\"]\n", "memory: takes one value, not a list"),
            ("no-sandbox = \"yes\"\n", "no-sandbox: write true or false"),
            ("disk = [1.5]\n", "disk: write a list of strings"),
            ("config = \"other.toml\"\n", "config: not a setting"),
            (
                "[disk]\npath = \"/a\"\n",
                "disk: a table; write key = value",
            ),
            ("kernel = \"/k\"\nmemory = \n", "line 2: "),
        ];
        for (text, want) in cases {
            let (p, _g) = file(text);
            let e = arguments(&p, &run()).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--config {}: ", p.display())), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let e = arguments(Path::new("/nonexistent.toml"), &run()).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("--config /nonexistent.toml: cannot read it"));
    }
}
