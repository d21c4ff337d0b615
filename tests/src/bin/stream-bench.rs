//! migrated's stream on this host, without a VM: RAM from one memfd to another over loopback
//! TCP, plain and with migrated's TLS, through the code a migration runs (`Writer::ram_live`
//! on the source, `server::receive` on the destination), with the raw transport beside it as
//! tls-bench measures it. Prints the throughput and each end's CPU time per GiB, so that a
//! change to the stream's code can be weighed on a noisy host (CPU time varies far less than
//! wall time when the machine is shared).
//!
//! usage: stream-bench CREDS_DIR [MIB] [ROUNDS]     (default 512 MiB, 3 rounds)

use migrated::channel::{Stream, Uri};
use migrated::ram::Ram;
use migrated::stream::{Config, Reader, Writer, Zeros, PAGE};
use migrated::tls::{self, Tls};
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(creds) = args.get(1) else {
        eprintln!("usage: stream-bench CREDS_DIR [MIB] [ROUNDS]");
        std::process::exit(2);
    };
    let num = |i: usize, default: u64, what: &str| -> u64 {
        match args.get(i).map(|s| s.parse::<u64>()) {
            None => default,
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                eprintln!("error: {what} {:?}: a whole number above 0", args[i]);
                std::process::exit(2);
            }
        }
    };
    let (mib, rounds) = (num(2, 512, "MIB"), num(3, 3, "ROUNDS"));
    let side = |server| vmm_tests::bench_tls(creds, server);
    let tls = (side(false), side(true));
    let bytes = mib << 20;
    let src = memfd("stream-bench-src", bytes);
    fill(&src, bytes);
    println!("{mib} MiB of non-zero pages, memfd to memfd over loopback TCP; medians of {rounds}");
    println!(
        "{:<24}{:>8}{:>16}{:>16}{:>17}",
        "case", "MB/s", "send CPU ms/GiB", "recv CPU ms/GiB", "all CPU ms/GiB"
    );
    for secure in [false, true] {
        let t = secure.then_some((&tls.0, &tls.1));
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            raw.push(run(bytes, t, None).unwrap_or_else(|e| die(&e)));
            ours.push(run(bytes, t, Some(&src)).unwrap_or_else(|e| die(&e)));
        }
        let name = if secure { "tls" } else { "plain" };
        for (what, rs) in [("transport", raw), ("stream", ours)] {
            let med = |f: fn(&Figures) -> f64| {
                let mut v: Vec<f64> = rs.iter().map(f).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let gib = bytes as f64 / (1u64 << 30) as f64;
            println!(
                "{:<24}{:>8.0}{:>16.0}{:>16.0}{:>17.0}",
                format!("{name} {what}"),
                med(|f| f.mbs),
                med(|f| f.send_cpu_ms) / gib,
                med(|f| f.recv_cpu_ms) / gib,
                med(|f| f.all_cpu_ms) / gib
            );
        }
    }
}

fn die(e: &str) -> ! {
    eprintln!("error: {e}");
    std::process::exit(1)
}

struct Figures {
    mbs: f64,
    send_cpu_ms: f64,
    recv_cpu_ms: f64,
    /// The whole process's (both ends, and any thread of theirs).
    all_cpu_ms: f64,
}

fn memfd(name: &str, bytes: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap_or_else(|e| die(&format!("memfd_create: {e}")));
    nix::unistd::ftruncate(&fd, bytes as i64).unwrap_or_else(|e| die(&format!("ftruncate: {e}")));
    fd
}

/// Every page non-zero and unlike its neighbours.
fn fill(fd: &OwnedFd, bytes: u64) {
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..bytes >> 20 {
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = (j as u64 * 31 + i * 7 + 1) as u8;
        }
        f.write_all(&chunk)
            .unwrap_or_else(|e| die(&format!("filling the memfd: {e}")));
    }
}

/// The process's CPU time so far (user and system, every thread), in ms.
fn process_cpu_ms() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .unwrap_or_else(|e| die(&format!("getrusage: {e}")));
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    ms(u.user_time()) + ms(u.system_time())
}

/// This thread's CPU time so far, in ms.
fn thread_cpu_ms() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .unwrap_or_else(|e| die(&format!("clock_gettime: {e}")));
    t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6
}

/// One transfer: the stream from `src` when given, else `bytes` of one buffer written again
/// and again and read into one (the transport alone, as tls-bench).
fn run(bytes: u64, tls: Option<(&Tls, &Tls)>, src: Option<&OwnedFd>) -> Result<Figures, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let uri = Uri::Tcp(addr.to_string());
    let (u2, t2) = (uri.clone(), tls.map(|(_, s)| s.clone()));
    let config = Config {
        regions: vec![(0, bytes)],
        vcpus: 1,
        spec: String::new(),
    };
    let (c2, stream) = (config.clone(), src.is_some());
    let reader = std::thread::spawn(move || -> Result<(Instant, f64), String> {
        let (s, _) = l.accept().map_err(|e| e.to_string())?;
        let mut s: Box<dyn Stream> = Box::new(s);
        if let Some(t) = &t2 {
            s = tls::server(&u2, t, s).map_err(|e| e.to_string())?;
        }
        let cpu0 = thread_cpu_ms();
        if stream {
            // As the destination's migrated takes a stream (server.rs, `take`).
            let dst = memfd("stream-bench-dst", bytes);
            let ram = Ram::map(&dst, &c2.regions).map_err(|e| e.to_string())?;
            let (r, w) = s.split().map_err(|e| e.to_string())?;
            let back = migrated::postcopy::back(w);
            let r = Reader::new(std::io::BufReader::with_capacity(1 << 20, r))
                .map_err(|e| e.to_string())?;
            migrated::server::receive(r, &back, &ram).map_err(|e| e.to_string())?;
            let end = Instant::now();
            return Ok((end, thread_cpu_ms() - cpu0));
        }
        let total = vmm_tests::drain(&mut s).map_err(|e| e.to_string())?;
        if total != bytes {
            return Err(format!("read {total} bytes of {bytes}"));
        }
        Ok((Instant::now(), thread_cpu_ms() - cpu0))
    });
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut s: Box<dyn Stream> = Box::new(s);
    if let Some((t, _)) = tls {
        s = tls::client(&uri, t, s).map_err(|e| e.to_string())?;
    }
    let start = Instant::now();
    let (cpu0, all0) = (thread_cpu_ms(), process_cpu_ms());
    let err = |e: std::io::Error| e.to_string();
    match src {
        Some(fd) => {
            // As the source's migrated sends its first pass (server.rs, `open` and
            // `send_pages`): runs of 1024 pages.
            let ram = Ram::map(fd, &config.regions).map_err(|e| e.to_string())?;
            let mut w = Writer::new(BufWriter::with_capacity(1 << 20, s), &config).map_err(err)?;
            for (i, run) in ram.bytes().chunks(1024 * PAGE).enumerate() {
                w.ram_live((i * 1024 * PAGE) as u64, run, Zeros::Skip)
                    .map_err(err)?;
            }
            w.device(migrated::wire::VM_SECTION, b"state")
                .map_err(err)?;
            let (mut s, _) = w.finish().map_err(err)?;
            s.flush().map_err(err)?;
            // The destination's half is closed once it has taken the stream.
            let mut rest = Vec::new();
            let _ = s.get_mut().read_to_end(&mut rest);
        }
        None => {
            let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 1) as u8).collect();
            for _ in 0..bytes >> 20 {
                s.write_all(&chunk).map_err(err)?;
            }
            s.flush().map_err(err)?;
            drop(s);
        }
    }
    let send_cpu_ms = thread_cpu_ms() - cpu0;
    let (end, recv_cpu_ms) = reader.join().map_err(|_| "the reader panicked")??;
    let all_cpu_ms = process_cpu_ms() - all0;
    Ok(Figures {
        mbs: bytes as f64 / end.duration_since(start).as_secs_f64() / 1e6,
        send_cpu_ms,
        recv_cpu_ms,
        all_cpu_ms,
    })
}
