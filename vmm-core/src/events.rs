//! The VM's event stream (`vmmctl events`): what happened, when, fanned out to every
//! subscriber through a bounded queue. Anything in vmm-core that has news emits here.

use std::sync::Mutex;
use std::time::Instant;

/// One event, as subscribers receive it.
#[derive(Debug, Clone)]
pub struct Event {
    pub time_unix_ms: u64,
    pub kind: &'static str,
    pub detail: String,
}

/// How far a subscriber may fall behind before it is dropped.
const SUBSCRIBER_BACKLOG: usize = 1024;

/// Events fan out from the VM to every subscriber, each through a bounded queue.
#[derive(Default)]
pub struct Events {
    subscribers: Mutex<Vec<futures::channel::mpsc::Sender<Event>>>,
    /// Events queued but not yet delivered, over all subscribers.
    in_flight: std::sync::atomic::AtomicUsize,
}

impl Events {
    pub fn emit(&self, kind: &'static str, detail: impl Into<String>) {
        use std::sync::atomic::Ordering;
        let time_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = Event {
            time_unix_ms,
            kind,
            detail: detail.into(),
        };
        let mut subs = self.subscribers.lock().unwrap();
        subs.retain_mut(|s| match s.try_send(event.clone()) {
            Ok(()) => {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(e) if e.is_full() => {
                log::warn!(
                    "API: dropped an event subscriber that fell {SUBSCRIBER_BACKLOG} events behind"
                );
                false
            }
            Err(_) => false,
        });
    }

    pub fn subscribe(&self) -> futures::channel::mpsc::Receiver<Event> {
        let (tx, rx) = futures::channel::mpsc::channel(SUBSCRIBER_BACKLOG);
        self.subscribers.lock().unwrap().push(tx);
        rx
    }

    /// A subscriber took one event off its queue.
    pub fn delivered(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Waits (up to `timeout`) until every queued event has reached its subscriber: the last
    /// events before the VMM exits should not be lost.
    pub fn flush(&self, timeout: std::time::Duration) {
        let deadline = Instant::now() + timeout;
        while self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0
            && Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}
