//! Fault injection rules, like QEMU's blkdebug, for users' fault tests: a rule matches reads,
//! writes or flushes (of one export or of all) that overlap a byte range, and fails them with
//! an errno, delays them, or makes blockd exit (a crash at a chosen moment). A rule fires
//! once, always, or with a probability. Rules are added, listed and removed over RPC.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
pub use vmm_proto::faults::{Action, Rule};

/// A rule blockd holds: as the schema carries it (its id set), and how often it fired.
struct Held {
    rule: Rule,
    hits: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

static RULES: Mutex<Vec<Arc<Held>>> = Mutex::new(Vec::new());
/// Whether there is any rule: the hot path checks only this.
static ANY: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static SEED: AtomicU64 = AtomicU64::new(0);

/// A fault rule blockd refuses, with what to change.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error("the rule matches no operation; give read, write and/or flush")]
    NoOperation,
    #[error("the range {0}-{1} is empty; give START-END with END above START")]
    EmptyRange(u64, u64),
    #[error("probability {0}: give a number from 0 to 1")]
    Probability(f64),
    #[error("errno {0}: give a positive error number, e.g. 5 (EIO) or 28 (ENOSPC)")]
    Errno(i32),
}

pub fn validate(r: &Rule) -> Result<(), RuleError> {
    if !(r.read || r.write || r.flush) {
        return Err(RuleError::NoOperation);
    }
    if r.end != 0 && r.end <= r.start {
        return Err(RuleError::EmptyRange(r.start, r.end));
    }
    if !(0.0..=1.0).contains(&r.probability) || r.probability.is_nan() {
        return Err(RuleError::Probability(r.probability));
    }
    if let Action::Errno(e) = r.action {
        if !(1..4096).contains(&e) {
            return Err(RuleError::Errno(e));
        }
    }
    Ok(())
}

/// Adds a rule (checked with `validate`); returns its id.
pub fn add(mut rule: Rule) -> u32 {
    rule.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    rule.hits = 0;
    let id = rule.id;
    let mut rules = RULES.lock().unwrap();
    rules.push(Arc::new(Held {
        rule,
        hits: AtomicU64::new(0),
    }));
    ANY.store(true, Ordering::Release);
    id
}

pub fn remove(id: u32) -> bool {
    let mut rules = RULES.lock().unwrap();
    let before = rules.len();
    rules.retain(|r| r.rule.id != id);
    ANY.store(!rules.is_empty(), Ordering::Release);
    rules.len() != before
}

pub fn clear() {
    RULES.lock().unwrap().clear();
    ANY.store(false, Ordering::Release);
}

/// The rules, with how often each fired.
pub fn list() -> Vec<Rule> {
    RULES
        .lock()
        .unwrap()
        .iter()
        .map(|h| Rule {
            hits: h.hits.load(Ordering::Relaxed),
            ..h.rule.clone()
        })
        .collect()
}

/// A cheap pseudo-random number in [0, 1) (xorshift; fault tests need no more).
fn chance() -> f64 {
    let mut x = SEED.load(Ordering::Relaxed);
    if x == 0 {
        x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9, |d| d.as_nanos() as u64)
            | 1;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// What the first matching rule does to this request, if one fires.
pub fn check(export: &str, op: Op, offset: u64, len: u64) -> Option<(u32, Action)> {
    if !ANY.load(Ordering::Acquire) {
        return None;
    }
    let mut rules = RULES.lock().unwrap();
    let i = rules.iter().position(|h| {
        let r = &h.rule;
        let op_ok = match op {
            Op::Read => r.read,
            Op::Write => r.write,
            Op::Flush => r.flush,
        };
        let range_ok = op == Op::Flush
            || (offset.saturating_add(len.max(1)) > r.start && (r.end == 0 || offset < r.end));
        op_ok
            && range_ok
            && (r.export.is_empty() || r.export == export)
            && (r.probability <= 0.0 || r.probability >= 1.0 || chance() < r.probability)
    })?;
    let h = rules[i].clone();
    h.hits.fetch_add(1, Ordering::Relaxed);
    if h.rule.once {
        rules.remove(i);
        ANY.store(!rules.is_empty(), Ordering::Release);
    }
    Some((h.rule.id, h.rule.action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: Action, once: bool) -> Rule {
        Rule {
            id: 0,
            export: "t-faults".into(),
            read: false,
            write: true,
            flush: false,
            start: 4096,
            end: 8192,
            action,
            once,
            probability: 0.0,
            hits: 0,
        }
    }

    #[test]
    fn rules_match_op_range_and_export_and_once_rules_go() {
        let id = add(rule(Action::Errno(28), true));
        assert_eq!(check("t-faults", Op::Read, 4096, 512), None);
        assert_eq!(check("t-faults", Op::Write, 0, 4096), None);
        assert_eq!(check("other", Op::Write, 4096, 512), None);
        assert_eq!(
            check("t-faults", Op::Write, 4000, 512),
            Some((id, Action::Errno(28)))
        );
        // Once: gone now.
        assert_eq!(check("t-faults", Op::Write, 4096, 512), None);
        assert!(!remove(id));
        let id = add(rule(Action::Exit, false));
        assert!(check("t-faults", Op::Write, 8000, 512).is_some());
        assert!(check("t-faults", Op::Write, 8000, 512).is_some());
        assert!(list().iter().any(|r| r.id == id && r.hits == 2));
        assert!(remove(id));
        let mut bad = rule(Action::Errno(0), false);
        assert!(validate(&bad).unwrap_err().to_string().contains("errno 0"));
        bad.action = Action::Errno(5);
        bad.end = 10;
        assert!(validate(&bad).unwrap_err().to_string().contains("empty"));
    }
}
