//! The migration stream: what a live migration sends and what a snapshot file holds.
//!
//! ```text
//! header   "VMMSTATE" | format u32 | page size u32 | config length u32 | config | crc32 u32
//! section  kind u8 | payload length u64 | payload | crc32 u32 (of kind, length and payload)
//!   RAM     gpa u64 | pages (a run of non-zero pages)
//!   LZ4     gpa u64 | page count u32 | the run's pages as one LZ4 block (--compress; a run
//!           that does not shrink goes as RAM)
//!   ZERO    gpa u64 | page count u64 (pages that became zero since they were sent)
//!   DEVICE  name length u16 | name | state (Cap'n Proto, proto/schema/state.capnp)
//!   PASS    pass u32 (a live source's pass ends here; the destination acknowledges it once
//!           it has written every page before it, see server.rs)
//!   POSTCOPY the pages still to come, a bitmap (bit n of word w: page 64w+n of RAM in
//!           region order, as u64 words); after the device state, when the destination runs
//!           the VM before it has all of its RAM (post-copy: see postcopy.rs)
//!   WORKSET the pages the guest was writing when the snapshot was taken, a bitmap as
//!           POSTCOPY's (a lazy restore loads them first)
//!   END     sections u64 | RAM pages u64 | zero pages u64 (what came before, to be checked)
//! ```
//!
//! All integers are little-endian. The config is the VM's shape (RAM regions and vCPU count):
//! a destination of another shape refuses the stream before it takes any of it. The reader
//! checks everything: magic, format, every checksum, every length against a bound, every RAM
//! range against the config, and the counts at the end, so a truncated, corrupt, wrong-version
//! or mismatched stream is refused with an error that says which and where. A caller applies
//! device state only once `Section::End` has been read (from `Reader::section`).

use std::fmt;
use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 8] = b"VMMSTATE";
/// The stream format this build writes and reads.
pub const FORMAT: u32 = 1;
pub const PAGE: usize = 4096;
/// Pages per RAM section (4 MiB).
const RUN: usize = 1024;
/// The largest payload a reader accepts, so that a corrupt length cannot exhaust memory.
pub const MAX_PAYLOAD: u64 = 64 << 20;
const MAX_CONFIG: u32 = 1 << 16;

const RAM: u8 = 1;
const ZERO: u8 = 2;
const DEVICE: u8 = 3;
const LZ4: u8 = 4;
const PASS: u8 = 5;
const POSTCOPY: u8 = 6;
const WORKSET: u8 = 7;
const END: u8 = 0xff;

/// The VM's shape: a stream only goes into a VM of the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Guest RAM regions: (guest physical address, bytes), page-aligned, in order.
    pub regions: Vec<(u64, u64)>,
    pub vcpus: u32,
    /// The source's run settings as a --config file (TOML; empty on a destination, and in
    /// streams from before it was carried). Not part of the shape a reader checks.
    pub spec: String,
}

impl Config {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + 16 * self.regions.len());
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        b.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (gpa, size) in &self.regions {
            b.extend_from_slice(&gpa.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
        }
        b.extend_from_slice(&(self.spec.len() as u32).to_le_bytes());
        b.extend_from_slice(self.spec.as_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Config> {
        let vcpus = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
        let n = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?) as usize;
        let shape = 8 + 16 * n;
        // The spec after the regions: a u32 length and the text (absent in older streams).
        let spec = match b.len().checked_sub(shape)? {
            0 => String::new(),
            rest => {
                let len = u32::from_le_bytes(b.get(shape..shape + 4)?.try_into().ok()?) as usize;
                if rest != 4 + len {
                    return None;
                }
                String::from_utf8(b[shape + 4..].to_vec()).ok()?
            }
        };
        let regions = (0..n)
            .map(|i| {
                let at = 8 + 16 * i;
                (
                    u64::from_le_bytes(b[at..at + 8].try_into().unwrap()),
                    u64::from_le_bytes(b[at + 8..at + 16].try_into().unwrap()),
                )
            })
            .collect();
        Some(Config {
            regions,
            vcpus,
            spec,
        })
    }

    /// Whether `pages` pages at `gpa` lie inside one region.
    fn holds(&self, gpa: u64, pages: u64) -> bool {
        let Some(len) = pages.checked_mul(PAGE as u64) else {
            return false;
        };
        gpa.is_multiple_of(PAGE as u64)
            && self.regions.iter().any(|&(start, size)| {
                gpa >= start && gpa.checked_add(len).is_some_and(|end| end <= start + size)
            })
    }

    fn ram_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.1).sum()
    }

    /// The page (counted from the start of RAM, regions end to end) at `gpa`.
    pub fn page_of(&self, gpa: u64) -> Option<u64> {
        let mut before = 0;
        for &(start, size) in &self.regions {
            if gpa >= start && gpa < start + size {
                return Some((before + gpa - start) / PAGE as u64);
            }
            before += size;
        }
        None
    }

    /// Words in a bitmap of every page of RAM.
    pub fn bitmap_words(&self) -> usize {
        (self.ram_bytes() / PAGE as u64).div_ceil(64) as usize
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let ram = self.ram_bytes();
        let (n, unit) = if ram.is_multiple_of(1 << 20) {
            (ram >> 20, "MiB")
        } else {
            (ram >> 10, "KiB")
        };
        write!(
            f,
            "{} vCPU(s) and {n} {unit} of RAM in {} region(s)",
            self.vcpus,
            self.regions.len()
        )
    }
}

#[derive(Debug)]
pub enum StreamError {
    NotAStream,
    Format(u32),
    Truncated {
        at: u64,
        inside: String,
    },
    Checksum {
        at: u64,
        what: String,
    },
    Bad {
        at: u64,
        why: String,
    },
    Mismatch {
        theirs: Box<Config>,
        ours: Box<Config>,
    },
    Io(io::Error),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            StreamError::NotAStream => write!(
                f,
                "not a VM state stream (no VMMSTATE magic at its start); give a snapshot file or migration stream that migrated wrote"
            ),
            StreamError::Format(v) => write!(
                f,
                "the stream is in format {v}, this build reads format {FORMAT}; use a migrated of the release that wrote it"
            ),
            StreamError::Truncated { at, inside } => write!(
                f,
                "the stream ends at byte {at}, inside {inside}; the transfer was cut or the file is incomplete"
            ),
            StreamError::Checksum { at, what } => write!(
                f,
                "{what} at byte {at} fails its checksum; the stream is corrupt"
            ),
            StreamError::Bad { at, why } => write!(f, "byte {at}: {why}; the stream is corrupt"),
            StreamError::Mismatch { theirs, ours } => write!(
                f,
                "the stream is of a VM with {theirs}, this VM has {ours}; start the destination with the same --memory and --cpus"
            ),
            StreamError::Io(e) => write!(f, "cannot read the stream: {e}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// What to do with all-zero pages in `Writer::ram`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeros {
    /// Leave them out: the destination's RAM is zero there already (a snapshot, or the first
    /// pass of a migration).
    Skip,
    /// Send them as ZERO runs: they may have held data the destination has (a later pass).
    Send,
}

/// Writes a stream.
pub struct Writer<W: Write> {
    w: W,
    config: Config,
    /// LZ4-compress RAM runs, and the buffer for it.
    compress: bool,
    packed: Vec<u8>,
    /// `ram_live`'s copy of the pages it sends.
    snapshot: Vec<u8>,
    /// RAM bytes before and after compression (the runs that went compressed).
    packed_in: u64,
    packed_out: u64,
    sections: u64,
    ram_pages: u64,
    zero_pages: u64,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a stream for a VM of shape `config` (writes the header).
    pub fn new(mut w: W, config: &Config) -> io::Result<Writer<W>> {
        let cfg = config.encode();
        let mut h = Vec::with_capacity(24 + cfg.len());
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&FORMAT.to_le_bytes());
        h.extend_from_slice(&(PAGE as u32).to_le_bytes());
        h.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
        h.extend_from_slice(&cfg);
        let crc = crc32fast::hash(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        w.write_all(&h)?;
        Ok(Writer {
            w,
            config: config.clone(),
            compress: false,
            packed: Vec::new(),
            snapshot: Vec::new(),
            packed_in: 0,
            packed_out: 0,
            sections: 0,
            ram_pages: 0,
            zero_pages: 0,
            bytes: h.len() as u64,
        })
    }

    fn section(&mut self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let mut head = [0u8; 9];
        head[0] = kind;
        head[1..].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        self.w.write_all(&head)?;
        for p in parts {
            crc.update(p);
            self.w.write_all(p)?;
        }
        self.w.write_all(&crc.finalize().to_le_bytes())?;
        self.sections += 1;
        self.bytes += 13 + len;
        Ok(())
    }

    /// Guest RAM at `gpa` (page-aligned, whole pages): runs of non-zero pages as RAM sections,
    /// zero pages skipped or sent as ZERO runs.
    pub fn ram(&mut self, gpa: u64, data: &[u8], zeros: Zeros) -> io::Result<()> {
        if !gpa.is_multiple_of(PAGE as u64) || !data.len().is_multiple_of(PAGE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("RAM at {gpa:#x} (+{:#x}) is not whole pages", data.len()),
            ));
        }
        if !self.config.holds(gpa, (data.len() / PAGE) as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "RAM at {gpa:#x} (+{:#x}) is outside the VM's regions",
                    data.len()
                ),
            ));
        }
        let zero = |p: &[u8]| p.iter().all(|&b| b == 0);
        let pages: Vec<&[u8]> = data.chunks(PAGE).collect();
        let mut i = 0;
        while i < pages.len() {
            let is_zero = zero(pages[i]);
            let mut j = i + 1;
            while j < pages.len() && j - i < RUN && zero(pages[j]) == is_zero {
                j += 1;
            }
            let at = gpa + (i * PAGE) as u64;
            if !is_zero {
                let run = &data[i * PAGE..j * PAGE];
                if !self.pack(at, run)? {
                    self.section(RAM, &[&at.to_le_bytes(), run])?;
                }
                self.ram_pages += (j - i) as u64;
            } else if zeros == Zeros::Send {
                self.section(ZERO, &[&at.to_le_bytes(), &((j - i) as u64).to_le_bytes()])?;
                self.zero_pages += (j - i) as u64;
            }
            i = j;
        }
        Ok(())
    }

    /// As `ram`, for pages that may change while they are sent (a running guest's): they are
    /// copied first, so that what is checksummed is what is sent (a page changed later is
    /// dirty and goes again).
    pub fn ram_live(&mut self, gpa: u64, live: &[u8], zeros: Zeros) -> io::Result<()> {
        let mut copy = std::mem::take(&mut self.snapshot);
        copy.clear();
        copy.extend_from_slice(live);
        let r = self.ram(gpa, &copy, zeros);
        self.snapshot = copy;
        r
    }

    /// LZ4-compresses the RAM runs from here on (a run that does not shrink goes as is).
    pub fn compressing(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Writes `run` as an LZ4 section if compression is on and it shrinks; says whether.
    fn pack(&mut self, gpa: u64, run: &[u8]) -> io::Result<bool> {
        if !self.compress {
            return Ok(false);
        }
        self.packed
            .resize(lz4_flex::block::get_maximum_output_size(run.len()), 0);
        let n = lz4_flex::block::compress_into(run, &mut self.packed)
            .map_err(|e| io::Error::other(format!("LZ4: {e}")))?;
        // Worth it only if it saves more than the section's extra count.
        if n + 4 >= run.len() {
            return Ok(false);
        }
        let pages = (run.len() / PAGE) as u32;
        let packed = std::mem::take(&mut self.packed);
        let r = self.section(
            LZ4,
            &[&gpa.to_le_bytes(), &pages.to_le_bytes(), &packed[..n]],
        );
        self.packed = packed;
        r?;
        self.packed_in += run.len() as u64;
        self.packed_out += n as u64;
        Ok(true)
    }

    /// RAM bytes that went compressed, before and after.
    pub fn compression(&self) -> (u64, u64) {
        (self.packed_in, self.packed_out)
    }

    /// The stream underneath (to flush it between passes).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    pub fn get_ref(&self) -> &W {
        &self.w
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// RAM pages and zero pages sent so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.ram_pages, self.zero_pages)
    }

    /// A device's state, under its name.
    pub fn device(&mut self, name: &str, state: &[u8]) -> io::Result<()> {
        let n = u16::try_from(name.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device name too long"))?;
        self.section(DEVICE, &[&n.to_le_bytes(), name.as_bytes(), state])
    }

    /// Marks the end of pre-copy pass `n` (a live stream).
    pub fn pass(&mut self, n: u32) -> io::Result<()> {
        self.section(PASS, &[&n.to_le_bytes()])
    }

    /// The switch to post-copy: the pages still to come (bit n: page n of RAM).
    pub fn postcopy(&mut self, pending: &[u64]) -> io::Result<()> {
        self.bitmap(POSTCOPY, pending)
    }

    /// A section that is a bitmap of RAM's pages.
    fn bitmap(&mut self, kind: u8, bits: &[u64]) -> io::Result<()> {
        if bits.len() != self.config.bitmap_words() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} of {} words, the VM's RAM needs {}",
                    kind_name(kind),
                    bits.len(),
                    self.config.bitmap_words()
                ),
            ));
        }
        let bytes: Vec<u8> = bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.section(kind, &[&bytes])
    }

    /// The guest's working set (a snapshot's: the pages it wrote just before).
    pub fn workset(&mut self, pages: &[u64]) -> io::Result<()> {
        self.bitmap(WORKSET, pages)
    }

    /// The same stream on another sink (the first's is returned by `f`, which makes the
    /// second): the counts go on.
    pub fn with_sink<W2: Write>(
        self,
        f: impl FnOnce(W) -> io::Result<W2>,
    ) -> io::Result<Writer<W2>> {
        Ok(Writer {
            w: f(self.w)?,
            config: self.config,
            compress: self.compress,
            packed: self.packed,
            snapshot: self.snapshot,
            packed_in: self.packed_in,
            packed_out: self.packed_out,
            sections: self.sections,
            ram_pages: self.ram_pages,
            zero_pages: self.zero_pages,
            bytes: self.bytes,
        })
    }

    /// Writes the end marker and flushes (the sink stays, for the peer's answer).
    pub fn end(&mut self) -> io::Result<()> {
        let (s, r, z) = (self.sections, self.ram_pages, self.zero_pages);
        self.section(END, &[&s.to_le_bytes(), &r.to_le_bytes(), &z.to_le_bytes()])?;
        self.w.flush()
    }

    /// The VM's shape the stream is of.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Ends the stream; returns the sink and the bytes written.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let (s, r, z) = (self.sections, self.ram_pages, self.zero_pages);
        self.section(END, &[&s.to_le_bytes(), &r.to_le_bytes(), &z.to_le_bytes()])?;
        self.w.flush()?;
        Ok((self.w, self.bytes))
    }
}

/// Where a snapshot file's RAM lies, for lazy restore: each RAM section's place in the file
/// and the pages it holds, read from the section heads alone (payloads are checked when they
/// are loaded). The device state is read and checked whole.
#[derive(Debug)]
pub struct Index {
    pub config: Config,
    /// (byte of the section in the file, its whole length with head and checksum, first
    /// page of RAM, pages), in file order.
    pub runs: Vec<(u64, u64, u64, u64)>,
    /// The device sections: (name, state).
    pub devices: Vec<(String, Vec<u8>)>,
    /// The working set the snapshot records, if it does.
    pub workset: Option<Vec<u64>>,
    /// The file's length.
    pub bytes: u64,
}

impl Index {
    /// Reads a snapshot's header and section heads. Every length, kind, range and count is
    /// checked as a reader would, and the end marker's counts against what was found.
    pub fn read<F: Read + std::io::Seek>(f: F) -> Result<Index, StreamError> {
        let mut r = Reader::new(std::io::BufReader::with_capacity(64 << 10, f))?;
        let config = r.config.clone();
        let mut runs = Vec::new();
        let mut devices = Vec::new();
        let mut workset = None;
        let (mut sections, mut ram_pages, mut zero_pages) = (0u64, 0u64, 0u64);
        loop {
            let start = r.at;
            let n = sections + 1;
            let mut head = [0u8; 21];
            // Kind and length, then the run's address (and an LZ4 run's page count).
            fill(
                &mut r.r,
                &mut head[..9],
                start,
                &format!("the head of section {n}"),
            )?;
            let kind = head[0];
            let len = u64::from_le_bytes(head[1..9].try_into().unwrap());
            let bad = |why: String| StreamError::Bad { at: start, why };
            let what = format!("section {n} ({})", kind_name(kind));
            match kind {
                RAM | LZ4 => {
                    let extra = if kind == RAM { 8 } else { 12 };
                    if len < extra + 1 || len > MAX_PAYLOAD + 8 {
                        return Err(bad(format!("{what} holds {len} bytes")));
                    }
                    fill(&mut r.r, &mut head[9..9 + extra as usize], start + 9, &what)?;
                    let gpa = u64::from_le_bytes(head[9..17].try_into().unwrap());
                    let pages = if kind == RAM {
                        if !(len - 8).is_multiple_of(PAGE as u64) {
                            return Err(bad(format!("{what} holds {len} bytes, not whole pages")));
                        }
                        (len - 8) / PAGE as u64
                    } else {
                        u64::from(u32::from_le_bytes(head[17..21].try_into().unwrap()))
                    };
                    if pages == 0 || !config.holds(gpa, pages) {
                        return Err(bad(format!(
                            "{what}: {pages} page(s) at {gpa:#x} are outside the VM's RAM"
                        )));
                    }
                    let first = config.page_of(gpa).expect("held");
                    runs.push((start, 13 + len, first, pages));
                    ram_pages += pages;
                    r.r.seek_relative((len - extra + 4) as i64)
                        .map_err(StreamError::Io)?;
                    r.at = start + 13 + len;
                    sections += 1;
                }
                DEVICE | ZERO | PASS | POSTCOPY | WORKSET | END => {
                    // Small sections: read and checked whole.
                    let mut one = Reader::resume(
                        std::io::Cursor::new(head[..9].to_vec()).chain(&mut r.r),
                        config.clone(),
                        start,
                    );
                    let got = match one.section()? {
                        Section::Device { name, state } => {
                            devices.push((name.to_string(), state.to_vec()));
                            None
                        }
                        Section::Zero { pages, .. } => {
                            zero_pages += pages;
                            None
                        }
                        Section::Workset(w) => {
                            workset = Some(w);
                            None
                        }
                        Section::End => Some(one.buf.clone()),
                        _ => None,
                    };
                    r.at = one.at;
                    sections += 1;
                    if let Some(end) = got {
                        check_end(&end, (sections - 1, ram_pages, zero_pages), start)?;
                        return Ok(Index {
                            config,
                            runs,
                            devices,
                            workset,
                            bytes: r.at,
                        });
                    }
                }
                _ => return Err(bad(format!("section {n} is of unknown kind {kind:#x}"))),
            }
        }
    }
}

/// One section, as the reader hands it out.
#[derive(Debug, PartialEq, Eq)]
pub enum Section<'a> {
    Ram {
        gpa: u64,
        data: &'a [u8],
    },
    Zero {
        gpa: u64,
        pages: u64,
    },
    Device {
        name: &'a str,
        state: &'a [u8],
    },
    Pass(u32),
    /// The pages still to come (post-copy), a bitmap of RAM's pages.
    Postcopy(Vec<u64>),
    /// The guest's working set when the snapshot was taken, a bitmap of RAM's pages.
    Workset(Vec<u64>),
    End,
}

/// Reads and checks a stream.
pub struct Reader<R: Read> {
    r: R,
    config: Config,
    at: u64,
    sections: u64,
    ram_pages: u64,
    zero_pages: u64,
    ended: bool,
    buf: Vec<u8>,
    /// A compressed section's pages, unpacked.
    unpacked: Vec<u8>,
    /// Whether the end marker's counts are checked (not by a reader that started midway).
    whole: bool,
}

/// A bitmap section's payload as its `words` u64 words; None if it is not that long.
fn bitmap_of(payload: &[u8], words: usize) -> Option<Vec<u64>> {
    (payload.len() == words * 8).then(|| {
        payload
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect()
    })
}

/// Reads exactly `buf.len()` bytes; a short read is a truncation inside `inside`.
fn fill<R: Read>(r: &mut R, buf: &mut [u8], at: u64, inside: &str) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(StreamError::Truncated {
                    at: at + got as u64,
                    inside: inside.to_string(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

/// The end marker's counts (its payload: sections, RAM pages, zero pages) against what came.
/// `at`: where the end marker starts.
fn check_end(payload: &[u8], seen: (u64, u64, u64), at: u64) -> Result<(), StreamError> {
    let count = |i: usize| u64::from_le_bytes(payload[i..i + 8].try_into().unwrap());
    let counts = (count(0), count(8), count(16));
    if counts != seen {
        return Err(StreamError::Bad {
            at,
            why: format!(
            "the end marker counts {} sections, {} RAM and {} zero pages; {} sections, {} and {} came",
            counts.0, counts.1, counts.2, seen.0, seen.1, seen.2
        ),
        });
    }
    Ok(())
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        RAM => "a RAM section",
        LZ4 => "a compressed RAM section",
        ZERO => "a zero-pages section",
        DEVICE => "a device section",
        PASS => "a pass marker",
        POSTCOPY => "the post-copy switch",
        WORKSET => "the working set",
        END => "the end marker",
        _ => "a section",
    }
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(mut r: R) -> Result<Reader<R>, StreamError> {
        let mut h = [0u8; 20];
        match fill(&mut r, &mut h, 0, "the header") {
            Err(StreamError::Truncated { .. }) if !h.starts_with(MAGIC) => {
                return Err(StreamError::NotAStream)
            }
            r => r?,
        }
        if &h[..8] != MAGIC {
            return Err(StreamError::NotAStream);
        }
        let format = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if format != FORMAT {
            return Err(StreamError::Format(format));
        }
        let page = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let cfg_len = u32::from_le_bytes(h[16..20].try_into().unwrap());
        if page as usize != PAGE || cfg_len > MAX_CONFIG {
            return Err(StreamError::Bad {
                at: 12,
                why: format!("a page size of {page} and a config of {cfg_len} bytes"),
            });
        }
        let mut rest = vec![0u8; cfg_len as usize + 4];
        fill(&mut r, &mut rest, 20, "the header")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&h);
        crc.update(&rest[..cfg_len as usize]);
        let want = u32::from_le_bytes(rest[cfg_len as usize..].try_into().unwrap());
        if crc.finalize() != want {
            return Err(StreamError::Checksum {
                at: 0,
                what: "the header".into(),
            });
        }
        let config = Config::decode(&rest[..cfg_len as usize]).ok_or_else(|| StreamError::Bad {
            at: 20,
            why: "the header's VM config does not parse".into(),
        })?;
        Ok(Reader {
            r,
            config,
            at: 24 + u64::from(cfg_len),
            sections: 0,
            ram_pages: 0,
            zero_pages: 0,
            ended: false,
            buf: Vec::new(),
            unpacked: Vec::new(),
            whole: true,
        })
    }

    /// A reader that starts at a section boundary (byte `at`) of a stream whose header was
    /// read already (lazy restore reads one section at a time from an indexed file). It
    /// checks each section as `section` does; the end's counts are not its to check.
    pub fn resume(r: R, config: Config, at: u64) -> Reader<R> {
        Reader {
            r,
            config,
            at,
            sections: 0,
            ram_pages: 0,
            zero_pages: 0,
            ended: false,
            buf: Vec::new(),
            unpacked: Vec::new(),
            whole: false,
        }
    }

    /// The shape of the VM the stream is of.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Refuses a stream of a VM of another shape than `ours`.
    pub fn check_config(&self, ours: &Config) -> Result<(), StreamError> {
        if self.config.regions != ours.regions || self.config.vcpus != ours.vcpus {
            return Err(StreamError::Mismatch {
                theirs: Box::new(self.config.clone()),
                ours: Box::new(ours.clone()),
            });
        }
        Ok(())
    }

    /// The next section, checked. After `Section::End` the stream is complete and consistent.
    pub fn section(&mut self) -> Result<Section<'_>, StreamError> {
        if self.ended {
            return Ok(Section::End);
        }
        let start = self.at;
        let n = self.sections + 1;
        let mut head = [0u8; 9];
        fill(
            &mut self.r,
            &mut head,
            start,
            &format!("the head of section {n}"),
        )?;
        let kind = head[0];
        let len = u64::from_le_bytes(head[1..].try_into().unwrap());
        let bad = |why: String| StreamError::Bad { at: start, why };
        if !matches!(
            kind,
            RAM | LZ4 | ZERO | DEVICE | PASS | POSTCOPY | WORKSET | END
        ) {
            return Err(bad(format!("section {n} is of unknown kind {kind:#x}")));
        }
        if len > MAX_PAYLOAD + 8 {
            return Err(bad(format!(
                "section {n} claims {len} bytes, more than the {MAX_PAYLOAD} a section may have"
            )));
        }
        let what = format!("section {n} ({})", kind_name(kind));
        self.buf.resize(len as usize + 4, 0);
        fill(&mut self.r, &mut self.buf, start + 9, &what)?;
        let (payload, tail) = self.buf.split_at(len as usize);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(payload);
        if crc.finalize() != u32::from_le_bytes(tail.try_into().unwrap()) {
            return Err(StreamError::Checksum { at: start, what });
        }
        self.at = start + 13 + len;
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let section = match kind {
            RAM => {
                if payload.len() < 8 + PAGE || !(payload.len() - 8).is_multiple_of(PAGE) {
                    return Err(bad(format!("{what} holds {len} bytes, not whole pages")));
                }
                let gpa = u64_at(payload, 0);
                let pages = ((payload.len() - 8) / PAGE) as u64;
                if !self.config.holds(gpa, pages) {
                    return Err(bad(format!(
                        "{what}: {pages} page(s) at {gpa:#x} are outside the VM's RAM"
                    )));
                }
                self.ram_pages += pages;
                Section::Ram {
                    gpa,
                    data: &payload[8..],
                }
            }
            LZ4 => {
                if payload.len() < 13 {
                    return Err(bad(format!("{what} holds {len} bytes, too few")));
                }
                let gpa = u64_at(payload, 0);
                let pages = u64::from(u32::from_le_bytes(payload[8..12].try_into().unwrap()));
                if pages == 0 || pages > RUN as u64 || !self.config.holds(gpa, pages) {
                    return Err(bad(format!(
                        "{what}: {pages} page(s) at {gpa:#x} are outside the VM's RAM or more than a run"
                    )));
                }
                let want = pages as usize * PAGE;
                self.unpacked.resize(want, 0);
                match lz4_flex::block::decompress_into(&payload[12..], &mut self.unpacked) {
                    Ok(n) if n == want => {}
                    Ok(n) => {
                        return Err(bad(format!(
                            "{what} unpacks to {n} bytes, not the {want} of its {pages} page(s)"
                        )))
                    }
                    Err(e) => return Err(bad(format!("{what} does not unpack ({e})"))),
                }
                self.ram_pages += pages;
                Section::Ram {
                    gpa,
                    data: &self.unpacked,
                }
            }
            ZERO => {
                if payload.len() != 16 {
                    return Err(bad(format!("{what} holds {len} bytes, 16 expected")));
                }
                let (gpa, pages) = (u64_at(payload, 0), u64_at(payload, 8));
                if pages == 0 || !self.config.holds(gpa, pages) {
                    return Err(bad(format!(
                        "{what}: {pages} page(s) at {gpa:#x} are outside the VM's RAM"
                    )));
                }
                self.zero_pages += pages;
                Section::Zero { gpa, pages }
            }
            PASS => {
                if payload.len() != 4 {
                    return Err(bad(format!("{what} holds {len} bytes, 4 expected")));
                }
                Section::Pass(u32::from_le_bytes(payload.try_into().unwrap()))
            }
            POSTCOPY | WORKSET => {
                let words = self.config.bitmap_words();
                let bits = bitmap_of(payload, words).ok_or_else(|| {
                    bad(format!(
                        "{what} holds {len} bytes, {} expected (a bitmap of the VM's pages)",
                        words * 8
                    ))
                })?;
                if kind == POSTCOPY {
                    Section::Postcopy(bits)
                } else {
                    Section::Workset(bits)
                }
            }
            DEVICE => {
                let name_len = payload
                    .get(..2)
                    .map(|b| u16::from_le_bytes(b.try_into().unwrap()) as usize);
                let name = name_len
                    .and_then(|l| payload.get(2..2 + l))
                    .and_then(|b| std::str::from_utf8(b).ok())
                    .ok_or_else(|| bad(format!("{what} has no readable device name")))?;
                Section::Device {
                    name,
                    state: &payload[2 + name.len()..],
                }
            }
            _ => {
                if payload.len() != 24 {
                    return Err(bad(format!("{what} holds {len} bytes, 24 expected")));
                }
                if self.whole {
                    check_end(
                        payload,
                        (self.sections, self.ram_pages, self.zero_pages),
                        start,
                    )?;
                }
                self.ended = true;
                Section::End
            }
        };
        self.sections += 1;
        Ok(section)
    }

    /// The source underneath (to answer a live source).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// Bytes read so far.
    pub fn position(&self) -> u64 {
        self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            regions: vec![(0, 64 * PAGE as u64), (1 << 32, 16 * PAGE as u64)],
            vcpus: 2,
            spec: "memory = \"320K\"\n".into(),
        }
    }

    /// A small stream: RAM with zero and non-zero runs in both regions, a later pass with
    /// zero pages sent, and two devices.
    fn sample() -> Vec<u8> {
        sample_with(false)
    }

    /// The same, with compression: pages 1-3 and 63 are runs of one byte (they shrink), page
    /// 10 is noise (it does not, and goes as RAM).
    fn sample_with(compress: bool) -> Vec<u8> {
        let mut ram = vec![0u8; 64 * PAGE];
        for p in [1usize, 2, 3, 10, 63] {
            ram[p * PAGE..(p + 1) * PAGE].fill(p as u8);
        }
        if compress {
            let mut x = 0x9E37_79B9u32;
            for b in &mut ram[10 * PAGE..11 * PAGE] {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = (x >> 24) as u8 | 1;
            }
        }
        let mut w = Writer::new(Vec::new(), &config())
            .unwrap()
            .compressing(compress);
        w.ram(0, &ram, Zeros::Skip).unwrap();
        w.ram(1 << 32, &[7u8; 2 * PAGE], Zeros::Skip).unwrap();
        w.pass(1).unwrap();
        w.ram(5 * PAGE as u64, &vec![0u8; 3 * PAGE], Zeros::Send)
            .unwrap();
        w.device("vcpu0", b"state of vcpu 0").unwrap();
        w.device("serial0", b"").unwrap();
        let (bytes, n) = w.finish().unwrap();
        assert_eq!(n, bytes.len() as u64);
        bytes
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<String>, StreamError> {
        let mut r = Reader::new(bytes)?;
        r.check_config(&config())?;
        let mut out = Vec::new();
        loop {
            match r.section()? {
                Section::Ram { gpa, data } => {
                    out.push(format!("ram {gpa:#x} {} {}", data.len() / PAGE, data[0]))
                }
                Section::Zero { gpa, pages } => out.push(format!("zero {gpa:#x} {pages}")),
                Section::Pass(n) => out.push(format!("pass {n}")),
                Section::Postcopy(b) => out.push(format!("postcopy {b:x?}")),
                Section::Workset(b) => out.push(format!("workset {b:x?}")),
                Section::Device { name, state } => {
                    out.push(format!("device {name} {}", String::from_utf8_lossy(state)))
                }
                Section::End => return Ok(out),
            }
        }
    }

    /// The post-copy switch carries its bitmap (one bit per page of RAM) and counts as a
    /// section; a bitmap of another size is refused on both ends.
    #[test]
    fn the_postcopy_switch_carries_its_bitmap() {
        let mut w = Writer::new(Vec::new(), &config()).unwrap();
        // 80 pages: two words.
        assert!(w.postcopy(&[1]).is_err());
        w.postcopy(&[0b101, 1 << 15]).unwrap();
        w.ram(0, &[9u8; PAGE], Zeros::Send).unwrap();
        let (bytes, _) = w.finish().unwrap();
        assert_eq!(
            read_all(&bytes).unwrap(),
            ["postcopy [5, 8000]", "ram 0x0 1 9"]
        );
        // A bitmap cut short: refused, naming the size it needs.
        let mut bad = Writer::new(Vec::new(), &config()).unwrap();
        bad.section(POSTCOPY, &[&[0u8; 8]]).unwrap();
        let (bytes, _) = bad.finish().unwrap();
        let e = read_all(&bytes).unwrap_err().to_string();
        assert!(
            e.contains("16 expected (a bitmap of the VM's pages)"),
            "{e}"
        );
    }

    /// A lazy restore's index: every RAM run's place and pages (plain and LZ4), the device
    /// state, without reading the runs; a run read back from its place is the pages written;
    /// a bad end count is refused.
    #[test]
    fn an_index_finds_each_run_and_a_run_reads_back_from_its_place() {
        let mut w = Writer::new(Vec::new(), &config())
            .unwrap()
            .compressing(true);
        let mut ram = vec![0u8; 4 * PAGE];
        for (i, b) in ram.iter_mut().enumerate() {
            *b = (i / PAGE) as u8 + 1;
        }
        w.ram(PAGE as u64, &ram, Zeros::Skip).unwrap(); // compresses
        let noise: Vec<u8> = (0..PAGE).map(|i| (i * 7919 % 251) as u8).collect();
        w.ram(1 << 32, &noise, Zeros::Skip).unwrap(); // does not
        w.device("vm", b"the state").unwrap();
        let (bytes, _) = w.finish().unwrap();
        let index = Index::read(std::io::Cursor::new(&bytes)).unwrap();
        assert_eq!(
            index.devices,
            vec![("vm".to_string(), b"the state".to_vec())]
        );
        assert_eq!(index.bytes, bytes.len() as u64);
        // Pages count from the start of RAM, regions end to end: the first region has 64
        // pages, so 4 GiB (the second's start) is page 64.
        let pages: Vec<(u64, u64)> = index.runs.iter().map(|r| (r.2, r.3)).collect();
        assert_eq!(pages, vec![(1, 4), (64, 1)]);
        for (run, want) in index.runs.iter().zip([&ram[..], &noise[..]]) {
            let (at, len) = (run.0 as usize, run.1 as usize);
            let mut r = Reader::resume(&bytes[at..at + len], config(), run.0);
            match r.section().unwrap() {
                Section::Ram { data, .. } => assert_eq!(data, want),
                other => panic!("{other:?}"),
            }
        }
        // The end marker's counts must match what the index saw.
        let mut bad = Writer::new(Vec::new(), &config()).unwrap();
        bad.ram(0, &[1u8; PAGE], Zeros::Skip).unwrap();
        bad.section(
            END,
            &[
                &0u64.to_le_bytes(),
                &0u64.to_le_bytes(),
                &0u64.to_le_bytes(),
            ],
        )
        .unwrap();
        let e = Index::read(std::io::Cursor::new(&bad.w))
            .unwrap_err()
            .to_string();
        assert!(e.contains("the end marker counts 0 sections"), "{e}");
    }

    #[test]
    fn round_trip_elides_zero_pages() {
        let bytes = sample();
        let got = read_all(&bytes).unwrap();
        assert_eq!(
            got,
            [
                "ram 0x1000 3 1",
                "ram 0xa000 1 10",
                "ram 0x3f000 1 63",
                "ram 0x100000000 2 7",
                "pass 1",
                "zero 0x5000 3",
                "device vcpu0 state of vcpu 0",
                "device serial0 ",
            ]
        );
        // 5 + 2 data pages and the overhead, not the 80 pages of RAM.
        assert!(bytes.len() < 8 * PAGE, "{} bytes", bytes.len());
    }

    #[test]
    fn compressed_runs_round_trip_and_shrink() {
        let plain = sample();
        let packed = sample_with(true);
        let got = read_all(&packed).unwrap();
        assert_eq!(got.len(), 8, "{got:?}");
        assert_eq!(got[0], "ram 0x1000 3 1");
        assert!(got[1].starts_with("ram 0xa000 1 "), "{got:?}");
        assert_eq!(got[2..4], ["ram 0x3f000 1 63", "ram 0x100000000 2 7"]);
        // The one-byte runs shrink to a few bytes; the noise page goes as it is.
        assert!(
            packed.len() < plain.len() - 5 * PAGE,
            "{} bytes compressed, {} plain",
            packed.len(),
            plain.len()
        );
        // The unpacked pages are exactly the ones written.
        let mut r = Reader::new(&packed[..]).unwrap();
        match r.section().unwrap() {
            Section::Ram { gpa, data } => {
                assert_eq!(gpa, 0x1000);
                assert!(data[..PAGE].iter().all(|&b| b == 1));
                assert!(data[2 * PAGE..].iter().all(|&b| b == 3));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        for bytes in [sample(), sample_with(true)] {
            every_truncation_of(&bytes);
        }
    }

    fn every_truncation_of(bytes: &[u8]) {
        for cut in 0..bytes.len() {
            let e = read_all(&bytes[..cut]).unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, StreamError::Truncated { .. } | StreamError::NotAStream),
                "cut at {cut}: {msg}"
            );
            if cut >= 8 {
                assert!(msg.contains("the transfer was cut"), "cut at {cut}: {msg}");
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        for bytes in [sample(), sample_with(true)] {
            every_flip_of(&bytes);
        }
    }

    fn every_flip_of(bytes: &[u8]) {
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x10;
            let e = read_all(&b).unwrap_err();
            assert!(
                !matches!(e, StreamError::Io(_)),
                "flip at {i} not caught as corrupt: {e}"
            );
        }
    }

    #[test]
    fn clear_errors_for_other_formats_shapes_and_files() {
        let mut b = sample();
        b[8] = 2;
        let e = read_all(&b).unwrap_err().to_string();
        assert_eq!(
            e,
            "the stream is in format 2, this build reads format 1; use a migrated of the release that wrote it"
        );
        let e = read_all(b"#!/bin/sh\necho not a snapshot\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("not a VM state stream"), "{e}");
        let good = sample();
        let r = Reader::new(&good[..]).unwrap();
        // The source's settings ride in the header, outside the shape that is checked.
        assert_eq!(r.config().spec, "memory = \"320K\"\n");
        let ours = Config {
            regions: vec![(0, 128 * PAGE as u64)],
            vcpus: 2,
            spec: String::new(),
        };
        assert_eq!(
            r.check_config(&ours).unwrap_err().to_string(),
            "the stream is of a VM with 2 vCPU(s) and 320 KiB of RAM in 2 region(s), this VM has 2 vCPU(s) and 512 KiB of RAM in 1 region(s); start the destination with the same --memory and --cpus"
        );
        let mut b = sample();
        // A byte of the end marker's counts.
        let end = b.len() - 4 - 24 + 3;
        b[end] ^= 0x42;
        let e = read_all(&b).unwrap_err().to_string();
        assert!(e.contains("fails its checksum"), "{e}");
    }

    #[test]
    fn the_writer_refuses_ram_outside_the_vm() {
        let mut w = Writer::new(Vec::new(), &config()).unwrap();
        let e = w
            .ram(64 * PAGE as u64, &[1u8; PAGE], Zeros::Skip)
            .unwrap_err();
        assert!(e.to_string().contains("outside the VM's regions"), "{e}");
    }
}
