//! A migration stream or snapshot file from an untrusted source, as the destination's
//! migrated reads it (`stream::Reader`, every section to the end marker) and as a lazy restore
//! indexes it (`stream::Index`). Neither may panic, loop or allocate beyond its bounds, whatever
//! the bytes; a stream either reads to its end marker or is refused with an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrated::stream::{Index, Reader, Section};

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = Reader::new(data) {
        // The destination checks the shape against its own; here the stream's own shape
        // stands for it, so that the sections are read.
        let config = r.config().clone();
        if r.check_config(&config).is_ok() {
            let mut n = 0u64;
            loop {
                match r.section() {
                    Ok(Section::End) | Err(_) => break,
                    Ok(_) => n += 1,
                }
                // Each section takes at least its 13 bytes of framing.
                assert!(n <= data.len() as u64 / 13 + 1);
            }
        }
    }
    let _ = Index::read(std::io::Cursor::new(data));
});
