//! API keys: a secret type that never prints, and a pool that spreads requests over
//! several keys and rests a key the provider rate-limited.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Timestamp, TokioClock};
use crate::limiter::core::{Compiled, Core, Item, Refusal};
use crate::limiter::{Quota, Unit};
use crate::{Error, Result};

impl KeyQuotas {
    /// Charges key `index` one request and `tokens` tokens, or says how long to wait.
    fn admit(&self, index: usize, tokens: u64, now: u64) -> std::result::Result<(), Duration> {
        let Some(name) = self.names.get(index) else {
            return Ok(());
        };
        let items: Vec<Item<'_>> = self
            .units
            .iter()
            .map(|(quota, unit)| Item {
                quota: *quota,
                key: name,
                units: if *unit == Unit::Requests { 1 } else { tokens },
                mult: 1000,
            })
            .collect();
        match self.core.check(now, &items) {
            Ok(()) => Ok(()),
            Err(Refusal::Wait { wait, .. }) => Err(wait),
            // A request larger than the per-key burst, or a full table: never ready.
            Err(_) => Err(Duration::from_secs(60)),
        }
    }

    fn core_quotas(&self) -> Vec<(Compiled, bool)> {
        self.core.quotas().iter().map(|q| (*q, false)).collect()
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
    ready_at: Mutex<Vec<Timestamp>>,
    next: AtomicUsize,
    clock: Arc<dyn Clock>,
    /// Per-key quotas: requests and/or tokens per minute, one GCRA key per pool index.
    quotas: Option<KeyQuotas>,
}

struct KeyQuotas {
    core: Core,
    /// (quota index, unit) of the per-key quotas.
    units: Vec<(usize, Unit)>,
    names: Box<[String]>,
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
                ready_at: Mutex::new(vec![Timestamp::default(); n]),
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
        let mut units = Vec::new();
        for (n, unit) in [(rpm, Unit::Requests), (tpm, Unit::Tokens)] {
            if let Some(n) = n {
                let n = crate::limiter::nonzero(n, "a per-key limit")?;
                units.push((quotas.len(), unit));
                quotas.push((Compiled::new(&Quota::per_minute(n)), false));
            }
        }
        let names = (0..self.inner.keys.len())
            .map(|i| format!("key{i}"))
            .collect();
        let quotas = (!units.is_empty()).then(|| KeyQuotas {
            core: Core::new(quotas, MAX_KEYS * 2),
            units,
            names,
        });
        Ok(KeyPool {
            inner: Arc::new(PoolInner {
                keys: self.inner.keys.clone(),
                ready_at: Mutex::new(self.lock().clone()),
                next: AtomicUsize::new(self.inner.next.load(Ordering::Relaxed)),
                clock: Arc::clone(&self.inner.clock),
                quotas,
            }),
        })
    }

    /// The same keys, timed on `clock`. Cooldowns already set are kept.
    #[must_use]
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        let ready_at = self.lock().clone();
        KeyPool {
            inner: Arc::new(PoolInner {
                keys: self.inner.keys.clone(),
                ready_at: Mutex::new(ready_at),
                next: AtomicUsize::new(self.inner.next.load(Ordering::Relaxed)),
                clock,
                quotas: None,
            }),
        }
        .with_quotas_of(&self)
    }

    /// Carries `other`'s quota settings over (used when the clock changes).
    fn with_quotas_of(self, other: &KeyPool) -> Self {
        match &other.inner.quotas {
            None => self,
            Some(q) => {
                // Quota state is timed on the old clock; start afresh on the new one.
                let inner = PoolInner {
                    keys: self.inner.keys.clone(),
                    ready_at: Mutex::new(self.lock().clone()),
                    next: AtomicUsize::new(0),
                    clock: Arc::clone(&self.inner.clock),
                    quotas: Some(KeyQuotas {
                        core: Core::new(q.core_quotas(), MAX_KEYS * 2),
                        units: q.units.clone(),
                        names: q.names.clone(),
                    }),
                };
                KeyPool {
                    inner: Arc::new(inner),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Timestamp>> {
        match self.inner.ready_at.lock() {
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

    /// How many keys are ready now.
    pub fn ready(&self) -> usize {
        let now = self.inner.clock.now();
        self.lock().iter().filter(|t| **t <= now).count()
    }

    /// The next ready key, taking turns; or, when every key is cooling down, how long
    /// until the first is ready.
    pub fn acquire(&self) -> std::result::Result<KeyLease, Duration> {
        self.acquire_for(0)
    }

    /// Like [`acquire`](Self::acquire), charging the key's quotas (see
    /// [`with_key_limits`](Self::with_key_limits)) one request and `tokens` tokens.
    pub fn acquire_for(&self, tokens: u64) -> std::result::Result<KeyLease, Duration> {
        let now = self.inner.clock.now();
        let n = self.inner.keys.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let ready_at = self.lock();
        let mut soonest = Timestamp::from_nanos(u64::MAX);
        for i in 0..n {
            let index = start.wrapping_add(i) % n;
            let (Some(at), Some(key)) = (ready_at.get(index), self.inner.keys.get(index)) else {
                continue;
            };
            if *at <= now {
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
            soonest = soonest.min(*at);
        }
        Err(soonest.saturating_since(now))
    }

    /// Rests key `index` for `period` from now (or longer, if it already rests longer).
    pub fn cool_down(&self, index: usize, period: Duration) {
        let until = self.inner.clock.now().saturating_add(period);
        if let Some(at) = self.lock().get_mut(index) {
            *at = (*at).max(until);
        }
    }

    /// How long until some key is ready: zero when one is ready now.
    pub fn next_ready_in(&self) -> Duration {
        let now = self.inner.clock.now();
        self.lock()
            .iter()
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
}
