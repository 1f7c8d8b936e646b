//! Bounded concurrency: an adaptive (AIMD) limit, a bounded queue with priority classes,
//! per-key in-flight caps, and immediate `Overloaded` when full.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::types::{Priority, RequestMeta, ScopeKind};
use crate::{Error, Result};

/// How many requests may run at once, and what waits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencyConfig {
    /// The starting limit on requests in flight (default 64).
    pub initial: usize,
    /// The adaptive limit never goes below this (default 4)...
    pub min: usize,
    /// ...nor above this (default 1,024).
    pub max: usize,
    /// Adapt the limit (AIMD): +1 per limit's worth of good calls, ×0.9 on an overload
    /// signal (a timeout, a 429 or 5xx, or a call slower than `latency_target`).
    /// Off: the limit stays at `initial` (default on).
    pub adaptive: bool,
    /// Calls slower than this count as an overload signal (default: none).
    pub latency_target: Option<Duration>,
    /// Requests that may wait for a slot, per priority class (default 64 each).
    pub queue_per_priority: usize,
    /// The longest a request waits in the queue before `Overloaded` (default 5 s).
    pub max_queue_wait: Duration,
    /// A cap on in-flight plus queued requests per key of this scope, e.g. per user.
    pub per_key: Option<(ScopeKind, usize)>,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            initial: 64,
            min: 4,
            max: 1_024,
            adaptive: true,
            latency_target: None,
            queue_per_priority: 64,
            max_queue_wait: Duration::from_secs(5),
            per_key: None,
        }
    }
}

impl ConcurrencyConfig {
    /// A fixed limit of `n` in flight and no queue: the excess is refused at once.
    pub fn fixed(n: usize) -> Self {
        ConcurrencyConfig {
            initial: n,
            min: n,
            max: n,
            adaptive: false,
            queue_per_priority: 0,
            ..Self::default()
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.min == 0 || self.min > self.initial || self.initial > self.max {
            return Err(Error::Config(
                "concurrency: need 1 <= min <= initial <= max".into(),
            ));
        }
        if self.queue_per_priority > 100_000 {
            return Err(Error::Config(
                "concurrency: queue_per_priority at most 100,000".into(),
            ));
        }
        if matches!(self.per_key, Some((_, 0))) {
            return Err(Error::Config(
                "concurrency: a per-key cap must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    queues: [VecDeque<oneshot::Sender<()>>; 3],
    per_key: HashMap<String, usize>,
}

#[derive(Debug)]
struct Inner {
    cfg: ConcurrencyConfig,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release_key(state: &mut State, key: Option<&str>) {
        if let Some(k) = key {
            if let Some(n) = state.per_key.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.per_key.remove(k);
                }
            }
        }
    }
}

/// The concurrency gate of a pipeline. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Concurrency {
    inner: Arc<Inner>,
}

/// A slot in flight; dropping it lets the next request in.
#[derive(Debug)]
pub(crate) struct Slot {
    inner: Arc<Inner>,
    key: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        Inner::release_key(&mut st, self.key.as_deref());
        // Hand the slot to the most urgent waiter still waiting.
        for q in st.queues.iter_mut().rev() {
            while let Some(tx) = q.pop_front() {
                if tx.send(()).is_ok() {
                    return;
                }
            }
        }
        st.in_flight = st.in_flight.saturating_sub(1);
    }
}

fn class(p: Priority) -> usize {
    match p {
        Priority::Low => 0,
        Priority::Normal => 1,
        Priority::High => 2,
    }
}

impl Concurrency {
    /// A gate with `cfg`.
    pub fn new(cfg: ConcurrencyConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Concurrency {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State {
                    limit: cfg.initial as f64,
                    in_flight: 0,
                    queues: [VecDeque::new(), VecDeque::new(), VecDeque::new()],
                    per_key: HashMap::new(),
                }),
            }),
        })
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Requests waiting now (including ones that gave up and are not yet removed).
    pub fn queued(&self) -> usize {
        self.inner.lock().queues.iter().map(VecDeque::len).sum()
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.inner.lock().limit as usize
    }

    /// A slot for a request by `meta`: at once if one is free, else after waiting in its
    /// priority's queue (bounded in length and time), else `Overloaded`.
    pub(crate) async fn acquire(&self, meta: &RequestMeta) -> Result<Slot> {
        let cfg = self.inner.cfg;
        let key = cfg
            .per_key
            .and_then(|(scope, _)| scope.key_of(meta))
            .map(str::to_owned);
        let rx = {
            let mut st = self.inner.lock();
            if let (Some((scope, cap)), Some(k)) = (cfg.per_key, &key) {
                let n = st.per_key.get(k).copied().unwrap_or(0);
                if n >= cap {
                    tracing::debug!(scope = %scope, "per-key in-flight cap reached");
                    return Err(Error::Overloaded { retry_after: None });
                }
                if st.per_key.len() >= 100_000 && n == 0 {
                    return Err(Error::Overloaded { retry_after: None });
                }
                *st.per_key.entry(k.clone()).or_default() += 1;
            }
            if st.in_flight < (st.limit as usize).max(1) {
                st.in_flight += 1;
                return Ok(Slot {
                    inner: Arc::clone(&self.inner),
                    key,
                });
            }
            let q = &mut st.queues[class(meta.priority)];
            // Drop waiters that gave up, then see if there is room.
            q.retain(|tx| !tx.is_closed());
            if q.len() >= cfg.queue_per_priority {
                Inner::release_key(&mut st, key.as_deref());
                return Err(Error::Overloaded { retry_after: None });
            }
            let (tx, rx) = oneshot::channel();
            q.push_back(tx);
            rx
        };
        match tokio::time::timeout(cfg.max_queue_wait, rx).await {
            Ok(Ok(())) => Ok(Slot {
                inner: Arc::clone(&self.inner),
                key,
            }),
            _ => {
                let mut st = self.inner.lock();
                Inner::release_key(&mut st, key.as_deref());
                Err(Error::Overloaded {
                    retry_after: Some(cfg.max_queue_wait),
                })
            }
        }
    }

    /// Feeds a call's outcome to the adaptive limit.
    pub(crate) fn feedback(&self, overloaded: bool, latency: Duration) {
        let cfg = self.inner.cfg;
        if !cfg.adaptive {
            return;
        }
        let slow = cfg.latency_target.is_some_and(|t| latency > t);
        let mut st = self.inner.lock();
        st.limit = if overloaded || slow {
            (st.limit * 0.9).max(cfg.min as f64)
        } else {
            (st.limit + 1.0 / st.limit.max(1.0)).min(cfg.max as f64)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(user: &str, p: Priority) -> RequestMeta {
        RequestMeta {
            user: Some(user.into()),
            priority: p,
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_limit_sheds_the_excess_at_once() {
        let c = Concurrency::new(ConcurrencyConfig::fixed(2)).unwrap();
        let a = c.acquire(&meta("a", Priority::Normal)).await.unwrap();
        let _b = c.acquire(&meta("b", Priority::Normal)).await.unwrap();
        assert!(matches!(
            c.acquire(&meta("c", Priority::Normal)).await,
            Err(Error::Overloaded { .. })
        ));
        drop(a);
        assert_eq!(c.in_flight(), 1);
        c.acquire(&meta("c", Priority::Normal)).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_prioritised_and_timed() {
        let cfg = ConcurrencyConfig {
            initial: 1,
            min: 1,
            max: 1,
            adaptive: false,
            queue_per_priority: 1,
            max_queue_wait: Duration::from_secs(1),
            ..Default::default()
        };
        let c = Concurrency::new(cfg).unwrap();
        let running = c.acquire(&meta("a", Priority::Normal)).await.unwrap();
        let low = tokio::spawn({
            let c = c.clone();
            async move { c.acquire(&meta("l", Priority::Low)).await.map(|_| "low") }
        });
        let high = tokio::spawn({
            let c = c.clone();
            async move {
                c.acquire(&meta("h", Priority::High)).await.map(|s| {
                    drop(s);
                    "high"
                })
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(c.queued(), 2);
        // the low queue is full: another low request is refused at once
        assert!(matches!(
            c.acquire(&meta("l2", Priority::Low)).await,
            Err(Error::Overloaded { .. })
        ));
        drop(running);
        assert_eq!(
            high.await.unwrap().unwrap(),
            "high",
            "high priority goes first"
        );
        assert_eq!(low.await.unwrap().unwrap(), "low");
        // a waiter that waits too long gets Overloaded
        let _hold = c.acquire(&meta("a", Priority::Normal)).await.unwrap();
        let t0 = tokio::time::Instant::now();
        assert!(matches!(
            c.acquire(&meta("b", Priority::Normal)).await,
            Err(Error::Overloaded { .. })
        ));
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_caps_and_aimd() {
        let cfg = ConcurrencyConfig {
            per_key: Some((ScopeKind::User, 1)),
            initial: 10,
            min: 2,
            max: 20,
            ..Default::default()
        };
        let c = Concurrency::new(cfg).unwrap();
        let s = c.acquire(&meta("ann", Priority::Normal)).await.unwrap();
        assert!(matches!(
            c.acquire(&meta("ann", Priority::Normal)).await,
            Err(Error::Overloaded { .. })
        ));
        c.acquire(&meta("bob", Priority::Normal)).await.unwrap();
        drop(s);
        c.acquire(&meta("ann", Priority::Normal)).await.unwrap();
        for _ in 0..5 {
            c.feedback(true, Duration::ZERO);
        }
        assert_eq!(c.limit(), 5);
        for _ in 0..100 {
            c.feedback(false, Duration::ZERO);
        }
        assert!(c.limit() > 10);
        for _ in 0..100 {
            c.feedback(true, Duration::ZERO);
        }
        assert_eq!(c.limit(), 2);
    }
}
