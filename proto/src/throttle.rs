//! Throttle settings as people write them (QEMU's names, comma-separated), and as the
//! blockd schema carries them (`Blockd.Throttle`): `iops=200`, `bps-wr=10485760,bps-wr-max=20971520,
//! bps-wr-max-length=5`, `group=tenant1,iops=400`, or `off`.

use crate::blockd_capnp::{limit, throttle};

/// The six limits' names, in the schema's order.
pub const NAMES: [&str; 6] = ["bps", "bps-rd", "bps-wr", "iops", "iops-rd", "iops-wr"];

/// Why a throttle setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0:?}: write KEY=VALUE, e.g. iops=200 (or just `off`)")]
    NotKeyValue(String),
    #[error("{0}: no such limit; use bps, bps-rd, bps-wr, iops, iops-rd, iops-wr (each also with -max and -max-length), or group")]
    UnknownLimit(String),
    #[error("{0}={1}: give a whole number{unit}", unit = if *.2 { " of bytes per second, with K, M or G if you like (10M)" } else { "" })]
    NotANumber(String, String, bool),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    /// Empty: the export's own budget.
    pub group: String,
    /// Per limit (NAMES order): average, burst rate, burst length in seconds.
    pub limits: [[u64; 3]; 6],
}

impl Spec {
    pub fn is_off(&self) -> bool {
        self.limits.iter().all(|l| l[0] == 0)
    }

    /// Parses `KEY=VALUE,...`; `off` turns throttling off.
    pub fn parse(s: &str) -> Result<Spec, SpecError> {
        let mut spec = Spec::default();
        if s.trim() == "off" {
            return Ok(spec);
        }
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| SpecError::NotKeyValue(part.into()))?;
            if key == "group" {
                spec.group = value.to_string();
                continue;
            }
            let (base, field) = if let Some(b) = key.strip_suffix("-max-length") {
                (b, 2)
            } else if let Some(b) = key.strip_suffix("-max") {
                (b, 1)
            } else {
                (key, 0)
            };
            let i = NAMES
                .iter()
                .position(|n| *n == base)
                .ok_or_else(|| SpecError::UnknownLimit(key.into()))?;
            // Byte rates take size suffixes (bps-wr=10M), as `migrate --bandwidth` does;
            // operation rates and burst lengths are plain numbers.
            let bytes = i < 3 && field < 2;
            spec.limits[i][field] = if bytes {
                crate::size::parse(value, 1).ok()
            } else {
                value.parse().ok()
            }
            .ok_or_else(|| SpecError::NotANumber(key.into(), value.into(), bytes))?;
        }
        Ok(spec)
    }

    pub fn write(&self, mut t: throttle::Builder) {
        t.set_group(&self.group);
        let set = |mut b: limit::Builder, l: [u64; 3]| {
            b.set_avg(l[0]);
            b.set_max(l[1]);
            b.set_burst_length(l[2]);
        };
        set(t.reborrow().init_bps_total(), self.limits[0]);
        set(t.reborrow().init_bps_read(), self.limits[1]);
        set(t.reborrow().init_bps_write(), self.limits[2]);
        set(t.reborrow().init_iops_total(), self.limits[3]);
        set(t.reborrow().init_iops_read(), self.limits[4]);
        set(t.reborrow().init_iops_write(), self.limits[5]);
    }

    pub fn read(t: throttle::Reader) -> capnp::Result<Spec> {
        let get = |r: limit::Reader| [r.get_avg(), r.get_max(), r.get_burst_length()];
        Ok(Spec {
            group: t.get_group()?.to_string()?,
            limits: [
                get(t.get_bps_total()?),
                get(t.get_bps_read()?),
                get(t.get_bps_write()?),
                get(t.get_iops_total()?),
                get(t.get_iops_read()?),
                get(t.get_iops_write()?),
            ],
        })
    }
}

impl std::fmt::Display for Spec {
    /// The same syntax back: `group=g iops=200`, or `off`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.limits.iter().flatten().all(|v| *v == 0) && self.group.is_empty() {
            return write!(f, "off");
        }
        let mut parts = Vec::new();
        if !self.group.is_empty() {
            parts.push(format!("group={}", self.group));
        }
        for (l, name) in self.limits.iter().zip(NAMES) {
            if l[0] > 0 {
                parts.push(format!("{name}={}", l[0]));
            }
            if l[1] > 0 {
                parts.push(format!("{name}-max={}", l[1]));
            }
            if l[2] > 1 {
                parts.push(format!("{name}-max-length={}", l[2]));
            }
        }
        write!(f, "{}", parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        let s = Spec::parse("group=g,iops=200,bps-wr=1000,bps-wr-max=2000,bps-wr-max-length=5")
            .unwrap();
        assert_eq!(s.group, "g");
        assert_eq!(s.limits[3], [200, 0, 0]);
        assert_eq!(s.limits[2], [1000, 2000, 5]);
        // Byte rates take suffixes; operation rates and burst lengths do not.
        let t = Spec::parse("bps-wr=10M,bps-max=1G,iops=5").unwrap();
        assert_eq!(t.limits[2][0], 10 << 20);
        assert_eq!(t.limits[0][1], 1 << 30);
        assert_eq!(
            Spec::parse("iops=5K").unwrap_err().to_string(),
            "iops=5K: give a whole number"
        );
        assert_eq!(
            Spec::parse("bps=fast").unwrap_err().to_string(),
            "bps=fast: give a whole number of bytes per second, with K, M or G if you like (10M)"
        );
        assert_eq!(
            s.to_string(),
            "group=g,bps-wr=1000,bps-wr-max=2000,bps-wr-max-length=5,iops=200"
        );
        assert!(Spec::parse("off").unwrap().is_off());
        let refused = |s: &str| Spec::parse(s).unwrap_err().to_string();
        assert!(refused("iops=x").contains("whole number"));
        assert!(refused("iops-total=5").contains("no such limit"));
        assert!(refused("iops").contains("KEY=VALUE"));
    }
}
