//! `--disk`: a disk's image or vhost-user socket, and how blockd serves it.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: Option<PathBuf>,
    /// An external vhost-user-blk backend's socket.
    pub socket: Option<PathBuf>,
    pub readonly: bool,
    pub queues: u16,
    pub serial: Option<String>,
    /// raw or qcow2.
    pub format: String,
    /// Open the image with O_DIRECT.
    pub direct: bool,
    /// The error policies for reads and for writes (QEMU's rerror, werror): report, ignore,
    /// stop or enospc.
    pub rerror: String,
    pub werror: String,
    /// blockd's throttle at start (`throttle.iops=200,throttle.group=g`, QEMU's names).
    pub throttle: Option<vmm_proto::throttle::Spec>,
    /// Its name (default diskN, N its place among the disks) and PCI slot on bus 0 (default
    /// the first free), as QEMU's id= and addr=: what a snapshot or migration of a VM whose
    /// disks changed (hot-add, hot-remove) carries, so that the destination has each disk
    /// where the state has it.
    pub name: Option<String>,
    pub slot: Option<u8>,
    /// A qcow2 overlay's backing file, in place of the one its header names (QEMU's
    /// -blockdev backing=): its format is what the file is; its own chain follows its header.
    pub backing: Option<PathBuf>,
}

pub const MAX_QUEUES: u16 = 16;

/// A `--disk` the parser refuses: the spec as given, and what is wrong with it and how to
/// write it.
#[derive(Debug, thiserror::Error)]
#[error("--disk {spec}: {why}")]
pub struct DiskSpecError {
    pub spec: String,
    pub why: String,
}

impl DiskSpecError {
    fn new(spec: &str, why: String) -> DiskSpecError {
        DiskSpecError {
            spec: spec.to_string(),
            why,
        }
    }
}

/// Parses `path=FILE[,readonly=on|off][,queues=N][,serial=ID]` or `socket=PATH[,queues=N]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, DiskSpecError> {
    let usage = "write path=FILE[,format=raw|qcow2][,readonly=on][,queues=N][,serial=ID][,direct=on][,rerror=POLICY][,werror=POLICY][,throttle.LIMIT=N][,throttle.group=NAME][,name=NAME][,slot=N][,backing=FILE] or socket=PATH[,queues=N][,name=NAME][,slot=N]";
    let mut d = DiskSpec {
        path: None,
        socket: None,
        readonly: false,
        queues: 1,
        serial: None,
        name: None,
        slot: None,
        backing: None,
        format: "raw".into(),
        direct: false,
        rerror: "report".into(),
        werror: "report".into(),
        throttle: None,
    };
    let mut throttle = Vec::new();
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            DiskSpecError::new(s, format!("\"{part}\" is not key=value; {usage}"))
        })?;
        if let Some(key) = k.strip_prefix("throttle.") {
            throttle.push(format!("{key}={v}"));
            continue;
        }
        match k {
            "path" if !v.is_empty() => d.path = Some(PathBuf::from(v)),
            "socket" if !v.is_empty() => d.socket = Some(PathBuf::from(v)),
            "backing" if !v.is_empty() => d.backing = Some(PathBuf::from(v)),
            "readonly" => d.readonly = on_off(s, k, v)?,
            "queues" => {
                d.queues = v
                    .parse::<u16>()
                    .ok()
                    .filter(|q| (1..=MAX_QUEUES).contains(q))
                    .ok_or_else(|| {
                        DiskSpecError::new(
                            s,
                            format!("queues={v}; write a number from 1 to {MAX_QUEUES}"),
                        )
                    })?
            }
            "format" => match v {
                "raw" | "qcow2" => d.format = v.to_string(),
                _ => {
                    return Err(DiskSpecError::new(
                        s,
                        format!("format={v}; write format=raw or format=qcow2"),
                    ))
                }
            },
            "direct" => d.direct = on_off(s, k, v)?,
            "rerror" | "werror" => {
                if !["report", "ignore", "stop", "enospc"].contains(&v) {
                    return Err(DiskSpecError::new(s, format!("{k}={v}: write report (the guest gets an I/O error), ignore, stop (pause the VM until vmmctl resume) or enospc (stop on a full disk only)"
                    )));
                }
                if k == "rerror" {
                    d.rerror = v.to_string()
                } else {
                    d.werror = v.to_string()
                }
            }
            "name" => {
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(DiskSpecError::new(
                        s,
                        format!("name={v}: write 1 to 32 letters, digits, - or _"),
                    ));
                }
                d.name = Some(v.to_string())
            }
            "slot" => {
                d.slot = Some(
                    v.parse::<u8>()
                        .ok()
                        .filter(|n| (1..32).contains(n))
                        .ok_or_else(|| {
                            DiskSpecError::new(
                                s,
                                format!("slot={v}; write a PCI slot from 1 to 31"),
                            )
                        })?,
                )
            }
            "serial" => {
                if v.len() > 20 {
                    return Err(DiskSpecError::new(
                        s,
                        format!("serial={v} is longer than 20 bytes"),
                    ));
                }
                d.serial = Some(v.to_string())
            }
            _ => {
                return Err(DiskSpecError::new(
                    s,
                    format!("unknown or empty key \"{k}\"; {usage}"),
                ))
            }
        }
    }
    if !throttle.is_empty() {
        let spec = vmm_proto::throttle::Spec::parse(&throttle.join(","))
            .map_err(|m| DiskSpecError::new(s, format!("throttle.{m}")))?;
        if d.socket.is_some() {
            return Err(DiskSpecError::new(
                s,
                "throttle.* is blockd's; a socket= backend throttles by itself".to_string(),
            ));
        }
        d.throttle = Some(spec);
    }
    if d.backing.is_some() && d.format != "qcow2" {
        return Err(DiskSpecError::new(
            s,
            "backing= is a qcow2 overlay's; add format=qcow2 (a raw image has no backing file)"
                .to_string(),
        ));
    }
    match (&d.path, &d.socket) {
        (None, None) => Err(DiskSpecError::new(s, format!("no path= or socket=; {usage}"))),
        (Some(_), Some(_)) => Err(DiskSpecError::new(s, "path= and socket= together; give one".to_string())),
        (None, Some(_)) if d.readonly || d.serial.is_some() || d.direct || d.format != "raw" => {
            Err(DiskSpecError::new(s, "readonly=, serial=, format= and direct= are the backend's own settings with socket=".to_string()))
        }
        _ => Ok(d),
    }
}

/// An on/off value of `--disk SPEC`'s key.
fn on_off(spec: &str, key: &str, v: &str) -> Result<bool, DiskSpecError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(DiskSpecError::new(
            spec,
            format!("{key}={v}; write {key}=on or off"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn disk_specs() {
        let d = parse_disk("path=/x.img,throttle.iops=5,throttle.group=a").unwrap();
        assert_eq!(
            d.throttle,
            Some(vmm_proto::throttle::Spec::parse("group=a,iops=5").unwrap())
        );
        let d = parse_disk("path=/x.img,readonly=on,queues=2,serial=abc,format=qcow2,direct=on")
            .unwrap();
        assert_eq!(d.format, "qcow2");
        assert!(d.direct);
        assert_eq!(d.path.as_deref(), Some(Path::new("/x.img")));
        assert!(d.readonly);
        assert_eq!(d.queues, 2);
        assert!(parse_disk("socket=/s,queues=4").is_ok());
        let d = parse_disk("path=/x,name=data-1,slot=5").unwrap();
        assert_eq!((d.name.as_deref(), d.slot), (Some("data-1"), Some(5)));
        for bad in [
            "",
            "x.img",
            "path=/x,queues=0",
            "path=/x,queues=99",
            "path=/x,readonly=maybe",
            "path=/x,socket=/y",
            "path=/x,colour=red",
            "socket=/s,readonly=on",
            "path=/x,format=vmdk",
            "path=/x,slot=0",
            "path=/x,slot=32",
            "path=/x,name=a/b",
        ] {
            let e = parse_disk(bad).unwrap_err().to_string();
            assert!(e.starts_with("--disk "), "{e}");
        }
    }
}
