//! The GCRA table shared by the keyed limiters: one theoretical arrival time (TAT) per
//! quota and key, all checks of one request decided under one lock.

use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use smallvec::SmallVec;

use super::Quota;
use crate::clock::duration_nanos;

use hashbrown::hash_map::EntryRef;

type Map = hashbrown::HashMap<Key, u64>;

/// A stored key. Keys are short (user ids, org ids), and comparing them through libc's
/// `memcmp` was a measurable share of a check, so they compare inline.
#[derive(Debug, Clone)]
struct Key(Box<str>);

/// A key looked up: hashes as the stored [`Key`] does.
#[derive(Clone, Copy)]
struct Probe<'a>(&'a str);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl Hash for Probe<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        bytes_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Key {}

impl hashbrown::Equivalent<Key> for Probe<'_> {
    #[inline]
    fn equivalent(&self, key: &Key) -> bool {
        bytes_eq(self.0.as_bytes(), key.0.as_bytes())
    }
}

/// Byte equality in word-sized loads (the last one overlapping), with no library call.
#[inline]
fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n >= 8 {
        let mut i = 0;
        while i + 8 < n {
            if word8(a, i) != word8(b, i) {
                return false;
            }
            i += 8;
        }
        return word8(a, n - 8) == word8(b, n - 8);
    }
    if n >= 4 {
        return word4(a, 0) == word4(b, 0) && word4(a, n - 4) == word4(b, n - 4);
    }
    // 0 to 3 bytes: the first, middle and last cover them all
    n == 0 || (a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1])
}

#[inline]
fn word8(s: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&s[at..at + 8]);
    u64::from_ne_bytes(w)
}

#[inline]
fn word4(s: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&s[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// The result of the one-pass check.
enum Fast {
    Done(Result<(), Refusal>),
    /// New keys would pass the bound: sweep and check again.
    NeedsRoom,
}

/// One quota, precomputed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Compiled {
    period_ns: u128,
    amount: u128,
    /// The same in `u64`, for the fast path (128-bit division is slow).
    period_ns64: u64,
    amount64: u64,
    /// Time one unit consumes at the base rate, rounded up.
    unit_ns: u64,
    burst: u64,
    /// Burst tolerance: how far ahead of now the TAT may run.
    tau_ns: u128,
}

impl Compiled {
    pub(crate) fn new(q: &Quota) -> Self {
        let period_ns = u128::from(duration_nanos(q.period()));
        let amount = u128::from(q.amount().get());
        let period_ns64 = duration_nanos(q.period());
        let amount64 = q.amount().get();
        Compiled {
            period_ns,
            amount,
            period_ns64,
            amount64,
            unit_ns: period_ns64.div_ceil(amount64),
            burst: q.burst().get(),
            tau_ns: period_ns * u128::from(q.burst().get()) / amount,
        }
    }

    /// Time `units` consume at `mult` (per mille) times the quota's rate, rounded up.
    fn cost_ns(&self, units: u64, mult: u64) -> u128 {
        if mult == 1000 {
            if units == 1 {
                return u128::from(self.unit_ns);
            }
            if let Some(p) = units.checked_mul(self.period_ns64) {
                return u128::from(p.div_ceil(self.amount64));
            }
        }
        (u128::from(units) * self.period_ns * 1000).div_ceil(self.amount * u128::from(mult.max(1)))
    }
}

/// One check of a request: quota `quota` for `key`, `units` at rate multiplier `mult`.
/// Keys should not be empty: an empty key compares slowly on some C libraries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Item<'a> {
    pub(crate) quota: usize,
    pub(crate) key: &'a str,
    pub(crate) units: u64,
    pub(crate) mult: u64,
}

/// Why a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Item `index` would be admitted after `wait`.
    Wait { index: usize, wait: Duration },
    /// Item `index` needs more than the quota's burst: it can never be admitted.
    TooLarge { index: usize, most: u64 },
    /// The key bound is reached by live keys.
    Full,
}

/// One quota's TATs: a map by key, or a single slot for a quota with one key (the
/// global scope, a model's own quota), which needs no hashing.
#[derive(Debug)]
enum Table {
    Keyed(Map),
    Single(Option<u64>),
}

impl Table {
    fn get(&self, key: &str) -> Option<u64> {
        match self {
            Table::Keyed(m) => m.get(&Probe(key)).copied(),
            Table::Single(t) => *t,
        }
    }

    /// Sets `key`'s TAT; true when the key is new to a keyed table.
    fn set(&mut self, key: &str, tat: u64) -> bool {
        match self {
            Table::Keyed(m) => match m.get_mut(&Probe(key)) {
                Some(t) => {
                    *t = tat;
                    false
                }
                None => {
                    m.insert(Key(key.into()), tat);
                    true
                }
            },
            Table::Single(t) => {
                *t = Some(tat);
                false
            }
        }
    }

    /// Puts back what `key` held before a check wrote it.
    fn restore(&mut self, key: &str, before: Option<u64>) {
        match (self, before) {
            (Table::Keyed(m), Some(t)) => {
                if let Some(slot) = m.get_mut(&Probe(key)) {
                    *slot = t;
                }
            }
            (Table::Keyed(m), None) => {
                m.remove(&Probe(key));
            }
            (Table::Single(t), before) => *t = before,
        }
    }

    /// Drops fully refilled keys; returns the keyed entries left.
    fn sweep(&mut self, now: u64) -> usize {
        match self {
            Table::Keyed(m) => {
                m.retain(|_, tat| *tat > now);
                m.len()
            }
            Table::Single(t) => {
                if t.is_some_and(|tat| tat <= now) {
                    *t = None;
                }
                0
            }
        }
    }
}

/// The GCRA step: the new TAT if `inc` more is admitted at `now`, or the wait.
#[inline]
fn step(q: &Compiled, stored: Option<u64>, now: u128, inc: u128) -> Result<u128, u128> {
    let tat = stored.map_or(now, |t| u128::from(t).max(now));
    let new_tat = tat + inc;
    let allow_at = new_tat.saturating_sub(q.tau_ns);
    if allow_at > now {
        Err(allow_at - now)
    } else {
        Ok(new_tat)
    }
}

/// The refusal for an item that needs more than its quota's burst, if it does.
#[inline]
fn too_large(q: &Compiled, it: &Item<'_>, index: usize, inc: u128) -> Option<Refusal> {
    (inc > q.tau_ns).then(|| {
        let most = u128::from(q.burst) * u128::from(it.mult.max(1)) / 1000;
        Refusal::TooLarge {
            index,
            most: u64::try_from(most).unwrap_or(u64::MAX),
        }
    })
}

fn saturate(t: u128) -> u64 {
    u64::try_from(t).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct State {
    tats: Vec<Table>,
    /// Keys held by keyed tables (single slots are not counted: their size is fixed).
    len: usize,
    next_sweep: u64,
}

/// The table.
#[derive(Debug)]
pub(crate) struct Core {
    quotas: Vec<Compiled>,
    state: Mutex<State>,
    max_keys: usize,
}

impl Core {
    /// A table for `quotas`; those marked `single` have one key only.
    pub(crate) fn new(quotas: Vec<(Compiled, bool)>, max_keys: usize) -> Self {
        let tats = quotas
            .iter()
            .map(|(_, single)| {
                if *single {
                    Table::Single(None)
                } else {
                    Table::Keyed(Map::default())
                }
            })
            .collect();
        let quotas = quotas.into_iter().map(|(q, _)| q).collect();
        Core {
            quotas,
            state: Mutex::new(State {
                tats,
                len: 0,
                next_sweep: 0,
            }),
            max_keys,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing that can panic runs between a check's writes and their undo, so a
        // poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys tracked, single slots included.
    pub(crate) fn len(&self) -> usize {
        let st = self.lock();
        let singles = st
            .tats
            .iter()
            .filter(|t| matches!(t, Table::Single(Some(_))))
            .count();
        st.len + singles
    }

    /// Admits all items at `now` (ns since epoch) and consumes them, or none.
    /// On refusal, reports the item with the longest wait.
    pub(crate) fn check(&self, now: u64, items: &[Item<'_>]) -> Result<(), Refusal> {
        let mut state = self.lock();
        // Items of distinct quotas in ascending order (every caller builds them so) are
        // decided in one pass with one hash lookup each.
        if items.windows(2).all(|w| w[0].quota < w[1].quota) {
            if let Fast::Done(r) = self.check_fast(&mut state, now, items) {
                return r;
            }
        }
        self.check_slow(&mut state, now, items)
    }

    /// One hash lookup per item: each admitted item's new TAT is written at once, with
    /// its previous value kept, and every write is undone if any item refuses. The undo
    /// log holds plain values (no borrows into the maps), so nothing large is moved.
    fn check_fast(&self, state: &mut State, now: u64, items: &[Item<'_>]) -> Fast {
        let now128 = u128::from(now);
        let State { tats, len, .. } = state;
        // (item index, its TAT before this check; `None` for a key this check inserted)
        let mut written: SmallVec<[(usize, Option<u64>); 4]> = SmallVec::new();
        let mut refusal: Option<(u128, usize)> = None;
        let mut early: Option<Fast> = None;
        let mut new_keys = 0usize;
        for (index, it) in items.iter().enumerate() {
            if it.units == 0 {
                continue;
            }
            let (Some(q), Some(table)) = (self.quotas.get(it.quota), tats.get_mut(it.quota)) else {
                early = Some(Fast::NeedsRoom);
                break;
            };
            let inc = q.cost_ns(it.units, it.mult);
            if let Some(r) = too_large(q, it, index, inc) {
                early = Some(Fast::Done(Err(r)));
                break;
            }
            match table {
                Table::Single(slot) => match step(q, *slot, now128, inc) {
                    Err(wait) => note_wait(&mut refusal, wait, index),
                    Ok(_) if refusal.is_some() => {}
                    Ok(tat) => {
                        written.push((index, *slot));
                        *slot = Some(saturate(tat));
                    }
                },
                Table::Keyed(map) => {
                    let probe = Probe(it.key);
                    let entry = map.entry_ref(&probe);
                    let stored = match &entry {
                        EntryRef::Occupied(o) => Some(*o.get()),
                        EntryRef::Vacant(_) => None,
                    };
                    match step(q, stored, now128, inc) {
                        Err(wait) => note_wait(&mut refusal, wait, index),
                        Ok(_) if refusal.is_some() => {}
                        Ok(tat) => {
                            match entry {
                                EntryRef::Occupied(mut o) => {
                                    o.insert(saturate(tat));
                                }
                                EntryRef::Vacant(v) => {
                                    if *len + new_keys >= self.max_keys {
                                        early = Some(Fast::NeedsRoom);
                                        break;
                                    }
                                    v.insert_with_key(Key(it.key.into()), saturate(tat));
                                    new_keys += 1;
                                }
                            }
                            written.push((index, stored));
                        }
                    }
                }
            }
        }
        let outcome = match (early, refusal) {
            (Some(f), _) => f,
            (None, Some((wait, index))) => Fast::Done(Err(Refusal::Wait {
                index,
                wait: Duration::from_nanos(saturate(wait)),
            })),
            (None, None) => {
                *len += new_keys;
                return Fast::Done(Ok(()));
            }
        };
        for (index, before) in written {
            let it = &items[index];
            tats[it.quota].restore(it.key, before);
        }
        outcome
    }

    /// The general path: any item order, sweeping when the key bound is reached.
    fn check_slow(&self, state: &mut State, now: u64, items: &[Item<'_>]) -> Result<(), Refusal> {
        let now128 = u128::from(now);
        // (item index, new TAT, the key is new)
        let mut updates: SmallVec<[(usize, u64, bool); 4]> = SmallVec::new();
        let mut refusal: Option<(u128, usize)> = None;
        for (index, it) in items.iter().enumerate() {
            if it.units == 0 {
                continue;
            }
            let q = &self.quotas[it.quota];
            let inc = q.cost_ns(it.units, it.mult);
            if let Some(r) = too_large(q, it, index, inc) {
                return Err(r);
            }
            let table = &state.tats[it.quota];
            let stored = table.get(it.key);
            match step(q, stored, now128, inc) {
                Err(wait) => note_wait(&mut refusal, wait, index),
                Ok(tat) => updates.push((
                    index,
                    saturate(tat),
                    stored.is_none() && matches!(table, Table::Keyed(_)),
                )),
            }
        }
        if let Some((wait, index)) = refusal {
            let wait = Duration::from_nanos(saturate(wait));
            return Err(Refusal::Wait { index, wait });
        }
        let new_keys = updates.iter().filter(|u| u.2).count();
        if state.len + new_keys > self.max_keys {
            Self::sweep(state, now);
            if state.len + new_keys > self.max_keys {
                return Err(Refusal::Full);
            }
        }
        for (index, tat, _) in updates {
            let it = &items[index];
            if state.tats[it.quota].set(it.key, tat) {
                state.len += 1;
            }
        }
        Ok(())
    }

    /// Removes fully refilled keys; at most once a second of clock time.
    fn sweep(state: &mut State, now: u64) {
        if now < state.next_sweep {
            return;
        }
        state.next_sweep = now.saturating_add(1_000_000_000);
        state.len = state.tats.iter_mut().map(|t| t.sweep(now)).sum();
    }

    /// Moves each item's TAT by its units: later when `add`, earlier (not before now)
    /// otherwise. Used to reconcile a charge to actual use.
    pub(crate) fn adjust(&self, now: u64, items: &[Item<'_>], add: bool) {
        let mut state = self.lock();
        for it in items {
            if it.units == 0 {
                continue;
            }
            let q = &self.quotas[it.quota];
            let shift = saturate(q.cost_ns(it.units, it.mult));
            let table = &mut state.tats[it.quota];
            let moved = match (table.get(it.key), add) {
                // More was used than charged: the debt counts even past the burst.
                (Some(t), true) => t.max(now).saturating_add(shift),
                (None, true) => now.saturating_add(shift),
                (Some(t), false) => t.saturating_sub(shift).max(now),
                (None, false) => continue,
            };
            if table.set(it.key, moved) {
                state.len += 1;
            }
        }
    }
}

/// A table of request and token quotas by key, for callers outside the limiters: each
/// key (any short string) gets its own allowance of every quota, a charge is all or
/// nothing across the quotas, and the table holds at most `max_keys` keys (idle keys
/// are swept to make room). The provider's key pool keeps its per-key limits in one.
///
/// Time is in nanoseconds on the caller's clock.
#[derive(Debug)]
pub(crate) struct QuotaTable {
    core: Core,
    quotas: Vec<Quota>,
}

/// Why a [`QuotaTable`] refused a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shortfall {
    /// Admitted after this wait, if nothing else is charged meanwhile.
    Wait(Duration),
    /// Never: the charge exceeds a quota's burst, or the table is full of live keys.
    Never,
}

impl QuotaTable {
    /// A table of `quotas` for at most `max_keys` keys.
    pub(crate) fn new(quotas: &[Quota], max_keys: usize) -> Self {
        let compiled = quotas.iter().map(|q| (Compiled::new(q), false)).collect();
        QuotaTable {
            core: Core::new(compiled, max_keys),
            quotas: quotas.to_vec(),
        }
    }

    /// The quotas, in the order given.
    pub(crate) fn quotas(&self) -> &[Quota] {
        &self.quotas
    }

    /// Charges `key` `units[i]` of quota `i` at `now`, or nothing and says why not.
    /// Missing units are zero; extra ones are ignored.
    pub(crate) fn charge(&self, now: u64, key: &str, units: &[u64]) -> Result<(), Shortfall> {
        let items: SmallVec<[Item<'_>; 4]> = self
            .quotas
            .iter()
            .enumerate()
            .map(|(quota, _)| Item {
                quota,
                key,
                units: units.get(quota).copied().unwrap_or(0),
                mult: 1000,
            })
            .collect();
        match self.core.check(now, &items) {
            Ok(()) => Ok(()),
            Err(Refusal::Wait { wait, .. }) => Err(Shortfall::Wait(wait)),
            Err(Refusal::TooLarge { .. } | Refusal::Full) => Err(Shortfall::Never),
        }
    }
}

/// Keeps the longest wait among refused items.
#[inline]
fn note_wait(refusal: &mut Option<(u128, usize)>, wait: u128, index: usize) {
    if refusal.is_none_or(|(w, _)| wait > w) {
        *refusal = Some((wait, index));
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use super::*;

    fn quota(per_minute: u64) -> Compiled {
        Compiled::new(&Quota::per_minute(NonZeroU64::new(per_minute).unwrap()))
    }

    fn item(quota: usize, key: &str) -> Item<'_> {
        Item {
            quota,
            key,
            units: 1,
            mult: 1000,
        }
    }

    #[test]
    fn inline_comparison_agrees_with_slice_equality() {
        let words: Vec<String> = (0..40).map(|n| "k".repeat(n)).collect();
        for a in &words {
            for b in &words {
                assert_eq!(bytes_eq(a.as_bytes(), b.as_bytes()), a == b);
            }
            // one differing byte at every position
            for i in 0..a.len() {
                let mut c = a.clone().into_bytes();
                c[i] = b'x';
                assert!(!bytes_eq(a.as_bytes(), &c), "len {} at {i}", a.len());
            }
        }
    }

    #[test]
    fn a_refusal_undoes_what_the_earlier_items_wrote() {
        // user (keyed), org (keyed), global (single slot, 2 a minute, burst 2)
        let core = Core::new(
            vec![(quota(100), false), (quota(100), false), (quota(2), true)],
            10,
        );
        let now = 1_000_000_000_000;
        core.check(now, &[item(0, "ann"), item(1, "acme"), item(2, "*")])
            .unwrap();
        core.check(now, &[item(0, "bob"), item(1, "acme"), item(2, "*")])
            .unwrap();
        let before = |core: &Core| {
            let st = core.lock();
            (
                st.tats[0].get("ann"),
                st.tats[1].get("acme"),
                st.tats[0].get("cat"),
                st.len,
            )
        };
        let snapshot = before(&core);
        // ann exists and is written first, acme too; the global slot refuses
        for key in ["ann", "cat"] {
            let r = core.check(now, &[item(0, key), item(1, "acme"), item(2, "*")]);
            assert!(matches!(r, Err(Refusal::Wait { index: 2, .. })), "{r:?}");
            assert_eq!(before(&core), snapshot, "{key}: nothing consumed");
        }
        assert_eq!(core.len(), 4, "ann, bob, acme and the global slot");
    }

    #[test]
    fn single_slots_refill_and_are_swept() {
        let core = Core::new(vec![(quota(60), true)], 1);
        let now = 1_000_000_000_000;
        core.check(now, &[item(0, "*")]).unwrap();
        assert_eq!(core.len(), 1);
        let mut st = core.lock();
        Core::sweep(&mut st, now + 2_000_000_000);
        assert!(matches!(st.tats[0], Table::Single(None)));
    }

    #[test]
    fn a_quota_table_charges_all_or_nothing_per_key() {
        let q = |n| Quota::per_minute(NonZeroU64::new(n).unwrap());
        let t = QuotaTable::new(&[q(2), q(100)], 4);
        assert_eq!(t.quotas().len(), 2);
        assert_eq!(t.charge(0, "a", &[1, 60]), Ok(()));
        // The token quota refuses: the request quota is not charged either.
        assert!(matches!(
            t.charge(0, "a", &[1, 60]),
            Err(Shortfall::Wait(_))
        ));
        assert_eq!(t.charge(0, "a", &[1, 40]), Ok(()));
        assert!(matches!(t.charge(0, "a", &[1, 0]), Err(Shortfall::Wait(_))));
        // Another key has its own allowance; a charge over the burst never fits.
        assert_eq!(t.charge(0, "b", &[1, 10]), Ok(()));
        assert_eq!(t.charge(0, "c", &[1, 101]), Err(Shortfall::Never));
    }
}
