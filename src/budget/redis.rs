//! Spend caps in Redis, shared by every replica (cargo feature `redis`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;

use super::{AlertHook, Budget, BudgetAlert, BudgetWindow, CapStatus, Reservation, SpendCap};
use crate::clock::{Clock, Timestamp, default_clock};
use crate::redis_conn::{OnRedisError, RedisConnection};
use crate::types::{Cost, RequestMeta};
use crate::{Error, Result};

/// Reserves on every account or none. KEYS: account hashes. ARGV: amount, then per key
/// (limit, ttl ms). Returns {1, spent1, reserved1, ...} or {0, index, spent+reserved}.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local amount = tonumber(ARGV[1])
local out = {1}
for i = 1, #KEYS do
  local s = tonumber(redis.call('HGET', KEYS[i], 's') or '0')
  local r = tonumber(redis.call('HGET', KEYS[i], 'r') or '0')
  local limit = tonumber(ARGV[2 * i])
  if s + r + amount > limit then
    return {0, i, string.format('%.0f', s + r)}
  end
  table.insert(out, string.format('%.0f', s))
  table.insert(out, string.format('%.0f', r))
end
for i = 1, #KEYS do
  redis.call('HINCRBY', KEYS[i], 'r', amount)
  redis.call('PEXPIRE', KEYS[i], ARGV[2 * i + 1])
end
return out
",
    )
});

/// Replaces a reservation with the actual spend and reports thresholds crossed for the
/// first time in the window (once across every replica, by HSETNX).
/// KEYS: account hashes. ARGV: amount, actual, n thresholds, thresholds..., limits...
static COMMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local amount = tonumber(ARGV[1])
local actual = tonumber(ARGV[2])
local nth = tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  local r = redis.call('HINCRBY', KEYS[i], 'r', -amount)
  if r < 0 then redis.call('HSET', KEYS[i], 'r', 0) end
  local s = redis.call('HINCRBY', KEYS[i], 's', actual)
  local limit = tonumber(ARGV[3 + nth + i])
  for j = 1, nth do
    local t = tonumber(ARGV[3 + j])
    if s * 100 >= t * limit and redis.call('HSETNX', KEYS[i], 'a' .. t, 1) == 1 then
      table.insert(out, i)
      table.insert(out, t)
      table.insert(out, s)
    end
  end
end
return out
",
    )
});

/// Spend caps whose accounts live in Redis, so that every replica shares one set of
/// caps: a cap of N across K replicas is N, not K×N.
///
/// Reserve, commit and release are single Lua scripts (all accounts of a request at
/// once). Accounts of a window expire a day after it ends. Alerts fire once per
/// threshold, cap, key and window across all replicas. Amounts are exact up to about
/// 9 million dollars per account (Lua's doubles). Windows: day, month and total;
/// rolling windows are only in [`MemoryBudget`](super::MemoryBudget). When Redis
/// cannot be reached, [`OnRedisError`] decides (default: fail closed).
#[derive(Debug, Clone)]
pub struct RedisBudget {
    conn: RedisConnection,
    caps: Arc<Vec<SpendCap>>,
    thresholds: Arc<Vec<u8>>,
    hook: Option<AlertHook>,
    on_error: OnRedisError,
    clock: Arc<dyn Clock>,
    next_id: Arc<AtomicU64>,
}

impl RedisBudget {
    /// A budget with `caps` over `conn`, alerts at 50, 80 and 100 %, failing closed.
    pub fn new(conn: RedisConnection, caps: impl IntoIterator<Item = SpendCap>) -> Result<Self> {
        let caps: Vec<SpendCap> = caps.into_iter().collect();
        if caps
            .iter()
            .any(|c| matches!(c.window, BudgetWindow::Rolling(_)))
        {
            return Err(Error::Config(
                "redis budget: rolling windows are not supported; use day, month or total".into(),
            ));
        }
        if caps
            .iter()
            .any(|c| c.limit.is_zero() || c.limit.as_nanos() > (1 << 53))
        {
            return Err(Error::Config(
                "redis budget: a cap must be positive and at most $9,007,199".into(),
            ));
        }
        Ok(RedisBudget {
            conn,
            caps: Arc::new(caps),
            thresholds: Arc::new(vec![50, 80, 100]),
            hook: None,
            on_error: OnRedisError::FailClosed,
            clock: default_clock(),
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// What to do when Redis cannot be reached (default: fail closed).
    #[must_use]
    pub fn on_error(mut self, policy: OnRedisError) -> Self {
        self.on_error = policy;
        self
    }

    /// Calls `hook` for every alert (also logged with `tracing`).
    #[must_use]
    pub fn on_alert(mut self, hook: impl Fn(&BudgetAlert) + Send + Sync + 'static) -> Self {
        self.hook = Some(AlertHook::new(hook));
        self
    }

    /// The clock windows are read from (default: [`TscClock`](crate::TscClock), or [`TokioClock`](crate::TokioClock) when built under paused tokio time; see [`clock`](crate::clock)).
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// (cap index, Redis key, ttl ms) of every cap `meta` falls under.
    fn accounts(&self, meta: &RequestMeta, now: Timestamp) -> Vec<(usize, String, u64)> {
        self.caps
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let key = c.scope.key_of(meta)?;
                let window = c.window.index(now);
                let ttl = c
                    .window
                    .until_reset(now)
                    .map_or(400 * 86_400_000, |d| d.as_millis() as u64 + 86_400_000);
                Some((
                    i,
                    self.conn
                        .key(&format!("bud:{i}:{}:{window}:{key}", c.scope.as_str())),
                    ttl,
                ))
            })
            .collect()
    }

    fn status(&self, cap: usize, key: &str, spent: u64, reserved: u64) -> Option<CapStatus> {
        let c = self.caps.get(cap)?;
        // prefix:bud:{cap}:{scope}:{window}:{scope key}; the scope key may hold colons
        let prefix = self.conn.key("bud:");
        let scope_key = key
            .strip_prefix(&prefix)
            .and_then(|rest| rest.splitn(4, ':').nth(3))
            .unwrap_or_default();
        Some(CapStatus {
            scope: c.scope.with_key(scope_key),
            window: c.window,
            limit: c.limit,
            spent: Cost::from_nanos(spent),
            reserved: Cost::from_nanos(reserved),
        })
    }
}

#[async_trait]
impl Budget for RedisBudget {
    async fn reserve(&self, meta: &RequestMeta, amount: Cost) -> Result<Reservation> {
        let now = self.clock.now();
        let accounts = self.accounts(meta, now);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if accounts.is_empty() {
            return Ok(Reservation::new(id, amount, Vec::new()));
        }
        let keys: Vec<String> = accounts.iter().map(|a| a.1.clone()).collect();
        let mut args = vec![amount.as_nanos().to_string()];
        for (cap, _, ttl) in &accounts {
            args.push(self.caps[*cap].limit.as_nanos().to_string());
            args.push(ttl.to_string());
        }
        let reply: Vec<redis::Value> = match self.conn.eval("budget", &RESERVE, &keys, &args).await
        {
            Ok(v) => v,
            Err(e) => {
                return match self.on_error {
                    OnRedisError::FailOpen => {
                        tracing::warn!(error = %e, "redis budget unreachable: spending unchecked (fail open)");
                        Ok(Reservation::new(id, amount, Vec::new()))
                    }
                    OnRedisError::FailClosed => Err(e),
                };
            }
        };
        let num = |v: Option<&redis::Value>| -> u64 {
            match v {
                Some(redis::Value::Int(i)) => u64::try_from(*i).unwrap_or(0),
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                Some(redis::Value::SimpleString(s)) => s.parse().unwrap_or(0),
                _ => 0,
            }
        };
        if num(reply.first()) != 1 {
            let i = (num(reply.get(1)) as usize).saturating_sub(1);
            let (cap, key, _) = accounts.get(i).cloned().unwrap_or((0, String::new(), 0));
            let c = self.caps[cap];
            return Err(Error::BudgetExceeded {
                scope: self
                    .status(cap, &key, 0, 0)
                    .map_or(crate::types::Scope::Global, |s| s.scope),
                limit: c.limit,
                spent: Cost::from_nanos(num(reply.get(2))),
                retry_after: c.window.until_reset(now),
            });
        }
        let mut tightest: Option<CapStatus> = None;
        for (k, (cap, key, _)) in accounts.iter().enumerate() {
            let st = self.status(
                *cap,
                key,
                num(reply.get(1 + 2 * k)),
                num(reply.get(2 + 2 * k)),
            );
            if let Some(st) = st {
                if tightest
                    .as_ref()
                    .is_none_or(|t| st.used_percent() > t.used_percent())
                {
                    tightest = Some(st);
                }
            }
        }
        let names = accounts
            .iter()
            .map(|(cap, key, _)| format!("{cap}|{key}"))
            .collect();
        let r = Reservation::new(id, amount, names);
        Ok(match tightest {
            Some(t) => r.with_tightest(t),
            None => r,
        })
    }

    async fn commit(&self, reservation: Reservation, actual: Cost) -> Result<()> {
        if reservation.accounts.is_empty() {
            return Ok(());
        }
        let parsed: Vec<(usize, String)> = reservation
            .accounts
            .iter()
            .filter_map(|a| {
                let (cap, key) = a.split_once('|')?;
                Some((cap.parse().ok()?, key.to_owned()))
            })
            .collect();
        let keys: Vec<String> = parsed.iter().map(|p| p.1.clone()).collect();
        let mut args = vec![
            reservation.amount.as_nanos().to_string(),
            actual.as_nanos().to_string(),
            self.thresholds.len().to_string(),
        ];
        args.extend(self.thresholds.iter().map(u8::to_string));
        for (cap, _) in &parsed {
            args.push(
                self.caps
                    .get(*cap)
                    .map_or(u64::MAX, |c| c.limit.as_nanos())
                    .to_string(),
            );
        }
        // One retry: a lost commit would leave the reservation held until the window ends.
        let mut result = self
            .conn
            .eval::<Vec<i64>>("budget", &COMMIT, &keys, &args)
            .await;
        if result.is_err() {
            result = self
                .conn
                .eval::<Vec<i64>>("budget", &COMMIT, &keys, &args)
                .await;
        }
        let crossed = result?;
        for chunk in crossed.chunks(3) {
            let [i, t, s] = chunk else { continue };
            let Some((cap, key)) = usize::try_from(i - 1).ok().and_then(|i| parsed.get(i)) else {
                continue;
            };
            let Some(st) = self.status(*cap, key, u64::try_from(*s).unwrap_or(0), 0) else {
                continue;
            };
            let alert = BudgetAlert {
                scope: st.scope,
                window: st.window,
                limit: st.limit,
                spent: st.spent,
                threshold_percent: u8::try_from(*t).unwrap_or(100),
            };
            tracing::warn!(scope = %alert.scope, threshold = alert.threshold_percent, spent = %alert.spent,
                limit = %alert.limit, "spend threshold reached");
            if let Some(h) = &self.hook {
                (h.0)(&alert);
            }
        }
        Ok(())
    }

    async fn status(&self, meta: &RequestMeta) -> Result<Vec<CapStatus>> {
        let now = self.clock.now();
        let mut out = Vec::new();
        for (cap, key, _) in self.accounts(meta, now) {
            let (s, r): (Option<u64>, Option<u64>) = self
                .conn
                .query("budget", redis::cmd("HMGET").arg(&key).arg("s").arg("r"))
                .await?;
            if let Some(st) = self.status(cap, &key, s.unwrap_or(0), r.unwrap_or(0)) {
                out.push(st);
            }
        }
        Ok(out)
    }
}
