//! The in-memory usage report.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{Outcome, UsageRecord, UsageSink};
use crate::types::Cost;

/// The key under which entries past a report's bound add up.
pub(crate) const OTHER: &str = "(other)";
/// The key for records without a user, org, feature or model.
pub(crate) const NONE: &str = "-";

/// Running totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Totals {
    /// Requests recorded.
    pub requests: u64,
    /// Answered by the cache.
    pub cache_hits: u64,
    /// Failed or refused.
    pub errors: u64,
    /// Input tokens billed.
    pub input_tokens: u64,
    /// Output tokens billed.
    pub output_tokens: u64,
    /// Spent.
    pub cost: Cost,
    /// Saved by cache hits.
    pub saved: Cost,
}

impl Totals {
    /// Adds one record.
    pub fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        match r.outcome {
            Outcome::CacheHit => self.cache_hits += 1,
            Outcome::Error(_) => self.errors += 1,
            Outcome::Provider => {}
        }
        self.input_tokens = self.input_tokens.saturating_add(r.usage.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(r.usage.output_tokens);
        self.cost += r.cost;
        self.saved += r.saved;
    }

    /// The share of requests the cache answered (0 when there were none).
    pub fn cache_hit_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.cache_hits as f64 / self.requests as f64
        }
    }
}

/// A report from [`MemoryUsage`]: totals overall and by model, user, organisation and
/// feature, and errors by reason. `Display` prints it as text tables, biggest spenders
/// first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UsageReport {
    /// Everything.
    pub totals: Totals,
    /// By model (`-` when no model was reached).
    pub by_model: HashMap<String, Totals>,
    /// By user (`-` for anonymous requests).
    pub by_user: HashMap<String, Totals>,
    /// By organisation (`-` for requests without one).
    #[serde(default)]
    pub by_org: HashMap<String, Totals>,
    /// By feature (`-` for requests without one).
    #[serde(default)]
    pub by_feature: HashMap<String, Totals>,
    /// By refusal or error reason.
    pub errors_by_reason: HashMap<String, u64>,
}

/// Rows shown per table by `Display`; the rest are summed into one line.
const SHOWN: usize = 10;

fn table(f: &mut fmt::Formatter<'_>, title: &str, map: &HashMap<String, Totals>) -> fmt::Result {
    if map.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<(&String, &Totals)> = map.iter().collect();
    rows.sort_by(|a, b| {
        b.1.cost
            .cmp(&a.1.cost)
            .then(b.1.requests.cmp(&a.1.requests))
            .then(a.0.cmp(b.0))
    });
    writeln!(
        f,
        "\nby {title:<25} {:>8} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12}",
        "requests", "hits", "errors", "in tok", "out tok", "cost", "saved"
    )?;
    let line = |f: &mut fmt::Formatter<'_>, name: &str, t: &Totals| {
        let name: String = name.chars().take(25).collect();
        writeln!(
            f,
            "   {name:<25} {:>8} {:>6} {:>6} {:>10} {:>10} {:>12} {:>12}",
            t.requests,
            t.cache_hits,
            t.errors,
            t.input_tokens,
            t.output_tokens,
            t.cost.to_string(),
            t.saved.to_string()
        )
    };
    for (name, t) in rows.iter().take(SHOWN) {
        line(f, name, t)?;
    }
    if rows.len() > SHOWN {
        let mut rest = Totals::default();
        for (_, t) in &rows[SHOWN..] {
            rest.requests += t.requests;
            rest.cache_hits += t.cache_hits;
            rest.errors += t.errors;
            rest.input_tokens += t.input_tokens;
            rest.output_tokens += t.output_tokens;
            rest.cost += t.cost;
            rest.saved += t.saved;
        }
        line(f, &format!("({} more)", rows.len() - SHOWN), &rest)?;
    }
    Ok(())
}

impl fmt::Display for UsageReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "{} requests, {} cache hits ({:.1} %), {} errors; {} input and {} output tokens; spent {}, saved {}",
            t.requests,
            t.cache_hits,
            t.cache_hit_rate() * 100.0,
            t.errors,
            t.input_tokens,
            t.output_tokens,
            t.cost,
            t.saved
        )?;
        table(f, "model", &self.by_model)?;
        table(f, "user", &self.by_user)?;
        table(f, "org", &self.by_org)?;
        table(f, "feature", &self.by_feature)?;
        if !self.errors_by_reason.is_empty() {
            let mut reasons: Vec<_> = self.errors_by_reason.iter().collect();
            reasons.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            writeln!(f, "\nerrors by reason")?;
            for (reason, n) in reasons {
                writeln!(f, "   {reason:<25} {n:>8}")?;
            }
        }
        Ok(())
    }
}

/// A breakdown as kept: hashed with `hashbrown`'s default hasher, faster than the
/// standard library's for these short keys; copied into a [`UsageReport`] on demand.
type Breakdown<T> = hashbrown::HashMap<String, T>;

#[derive(Debug, Default)]
struct Tallies {
    totals: Totals,
    by_model: Breakdown<Totals>,
    by_user: Breakdown<Totals>,
    by_org: Breakdown<Totals>,
    by_feature: Breakdown<Totals>,
    errors_by_reason: Breakdown<u64>,
}

impl Tallies {
    fn report(&self) -> UsageReport {
        fn copy<T: Copy>(m: &Breakdown<T>) -> HashMap<String, T> {
            m.iter().map(|(k, v)| (k.clone(), *v)).collect()
        }
        UsageReport {
            totals: self.totals,
            by_model: copy(&self.by_model),
            by_user: copy(&self.by_user),
            by_org: copy(&self.by_org),
            by_feature: copy(&self.by_feature),
            errors_by_reason: copy(&self.errors_by_reason),
        }
    }
}

#[derive(Debug, Default)]
struct MemoryState {
    tallies: Tallies,
    recent: Recent,
}

/// The most recent records, a ring: once full, the oldest record's slot is written
/// over in place, its strings' buffers reused where they are long enough (see
/// [`overwrite`]), so keeping a record mostly writes over old memory rather than
/// freeing it and allocating anew. (A string the new record lacks is still freed, and
/// a longer one reallocated; while the ring fills, a borrowed record is cloned.)
#[derive(Debug, Default)]
struct Recent {
    slots: Vec<UsageRecord>,
    /// The oldest slot, once the ring is full.
    oldest: usize,
}

impl Recent {
    /// Keeps `r`, dropping the oldest record when `cap` are kept.
    fn keep(&mut self, cap: usize, r: &UsageRecord) {
        if cap == 0 {
            return;
        }
        if self.slots.len() < cap {
            self.slots.push(r.clone());
            return;
        }
        // (a smaller `cap` than before is not possible: it is fixed at construction)
        if let Some(slot) = self.slots.get_mut(self.oldest) {
            overwrite(slot, r);
        }
        self.oldest = (self.oldest + 1) % self.slots.len();
    }

    /// The records, oldest first.
    fn to_vec(&self) -> Vec<UsageRecord> {
        let (newer, older) = self.slots.split_at(self.oldest.min(self.slots.len()));
        older.iter().chain(newer).cloned().collect()
    }
}

/// Makes `slot` equal to `r`, reusing the buffers of `slot`'s strings.
fn overwrite(slot: &mut UsageRecord, r: &UsageRecord) {
    // Every field, named: a field added to `UsageRecord` fails to compile here until
    // it is copied too.
    let UsageRecord {
        started_at,
        latency,
        time_to_first_token,
        user,
        org,
        feature,
        model,
        provider,
        route,
        usage,
        cost,
        saved,
        prompt_cache_saved,
        prompt_cache_write_premium,
        attempts,
        fallbacks,
        escalated,
        similarity,
        guard_rejections,
        degrade_mode,
        refusal_scope,
        finish_reason,
        stream,
        outcome,
    } = r;
    slot.started_at = *started_at;
    slot.latency = *latency;
    slot.time_to_first_token = *time_to_first_token;
    slot.user.clone_from(user);
    slot.org.clone_from(org);
    slot.feature.clone_from(feature);
    slot.model.clone_from(model);
    slot.provider.clone_from(provider);
    slot.route.clone_from(route);
    slot.usage = *usage;
    slot.cost = *cost;
    slot.saved = *saved;
    slot.prompt_cache_saved = *prompt_cache_saved;
    slot.prompt_cache_write_premium = *prompt_cache_write_premium;
    slot.attempts = *attempts;
    slot.fallbacks = *fallbacks;
    slot.escalated = *escalated;
    slot.similarity = *similarity;
    slot.guard_rejections = *guard_rejections;
    slot.degrade_mode.clone_from(degrade_mode);
    slot.refusal_scope = *refusal_scope;
    slot.finish_reason.clone_from(finish_reason);
    slot.stream = *stream;
    match (&mut slot.outcome, outcome) {
        (Outcome::Error(to), Outcome::Error(from)) => to.clone_from(from),
        (to, from) => *to = from.clone(),
    }
}

/// An in-memory sink: totals by model, user, organisation and feature, errors by
/// reason, and the most recent records.
///
/// Bounded: each breakdown tracks at most `max_keys` distinct keys apart (later keys
/// add up under `(other)`), error reasons are bounded the same way, and at most
/// `recent` records are kept.
///
/// ```
/// use tokenwise::observe::{MemoryUsage, UsageRecord, UsageSink};
/// use tokenwise::{ChatRequest, Cost, Timestamp};
///
/// let usage = MemoryUsage::new(100, 10);
/// let req = ChatRequest::user_text("hi").org("acme").feature("search");
/// let mut r = UsageRecord::new(Timestamp::from_secs(0), &req.meta, false);
/// r.cost = Cost::from_micros(30);
/// usage.record(&r);
/// let report = usage.report();
/// assert_eq!(report.by_org["acme"].cost, Cost::from_micros(30));
/// assert_eq!(report.by_feature["search"].requests, 1);
/// println!("{report}");
/// ```
#[derive(Debug)]
pub struct MemoryUsage {
    state: Mutex<MemoryState>,
    max_keys: usize,
    recent: usize,
}

impl Default for MemoryUsage {
    fn default() -> Self {
        Self::new(10_000, 1_000)
    }
}

impl MemoryUsage {
    /// A sink tracking up to `max_keys` models, users, organisations and features apart
    /// (each) and keeping the last `recent` records.
    pub fn new(max_keys: usize, recent: usize) -> Self {
        MemoryUsage {
            state: Mutex::new(MemoryState::default()),
            max_keys,
            recent,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The report so far.
    pub fn report(&self) -> UsageReport {
        self.lock().tallies.report()
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<UsageRecord> {
        self.lock().recent.to_vec()
    }
}

/// Adds to `key`'s entry (or `(other)` once `max` keys are tracked). A key already
/// present costs one lookup and no allocation.
fn bucket<T: Default>(map: &mut Breakdown<T>, key: &str, max: usize, add: impl FnOnce(&mut T)) {
    if let Some(v) = map.get_mut(key) {
        return add(v);
    }
    let key = if map.len() < max { key } else { OTHER };
    add(map.entry(key.to_owned()).or_default());
}

impl MemoryUsage {
    /// Records `r`, which it takes (the pipeline's streams, batches and cancelled calls
    /// hand their records over this way; a whole answer's record, kept in its call,
    /// goes through [`UsageSink::record`]). Until the ring of recent records is full,
    /// `r` itself is kept; after, its contents are copied into the oldest record's slot
    /// and `r` is dropped here, its memory still warm.
    pub fn record_owned(&self, r: UsageRecord) {
        let mut st = self.lock();
        self.add(&mut st, &r);
        if st.recent.slots.len() < self.recent {
            st.recent.slots.push(r);
        } else {
            st.recent.keep(self.recent, &r);
            drop(st);
        }
    }

    fn add(&self, st: &mut MemoryState, r: &UsageRecord) {
        let max = self.max_keys;
        let rep = &mut st.tallies;
        rep.totals.add(r);
        let model = r.model.as_deref().unwrap_or(NONE);
        bucket(&mut rep.by_model, model, max, |t| t.add(r));
        let user = r.user.as_deref().unwrap_or(NONE);
        bucket(&mut rep.by_user, user, max, |t| t.add(r));
        let org = r.org.as_deref().unwrap_or(NONE);
        bucket(&mut rep.by_org, org, max, |t| t.add(r));
        let feature = r.feature.as_deref().unwrap_or(NONE);
        bucket(&mut rep.by_feature, feature, max, |t| t.add(r));
        if let Outcome::Error(reason) = &r.outcome {
            bucket(&mut rep.errors_by_reason, reason, max, |n| *n += 1);
        }
    }
}

impl UsageSink for MemoryUsage {
    fn record(&self, r: &UsageRecord) {
        let mut st = self.lock();
        self.add(&mut st, r);
        st.recent.keep(self.recent, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::types::RequestMeta;

    #[test]
    fn memory_usage_is_bounded() {
        let sink = MemoryUsage::new(2, 3);
        for i in 0..5 {
            let meta = RequestMeta {
                user: Some(format!("u{i}")),
                org: Some(format!("o{}", i % 2)),
                feature: Some(format!("f{i}")),
                ..Default::default()
            };
            let mut r = UsageRecord::new(Timestamp::from_secs(0), &meta, false);
            r.cost = Cost::from_nanos(10);
            if i == 4 {
                r.outcome = Outcome::Error("rate_limited".into());
            }
            sink.record(&r);
        }
        let rep = sink.report();
        assert_eq!(rep.totals.requests, 5);
        assert_eq!(rep.totals.cost, Cost::from_nanos(50));
        assert_eq!(rep.by_user.len(), 3); // u0, u1, (other)
        assert_eq!(rep.by_user[OTHER].requests, 3);
        assert_eq!(rep.by_org.len(), 2);
        assert_eq!(rep.by_org["o0"].requests, 3);
        assert_eq!(rep.by_feature[OTHER].cost, Cost::from_nanos(30));
        assert_eq!(rep.errors_by_reason["rate_limited"], 1);
        assert_eq!(sink.recent().len(), 3);
        let text = rep.to_string();
        assert!(text.starts_with("5 requests, 0 cache hits"), "{text}");
        assert!(text.contains("by org"), "{text}");
    }

    #[test]
    fn the_ring_keeps_the_last_records_whole_in_order() {
        // Records that differ in every field that owns memory, so that an overwritten
        // slot keeps nothing of its earlier record.
        let record = |i: u32| {
            let meta = RequestMeta {
                user: (!i.is_multiple_of(3))
                    .then(|| format!("user-{i}-{}", "x".repeat(i as usize % 7))),
                org: i.is_multiple_of(2).then(|| format!("org{i}")),
                feature: (!i.is_multiple_of(5)).then(|| "f".repeat(1 + i as usize % 40)),
                ..Default::default()
            };
            let mut r = UsageRecord::new(Timestamp::from_secs(u64::from(i)), &meta, i % 2 == 1);
            r.model = (!i.is_multiple_of(4)).then(|| format!("model-{i}"));
            r.provider = (i % 3 != 1).then(|| "p".repeat(i as usize % 11));
            r.route = (0..i % 4).map(|k| format!("m{k}-{i}")).collect();
            r.degrade_mode = i.is_multiple_of(6).then(|| "cheaper".to_owned());
            r.finish_reason = i
                .is_multiple_of(2)
                .then(|| ["stop", "length"][i as usize / 2 % 2].to_owned());
            r.outcome = match i % 3 {
                0 => Outcome::Provider,
                1 => Outcome::CacheHit,
                _ => Outcome::Error(format!("reason-{i}")),
            };
            r.cost = Cost::from_nanos(u64::from(i));
            r.attempts = i;
            r.similarity = (i % 2 == 1).then_some(i as f32 / 100.0);
            r
        };
        for cap in [1usize, 2, 7] {
            let owned = MemoryUsage::new(10, cap);
            let borrowed = MemoryUsage::new(10, cap);
            for i in 0..40u32 {
                owned.record_owned(record(i));
                borrowed.record(&record(i));
                let from = (i as usize + 1).saturating_sub(cap) as u32;
                let want: Vec<UsageRecord> = (from..=i).map(record).collect();
                assert_eq!(owned.recent(), want, "cap {cap}, after {i}");
                assert_eq!(borrowed.recent(), want, "cap {cap}, after {i}");
            }
        }
        assert!(MemoryUsage::new(10, 0).recent().is_empty());
        let none = MemoryUsage::new(10, 0);
        none.record_owned(record(1));
        assert!(none.recent().is_empty());
        assert_eq!(none.report().totals.requests, 1);
    }

    #[test]
    fn display_sums_the_long_tail() {
        let sink = MemoryUsage::new(100, 0);
        for i in 0..15u64 {
            let meta = RequestMeta {
                user: Some(format!("user{i:02}")),
                ..Default::default()
            };
            let mut r = UsageRecord::new(Timestamp::from_secs(0), &meta, false);
            r.cost = Cost::from_nanos(1_000 * (i + 1));
            sink.record(&r);
        }
        let text = sink.report().to_string();
        assert!(text.contains("(5 more)"), "{text}");
        // biggest spender first
        let first = text.find("user14").unwrap();
        let second = text.find("user13").unwrap();
        assert!(first < second);
        assert!(!text.contains("user00"));
    }
}
