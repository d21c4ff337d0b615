//! A helper's stderr comes through a pipe to vmm-core's own (so that one log holds
//! everything), and a helper's report that its seccomp filter killed it is logged by vmm-core
//! too and becomes an event.

use std::io::BufRead;
use std::sync::Arc;

/// Called with (helper, system call) when a helper reports a forbidden system call.
pub type SeccompReport = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The marker the helpers' SIGSYS handler writes (see vmm-sandbox's seccomp module).
const MARKER: &str = ": seccomp: forbidden system call ";

/// A pipe for a helper's stderr; a thread copies its lines to ours and watches for seccomp
/// reports.
pub fn pipe(helper: &'static str, report: SeccompReport) -> std::io::Result<std::io::PipeWriter> {
    let (reader, writer) = std::io::pipe()?;
    std::thread::Builder::new()
        .name(format!("{helper}-stderr"))
        .spawn(move || {
            crate::threads::filter_service_thread("vmm-core (a helper's stderr reader)");
            let mut lines = std::io::BufReader::new(reader);
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                eprint!("{}", vmm_sandbox::logging::relay(&line));
                if let Some(i) = line.find(MARKER) {
                    let call = line[i + MARKER.len()..]
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    report(helper, &call);
                }
            }
        })?;
    Ok(writer)
}

/// The usual report: an error in vmm-core's log and a `helper-seccomp` event.
pub fn seccomp_reporter(events: Arc<crate::events::Events>) -> SeccompReport {
    Arc::new(move |helper: &str, call: &str| {
        log::error!(
            "{helper} made a system call outside its seccomp allowlist, {call}, and was killed by SIGSYS"
        );
        events.emit("helper-seccomp", format!("{helper}: {call}"));
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    #[test]
    fn reports_are_found_in_the_stream() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut w = pipe(
            "blockd",
            Arc::new(move |h: &str, c: &str| s.lock().unwrap().push(format!("{h}/{c}"))),
        )
        .unwrap();
        writeln!(w, "blockd: info: hello").unwrap();
        writeln!(
            w,
            "blockd: seccomp: forbidden system call ptrace (101); killed by SIGSYS"
        )
        .unwrap();
        drop(w);
        for _ in 0..200 {
            if !seen.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["blockd/ptrace (101)".to_string()]
        );
    }
}
