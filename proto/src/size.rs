//! Sizes as people write them, for every binary: `512M`, `2G`, `2GiB`, `64K`, `4096`.
//! K, M, G and T are powers of 1024 (with or without `B` or `iB`); what a bare number counts
//! is the caller's choice (bytes for a ring or a rate, MiB for `--memory`, as QEMU's `-m`).

/// A size that does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size; write a number with an optional K, M, G or T (e.g. 64K, 2G)")]
    Malformed(String),
    #[error("{0} is too large")]
    TooLarge(String),
}

/// `s` in bytes; a bare number counts `unit` bytes.
pub fn parse(s: &str, unit: u64) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Malformed(s.to_string()))?;
    let mult = match suffix.trim().to_ascii_uppercase().as_str() {
        "" => unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(SizeError::Malformed(s.to_string())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("4096", 1), Ok(4096));
        assert_eq!(parse("128", 1 << 20), Ok(128 << 20));
        assert_eq!(parse("64K", 1), Ok(64 << 10));
        assert_eq!(parse("2g", 1), Ok(2 << 30));
        assert_eq!(parse("2GiB", 1 << 20), Ok(2 << 30));
        assert_eq!(parse("100MB", 1), Ok(100 << 20));
        assert_eq!(parse("5B", 1 << 20), Ok(5));
        assert_eq!(parse("1T", 1), Ok(1 << 40));
    }

    #[test]
    fn bad_sizes() {
        for s in ["", "K", "lots", "12X", "1.5G", "-1", "2 G B"] {
            assert_eq!(parse(s, 1), Err(SizeError::Malformed(s.to_string())), "{s}");
        }
        assert_eq!(
            parse("99999999999T", 1),
            Err(SizeError::TooLarge("99999999999T".to_string()))
        );
    }
}
