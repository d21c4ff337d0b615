//! Record/replay of a disk's requests (vmm-core's `--record DIR` / `--replay DIR`).
//!
//! Recording, every request blockd answers goes into the disk's log (vmm_proto::record) as
//! the guest saw it: its queue and index there, its header (type, sector), the length and a
//! CRC-32 of what the guest gave (the header and a write's data), and everything blockd
//! wrote back (a read's data, a GET_ID string, the status byte), with the used length. So a
//! failure a fault rule injected is recorded as the guest saw it, too.
//!
//! Replaying, blockd answers each request from the log and touches no image: a read gets the
//! recorded bytes even if the image changed since, a write is checked against the recording
//! and not written, an injected error comes back with no rule set. A request that differs
//! from the recorded one at its place (type, sector, lengths or written bytes) stops the
//! export with a line that names the queue, the index, what was recorded and what came.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_proto::record::{Reader, Writer};

/// The log's kind.
pub const KIND: &str = "disk";

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
    written: Vec<u8>,
}

impl Rec {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(42 + self.written.len());
        b.extend_from_slice(&self.queue.to_le_bytes());
        b.extend_from_slice(&self.index.to_le_bytes());
        b.extend_from_slice(&self.used.to_le_bytes());
        b.extend_from_slice(&self.delay_ms.to_le_bytes());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&self.given_len.to_le_bytes());
        b.extend_from_slice(&self.given_crc.to_le_bytes());
        b.extend_from_slice(&self.written);
        b
    }

    fn decode(b: &[u8]) -> Option<Rec> {
        if b.len() < 42 {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Some(Rec {
            queue: u16::from_le_bytes([b[0], b[1]]),
            index: u64::from_le_bytes(b[2..10].try_into().unwrap()),
            used: u32_at(10),
            delay_ms: u32_at(14),
            header: b[18..34].try_into().unwrap(),
            given_len: u32_at(34),
            given_crc: u32_at(38),
            written: b[42..].to_vec(),
        })
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
    /// Records go to a thread of their own, which appends them (in order, each written to
    /// the kernel as soon as the thread gets it): the queue's worker only copies.
    Record(std::sync::mpsc::Sender<Vec<u8>>),
    Replay {
        reader: Reader<File>,
        /// Records read ahead for other queues than the one asked.
        ahead: Vec<VecDeque<Rec>>,
    },
}

/// A disk's recording, or the recording it replays.
pub struct Recording {
    mode: Mutex<Mode>,
    /// The recorder's thread, joined when the recording ends (so that every record is in the
    /// log before blockd exits).
    recorder: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Per queue: requests recorded or replayed so far (this blockd's).
    next: Mutex<Vec<u64>>,
    /// Requests recorded, or answered from the recording.
    done: std::sync::atomic::AtomicU64,
    /// Requests (by head) a fault rule delays, with the delay: recorded with their answer.
    delays: Mutex<std::collections::HashMap<(u16, u16), u32>>,
}

impl Recording {
    pub fn to_record(file: File) -> Result<Recording, vmm_proto::record::RecordError> {
        let mut w = Writer::append(std::io::BufWriter::new(file), KIND)?;
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let recorder = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || {
                use std::io::Write;
                // Whatever came meanwhile goes in one write; then to the kernel.
                while let Ok(rec) = rx.recv() {
                    let mut r = w.record(&rec);
                    while let (Ok(()), Ok(more)) = (&r, rx.try_recv()) {
                        r = w.record(&more);
                    }
                    if let Err(e) = r.and_then(|()| Ok(w.get_mut().flush()?)) {
                        log::error!("cannot write the recording ({e}); it stops here");
                        return;
                    }
                }
            })?;
        Ok(Recording {
            mode: Mutex::new(Mode::Record(tx)),
            recorder: Mutex::new(Some(recorder)),
            next: Mutex::new(Vec::new()),
            done: Default::default(),
            delays: Mutex::default(),
        })
    }

    pub fn to_replay(file: File) -> Result<Recording, vmm_proto::record::RecordError> {
        Ok(Recording {
            mode: Mutex::new(Mode::Replay {
                reader: Reader::resume(file, KIND)?,
                ahead: Vec::new(),
            }),
            recorder: Mutex::new(None),
            next: Mutex::new(Vec::new()),
            done: Default::default(),
            delays: Mutex::default(),
        })
    }

    /// Ends the recording: every record sent is written, and the thread ends.
    pub fn finish(&self) {
        let (tx, _) = std::sync::mpsc::channel();
        let mut mode = self.mode.lock().unwrap();
        if let Mode::Record(old) = &mut *mode {
            drop(std::mem::replace(old, tx));
        }
        drop(mode);
        if let Some(t) = self.recorder.lock().unwrap().take() {
            let _ = t.join();
        }
    }

    /// A fault rule delays the request at `head` by `ms` (recorded with its answer).
    pub fn delayed(&self, queue: u16, head: u16, ms: u32) {
        self.delays.lock().unwrap().insert((queue, head), ms);
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
        matches!(*self.mode.lock().unwrap(), Mode::Replay { .. })
    }

    fn take_index(&self, queue: u16) -> u64 {
        let mut next = self.next.lock().unwrap();
        let q = usize::from(queue);
        if next.len() <= q {
            next.resize(q + 1, 0);
        }
        let i = next[q];
        next[q] += 1;
        i
    }

    /// What the guest gave (the readable segments) and the room it left (the writable ones).
    fn given(mem: &GuestMemoryMmap<()>, chain: &Segments) -> (Vec<u8>, usize) {
        let given = read_all(mem, chain.readable);
        let room = chain.writable.iter().map(|s| s.1 as usize).sum();
        (given, room)
    }

    fn header(given: &[u8]) -> [u8; 16] {
        let mut h = [0u8; 16];
        let n = given.len().min(16);
        h[..n].copy_from_slice(&given[..n]);
        h
    }

    /// Records a request blockd has just answered with `used` bytes written back.
    pub fn record_answered(
        &self,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        head: u16,
        chain: &Segments,
        used: u32,
    ) {
        let tx = match &*self.mode.lock().unwrap() {
            Mode::Record(tx) => tx.clone(),
            Mode::Replay { .. } => return,
        };
        let (given, _) = Self::given(mem, chain);
        let written = read_all(mem, chain.writable);
        let rec = Rec {
            queue,
            index: self.take_index(queue),
            used,
            delay_ms: self
                .delays
                .lock()
                .unwrap()
                .remove(&(queue, head))
                .unwrap_or(0),
            header: Self::header(&given),
            given_len: given.len() as u32,
            given_crc: crc32fast::hash(&given),
            written,
        };
        let index = rec.index;
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if tx.send(rec.encode()).is_err() {
            log::error!("cannot record request {index} of queue {queue}: the recorder stopped");
        }
    }

    /// Answers a request from the recording: writes back what was recorded and returns the
    /// used length and the delay a fault rule had injected, or says how the request differs
    /// from the recorded one.
    pub fn answer(
        &self,
        mem: &GuestMemoryMmap<()>,
        queue: u16,
        chain: &Segments,
    ) -> Result<(u32, u32), Diverged> {
        let index = self.take_index(queue);
        let (given, room) = Self::given(mem, chain);
        let rec = self.next_for(queue)?;
        let Some(rec) = rec else {
            return Err(Diverged(format!(
                "queue {queue}, request {index}: the recording has no more requests on this queue; the guest sent {}",
                Rec::describe(&Self::header(&given), given.len() as u32, room)
            )));
        };
        let same = rec.header == Self::header(&given)
            && rec.given_len == given.len() as u32
            && rec.given_crc == crc32fast::hash(&given)
            && rec.written.len() == room;
        if !same {
            let extra = if rec.header == Self::header(&given) && rec.given_len == given.len() as u32
            {
                " (the same request with other bytes written)"
            } else {
                ""
            };
            return Err(Diverged(format!(
                "queue {queue}, request {index}: the recording has {}, the guest sent {}{extra}",
                Rec::describe(&rec.header, rec.given_len, rec.written.len()),
                Rec::describe(&Self::header(&given), given.len() as u32, room)
            )));
        }
        let mut at = 0;
        for &(addr, len) in chain.writable {
            let n = len as usize;
            let _ = mem.write_slice(&rec.written[at..at + n], GuestAddress(addr));
            at += n;
        }
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok((rec.used, rec.delay_ms))
    }

    /// The next recorded request of `queue` (None: the recording has no more); Err: why the
    /// recording cannot be read on.
    fn next_for(&self, queue: u16) -> Result<Option<Rec>, Diverged> {
        let mut mode = self.mode.lock().unwrap();
        let Mode::Replay { reader, ahead } = &mut *mode else {
            return Ok(None);
        };
        let q = usize::from(queue);
        if ahead.len() <= q {
            ahead.resize_with(q + 1, VecDeque::new);
        }
        if let Some(r) = ahead[q].pop_front() {
            return Ok(Some(r));
        }
        loop {
            let Some(payload) = reader
                .next_record()
                .map_err(|e| Diverged(format!("queue {queue}: the recording: {e}")))?
            else {
                return Ok(None);
            };
            let rec = Rec::decode(&payload).ok_or_else(|| {
                Diverged(format!(
                    "queue {queue}: the recording holds a record too short to be a request"
                ))
            })?;
            let rq = usize::from(rec.queue);
            if rq == q {
                return Ok(Some(rec));
            }
            if ahead.len() <= rq {
                ahead.resize_with(rq + 1, VecDeque::new);
            }
            ahead[rq].push_back(rec);
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        self.finish();
    }
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
