//! crashfs: a FUSE file system of one file, `disk.img`, that remembers only what was made
//! durable. Every write reaches it (direct I/O, no page cache), but only `fsync`/`fdatasync`
//! (which a write with RWF_DSYNC or O_DSYNC also sends) copies the file's current content to
//! its durable copy. A "power cut" (SIGTERM) writes the durable copy to OUT, unmounts and
//! exits: what a crash-consistency check then reads is what a real disk would have kept.
//!
//! `crashfs MOUNTPOINT OUT IMAGE`: serves MOUNTPOINT/disk.img, which starts (durable) as a
//! copy of IMAGE and grows as it is written beyond its end (a qcow2 image does).

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, SessionACL, WriteFlags,
};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const FILE: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    syncs: u64,
}

struct CrashFs(Arc<Mutex<State>>);

fn attr(ino: INodeNo, size: u64) -> FileAttr {
    let dir = ino == INodeNo::ROOT;
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o666 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl CrashFs {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().current.len() as u64
    }
}

impl Filesystem for CrashFs {
    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == "disk.img" {
            reply.entry(&TTL, &attr(FILE, self.size()), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        match ino {
            INodeNo::ROOT => reply.attr(&TTL, &attr(ino, 0)),
            FILE => reply.attr(&TTL, &attr(ino, self.size())),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        if ino == FILE {
            // No writeback cache is asked for (init), so each write comes here when it is
            // made; the kernel's page cache keeps copies for reads only. (Not direct I/O:
            // there the kernel drops the fsync an O_DSYNC or RWF_DSYNC write asks for.)
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.0.lock().unwrap();
        let start = (offset as usize).min(s.current.len());
        let end = (start + size as usize).min(s.current.len());
        reply.data(&s.current[start..end]);
    }

    fn write(
        &self,
        _: &Request,
        _: INodeNo,
        _: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.0.lock().unwrap();
        let start = offset as usize;
        if start + data.len() > 1 << 30 {
            reply.error(Errno::EFBIG);
            return;
        }
        if start + data.len() > s.current.len() {
            s.current.resize(start + data.len(), 0);
        }
        s.current[start..start + data.len()].copy_from_slice(data);
        reply.written(data.len() as u32);
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        // close(2): not a promise of durability.
        reply.ok();
    }

    fn fsync(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        let mut s = self.0.lock().unwrap();
        s.durable = s.current.clone();
        s.syncs += 1;
        reply.ok();
    }
}

fn die(msg: String) -> ! {
    eprintln!("crashfs: {msg}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mountpoint, out, image] = &args[..] else {
        die("usage: crashfs MOUNTPOINT OUT IMAGE".into())
    };
    let start = std::fs::read(image).unwrap_or_else(|e| die(format!("{image}: {e}")));
    let state = Arc::new(Mutex::new(State {
        current: start.clone(),
        durable: start,
        syncs: 0,
    }));
    // The power cut comes as SIGTERM, taken by this thread once the file system serves.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set.thread_block()
        .unwrap_or_else(|e| die(format!("signals: {e}")));
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("crashfs".into())];
    config.acl = SessionACL::All;
    let session = fuser::spawn_mount(CrashFs(state.clone()), mountpoint, &config)
        .unwrap_or_else(|e| die(format!("cannot mount on {mountpoint}: {e}")));
    println!("crashfs: serving {mountpoint}/disk.img");
    let _ = set.wait();
    let s = state.lock().unwrap();
    std::fs::write(out, &s.durable).unwrap_or_else(|e| die(format!("{out}: {e}")));
    eprintln!(
        "crashfs: power cut after {} sync(s); the durable copy is in {out}",
        s.syncs
    );
    drop(s);
    drop(session);
}
