//! A GCRA limiter in Redis, shared by every replica (cargo feature `redis`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;

use super::{Admission, LimitRule, Limiter, Unit};
use crate::clock::{Clock, default_clock, duration_nanos};
use crate::redis_conn::{OnRedisError, RedisConnection};
use crate::types::{RequestMeta, Scope, ScopeKind, Tier};
use crate::{Error, Result};

/// Checks every key and consumes them all, or none: one round trip per request.
/// Times are microseconds (exact in Lua's doubles for centuries of timestamps).
/// KEYS: TAT keys. ARGV: now, then (increment, tolerance) per key.
/// Returns {1} when admitted, {0, wait, index} when refused.
static CHECK: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(ARGV[1])
local news = {}
local worst, worst_i = 0, 0
for i = 1, #KEYS do
  local inc = tonumber(ARGV[2 * i])
  local tau = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + inc
  local allow = new - tau
  if allow > now and allow - now > worst then
    worst = allow - now
    worst_i = i
  end
  news[i] = new
end
if worst > 0 then
  return {0, string.format('%.0f', worst), worst_i}
end
for i = 1, #KEYS do
  local ttl = math.ceil((news[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', ttl)
end
return {1, '0', 0}
",
    )
});

/// Moves TATs by signed amounts (token reconciliation). ARGV: now, then a delta per key.
static ADJUST: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(ARGV[1])
for i = 1, #KEYS do
  local delta = tonumber(ARGV[1 + i])
  local cur = redis.call('GET', KEYS[i])
  if cur or delta > 0 then
    local tat = tonumber(cur or now)
    if delta > 0 then
      if tat < now then tat = now end
      tat = tat + delta
    else
      tat = tat + delta
      if tat < now then tat = now end
    end
    local ttl = math.ceil((tat - now) / 1000) + 1000
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', ttl)
  end
end
return 1
",
    )
});

/// A keyed GCRA limiter whose state lives in Redis, so that every replica shares one
/// set of limits: a cap of N across K replicas is N, not K×N.
///
/// All scopes of a request are checked and consumed by one Lua script in one round
/// trip; keys expire once they have fully refilled, so Redis memory stays bounded. The
/// rules, tiers and reconciliation behave as in [`GcraLimiter`](super::GcraLimiter).
/// Time comes from the injectable clock (keep replicas' clocks in sync; skew shifts a
/// limit by the skew). When Redis cannot be reached, [`OnRedisError`] decides.
#[derive(Debug, Clone)]
pub struct RedisLimiter {
    conn: RedisConnection,
    rules: Arc<Vec<LimitRule>>,
    premium_permille: u64,
    on_error: OnRedisError,
    clock: Arc<dyn Clock>,
}

impl RedisLimiter {
    /// A limiter with `rules` over `conn`; premium ×2 on every scope but global; fails
    /// closed.
    pub fn new(conn: RedisConnection, rules: impl IntoIterator<Item = LimitRule>) -> Result<Self> {
        let rules: Vec<LimitRule> = rules.into_iter().collect();
        if rules.is_empty() {
            return Err(Error::Config("redis limiter: no rules".into()));
        }
        Ok(RedisLimiter {
            conn,
            rules: Arc::new(rules),
            premium_permille: 2_000,
            on_error: OnRedisError::FailClosed,
            clock: default_clock(),
        })
    }

    /// What to do when Redis cannot be reached (default: fail closed).
    #[must_use]
    pub fn on_error(mut self, policy: OnRedisError) -> Self {
        self.on_error = policy;
        self
    }

    /// The premium multiplier (default 2.0).
    #[must_use]
    pub fn premium_multiplier(mut self, m: f64) -> Self {
        if m.is_finite() && m > 0.0 {
            self.premium_permille = ((m * 1000.0).round() as u64).max(1);
        }
        self
    }

    /// The clock (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn mult(&self, scope: ScopeKind, tier: Tier) -> u128 {
        match (scope, tier) {
            (ScopeKind::Global, _) | (_, Tier::Standard | Tier::Free) => 1_000,
            (_, Tier::Premium) => u128::from(self.premium_permille),
        }
    }

    /// (rule index, key, increment µs, tolerance µs) for every rule `meta` falls under.
    fn items(
        &self,
        meta: &RequestMeta,
        tokens: u64,
        only_tokens: bool,
    ) -> Result<Vec<(usize, String, u128, u128)>> {
        let mut out = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            if only_tokens && r.unit != Unit::Tokens {
                continue;
            }
            let Some(key) = r.scope.key_of(meta) else {
                continue;
            };
            let units = match r.unit {
                Unit::Requests => 1,
                Unit::Tokens => u128::from(tokens),
            };
            if units == 0 {
                continue;
            }
            let period_us = u128::from(duration_nanos(r.quota.period())) / 1_000;
            let amount = u128::from(r.quota.amount().get());
            let mult = self.mult(r.scope, meta.tier);
            let inc = (units * period_us * 1_000).div_ceil(amount * mult);
            let tau = period_us * u128::from(r.quota.burst().get()) / amount;
            if inc > tau && !only_tokens {
                return Err(Error::InvalidRequest(format!(
                    "request needs {units} {} but the {} limit allows at most {} at once",
                    if r.unit == Unit::Tokens {
                        "tokens"
                    } else {
                        "requests"
                    },
                    r.scope,
                    u128::from(r.quota.burst().get()) * mult / 1_000
                )));
            }
            let unit = if r.unit == Unit::Tokens { "t" } else { "r" };
            out.push((
                i,
                self.conn
                    .key(&format!("lim:{i}:{unit}:{}:{key}", r.scope.as_str())),
                inc,
                tau,
            ));
        }
        Ok(out)
    }

    fn now_us(&self) -> u128 {
        u128::from(self.clock.now().as_nanos()) / 1_000
    }
}

#[async_trait]
impl Limiter for RedisLimiter {
    async fn acquire(&self, req: &Admission<'_>) -> Result<()> {
        let items = self.items(req.meta, req.tokens, false)?;
        if items.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = items.iter().map(|i| i.1.clone()).collect();
        let mut args = Vec::with_capacity(1 + items.len() * 2);
        args.push(self.now_us().to_string());
        for (_, _, inc, tau) in &items {
            args.push(inc.to_string());
            args.push(tau.to_string());
        }
        match self
            .conn
            .eval::<(i64, String, i64)>("limiter", &CHECK, &keys, &args)
            .await
        {
            Ok((1, _, _)) => Ok(()),
            Ok((_, wait, idx)) => {
                let wait_us: u64 = wait.parse().unwrap_or(u64::MAX / 1_000);
                let rule = usize::try_from(idx - 1)
                    .ok()
                    .and_then(|i| items.get(i))
                    .map(|i| &self.rules[i.0]);
                Err(Error::RateLimited {
                    scope: rule
                        .and_then(|r| r.scope.scope_of(req.meta))
                        .unwrap_or(Scope::Global),
                    retry_after: Duration::from_micros(wait_us),
                })
            }
            Err(e) => match self.on_error {
                OnRedisError::FailOpen => {
                    tracing::warn!(error = %e, "redis limiter unreachable: admitting unchecked (fail open)");
                    Ok(())
                }
                OnRedisError::FailClosed => Err(e),
            },
        }
    }

    async fn reconcile(&self, meta: &RequestMeta, charged: u64, actual: u64) -> Result<()> {
        if charged == actual {
            return Ok(());
        }
        let items = self.items(meta, charged.abs_diff(actual), true)?;
        if items.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = items.iter().map(|i| i.1.clone()).collect();
        let mut args = vec![self.now_us().to_string()];
        for (_, _, inc, _) in &items {
            args.push(if actual > charged {
                inc.to_string()
            } else {
                format!("-{inc}")
            });
        }
        self.conn
            .eval::<i64>("limiter", &ADJUST, &keys, &args)
            .await
            .map(|_| ())
    }
}
