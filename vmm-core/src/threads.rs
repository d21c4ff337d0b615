//! vmm-core's small service threads (signals, console input, helpers' stderr) and the
//! seccomp filter they run under once set-up is over.

/// The seccomp mode for vmm-core's small service threads (None: unfiltered, --no-sandbox),
/// set once at start-up.
static THREAD_FILTERS: std::sync::OnceLock<Option<vmm_sandbox::seccomp::Mode>> =
    std::sync::OnceLock::new();

pub fn set_thread_filters(mode: Option<vmm_sandbox::seccomp::Mode>) {
    let _ = THREAD_FILTERS.set(mode);
}

/// Filters the calling thread, one of vmm-core's service threads (signals, console input,
/// helpers' stderr), with the common base alone: they read a descriptor, log, and pass
/// messages on. A filter that cannot be installed is logged; the thread goes on without.
pub fn filter_service_thread(role: &'static str) {
    if let Some(Some(mode)) = THREAD_FILTERS.get() {
        if let Err(e) = vmm_sandbox::seccomp::install(role, &vmm_sandbox::seccomp::base(), *mode) {
            log::error!("{role}: cannot install its seccomp filter ({e})");
        }
    }
}
