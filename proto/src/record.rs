//! Record/replay logs at the device boundary: what a device gave the guest, in order, so that
//! a replay can give it again without the world (the console's input, the rng's bytes).
//!
//! A log is append-only: a header, then records. Each record carries its own length and a
//! CRC-32 of its payload, so a log cut by a crash reads up to its last whole record, and a
//! flipped byte is found where it is.
//!
//! ```text
//! header  "VMMRLOG" | version u8 (1) | kind length u8 | kind (what the log is of: "console", "rng")
//! record  payload length u32 | crc32 u32 (of the payload) | payload
//! ```

use std::io::{Read, Write};

const MAGIC: &[u8; 7] = b"VMMRLOG";
const VERSION: u8 = 1;
/// A record's payload at most (an rng request is 64 KiB).
const MAX_RECORD: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read or write the log ({0})")]
    Io(#[from] std::io::Error),
    #[error("not a record/replay log (no VMMRLOG header); give the directory that --record wrote")]
    NotALog,
    #[error("a log in format {0}; this build reads format {VERSION}")]
    Version(u8),
    #[error("a log of {got:?}, not of {want:?}")]
    Kind { got: String, want: String },
    #[error("the record at byte {0} is cut short; the recording ended there")]
    Truncated(u64),
    #[error("the record at byte {0} fails its checksum; the log is corrupt")]
    Checksum(u64),
    #[error("the record at byte {0} claims {1} bytes, more than a record holds")]
    TooLong(u64, u32),
}

/// Appends records to a log (writing the header first when the file is empty).
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write + std::io::Seek> Writer<W> {
    /// A log of `kind` in `file`, opened for appending: a restarted helper that is handed the
    /// same file goes on after what its predecessor wrote.
    pub fn append(file: W, kind: &str) -> Result<Self, RecordError> {
        let mut w = Writer { out: file };
        // (lseek, not fstat: a sandboxed helper's allowlist has the one, not always the other)
        if w.out.seek(std::io::SeekFrom::End(0))? == 0 {
            w.out.write_all(&header(kind))?;
        }
        Ok(w)
    }
}

impl<W: Write> Writer<W> {
    /// A log of `kind` on a fresh writer.
    pub fn new(mut out: W, kind: &str) -> Result<Self, RecordError> {
        out.write_all(&header(kind))?;
        Ok(Writer { out })
    }

    /// One record, written whole (one write, so that a crash leaves whole records).
    pub fn record(&mut self, payload: &[u8]) -> Result<(), RecordError> {
        let mut buf = Vec::with_capacity(8 + payload.len());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        self.out.write_all(&buf)?;
        Ok(())
    }

    /// One record, for a buffered writer (its head and payload go in as two writes, with no
    /// copy made first; the buffer makes them one write to the file, or a crash that cuts
    /// the last record leaves it cut short, which a reader reports as the recording's end).
    pub fn record_buffered(&mut self, payload: &[u8]) -> Result<(), RecordError> {
        let mut head = [0u8; 8];
        head[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        head[4..].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

fn header(kind: &str) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(VERSION);
    h.push(kind.len() as u8);
    h.extend_from_slice(kind.as_bytes());
    h
}

/// Reads a log's records in order.
pub struct Reader<R: Read> {
    input: R,
    at: u64,
}

impl Reader<std::fs::File> {
    /// A log in `file` read on from the file's offset (which the descriptor shares with a
    /// predecessor that read up to there: a restarted helper handed the same file goes on
    /// where the last one stopped); the header is checked wherever the offset is.
    pub fn resume(mut file: std::fs::File, kind: &str) -> Result<Self, RecordError> {
        use std::io::Seek;
        use std::os::unix::fs::FileExt;
        let at = file.stream_position()?;
        if at == 0 {
            return Reader::new(file, kind);
        }
        let mut head = vec![0u8; 9 + kind.len()];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| RecordError::NotALog)?;
        Reader::new(&head[..], kind)?;
        Ok(Reader { input: file, at })
    }
}

impl<R: Read> Reader<R> {
    /// Checks the header: a log of `kind`, in this build's format.
    pub fn new(mut input: R, kind: &str) -> Result<Self, RecordError> {
        let mut head = [0u8; 9];
        read_all(&mut input, &mut head).map_err(|_| RecordError::NotALog)?;
        if &head[..7] != MAGIC {
            return Err(RecordError::NotALog);
        }
        if head[7] != VERSION {
            return Err(RecordError::Version(head[7]));
        }
        let mut got = vec![0u8; head[8].into()];
        read_all(&mut input, &mut got).map_err(|_| RecordError::NotALog)?;
        let got = String::from_utf8_lossy(&got).into_owned();
        if got != kind {
            return Err(RecordError::Kind {
                got,
                want: kind.to_string(),
            });
        }
        Ok(Reader {
            input,
            at: 9 + u64::from(head[8]),
        })
    }

    /// The next record's payload; None at the end of the log.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, RecordError> {
        let at = self.at;
        let mut head = [0u8; 8];
        match read_all(&mut self.input, &mut head)? {
            0 => return Ok(None),
            8 => {}
            _ => return Err(RecordError::Truncated(at)),
        }
        let len = u32::from_le_bytes(head[..4].try_into().unwrap());
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
        if len > MAX_RECORD {
            return Err(RecordError::TooLong(at, len));
        }
        let mut payload = vec![0u8; len as usize];
        if read_all(&mut self.input, &mut payload)? != payload.len() {
            return Err(RecordError::Truncated(at));
        }
        if crc32fast::hash(&payload) != crc {
            return Err(RecordError::Checksum(at));
        }
        self.at += 8 + u64::from(len);
        Ok(Some(payload))
    }

    /// Where the next record starts.
    pub fn position(&self) -> u64 {
        self.at
    }
}

/// Reads until `buf` is full or the input ends; how much came.
fn read_all(input: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(records: &[&[u8]]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), "rng").unwrap();
        for r in records {
            w.record(r).unwrap();
        }
        w.into_inner()
    }

    #[test]
    fn records_come_back_in_order() {
        let bytes = log(&[b"one", b"", b"three"]);
        let mut r = Reader::new(&bytes[..], "rng").unwrap();
        assert_eq!(r.next_record().unwrap().unwrap(), b"one");
        assert_eq!(r.next_record().unwrap().unwrap(), b"");
        assert_eq!(r.next_record().unwrap().unwrap(), b"three");
        assert!(r.next_record().unwrap().is_none());
    }

    #[test]
    fn every_damage_is_named_with_its_place() {
        let bytes = log(&[b"one", b"two"]);
        // The header is 12 bytes ("VMMRLOG", version, 3, "rng"); the first record 11.
        let mut flipped = bytes.clone();
        flipped[12 + 11 + 8] ^= 1;
        let mut r = Reader::new(&flipped[..], "rng").unwrap();
        r.next_record().unwrap();
        assert!(matches!(r.next_record(), Err(RecordError::Checksum(23))));
        let cut = &bytes[..bytes.len() - 1];
        let mut r = Reader::new(cut, "rng").unwrap();
        r.next_record().unwrap();
        assert!(matches!(r.next_record(), Err(RecordError::Truncated(23))));
        assert!(matches!(
            Reader::new(&bytes[..], "console"),
            Err(RecordError::Kind { .. })
        ));
        assert!(matches!(
            Reader::new(&b"something else"[..], "rng"),
            Err(RecordError::NotALog)
        ));
    }

    #[test]
    fn a_reader_resumes_where_the_shared_offset_stands() {
        use std::io::{Seek, SeekFrom, Write as _};
        let mut f = tempfile();
        f.write_all(&log(&[b"one", b"two"])).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        let mut first = Reader::resume(f.try_clone().unwrap(), "rng").unwrap();
        assert_eq!(first.next_record().unwrap().unwrap(), b"one");
        let mut second = Reader::resume(f, "rng").unwrap();
        assert_eq!(second.next_record().unwrap().unwrap(), b"two");
        assert!(second.next_record().unwrap().is_none());
    }

    fn tempfile() -> std::fs::File {
        let flags = nix::sys::memfd::MFdFlags::MFD_CLOEXEC;
        std::fs::File::from(nix::sys::memfd::memfd_create(c"record-test", flags).unwrap())
    }
}
