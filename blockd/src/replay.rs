//! Record/replay of a disk's requests (vmm-core's `--record DIR` / `--replay DIR`).
//!
//! Recording, every request blockd answers goes into the disk's log (vmm_proto::record) as
//! the guest saw it: its queue and index there, its header (type, sector), the length and a
//! CRC-32 of what the guest gave (the header and a write's data), and everything blockd
//! wrote back (a read's data, a GET_ID string, the status byte), with the used length. So a
//! failure a fault rule injected is recorded as the guest saw it, too.
//!
//! On a base copy (vmm-core copies the image beside a new log when the recording starts), a
//! read that succeeded on blocks nobody has written since the start is logged as a CRC-32 of
//! its data, not the data: the copy holds those bytes. Blocks are marked written before a
//! write, discard or write-zeroes is done, so a read that may have seen one keeps its bytes.
//!
//! Replaying, blockd answers each request from the log and touches no image: a read gets the
//! recorded bytes even if the image changed since (from the log, or from the base copy,
//! which is then the export's image, checked against the recorded CRC), a write is checked
//! against the recording and not written, an injected error comes back with no rule set. A
//! request that differs from the recorded one at its place (type, sector, lengths or written
//! bytes) stops the export with a line that names the queue, the index, what was recorded
//! and what came.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_proto::record::{Reader, Writer};

/// The log's kind ("disk2": records carry the room, where a read's bytes are and their CRC).
pub const KIND: &str = "disk2";

/// A record's flag: the read's data is in the base copy (at the header's sector), not here.
const FROM_BASE: u8 = 1;

/// A record's flag: blockd wrote the status byte alone (a request that failed with nothing
/// transferred, used length 1): the rest of the room is the guest's, untouched.
const STATUS_ONLY: u8 = 2;

/// Bytes of a record before what was written back.
const REC_HEAD: usize = 51;

/// A request's memory as (guest address, length) pieces: what the device reads (the header
/// and a write's data), then what it writes (data, status).
pub struct Segments<'a> {
    pub readable: &'a [(u64, u64)],
    pub writable: &'a [(u64, u64)],
}

/// How a replayed request differs from the recorded one at its place.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Diverged(String);

impl Diverged {
    pub fn new(why: String) -> Diverged {
        Diverged(why)
    }
}

/// One recorded request.
struct Rec {
    queue: u16,
    index: u64,
    used: u32,
    /// The delay a fault rule injected (ms; 0: none).
    delay_ms: u32,
    header: [u8; 16],
    given_len: u32,
    given_crc: u32,
    /// The device-writable bytes the request had (data and status).
    room: u32,
    flags: u8,
    /// FROM_BASE: CRC-32 of the data read (all but the status byte).
    data_crc: u32,
    /// What blockd wrote back: all of the room, or (FROM_BASE) the status byte alone.
    written: Vec<u8>,
}

impl Rec {
    /// The record into `b` (cleared first).
    fn encode_into(&self, b: &mut Vec<u8>) {
        b.clear();
        b.reserve(REC_HEAD + self.written.len());
        b.extend_from_slice(&self.queue.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.used.to_le_bytes());
        b.extend_from_slice(&self.delay_ms.to_le_bytes());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&self.given_len.to_le_bytes());
        b.extend_from_slice(&self.given_crc.to_le_bytes());
        b.extend_from_slice(&self.room.to_le_bytes());
        b.push(self.flags);
        b.extend_from_slice(&self.data_crc.to_le_bytes());
        b.extend_from_slice(&self.written);
    }

    fn decode(b: &[u8]) -> Option<Rec> {
        if b.len() < REC_HEAD {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let rec = Rec {
            queue: u16::from_le_bytes([b[0], b[1]]),
            index: u64::from_le_bytes(b[2..10].try_into().unwrap()),
            used: u32_at(10),
            delay_ms: u32_at(14),
            header: b[18..34].try_into().unwrap(),
            given_len: u32_at(34),
            given_crc: u32_at(38),
            room: u32_at(42),
            flags: b[46],
            data_crc: u32_at(47),
            written: b[REC_HEAD..].to_vec(),
        };
        let whole = rec.flags == 0 && rec.written.len() == rec.room as usize;
        let base = rec.flags == FROM_BASE && rec.written.len() == 1 && rec.room > 1;
        let status = rec.flags == STATUS_ONLY && rec.written.len() == 1 && rec.room > 1;
        (whole || base || status).then_some(rec)
    }

    /// Whether a replay on a working copy does it there: a read logged as a checksum (its
    /// bytes come from the copy), or a write, discard or write-zeroes that worked.
    fn on_copy(&self) -> bool {
        use virtio_bindings::virtio_blk as blk;
        let kind = u32::from_le_bytes(self.header[..4].try_into().unwrap());
        let writes = matches!(
            kind,
            blk::VIRTIO_BLK_T_OUT | blk::VIRTIO_BLK_T_DISCARD | blk::VIRTIO_BLK_T_WRITE_ZEROES
        );
        self.flags & FROM_BASE != 0 || (writes && self.written.last() == Some(&0))
    }

    /// The read's offset on the disk (its header's sector).
    fn offset(&self) -> u64 {
        u64::from_le_bytes(self.header[8..].try_into().unwrap()).saturating_mul(512)
    }

    /// "read of sector 2048 (4096 bytes in)" and the like, for the divergence message.
    fn describe(header: &[u8; 16], given: u32, room: usize) -> String {
        let kind = u32::from_le_bytes(header[..4].try_into().unwrap());
        let sector = u64::from_le_bytes(header[8..].try_into().unwrap());
        use virtio_bindings::virtio_blk as blk;
        let what = match kind {
            blk::VIRTIO_BLK_T_IN => "a read",
            blk::VIRTIO_BLK_T_OUT => "a write",
            blk::VIRTIO_BLK_T_FLUSH => "a flush",
            blk::VIRTIO_BLK_T_GET_ID => "a GET_ID",
            blk::VIRTIO_BLK_T_DISCARD => "a discard",
            blk::VIRTIO_BLK_T_WRITE_ZEROES => "a write-zeroes",
            _ => "an unknown request",
        };
        format!("{what} at sector {sector} ({given} bytes out, room for {room} back)")
    }
}

enum Mode {
    /// Each record is appended by the queue's worker that answered the request, and goes to
    /// the kernel before the guest is told (`flush`, as blockd notifies it: once for a batch
    /// of completions), so a killed blockd loses no request the guest heard of.
    Record(Option<Writer<std::io::BufWriter<File>>>),
    Replay {
        reader: Reader<File>,
        /// Per queue: records read and not matched yet.
        ahead: Vec<Ahead>,
        /// Operations on the working copy in the records read so far (the next one's turn).
        copy_ops: u64,
    },
}

/// A disk's recording, or the recording it replays.
pub struct Recording {
    mode: Mutex<Mode>,
    /// Per queue: the next index, and per head what a request in flight has noted (one lock,
    /// indexed by head: no hashing on the hot path).
    queues: Mutex<Vec<QueueNotes>>,
    /// Requests recorded, or answered from the recording.
    done: std::sync::atomic::AtomicU64,
    /// Recording on a base copy: what writes do, to tell the reads a replay reproduces.
    tracking: Option<Tracking>,
    /// Replaying on a working copy of the base: the guest's writes are done there.
    on_copy: bool,
    /// Replaying (fixed at the start; asked for every request, without the mode's lock).
    replaying: bool,
    /// Replaying on a working copy: the turn of the next operation on it (a write done, or
    /// a read taken from it), in the recording's order across queues.
    copy_turn: Mutex<u64>,
    copy_turned: std::sync::Condvar,
}

/// The granule of write tracking (per chunk: 8 bytes of state, 8 MiB for a TiB).
const CHUNK: u64 = 1 << 20;

/// Recording on a base copy, a read's data is logged as a CRC-32 when a replay will find the
/// same bytes in its working copy (the base with the replayed writes done in order): when no
/// write to its chunks was in flight as it began, and none began before it ended. Otherwise
/// (a write raced it), its bytes are kept.
struct Tracking {
    /// Writes begun, a counter: a write's chunks take the count as it begins.
    epoch: std::sync::atomic::AtomicU64,
    /// Per chunk: writes in flight on it.
    inflight: Vec<std::sync::atomic::AtomicU32>,
    /// Per chunk: the epoch of the last write that began on it.
    last: Vec<std::sync::atomic::AtomicU64>,
}

/// A queue's requests as the recording follows them.
#[derive(Default)]
struct QueueNotes {
    /// Requests recorded or replayed so far (this blockd's): the next one's index.
    next: u64,
    /// By head: what its request noted as it began (until it is answered).
    heads: Vec<HeadNote>,
}

/// What a request in flight noted, by its head.
#[derive(Default)]
struct HeadNote {
    /// Recording on a base copy: how it began (reads, and writes to end).
    begun: Option<Begun>,
    /// The delay a fault rule injected (ms; 0: none), recorded with its answer.
    delay_ms: u32,
    /// Recording: what the guest gave, taken as the request came (`submitted`).
    given: Option<Given>,
    /// Recording: the room it left for the answer (its writable pieces), as it came; the
    /// vector is kept for the head's next request.
    writable: Vec<(u64, u64)>,
}

impl QueueNotes {
    fn head(&mut self, head: u16) -> &mut HeadNote {
        let h = usize::from(head);
        if self.heads.len() <= h {
            self.heads.resize_with(h + 1, HeadNote::default);
        }
        &mut self.heads[h]
    }
}

#[derive(Clone, Copy)]
enum Begun {
    /// A read, with the epoch as it began; clean: no write to its chunks was in flight.
    Read {
        epoch: u64,
        clean: bool,
    },
    Write {
        offset: u64,
        len: u64,
    },
}

impl Tracking {
    fn new(size: u64) -> Tracking {
        let n = size.div_ceil(CHUNK) as usize;
        Tracking {
            epoch: Default::default(),
            inflight: (0..n).map(|_| Default::default()).collect(),
            last: (0..n).map(|_| Default::default()).collect(),
        }
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.saturating_add(len.max(1)).div_ceil(CHUNK) as usize;
        (offset / CHUNK) as usize..end.min(self.inflight.len())
    }

    fn write_begins(&self, offset: u64, len: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let e = self.epoch.fetch_add(1, SeqCst) + 1;
        for c in self.chunks(offset, len) {
            self.inflight[c].fetch_add(1, SeqCst);
            self.last[c].fetch_max(e, SeqCst);
        }
    }

    fn write_ends(&self, offset: u64, len: u64) {
        for c in self.chunks(offset, len) {
            self.inflight[c].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn read_begins(&self, offset: u64, len: u64) -> Begun {
        use std::sync::atomic::Ordering::SeqCst;
        let epoch = self.epoch.load(SeqCst);
        let clean = self
            .chunks(offset, len)
            .all(|c| self.inflight[c].load(SeqCst) == 0);
        Begun::Read { epoch, clean }
    }

    /// Whether the read that began so, of `len` bytes at `offset`, saw what the working copy
    /// will hold at its place in a replay.
    fn reproducible(&self, begun: &Begun, offset: u64, len: u64) -> bool {
        let Begun::Read { epoch, clean } = begun else {
            return false;
        };
        *clean
            && self
                .chunks(offset, len)
                .all(|c| self.last[c].load(std::sync::atomic::Ordering::SeqCst) <= *epoch)
    }
}

impl Recording {
    /// Records into `file` (appended: a restarted blockd goes on in its predecessor's log);
    /// with `base` (the disk's size), on a base copy of the image made as the log began.
    pub fn to_record(
        file: File,
        base: Option<u64>,
    ) -> Result<Recording, vmm_proto::record::RecordError> {
        let w = Writer::append(std::io::BufWriter::with_capacity(1 << 20, file), KIND)?;
        Ok(Recording {
            mode: Mutex::new(Mode::Record(Some(w))),
            queues: Mutex::default(),
            done: Default::default(),
            tracking: base.map(Tracking::new),
            on_copy: false,
            replaying: false,
            copy_turn: Mutex::new(0),
            copy_turned: std::sync::Condvar::new(),
        })
    }

    /// Replays `file`; `on_copy`: the export's image is a working copy of the recording's
    /// base, where the guest's writes are done (so that reads logged as checksums find their
    /// bytes).
    pub fn to_replay(
        file: File,
        on_copy: bool,
    ) -> Result<Recording, vmm_proto::record::RecordError> {
        Ok(Recording {
            mode: Mutex::new(Mode::Replay {
                reader: Reader::resume(file, KIND)?,
                ahead: Vec::new(),
                copy_ops: 0,
            }),
            queues: Mutex::default(),
            done: Default::default(),
            tracking: None,
            on_copy,
            replaying: true,
            copy_turn: Mutex::new(0),
            copy_turned: std::sync::Condvar::new(),
        })
    }

    /// Ends the recording: what is buffered goes to the log, and nothing after.
    pub fn finish(&self) {
        self.flush();
        if let Mode::Record(w) = &mut *self.mode.lock().unwrap() {
            w.take();
        }
    }

    /// Everything recorded so far goes into the log; returns the log's length then (where a
    /// replay from this point reads on). Err: the recording stopped, or this is a replay.
    pub fn mark(&self) -> Result<u64, String> {
        use std::io::{Seek, Write};
        let mut mode = self.mode.lock().unwrap();
        let Mode::Record(Some(w)) = &mut *mode else {
            return Err(
                "it is not recording (a replay, or a recording that stopped on an error)".into(),
            );
        };
        let out = w.get_mut();
        out.flush()
            .map_err(|e| format!("cannot write the log ({e})"))?;
        // (Opened for appending: the offset is the end once what was buffered is written.)
        out.get_mut()
            .stream_position()
            .map_err(|e| format!("cannot tell where the log stands ({e})"))
    }

    /// The records of the requests answered so far go to the kernel (before the guest is
    /// told of them).
    pub fn flush(&self) {
        use std::io::Write;
        let mut mode = self.mode.lock().unwrap();
        if let Mode::Record(Some(w)) = &mut *mode {
            if let Err(e) = w.get_mut().flush() {
                log::error!("cannot write the recording ({e}); it stops here");
                *mode = Mode::Record(None);
            }
        }
    }

    /// A request with a transfer begins (after it was checked, before its I/O): a write's
    /// chunks are marked, a read notes the epoch (recording on a base copy).
    pub fn begins(&self, queue: u16, head: u16, write: bool, offset: u64, len: u64) {
        let Some(t) = &self.tracking else {
            return;
        };
        let begun = if write {
            t.write_begins(offset, len);
            Begun::Write { offset, len }
        } else {
            t.read_begins(offset, len)
        };
        self.with_queue(queue, |q| q.head(head).begun = Some(begun));
    }

    fn with_queue<T>(&self, queue: u16, f: impl FnOnce(&mut QueueNotes) -> T) -> T {
        let mut queues = self.queues.lock().unwrap();
        let q = usize::from(queue);
        if queues.len() <= q {
            queues.resize_with(q + 1, QueueNotes::default);
        }
        f(&mut queues[q])
    }

    /// A discard or write-zeroes (done within the request's checks) begins, or ends.
    pub fn zeroing(&self, offset: u64, len: u64, begins: bool) {
        if let Some(t) = &self.tracking {
            if begins {
                t.write_begins(offset, len);
            } else {
                t.write_ends(offset, len);
            }
        }
    }

    /// The request at `head` is answered, as it `began`: a write's chunks are free again; for
    /// a read, whether a replay's working copy will hold what it read.
    fn answered(&self, began: Option<Begun>, offset: u64, len: u64) -> bool {
        let Some(t) = &self.tracking else {
            return false;
        };
        match began {
            Some(Begun::Write { offset, len }) => {
                t.write_ends(offset, len);
                false
            }
            Some(b) => t.reproducible(&b, offset, len),
            None => false,
        }
    }

    /// A fault rule delays the request at `head` by `ms` (recorded with its answer).
    pub fn delayed(&self, queue: u16, head: u16, ms: u32) {
        self.with_queue(queue, |q| q.head(head).delay_ms = ms);
    }

    /// Where it stands, for `vmmctl replay status`.
    pub fn status(&self) -> String {
        let n = self.done.load(std::sync::atomic::Ordering::Relaxed);
        if self.replaying() {
            format!("replaying, {n} request(s) answered")
        } else {
            format!("recording, {n} request(s)")
        }
    }

    pub fn replaying(&self) -> bool {
        self.replaying
    }

    /// The next index on `queue` (`known`: the recorded one), and the one after it is next.
    fn take_index(&self, queue: u16, known: Option<u64>) -> u64 {
        self.with_queue(queue, |q| {
            let i = known.unwrap_or(q.next);
            q.next = i + 1;
            i
        })
    }

    /// What the guest gave (the readable segments: its header, length and CRC-32, read
    /// without a copy of the whole) and the room it left (the writable ones).
    fn given(mem: &GuestMemoryMmap<()>, chain: &Segments) -> (Given, usize) {
        let room = chain.writable.iter().map(|s| s.1 as usize).sum();
        (Self::given_by(mem, chain.readable.iter().copied()), room)
    }

    fn given_by(mem: &GuestMemoryMmap<()>, readable: impl Iterator<Item = (u64, u64)>) -> Given {
        let mut header = [0u8; 16];
        let mut len = 0usize;
        let crc = crc_of(mem, readable, u64::MAX, |piece| {
            if len < 16 {
                let n = piece.len().min(16 - len);
                header[len..len + n].copy_from_slice(&piece[..n]);
            }
            len += piece.len();
        });
        Given { header, len, crc }
    }

    /// Recording, the request `chain` came at `head` of `queue`: what it gave (a write's
    /// data) is taken now, before any I/O, and the room it left is kept for its answer, so
    /// that the answer needs no walk of its chain again.
    pub fn submitted(
        &self,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        head: u16,
        chain: &crate::request::Chain,
    ) {
        if self.replaying {
            return;
        }
        let given = Self::given_by(mem, chain.readable.iter().map(|s| (s.addr, s.len)));
        self.with_queue(queue, |q| {
            let note = q.head(head);
            note.given = Some(given);
            note.writable.clear();
            note.writable
                .extend(chain.writable.iter().map(|s| (s.addr, s.len)));
        });
    }

    /// Records a request blockd has just answered with `used` bytes written back. What the
    /// request gave and the room it left were noted as it came (`submitted`); for one that
    /// came before (to a blockd that restarted since), `walk` finds its chain's pieces.
    pub fn record_answered(
        &self,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        head: u16,
        used: u32,
        walk: impl FnOnce() -> Option<(Vec<(u64, u64)>, Vec<(u64, u64)>)>,
    ) {
        if self.replaying {
            return;
        }
        // What it noted as it came and began.
        let (begun, delay_ms, given, mut writable) = self.with_queue(queue, |q| {
            let note = q.head(head);
            (
                note.begun.take(),
                std::mem::take(&mut note.delay_ms),
                note.given.take(),
                std::mem::take(&mut note.writable),
            )
        });
        let given = match given {
            Some(g) => g,
            None => {
                let Some((readable, w)) = walk() else {
                    return;
                };
                writable = w;
                Self::given_by(mem, readable.into_iter())
            }
        };
        let room: usize = writable.iter().map(|s| s.1 as usize).sum();
        // A read that worked, whose bytes a replay's working copy will hold: its CRC alone.
        let kind = u32::from_le_bytes(given.header[..4].try_into().unwrap());
        let status = writable
            .last()
            .and_then(|&(a, l)| mem.read_obj::<u8>(GuestAddress(a + l - 1)).ok());
        let data = room.saturating_sub(1) as u64;
        let offset = u64::from_le_bytes(given.header[8..].try_into().unwrap()).saturating_mul(512);
        let reproducible = self.answered(begun, offset, data);
        let base = kind == virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN
            && status == Some(0)
            && used as usize == room
            && data > 0
            && reproducible;
        let (flags, data_crc, written) = match (base, status) {
            (true, Some(s)) => (
                FROM_BASE,
                crc_of(mem, writable.iter().copied(), data, |_| {}),
                vec![s],
            ),
            (false, Some(s)) if s != 0 && used <= 1 && room > 1 => (STATUS_ONLY, 0, vec![s]),
            _ => (0, 0, read_all(mem, &writable)),
        };
        // Its index; the vector goes back for the head's next request.
        writable.clear();
        let index = self.with_queue(queue, |q| {
            let note = q.head(head);
            if note.writable.capacity() == 0 {
                note.writable = writable;
            }
            q.next += 1;
            q.next - 1
        });
        let rec = Rec {
            queue,
            index,
            used,
            delay_ms,
            header: given.header,
            given_len: given.len as u32,
            given_crc: given.crc,
            room: room as u32,
            flags,
            data_crc,
            written,
        };
        thread_local! {
            // The worker's record, encoded here (not a new buffer for every request).
            static PAYLOAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let written = PAYLOAD.with_borrow_mut(|payload| {
            rec.encode_into(payload);
            let mut mode = self.mode.lock().unwrap();
            let Mode::Record(Some(w)) = &mut *mode else {
                return Ok(false);
            };
            let r = w.record_buffered(payload);
            if r.is_err() {
                *mode = Mode::Record(None);
            }
            r.map(|()| true)
        });
        match written {
            Ok(true) => {
                self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => log::error!(
                "cannot record request {index} of queue {queue} ({e}); the recording stops here"
            ),
        }
    }

    /// Finds the recorded request that a request the guest sent now is: the first of its
    /// queue's records not matched yet that has the same header, bytes out and room, among
    /// the next `WINDOW` (a request can be that far ahead of those the recording answered
    /// before it, when requests in flight completed out of order). Err: none is, and how
    /// the request differs from the first record still to come.
    pub fn matched(
        &self,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        chain: &Segments,
    ) -> Result<Matched, Diverged> {
        let (given, room) = Self::given(mem, chain);
        let same = |rec: &Rec| {
            rec.header == given.header
                && rec.given_len == given.len as u32
                && rec.given_crc == given.crc
                && rec.room as usize == room
        };
        let mut mode = self.mode.lock().unwrap();
        let Mode::Replay {
            reader,
            ahead,
            copy_ops,
        } = &mut *mode
        else {
            return Err(Diverged(format!("queue {queue}: not replaying")));
        };
        let q = usize::from(queue);
        if ahead.len() <= q {
            ahead.resize_with(q + 1, Ahead::default);
        }
        loop {
            if let Some(at) = ahead[q].recs.iter().position(|(_, _, r)| same(r)) {
                let (ord, turn, rec) = ahead[q].recs.remove(at).expect("found");
                return Ok(Matched { ord, turn, rec });
            }
            if ahead[q].recs.len() >= WINDOW {
                break;
            }
            let Some(payload) = reader
                .next_record()
                .map_err(|e| Diverged(format!("queue {queue}: the recording: {e}")))?
            else {
                break;
            };
            let rec = Rec::decode(&payload).ok_or_else(|| {
                Diverged(format!(
                    "queue {queue}: the recording holds a record too short to be a request"
                ))
            })?;
            let rq = usize::from(rec.queue);
            if ahead.len() <= rq {
                ahead.resize_with(rq + 1, Ahead::default);
            }
            // An operation on the working copy takes its turn among them all.
            let turn = (self.on_copy && rec.on_copy()).then(|| {
                *copy_ops += 1;
                *copy_ops - 1
            });
            let a = &mut ahead[rq];
            a.recs.push_back((a.next_ord, turn, rec));
            a.next_ord += 1;
        }
        let sent = Rec::describe(&given.header, given.len as u32, room);
        Err(Diverged(match ahead[q].recs.front() {
            None => format!(
                "queue {queue}, request {}: the recording has no more requests on this queue; the guest sent {sent}",
                self.take_index(queue, None)
            ),
            Some((_, _, rec)) => {
                let extra = if rec.header == given.header && rec.given_len == given.len as u32 {
                    " (the same request with other bytes written)"
                } else {
                    ""
                };
                format!(
                    "queue {queue}, request {}: the recording has {}, the guest sent {sent}{extra}",
                    rec.index,
                    Rec::describe(&rec.header, rec.given_len, rec.room as usize),
                )
            }
        }))
    }

    /// Answers a matched request as it was recorded (in the recorded order of its queue's
    /// answers, which the caller keeps): writes back what was recorded and returns the used
    /// length and the delay a fault rule had injected, or says why it cannot.
    /// On a working copy, `apply` does a recorded write that worked (write, discard or
    /// write-zeroes) there first, as the guest asks it again.
    /// `read` reads the working copy (the export's image) at an offset, for reads logged as
    /// checksums.
    pub fn complete(
        &self,
        m: Matched,
        read: impl FnOnce(u64, &mut [u8]) -> std::io::Result<u64>,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        chain: &Segments,
        apply: impl FnOnce() -> Result<(), String>,
    ) -> Result<(u32, u32), Diverged> {
        let rec = m.rec;
        let index = self.take_index(queue, Some(rec.index));
        // On the working copy, in the recorded order across queues: a read another queue's
        // later write would change comes first, and a write earlier than a read is done.
        let _turn = match m.turn {
            Some(t) => Some(self.copy_turn(t).map_err(|waited| {
                Diverged(format!(
                    "queue {queue}, request {index}: waited {waited} s for a request of another queue that the recording answered before it and that has not come"
                ))
            })?),
            None => None,
        };
        let room = rec.room as usize;
        use virtio_bindings::virtio_blk as blk;
        let kind = u32::from_le_bytes(rec.header[..4].try_into().unwrap());
        let writes = matches!(
            kind,
            blk::VIRTIO_BLK_T_OUT | blk::VIRTIO_BLK_T_DISCARD | blk::VIRTIO_BLK_T_WRITE_ZEROES
        );
        if self.on_copy && writes && rec.written.last() == Some(&0) {
            apply().map_err(|e| {
                Diverged(format!(
                    "queue {queue}, request {index}: {} cannot be done on the working copy: {e}",
                    Rec::describe(&rec.header, rec.given_len, room)
                ))
            })?;
        }
        let written = if rec.flags & FROM_BASE != 0 {
            // The data from the base copy (the export's image now), as it was read then.
            let mut data = vec![0u8; room - 1];
            let read = read(rec.offset(), &mut data);
            if !matches!(read, Ok(n) if n as usize == data.len())
                || crc32fast::hash(&data) != rec.data_crc
            {
                return Err(Diverged(format!(
                    "queue {queue}, request {index}: {} is to come from the working copy of the recording's base copy, which does not hold what was read there when recording ({}); replay with the base copy the recording made",
                    Rec::describe(&rec.header, rec.given_len, room),
                    match read {
                        Err(e) => e.to_string(),
                        Ok(_) => "its CRC-32 differs".into(),
                    }
                )));
            }
            data.extend_from_slice(&rec.written);
            data
        } else {
            rec.written
        };
        if rec.flags == STATUS_ONLY {
            // The last writable byte, if the guest's descriptor has one within the address
            // space.
            let last = chain.writable.last();
            if let Some(at) = last.and_then(|&(a, l)| a.checked_add(l)?.checked_sub(1)) {
                let _ = mem.write_slice(&written, GuestAddress(at));
            }
        } else {
            let mut at = 0;
            for &(addr, len) in chain.writable {
                let n = len as usize;
                let _ = mem.write_slice(&written[at..at + n], GuestAddress(addr));
                at += n;
            }
        }
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((rec.used, rec.delay_ms))
    }
}

/// A request the guest sent, matched to its record.
pub struct Matched {
    /// Its place among its queue's recorded answers (from where the replay began): it is
    /// answered after those before it.
    pub ord: u64,
    /// Its turn among the operations on the working copy, of every queue.
    turn: Option<u64>,
    rec: Rec,
}

/// An operation's turn on the working copy: the next one's comes when it drops.
struct CopyTurn<'a>(&'a Recording);

impl Drop for CopyTurn<'_> {
    fn drop(&mut self) {
        *self.0.copy_turn.lock().unwrap() += 1;
        self.0.copy_turned.notify_all();
    }
}

impl Recording {
    /// Waits for turn `t` on the working copy (Err: the seconds waited in vain).
    fn copy_turn(&self, t: u64) -> Result<CopyTurn<'_>, u64> {
        const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        let mut at = self.copy_turn.lock().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        while *at < t {
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(WAIT.as_secs());
            }
            at = self.copy_turned.wait_timeout(at, deadline - now).unwrap().0;
        }
        Ok(CopyTurn(self))
    }
}

/// How far ahead of the answers still to come a request's record may be (the most requests
/// a queue holds in flight).
const WINDOW: usize = 1024;

/// A queue's records read ahead and not matched yet, with their places.
#[derive(Default)]
struct Ahead {
    /// (place on the queue, turn on the working copy, record)
    recs: VecDeque<(u64, Option<u64>, Rec)>,
    next_ord: u64,
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What a request gave: its first 16 bytes (the header), its length and its CRC-32.
#[derive(Clone, Copy)]
struct Given {
    header: [u8; 16],
    len: usize,
    crc: u32,
}

/// The CRC-32 of the first `limit` bytes of guest memory at `segs`, one after the other (a
/// piece outside guest memory is left out), hashed where they are (no copy: this is on
/// every recorded request's path) and shown to `each` as they pass.
fn crc_of(
    mem: &GuestMemoryMmap<()>,
    segs: impl IntoIterator<Item = (u64, u64)>,
    mut limit: u64,
    mut each: impl FnMut(&[u8]),
) -> u32 {
    use vm_memory::GuestMemoryBackend;
    let mut h = crc32fast::Hasher::new();
    for (addr, len) in segs {
        let len = len.min(limit);
        limit -= len;
        for slice in mem.get_slices(GuestAddress(addr), len as usize) {
            let Ok(v) = slice else { break };
            let guard = v.ptr_guard();
            // SAFETY: the pointer and length are those of a slice of a guest memory region
            // that `mem` (borrowed for this call) keeps mapped, and the bytes are only read,
            // as u8 (every value is one), within this call. The guest may write them
            // meanwhile, as it may during any copy of them: the hash is then of what was
            // there as it passed, and a replay that finds other bytes says so.
            let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), v.len()) };
            h.update(bytes);
            each(bytes);
        }
    }
    h.finalize()
}

/// The bytes of guest memory at `segs`, one after the other (a piece outside guest memory is
/// left out).
fn read_all(mem: &GuestMemoryMmap<()>, segs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len) in segs {
        let start = out.len();
        out.resize(start + len as usize, 0);
        if mem
            .read_slice(&mut out[start..], GuestAddress(addr))
            .is_err()
        {
            out.truncate(start);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Begun, Tracking, CHUNK};

    #[test]
    fn a_read_is_reproducible_unless_a_write_to_its_chunks_races_it() {
        let t = Tracking::new(8 * CHUNK);
        // No write anywhere near: reproducible.
        let r = t.read_begins(0, 4096);
        assert!(t.reproducible(&r, 0, 4096));
        // A write elsewhere begins and ends meanwhile: still reproducible.
        let r = t.read_begins(0, 4096);
        t.write_begins(4 * CHUNK, 4096);
        t.write_ends(4 * CHUNK, 4096);
        assert!(t.reproducible(&r, 0, 4096));
        // A write to the same chunk begins after the read began: not.
        let r = t.read_begins(0, 4096);
        t.write_begins(8192, 4096);
        assert!(!t.reproducible(&r, 0, 4096));
        // ... and while it is in flight, a read that begins is not either, even once the
        // write has ended.
        let r = t.read_begins(0, 4096);
        t.write_ends(8192, 4096);
        assert!(!t.reproducible(&r, 0, 4096));
        // After it, reads are again.
        let r = t.read_begins(0, 4096);
        assert!(t.reproducible(&r, 0, 4096));
        // A read across a chunk boundary sees a write in its second chunk.
        let r = t.read_begins(CHUNK - 4096, 8192);
        t.write_begins(CHUNK, 512);
        t.write_ends(CHUNK, 512);
        assert!(!t.reproducible(&r, CHUNK - 4096, 8192));
        // A write is never one.
        let w = Begun::Write { offset: 0, len: 1 };
        assert!(!t.reproducible(&w, 0, 4096));
    }
}
