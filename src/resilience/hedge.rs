//! Hedging: when the first target is slow, ask the next one too.

use std::collections::VecDeque;

use hashbrown::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{Error, Result};

/// When to send a hedged request to the next target.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Hedge {
    /// After this long without an answer.
    After(Duration),
    /// After the first target's recent latency percentile (0 < p < 1), e.g. 0.95; until
    /// 20 latencies are known, after `fallback`.
    Percentile {
        /// The percentile.
        p: f64,
        /// The delay while too few latencies are known.
        fallback: Duration,
    },
}

impl Hedge {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        match self {
            Hedge::After(d) | Hedge::Percentile { fallback: d, .. } if d.is_zero() => {
                Err(Error::Config("hedge: the delay must be positive".into()))
            }
            Hedge::Percentile { p, .. } if !(*p > 0.0 && *p < 1.0) => Err(Error::Config(
                "hedge: the percentile must be in (0, 1)".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Latencies kept per target.
const SAMPLES: usize = 256;

/// Recent successful-call latencies per target, for percentile hedging.
#[derive(Debug, Clone, Default)]
pub(crate) struct Latencies {
    map: Arc<Mutex<HashMap<String, VecDeque<Duration>>>>,
}

impl Latencies {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Duration>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a successful call's latency.
    pub(crate) fn record(&self, target: &str, latency: Duration) {
        let mut map = self.lock();
        if !map.contains_key(target) {
            if map.len() >= 1_024 {
                return;
            }
            map.insert(target.to_owned(), VecDeque::new());
        }
        // a known target's key is not allocated again
        let Some(q) = map.get_mut(target) else {
            return;
        };
        if q.len() == SAMPLES {
            q.pop_front();
        }
        q.push_back(latency);
    }

    /// The `p` percentile of `target`'s recent latencies, with at least 20 samples.
    pub(crate) fn percentile(&self, target: &str, p: f64) -> Option<Duration> {
        let map = self.lock();
        let q = map.get(target)?;
        if q.len() < 20 {
            return None;
        }
        let mut v: Vec<Duration> = q.iter().copied().collect();
        v.sort_unstable();
        let idx = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v.get(idx).copied()
    }

    /// The hedge delay for `target` under `hedge`.
    pub(crate) fn delay(&self, hedge: Hedge, target: &str) -> Duration {
        match hedge {
            Hedge::After(d) => d,
            Hedge::Percentile { p, fallback } => self.percentile(target, p).unwrap_or(fallback),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_after_enough_samples() {
        let l = Latencies::default();
        let h = Hedge::Percentile {
            p: 0.9,
            fallback: Duration::from_secs(2),
        };
        assert_eq!(l.delay(h, "m"), Duration::from_secs(2));
        for ms in 1..=100 {
            l.record("m", Duration::from_millis(ms));
        }
        assert_eq!(l.delay(h, "m"), Duration::from_millis(90));
        assert!(
            Hedge::Percentile {
                p: 1.5,
                fallback: Duration::from_secs(1)
            }
            .validate()
            .is_err()
        );
    }
}
