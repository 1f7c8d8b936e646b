//! API keys: a secret type that never prints, and a pool that spreads requests over
//! several keys and rests a key the provider rate-limited.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Timestamp, TokioClock};
use crate::limiter::{Quota, QuotaTable, Shortfall, Unit};
use crate::{Error, Result};

/// The most (key, model) rests a pool keeps; past it, expired rests are dropped, then
/// the one ending soonest.
const MAX_MODEL_RESTS: usize = 1024;

/// Per-key quotas: requests and/or tokens per minute, one table key per pool index.
struct KeyQuotas {
    table: QuotaTable,
    /// What each quota of the table counts.
    units: Vec<Unit>,
    names: Box<[String]>,
}

impl KeyQuotas {
    fn new(quotas: &[(Quota, Unit)], keys: usize) -> Self {
        let only: Vec<Quota> = quotas.iter().map(|(q, _)| *q).collect();
        KeyQuotas {
            table: QuotaTable::new(&only, MAX_KEYS * 2),
            units: quotas.iter().map(|(_, u)| *u).collect(),
            names: (0..keys).map(|i| format!("key{i}")).collect(),
        }
    }

    /// The same quotas, with nothing charged.
    fn fresh(&self) -> Self {
        let quotas: Vec<(Quota, Unit)> = self
            .table
            .quotas()
            .iter()
            .copied()
            .zip(self.units.iter().copied())
            .collect();
        KeyQuotas::new(&quotas, self.names.len())
    }

    /// Charges key `index` one request and `tokens` tokens, or says how long to wait.
    fn admit(&self, index: usize, tokens: u64, now: u64) -> std::result::Result<(), Duration> {
        let Some(name) = self.names.get(index) else {
            return Ok(());
        };
        let units: smallvec::SmallVec<[u64; 2]> = self
            .units
            .iter()
            .map(|u| if *u == Unit::Requests { 1 } else { tokens })
            .collect();
        match self.table.charge(now, name, &units) {
            Ok(()) => Ok(()),
            Err(Shortfall::Wait(wait)) => Err(wait),
            // A request larger than the per-key burst, or a full table: never ready.
            Err(Shortfall::Never) => Err(Duration::from_secs(60)),
        }
    }
}

/// When the keys are ready: each key's own rest, and its rests for single models.
#[derive(Debug, Clone)]
struct Rests {
    key: Vec<Timestamp>,
    /// Per key: model name → end of its rest for that model.
    model: Vec<HashMap<Box<str>, Timestamp>>,
    /// Entries of `model`, all keys together.
    model_len: usize,
}

impl Rests {
    fn new(n: usize) -> Self {
        Rests {
            key: vec![Timestamp::default(); n],
            model: vec![HashMap::new(); n],
            model_len: 0,
        }
    }

    /// When key `index` is ready for `model`, or for every model when `None`.
    fn ready_at(&self, index: usize, model: Option<&str>) -> Timestamp {
        let own = self.key.get(index).copied().unwrap_or_default();
        let rests = match self.model.get(index) {
            Some(r) if !r.is_empty() => r,
            _ => return own,
        };
        let by_model = match model {
            Some(m) => rests.get(m).copied(),
            None => rests.values().max().copied(),
        };
        by_model.map_or(own, |t| t.max(own))
    }

    fn rest_model(&mut self, now: Timestamp, index: usize, model: &str, until: Timestamp) {
        if index >= self.model.len() {
            return;
        }
        if self.model_len >= MAX_MODEL_RESTS {
            for m in &mut self.model {
                m.retain(|_, t| *t > now);
            }
            self.model_len = self.model.iter().map(HashMap::len).sum();
        }
        if self.model_len >= MAX_MODEL_RESTS {
            // Still full of live rests: the one ending soonest makes room.
            let soonest = self
                .model
                .iter()
                .enumerate()
                .flat_map(|(i, m)| m.iter().map(move |(k, t)| (*t, i, k.clone())))
                .min();
            if let Some((_, i, k)) = soonest {
                if let Some(m) = self.model.get_mut(i) {
                    m.remove(&k);
                    self.model_len -= 1;
                }
            }
        }
        let Some(rests) = self.model.get_mut(index) else {
            return;
        };
        match rests.get_mut(model) {
            Some(t) => *t = (*t).max(until),
            None => {
                rests.insert(model.into(), until);
                self.model_len += 1;
            }
        }
    }
}

/// An API key. Its `Debug` output shows only a short fingerprint; it has no `Display`
/// and no `Serialize`, so it cannot end up in logs, errors or serialized configuration
/// by accident. Cheap to clone.
///
/// ```
/// use tokenwise::provider::ApiKey;
/// let key = ApiKey::new("sk-very-secret");
/// let shown = format!("{key:?}");
/// assert!(!shown.contains("very-secret"));
/// assert_eq!(key.expose_secret(), "sk-very-secret");
/// ```
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps `key`.
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(Arc::from(key.into()))
    }

    /// The key in environment variable `var`, if it is set and not blank.
    pub fn from_env(var: &str) -> Option<Self> {
        let v = std::env::var(var).ok()?;
        let v = v.trim();
        (!v.is_empty()).then(|| ApiKey::new(v))
    }

    /// The key itself, for putting in a request header. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Four hex digits of the key's BLAKE3 hash: tells keys apart in logs without
    /// revealing anything usable.
    pub fn fingerprint(&self) -> String {
        let h = blake3::hash(self.0.as_bytes());
        let b = h.as_bytes();
        format!("{:02x}{:02x}", b[0], b[1])
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(#{})", self.fingerprint())
    }
}

impl From<String> for ApiKey {
    fn from(s: String) -> Self {
        ApiKey::new(s)
    }
}

impl From<&str> for ApiKey {
    fn from(s: &str) -> Self {
        ApiKey::new(s)
    }
}

/// The most keys one pool holds.
pub const MAX_KEYS: usize = 64;

/// A key handed out by a [`KeyPool`] for one request.
#[derive(Debug, Clone)]
pub struct KeyLease {
    index: usize,
    key: ApiKey,
}

impl KeyLease {
    /// The key.
    pub fn key(&self) -> &ApiKey {
        &self.key
    }

    /// Its position in the pool.
    pub fn index(&self) -> usize {
        self.index
    }
}

/// Several API keys of one provider.
///
/// [`acquire`](Self::acquire) hands out the ready keys in turn; a key the provider
/// rate-limited is [`cooled down`](Self::cool_down) until its Retry-After and skipped
/// meanwhile. When every key is cooling down, `acquire` says how long until the first
/// is ready again, and no request is sent. Cheap to clone; clones share state.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tokenwise::provider::{ApiKey, KeyPool};
/// use tokenwise::{ManualClock, Timestamp};
///
/// let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
/// let pool = KeyPool::new([ApiKey::new("k1"), ApiKey::new("k2")])?.with_clock(clock.clone());
/// let a = pool.acquire().unwrap();
/// let b = pool.acquire().unwrap();
/// assert_ne!(a.index(), b.index()); // spread over the keys
///
/// pool.cool_down(a.index(), Duration::from_secs(30)); // `a` got a 429
/// assert_eq!(pool.acquire().unwrap().index(), b.index());
/// pool.cool_down(b.index(), Duration::from_secs(10));
/// assert_eq!(pool.acquire().unwrap_err(), Duration::from_secs(10));
/// clock.advance(Duration::from_secs(10));
/// assert_eq!(pool.acquire().unwrap().index(), b.index());
/// # Ok::<(), tokenwise::Error>(())
/// ```
#[derive(Clone)]
pub struct KeyPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    keys: Box<[ApiKey]>,
    rests: Mutex<Rests>,
    next: AtomicUsize,
    clock: Arc<dyn Clock>,
    /// Per-key quotas: requests and/or tokens per minute.
    quotas: Option<KeyQuotas>,
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPool")
            .field("keys", &self.inner.keys)
            .field("ready", &self.ready())
            .finish()
    }
}

impl KeyPool {
    /// The keys, in the order of their [`KeyLease::index`].
    pub(crate) fn all_keys(&self) -> &[ApiKey] {
        &self.inner.keys
    }

    /// A pool of `keys` (1 to [`MAX_KEYS`], none blank), all ready, on tokio's clock.
    pub fn new(keys: impl IntoIterator<Item = ApiKey>) -> Result<Self> {
        let keys: Vec<ApiKey> = keys.into_iter().take(MAX_KEYS + 1).collect();
        if keys.is_empty() {
            return Err(Error::Config("a key pool needs at least one key".into()));
        }
        if keys.len() > MAX_KEYS {
            return Err(Error::Config(format!(
                "a key pool holds at most {MAX_KEYS} keys"
            )));
        }
        if keys.iter().any(|k| k.expose_secret().trim().is_empty()) {
            return Err(Error::Config("an API key is blank".into()));
        }
        let n = keys.len();
        Ok(KeyPool {
            inner: Arc::new(PoolInner {
                keys: keys.into_boxed_slice(),
                rests: Mutex::new(Rests::new(n)),
                next: AtomicUsize::new(0),
                clock: Arc::new(TokioClock::new()),
                quotas: None,
            }),
        })
    }

    /// The same keys, each held under `rpm` requests and `tpm` tokens a minute (either
    /// may be `None`): a key whose quota is used up is skipped like one cooling down, so
    /// the pool stays under the provider's per-key limits instead of waiting for 429s.
    /// Tokens are charged as the caller estimates them (prompt plus output allowance).
    pub fn with_key_limits(self, rpm: Option<u64>, tpm: Option<u64>) -> Result<Self> {
        let mut quotas = Vec::new();
        for (n, unit) in [(rpm, Unit::Requests), (tpm, Unit::Tokens)] {
            if let Some(n) = n {
                let n = crate::limiter::nonzero(n, "a per-key limit")?;
                quotas.push((Quota::per_minute(n), unit));
            }
        }
        let quotas = (!quotas.is_empty()).then(|| KeyQuotas::new(&quotas, self.inner.keys.len()));
        Ok(KeyPool {
            inner: Arc::new(PoolInner {
                keys: self.inner.keys.clone(),
                rests: Mutex::new(self.lock().clone()),
                next: AtomicUsize::new(self.inner.next.load(Ordering::Relaxed)),
                clock: Arc::clone(&self.inner.clock),
                quotas,
            }),
        })
    }

    /// The same keys, timed on `clock`. Rests already set are kept; per-key quota use
    /// starts afresh (it was timed on the old clock).
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        KeyPool {
            inner: Arc::new(PoolInner {
                keys: self.inner.keys.clone(),
                rests: Mutex::new(self.lock().clone()),
                next: AtomicUsize::new(self.inner.next.load(Ordering::Relaxed)),
                clock,
                quotas: self.inner.quotas.as_ref().map(KeyQuotas::fresh),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rests> {
        match self.inner.rests.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// How many keys the pool holds.
    pub fn len(&self) -> usize {
        self.inner.keys.len()
    }

    /// Always false: a pool holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.inner.keys.is_empty()
    }

    /// How many keys are ready now for every model.
    pub fn ready(&self) -> usize {
        self.count_ready(None)
    }

    /// How many keys are ready now for `model`.
    pub fn ready_for(&self, model: &str) -> usize {
        self.count_ready(Some(model))
    }

    fn count_ready(&self, model: Option<&str>) -> usize {
        let now = self.inner.clock.now();
        let rests = self.lock();
        (0..self.inner.keys.len())
            .filter(|i| rests.ready_at(*i, model) <= now)
            .count()
    }

    /// The next key ready for every model, taking turns; or, when every key is
    /// resting, how long until the first is ready.
    pub fn acquire(&self) -> std::result::Result<KeyLease, Duration> {
        self.pick(None, 0)
    }

    /// Like [`acquire`](Self::acquire), charging the key's quotas (see
    /// [`with_key_limits`](Self::with_key_limits)) one request and `tokens` tokens.
    pub fn acquire_for(&self, tokens: u64) -> std::result::Result<KeyLease, Duration> {
        self.pick(None, tokens)
    }

    /// The next key ready for `model` (a key resting after a 429 for another model is
    /// not held back), charging its quotas one request and `tokens` tokens; or how long
    /// until the first is ready.
    pub fn acquire_for_model(
        &self,
        model: &str,
        tokens: u64,
    ) -> std::result::Result<KeyLease, Duration> {
        self.pick(Some(model), tokens)
    }

    fn pick(&self, model: Option<&str>, tokens: u64) -> std::result::Result<KeyLease, Duration> {
        let now = self.inner.clock.now();
        let n = self.inner.keys.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let rests = self.lock();
        let mut soonest = Timestamp::from_nanos(u64::MAX);
        for i in 0..n {
            let index = start.wrapping_add(i) % n;
            let Some(key) = self.inner.keys.get(index) else {
                continue;
            };
            let at = rests.ready_at(index, model);
            if at <= now {
                if let Some(q) = &self.inner.quotas {
                    if let Err(wait) = q.admit(index, tokens, now.as_nanos()) {
                        soonest = soonest.min(now.saturating_add(wait));
                        continue;
                    }
                }
                if i > 0 {
                    // Keys were skipped: the turn continues after this one, so the
                    // ready keys keep sharing the load evenly.
                    self.inner
                        .next
                        .store(index.wrapping_add(1), Ordering::Relaxed);
                }
                return Ok(KeyLease {
                    index,
                    key: key.clone(),
                });
            }
            soonest = soonest.min(at);
        }
        Err(soonest.saturating_since(now))
    }

    /// Rests key `index` for `period` from now, for every model (or longer, if it
    /// already rests longer).
    pub fn cool_down(&self, index: usize, period: Duration) {
        let until = self.inner.clock.now().saturating_add(period);
        if let Some(at) = self.lock().key.get_mut(index) {
            *at = (*at).max(until);
        }
    }

    /// Rests key `index` for `period` from now for `model` only: the key keeps serving
    /// other models. A pool keeps at most 1,024 such rests; past that, expired ones are
    /// dropped, then the one ending soonest.
    pub fn cool_down_model(&self, index: usize, model: &str, period: Duration) {
        let now = self.inner.clock.now();
        self.lock()
            .rest_model(now, index, model, now.saturating_add(period));
    }

    /// How long until some key is ready for every model: zero when one is ready now.
    pub fn next_ready_in(&self) -> Duration {
        self.ready_in(None)
    }

    /// How long until some key is ready for `model`: zero when one is ready now.
    pub fn next_ready_in_for(&self, model: &str) -> Duration {
        self.ready_in(Some(model))
    }

    fn ready_in(&self, model: Option<&str>) -> Duration {
        let now = self.inner.clock.now();
        let rests = self.lock();
        (0..self.inner.keys.len())
            .map(|i| rests.ready_at(i, model))
            .min()
            .map_or(Duration::ZERO, |t| t.saturating_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn keys_never_print() {
        let k = ApiKey::new("sk-live-abcdef123456");
        let pool = KeyPool::new([k.clone()]).unwrap();
        for shown in [format!("{k:?}"), format!("{k:#?}"), format!("{pool:?}")] {
            assert!(!shown.contains("abcdef"), "{shown}");
            assert!(shown.contains(&k.fingerprint()));
        }
    }

    #[test]
    fn pool_bounds() {
        assert!(KeyPool::new(Vec::new()).is_err());
        assert!(KeyPool::new([ApiKey::new("  ")]).is_err());
        assert!(KeyPool::new((0..=MAX_KEYS).map(|i| ApiKey::new(format!("k{i}")))).is_err());
        assert_eq!(
            KeyPool::new((0..MAX_KEYS).map(|i| ApiKey::new(format!("k{i}"))))
                .unwrap()
                .len(),
            MAX_KEYS
        );
    }

    #[test]
    fn spreads_and_cools_down() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(10)));
        let pool = KeyPool::new(["a", "b", "c"].map(ApiKey::new))
            .unwrap()
            .with_clock(clock.clone());
        let mut seen = [0; 3];
        for _ in 0..30 {
            seen[pool.acquire().unwrap().index()] += 1;
        }
        assert_eq!(seen, [10, 10, 10]);
        pool.cool_down(1, Duration::from_secs(5));
        assert_eq!(pool.ready(), 2);
        for _ in 0..10 {
            assert_ne!(pool.acquire().unwrap().index(), 1);
        }
        // A shorter cooldown does not shorten a longer one.
        pool.cool_down(1, Duration::from_secs(1));
        pool.cool_down(0, Duration::from_secs(3));
        pool.cool_down(2, Duration::from_secs(4));
        assert_eq!(pool.acquire().unwrap_err(), Duration::from_secs(3));
        assert_eq!(pool.next_ready_in(), Duration::from_secs(3));
        clock.advance(Duration::from_secs(3));
        assert_eq!(pool.acquire().unwrap().index(), 0);
        clock.advance(Duration::from_secs(2));
        assert_eq!(pool.ready(), 3);
    }

    #[test]
    fn a_rest_for_one_model_does_not_hold_back_another() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(10)));
        let pool = KeyPool::new(["a", "b"].map(ApiKey::new))
            .unwrap()
            .with_clock(clock.clone());
        pool.cool_down_model(0, "gpt-4o", Duration::from_secs(5));
        pool.cool_down_model(1, "gpt-4o", Duration::from_secs(8));
        assert_eq!(pool.ready_for("gpt-4o"), 0);
        assert_eq!(pool.ready_for("gpt-4o-mini"), 2);
        assert_eq!(pool.ready(), 0, "not ready for every model");
        assert_eq!(
            pool.acquire_for_model("gpt-4o", 0).unwrap_err(),
            Duration::from_secs(5)
        );
        assert_eq!(pool.next_ready_in_for("gpt-4o"), Duration::from_secs(5));
        assert_eq!(pool.next_ready_in_for("other"), Duration::ZERO);
        for _ in 0..4 {
            assert!(pool.acquire_for_model("gpt-4o-mini", 0).is_ok());
        }
        clock.advance(Duration::from_secs(5));
        assert_eq!(pool.acquire_for_model("gpt-4o", 0).unwrap().index(), 0);
        // A whole-key rest holds back every model.
        pool.cool_down(0, Duration::from_secs(60));
        assert_eq!(pool.ready_for("gpt-4o-mini"), 1);
    }

    #[test]
    fn model_rests_are_bounded() {
        let clock = Arc::new(ManualClock::new(Timestamp::from_secs(10)));
        let pool = KeyPool::new([ApiKey::new("a")])
            .unwrap()
            .with_clock(clock.clone());
        for i in 0..(MAX_MODEL_RESTS + 10) {
            let secs = u64::try_from(i).unwrap() + 1;
            pool.cool_down_model(0, &format!("m{i}"), Duration::from_secs(secs));
        }
        let rests = pool.lock();
        assert_eq!(rests.model_len, MAX_MODEL_RESTS);
        assert_eq!(rests.model[0].len(), MAX_MODEL_RESTS);
        // The soonest-ending rests made room for the latest.
        assert!(!rests.model[0].contains_key("m0"));
        assert!(rests.model[0].contains_key(format!("m{}", MAX_MODEL_RESTS + 9).as_str()));
    }
}
