//! The ceiling for a migration stream on this host: MIB MiB pushed through loopback TCP,
//! plain and through migrated's own TLS (rustls on ring, mutual authentication), one thread
//! each end as in migrated. bench/migrate.sh prints it next to the migrations.
//!
//! usage: tls-bench CREDS_DIR [MIB]     (CREDS_DIR holds QEMU's tls-creds files for 127.0.0.1)

use migrated::channel::{Stream, Uri};
use migrated::tls::{self, Tls};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(creds) = args.get(1) else {
        eprintln!("usage: tls-bench CREDS_DIR [MIB]");
        std::process::exit(2);
    };
    let mib: u64 = match args.get(2).map(|s| s.parse()) {
        None => 1024,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("error: MIB {:?}: a whole number above 0", args[2]);
            std::process::exit(2);
        }
    };
    let side = |server| vmm_tests::bench_tls(creds, server);
    let (client, server) = (side(false), side(true));
    for tls in [false, true] {
        match run(mib, tls.then_some((&client, &server))) {
            Ok(mbs) => println!(
                "{} loopback: {mbs:.0} MB/s ({mib} MiB)",
                if tls { "rustls" } else { "plain tcp" }
            ),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// MB/s from the first byte written to the last byte read.
fn run(mib: u64, tls: Option<(&Tls, &Tls)>) -> Result<f64, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let uri = Uri::Tcp(addr.to_string());
    let (u2, t2) = (uri.clone(), tls.map(|(_, s)| s.clone()));
    let reader = std::thread::spawn(move || -> Result<(u64, Instant), String> {
        let (s, _) = l.accept().map_err(|e| e.to_string())?;
        let mut s: Box<dyn Stream> = Box::new(s);
        if let Some(t) = &t2 {
            s = tls::server(&u2, t, s).map_err(|e| e.to_string())?;
        }
        let total = vmm_tests::drain(&mut s).map_err(|e| e.to_string())?;
        Ok((total, Instant::now()))
    });
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut s: Box<dyn Stream> = Box::new(s);
    if let Some((t, _)) = tls {
        s = tls::client(&uri, t, s).map_err(|e| e.to_string())?;
    }
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 1) as u8).collect();
    let start = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    s.flush().map_err(|e| e.to_string())?;
    drop(s);
    let (total, end) = reader.join().map_err(|_| "the reader panicked")??;
    if total != mib << 20 {
        return Err(format!("read {total} bytes of {}", mib << 20));
    }
    Ok(total as f64 / end.duration_since(start).as_secs_f64() / 1e6)
}
