//! Load balancing over deployments of one model (several keys, regions, base URLs).

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use smallvec::SmallVec;

use crate::provider::Provider;
use crate::{Error, Result};

/// How a request picks one of a model's deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// Smooth weighted round robin: each deployment gets its weight's share, evenly
    /// interleaved.
    #[default]
    Weighted,
    /// The deployment with the fewest calls in flight.
    LeastInFlight,
    /// Two deployments at random; the one with the lower latency EWMA × (in flight + 1).
    PowerOfTwo,
}

#[derive(Debug)]
struct Member {
    provider: Arc<dyn Provider>,
    /// The name of this deployment's circuit breaker: `model@provider`, set when the
    /// deployments are given to a pipeline.
    breaker_key: String,
    weight: i64,
    in_flight: AtomicUsize,
    /// Latency EWMA in microseconds; 0 until the first call.
    ewma_us: AtomicU64,
}

/// The deployments of one model, and how to spread calls over them.
///
/// ```
/// use tokenwise::provider::SimulatedProvider;
/// use tokenwise::router::{Balance, Deployments};
/// let eu = SimulatedProvider::builder().name("openai-eu").build().unwrap();
/// let us = SimulatedProvider::builder().name("openai-us").build().unwrap();
/// let gpt4o = Deployments::new(Balance::PowerOfTwo).add(eu, 1).add(us, 1);
/// assert_eq!(gpt4o.len(), 2);
/// ```
pub struct Deployments {
    members: Vec<Arc<Member>>,
    strategy: Balance,
    current: Mutex<Vec<i64>>,
    turn: AtomicUsize,
}

impl fmt::Debug for Deployments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.members.iter().map(|m| m.provider.name()).collect();
        f.debug_struct("Deployments")
            .field("strategy", &self.strategy)
            .field("members", &names)
            .finish()
    }
}

/// One pick: the provider to call; its in-flight count drops when this is dropped, so
/// a stream holds it until it ends.
#[derive(Debug)]
pub(crate) struct Picked {
    member: Arc<Member>,
    index: usize,
}

impl Picked {
    pub(crate) fn provider(&self) -> &Arc<dyn Provider> {
        &self.member.provider
    }

    /// The deployment's position among its model's deployments.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The name of the deployment's circuit breaker.
    pub(crate) fn breaker_key(&self) -> &str {
        &self.member.breaker_key
    }

    /// Records a call's latency (a failure counts as at least one second).
    pub(crate) fn record(&self, latency: Duration, ok: bool) {
        let sample = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let sample = if ok {
            sample.max(1)
        } else {
            sample.max(1_000_000)
        };
        let old = self.member.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old / 5) * 4 + sample / 5
        };
        self.member.ewma_us.store(new.max(1), Ordering::Relaxed);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        self.member.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Deployments {
    /// No deployments yet, spread by `strategy`.
    pub fn new(strategy: Balance) -> Self {
        Deployments {
            members: Vec::new(),
            strategy,
            current: Mutex::new(Vec::new()),
            turn: AtomicUsize::new(0),
        }
    }

    /// Adds a deployment with `weight` (used by [`Balance::Weighted`]; 0 counts as 1).
    #[must_use]
    pub fn add(self, provider: impl Provider + 'static, weight: u32) -> Self {
        self.add_arc(Arc::new(provider), weight)
    }

    /// Adds a shared deployment.
    #[must_use]
    pub fn add_arc(mut self, provider: Arc<dyn Provider>, weight: u32) -> Self {
        let breaker_key = provider.name().to_owned();
        self.members.push(Arc::new(Member {
            provider,
            breaker_key,
            weight: i64::from(weight.max(1)),
            in_flight: AtomicUsize::new(0),
            ewma_us: AtomicU64::new(0),
        }));
        self.current
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .push(0);
        self
    }

    /// How many deployments.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Names each deployment's circuit breaker `model@provider` (the provider's name,
    /// plus its position when two deployments share a name).
    pub(crate) fn bind(&mut self, model: &str) {
        let names: Vec<String> = self
            .members
            .iter()
            .map(|m| m.provider.name().to_owned())
            .collect();
        for (i, m) in self.members.iter_mut().enumerate() {
            let shared = names.iter().filter(|n| **n == names[i]).count() > 1;
            let key = if shared {
                format!("{model}@{}#{i}", names[i])
            } else {
                format!("{model}@{}", names[i])
            };
            if let Some(m) = Arc::get_mut(m) {
                m.breaker_key = key;
            }
        }
    }

    /// The breaker names of every deployment, in order.
    pub(crate) fn breaker_keys(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.breaker_key.as_str())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.members.is_empty() {
            return Err(Error::Config("deployments: at least one provider".into()));
        }
        if self.members.len() > 256 {
            return Err(Error::Config("deployments: at most 256 per model".into()));
        }
        Ok(())
    }

    /// Calls in flight per deployment.
    pub fn in_flight(&self) -> Vec<usize> {
        self.members
            .iter()
            .map(|m| m.in_flight.load(Ordering::Relaxed))
            .collect()
    }

    fn weighted(&self, skip: &[usize]) -> usize {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let live = |i: &usize| !skip.contains(i);
        let total: i64 = (0..self.members.len())
            .filter(live)
            .map(|i| self.members[i].weight)
            .sum();
        let mut best = None;
        for (i, m) in self.members.iter().enumerate() {
            if !live(&i) {
                continue;
            }
            if let Some(c) = cur.get_mut(i) {
                *c += m.weight;
            }
            if best.is_none_or(|b| cur.get(i) > cur.get(b)) {
                best = Some(i);
            }
        }
        let best = best.unwrap_or(0);
        if let Some(c) = cur.get_mut(best) {
            *c -= total;
        }
        best
    }

    /// Picks a deployment by the strategy, skipping those at the positions in `skip`
    /// (whose breakers are open); `None` when none is left.
    pub(crate) fn pick(&self, skip: &[usize]) -> Option<Picked> {
        let n = self.members.len();
        let live: SmallVec<[usize; 8]> = (0..n).filter(|i| !skip.contains(i)).collect();
        if live.is_empty() {
            return None;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed);
        let m = live.len();
        let i = match self.strategy {
            _ if m == 1 => live[0],
            Balance::Weighted => self.weighted(skip),
            Balance::LeastInFlight => (0..m)
                .map(|k| live[(start + k) % m])
                .min_by_key(|i| self.members[*i].in_flight.load(Ordering::Relaxed))
                .unwrap_or(live[0]),
            Balance::PowerOfTwo => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..m);
                let b = (a + rng.random_range(1..m)) % m;
                let score = |i: usize| {
                    let m = &self.members[i];
                    let ewma = m.ewma_us.load(Ordering::Relaxed);
                    ewma.saturating_mul(m.in_flight.load(Ordering::Relaxed) as u64 + 1)
                };
                let (a, b) = (live[a], live[b]);
                if score(b) < score(a) { b } else { a }
            }
        };
        let member = Arc::clone(self.members.get(i)?);
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked { member, index: i })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::SimulatedProvider;

    fn sim(name: &str) -> SimulatedProvider {
        SimulatedProvider::builder().name(name).build().unwrap()
    }

    #[test]
    fn weighted_round_robin_shares_by_weight() {
        let d = Deployments::new(Balance::Weighted)
            .add(sim("a"), 3)
            .add(sim("b"), 1);
        let picks: Vec<String> = (0..8)
            .map(|_| d.pick(&[]).unwrap().provider().name().to_owned())
            .collect();
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 6);
        assert_ne!(
            picks[..4].iter().filter(|p| *p == "b").count(),
            0,
            "interleaved: {picks:?}"
        );
    }

    #[test]
    fn least_in_flight_and_power_of_two() {
        let d = Deployments::new(Balance::LeastInFlight)
            .add(sim("a"), 1)
            .add(sim("b"), 1);
        let first = d.pick(&[]).unwrap();
        let second = d.pick(&[]).unwrap();
        assert_ne!(first.provider().name(), second.provider().name());
        drop(first);
        assert_eq!(d.in_flight().iter().sum::<usize>(), 1);

        let p = Deployments::new(Balance::PowerOfTwo)
            .add(sim("fast"), 1)
            .add(sim("slow"), 1);
        for _ in 0..4 {
            let a = p.pick(&[]).unwrap();
            let slow = a.provider().name() == "slow";
            a.record(Duration::from_millis(if slow { 900 } else { 50 }), true);
            let b = p.pick(&[]).unwrap();
            let slow = b.provider().name() == "slow";
            b.record(Duration::from_millis(if slow { 900 } else { 50 }), true);
        }
        let fast = (0..100)
            .filter(|_| p.pick(&[]).unwrap().provider().name() == "fast")
            .count();
        assert_eq!(fast, 100, "with two deployments, p2c always compares both");
    }
}
