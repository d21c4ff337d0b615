//! A block I/O client on libblkio (the `blkio` crate): the same client measures blockd and
//! qemu-storage-daemon over vhost-user-blk, and a file through io_uring (the ceiling).
//!
//! blkio-bench --driver virtio-blk-vhost-user|io_uring --path SOCKET|FILE [--direct]
//!   verify --seed N                 write a pattern over the device, read it back, compare
//!   run --workload randread|randwrite|read|write --bs N --qd N --seconds S
//!
//! `run` prints one line: workload=... bs=... qd=... iops=... mbps=... p50_us=... p99_us=...

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

const K: u64 = 0x9E37_79B9_7F4A_7C15;

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("blkio-bench: {msg}");
    std::process::exit(1);
}

struct Args {
    driver: String,
    path: String,
    direct: bool,
    cmd: String,
    seed: u64,
    workload: String,
    bs: usize,
    qd: usize,
    seconds: f64,
}

fn parse() -> Args {
    let mut a = Args {
        driver: String::new(),
        path: String::new(),
        direct: false,
        cmd: String::new(),
        seed: 1,
        workload: "randread".into(),
        bs: 4096,
        qd: 32,
        seconds: 5.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .unwrap_or_else(|| die(format!("{name} needs a value")))
        };
        match x.as_str() {
            "--driver" => a.driver = val("--driver"),
            "--path" => a.path = val("--path"),
            "--direct" => a.direct = true,
            "--seed" => {
                a.seed = val("--seed")
                    .parse()
                    .unwrap_or_else(|_| die("--seed: a number"))
            }
            "--workload" => a.workload = val("--workload"),
            "--bs" => {
                a.bs = val("--bs")
                    .parse()
                    .unwrap_or_else(|_| die("--bs: a number"))
            }
            "--qd" => {
                a.qd = val("--qd")
                    .parse()
                    .unwrap_or_else(|_| die("--qd: a number"))
            }
            "--seconds" => {
                a.seconds = val("--seconds")
                    .parse()
                    .unwrap_or_else(|_| die("--seconds: a number"))
            }
            "verify" | "run" => a.cmd = x,
            other => die(format!("unknown argument {other}")),
        }
    }
    if a.driver.is_empty() || a.path.is_empty() || a.cmd.is_empty() {
        die("usage: blkio-bench --driver D --path P [--direct] verify|run [options]");
    }
    a
}

fn open(a: &Args) -> (Blkio, Blkioq, u64) {
    let mut b =
        Blkio::new(&a.driver).unwrap_or_else(|e| die(format!("{}: {}", a.driver, e.message())));
    b.set_str("path", &a.path)
        .unwrap_or_else(|e| die(format!("path: {}", e.message())));
    if a.direct {
        b.set_bool("direct", true)
            .unwrap_or_else(|e| die(format!("direct: {}", e.message())));
    }
    b.connect()
        .unwrap_or_else(|e| die(format!("connect to {}: {}", a.path, e.message())));
    b.set_i32("num-queues", 1)
        .unwrap_or_else(|e| die(format!("num-queues: {}", e.message())));
    let mut started = b
        .start()
        .unwrap_or_else(|e| die(format!("start: {}", e.message())));
    let q = started.queues.remove(0);
    let cap = b
        .get_u64("capacity")
        .unwrap_or_else(|e| die(format!("capacity: {}", e.message())));
    (b, q, cap)
}

fn buffers(b: &mut Blkio, len: usize) -> *mut u8 {
    let align = b.get_u64("mem-region-alignment").unwrap_or(4096) as usize;
    let len = len.div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .unwrap_or_else(|e| die(format!("alloc_mem_region: {}", e.message())));
    b.map_mem_region(&region)
        .unwrap_or_else(|e| die(format!("map_mem_region: {}", e.message())));
    region.addr as *mut u8
}

fn wait_one(q: &mut Blkioq) -> Completion {
    let mut c = [MaybeUninit::<Completion>::uninit()];
    let n = q
        .do_io(&mut c, 1, None, None)
        .unwrap_or_else(|e| die(format!("do_io: {}", e.message())));
    assert_eq!(n, 1);
    // SAFETY: do_io initialised the first n completions.
    unsafe { c[0].assume_init_read() }
}

fn check(c: &Completion, what: &str) {
    if c.ret != 0 {
        die(format!(
            "{what} failed: {}",
            std::io::Error::from_raw_os_error(-c.ret)
        ));
    }
}

fn verify(a: &Args) {
    let (mut b, mut q, cap) = open(a);
    const CHUNK: usize = 1 << 20;
    let buf = buffers(&mut b, CHUNK);
    let mut off = 0u64;
    while off < cap {
        let n = ((cap - off) as usize).min(CHUNK);
        for i in 0..n / 8 {
            let w = (off / 8 + i as u64).wrapping_add(a.seed).wrapping_mul(K);
            // SAFETY: buf holds CHUNK bytes.
            unsafe { (buf as *mut u64).add(i).write(w) };
        }
        q.write(off, buf, n, 0, ReqFlags::FUA);
        check(&wait_one(&mut q), "write");
        off += n as u64;
    }
    q.flush(0, ReqFlags::empty());
    check(&wait_one(&mut q), "flush");
    let mut bad = 0u64;
    off = 0;
    while off < cap {
        let n = ((cap - off) as usize).min(CHUNK);
        // SAFETY: buf holds CHUNK bytes.
        unsafe { std::ptr::write_bytes(buf, 0xee, n) };
        q.read(off, buf, n, 0, ReqFlags::empty());
        check(&wait_one(&mut q), "read");
        for i in 0..n / 8 {
            let w = (off / 8 + i as u64).wrapping_add(a.seed).wrapping_mul(K);
            // SAFETY: buf holds CHUNK bytes.
            if unsafe { (buf as *const u64).add(i).read() } != w {
                bad += 1;
            }
        }
        off += n as u64;
    }
    // Write-zeroes and discard, then read back zeroes.
    q.write_zeroes(0, 4096, 0, ReqFlags::empty());
    check(&wait_one(&mut q), "write-zeroes");
    q.discard(8192, 4096, 0, ReqFlags::empty());
    check(&wait_one(&mut q), "discard");
    q.read(0, buf, 12288, 0, ReqFlags::empty());
    check(&wait_one(&mut q), "read");
    // SAFETY: buf holds CHUNK bytes.
    let head = unsafe { std::slice::from_raw_parts(buf, 12288) };
    let zeroes_ok = head[..4096].iter().all(|&x| x == 0) && head[8192..].iter().all(|&x| x == 0);
    println!(
        "verify capacity={cap} bad-words={bad} zeroes={}",
        if zeroes_ok { "ok" } else { "bad" }
    );
    if bad != 0 || !zeroes_ok {
        std::process::exit(1);
    }
}

fn run(a: &Args) {
    let (mut b, mut q, cap) = open(a);
    let (write, random) = match a.workload.as_str() {
        "randread" => (false, true),
        "randwrite" => (true, true),
        "read" => (false, false),
        "write" => (true, false),
        w => die(format!(
            "--workload {w}: randread, randwrite, read or write"
        )),
    };
    let blocks = cap / a.bs as u64;
    if blocks == 0 {
        die("the device is smaller than one block");
    }
    let buf = buffers(&mut b, a.bs * a.qd);
    // SAFETY: buf holds bs * qd bytes.
    unsafe { std::ptr::write_bytes(buf, 0x5a, a.bs * a.qd) };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_seq = 0u64;
    let mut pick = |rng: &mut u64| -> u64 {
        if random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * a.bs as u64
        } else {
            let o = (next_seq % blocks) * a.bs as u64;
            next_seq += 1;
            o
        }
    };
    let mut started = vec![Instant::now(); a.qd];
    let submit = |q: &mut Blkioq, slot: usize, off: u64, started: &mut Vec<Instant>| {
        // SAFETY: each slot has its own bs bytes of buf.
        let p = unsafe { buf.add(slot * a.bs) };
        started[slot] = Instant::now();
        if write {
            q.write(off, p, a.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, p, a.bs, slot, ReqFlags::empty());
        }
    };
    for slot in 0..a.qd {
        let off = pick(&mut rng);
        submit(&mut q, slot, off, &mut started);
    }
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.seconds);
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut done = 0u64;
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..a.qd).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight = a.qd;
    while inflight > 0 {
        let n = q
            .do_io(&mut comps, 1, None, None)
            .unwrap_or_else(|e| die(format!("do_io: {}", e.message())));
        let now = Instant::now();
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            check(&c, &a.workload);
            let slot = c.user_data;
            lat.push((now - started[slot]).as_nanos().min(u32::MAX as u128) as u32);
            done += 1;
            if now < end {
                let off = pick(&mut rng);
                submit(&mut q, slot, off, &mut started);
            } else {
                inflight -= 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "workload={} bs={} qd={} iops={:.0} mbps={:.1} p50_us={:.1} p99_us={:.1}",
        a.workload,
        a.bs,
        a.qd,
        done as f64 / secs,
        done as f64 * a.bs as f64 / secs / 1e6,
        pct(0.50),
        pct(0.99)
    );
}

fn main() {
    let a = parse();
    match a.cmd.as_str() {
        "verify" => verify(&a),
        _ => run(&a),
    }
}
