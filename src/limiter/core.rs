//! The GCRA table shared by the keyed limiters: one theoretical arrival time (TAT) per
//! quota and key, all checks of one request decided under one lock.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use smallvec::SmallVec;

use super::Quota;
use crate::clock::duration_nanos;

use hashbrown::hash_map::EntryRef;

type Map = hashbrown::HashMap<String, u64>;

/// Where a checked item's new TAT goes once every item passed.
enum Slot<'m> {
    Existing(&'m mut u64),
    New(&'m mut Map),
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

#[derive(Debug)]
struct State {
    tats: Vec<Map>,
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
    pub(crate) fn new(quotas: Vec<Compiled>, max_keys: usize) -> Self {
        let tats = quotas.iter().map(|_| Map::default()).collect();
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
        // Updates are applied only after every item was checked, so a panic cannot leave
        // a half-applied request behind: a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The quotas.
    pub(crate) fn quotas(&self) -> &[Compiled] {
        &self.quotas
    }

    /// Keys tracked.
    pub(crate) fn len(&self) -> usize {
        self.lock().len
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

    fn check_fast(&self, state: &mut State, now: u64, items: &[Item<'_>]) -> Fast {
        let now128 = u128::from(now);
        let State { tats, len, .. } = state;
        let mut maps = tats.iter_mut().enumerate();
        let mut slots: SmallVec<[(Slot<'_>, u64, usize); 4]> = SmallVec::new();
        let mut refusal: Option<(u128, usize)> = None;
        for (index, it) in items.iter().enumerate() {
            if it.units == 0 {
                continue;
            }
            let map = loop {
                match maps.next() {
                    Some((i, m)) if i == it.quota => break m,
                    Some(_) => {}
                    None => return Fast::NeedsRoom,
                }
            };
            let q = &self.quotas[it.quota];
            let inc = q.cost_ns(it.units, it.mult);
            if inc > q.tau_ns {
                let most = u128::from(q.burst) * u128::from(it.mult.max(1)) / 1000;
                return Fast::Done(Err(Refusal::TooLarge {
                    index,
                    most: u64::try_from(most).unwrap_or(u64::MAX),
                }));
            }
            let (slot, stored) = match map.entry_ref(it.key) {
                EntryRef::Occupied(o) => {
                    let t = o.into_mut();
                    let stored = *t;
                    (Slot::Existing(t), Some(stored))
                }
                // A new key: inserted (hashed again) only if the request is admitted.
                EntryRef::Vacant(v) => (Slot::New(v.into_map()), None),
            };
            let tat = stored.map_or(now128, |t| u128::from(t).max(now128));
            let new_tat = tat + inc;
            let allow_at = new_tat.saturating_sub(q.tau_ns);
            if allow_at > now128 {
                let wait = allow_at - now128;
                if refusal.is_none_or(|(w, _)| wait > w) {
                    refusal = Some((wait, index));
                }
                continue;
            }
            slots.push((slot, u64::try_from(new_tat).unwrap_or(u64::MAX), index));
        }
        if let Some((wait, index)) = refusal {
            let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
            return Fast::Done(Err(Refusal::Wait { index, wait }));
        }
        let new_keys = slots
            .iter()
            .filter(|(s, _, _)| matches!(s, Slot::New(_)))
            .count();
        if *len + new_keys > self.max_keys {
            return Fast::NeedsRoom;
        }
        for (slot, tat, index) in slots {
            match slot {
                Slot::Existing(t) => *t = tat,
                Slot::New(map) => {
                    map.insert(items[index].key.to_owned(), tat);
                    *len += 1;
                }
            }
        }
        Fast::Done(Ok(()))
    }

    /// The general path: any item order, sweeping when the key bound is reached.
    fn check_slow(&self, state: &mut State, now: u64, items: &[Item<'_>]) -> Result<(), Refusal> {
        let now128 = u128::from(now);
        let mut updates: SmallVec<[(usize, u64, bool); 4]> = SmallVec::new();
        let mut refusal: Option<(u128, usize)> = None;
        for (index, it) in items.iter().enumerate() {
            if it.units == 0 {
                continue;
            }
            let q = &self.quotas[it.quota];
            let inc = q.cost_ns(it.units, it.mult);
            if inc > q.tau_ns {
                let most = u128::from(q.burst) * u128::from(it.mult.max(1)) / 1000;
                return Err(Refusal::TooLarge {
                    index,
                    most: u64::try_from(most).unwrap_or(u64::MAX),
                });
            }
            let stored = state.tats[it.quota].get(it.key).copied();
            let tat = stored.map_or(now128, |t| u128::from(t).max(now128));
            let new_tat = tat + inc;
            let allow_at = new_tat.saturating_sub(q.tau_ns);
            if allow_at > now128 {
                let wait = allow_at - now128;
                if refusal.is_none_or(|(w, _)| wait > w) {
                    refusal = Some((wait, index));
                }
                continue;
            }
            updates.push((
                index,
                u64::try_from(new_tat).unwrap_or(u64::MAX),
                stored.is_none(),
            ));
        }
        if let Some((wait, index)) = refusal {
            let wait = Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX));
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
            let map = &mut state.tats[it.quota];
            match map.get_mut(it.key) {
                Some(t) => *t = tat,
                None => {
                    map.insert(it.key.into(), tat);
                    state.len += 1;
                }
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
        let mut len = 0;
        for map in &mut state.tats {
            map.retain(|_, tat| *tat > now);
            len += map.len();
        }
        state.len = len;
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
            let shift = q.cost_ns(it.units, it.mult);
            let shift = u64::try_from(shift).unwrap_or(u64::MAX);
            let map = &mut state.tats[it.quota];
            if add {
                // More was used than charged: the debt counts even past the burst.
                match map.get_mut(it.key) {
                    Some(t) => *t = (*t).max(now).saturating_add(shift),
                    None => {
                        map.insert(it.key.into(), now.saturating_add(shift));
                        state.len += 1;
                    }
                }
            } else if let Some(t) = map.get_mut(it.key) {
                *t = t.saturating_sub(shift).max(now);
            }
        }
    }
}
