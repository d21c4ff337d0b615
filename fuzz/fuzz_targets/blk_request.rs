//! A guest that wants to harm blockd: guest memory, the descriptor table and the available
//! ring are all the input's. blockd pops each chain the ring offers (virtio-queue's iterator,
//! as its queue workers do), and resubmits heads as a restarted blockd does (`Chain::at_head`),
//! then parses and executes each request on a real raw image (`request::execute`): chains that
//! loop or leave guest memory, indirect tables, headers and status bytes split anywhere,
//! lengths up to u32::MAX, every request type with any sector and size. blockd may refuse any
//! request, but never panic, and touches no memory outside the guest's.
#![no_main]

use blockd::disk::{Disk, Options, Policy};
use blockd::image::Format;
use blockd::request::{execute, Chain};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: 64 KiB at 0 and one page at 1 MiB, with a hole between.
const LOW: usize = 64 << 10;
const HIGH: u64 = 1 << 20;
const SIZE: u16 = 16;

/// A 1 MiB raw image in a memfd, shared by every run.
fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let fd = nix::sys::memfd::memfd_create("blk-fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd_create");
        let file = std::fs::File::from(fd);
        file.set_len(1 << 20).expect("ftruncate");
        let options = Options {
            readonly: false,
            queues: 1,
            queue_size: SIZE,
            writethrough: false,
            serial: "fuzz".into(),
            format: Format::Raw,
            read_error: Policy::Report,
            write_error: Policy::Report,
        };
        Disk::new(file, options).expect("the image")
    })
}

fuzz_target!(|data: &[u8]| {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH), 4096)])
            .expect("guest memory");
    let (low, high) = data.split_at(data.len().min(LOW));
    mem.write_slice(low, GuestAddress(0)).expect("in memory");
    mem.write_slice(&high[..high.len().min(4096)], GuestAddress(HIGH))
        .expect("in memory");
    let disk = disk();
    // The rings where a driver would put them: the table at 0, the available ring at 0x100,
    // the used ring at 0x200 (all in the input).
    let mut q = Queue::new(SIZE).expect("a queue");
    q.set_size(SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    let mut heads = Vec::new();
    if let Ok(mut it) = q.iter(&mem) {
        for chain in it.by_ref().take(usize::from(SIZE) * 2) {
            heads.push(chain.head_index());
            let _ = execute(disk, &mem, Chain::from_descriptors(chain));
        }
    }
    // A restarted blockd walks the chains it finds in flight itself.
    for head in heads.into_iter().chain([0, SIZE - 1, SIZE]) {
        if let Ok(chain) = Chain::at_head(&mem, GuestAddress(0), SIZE, head) {
            let _ = execute(disk, &mem, chain);
        }
    }
});
