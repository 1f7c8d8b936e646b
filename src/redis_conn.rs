//! The shared Redis connection of the Redis backends (cargo feature `redis`).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{Error, Result};

/// What a Redis-backed limiter or budget does when Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnRedisError {
    /// Refuse: requests get a retryable `Error::Backend` (the default for limits and
    /// budgets: an outage of the store never lets spend or traffic through unchecked).
    #[default]
    FailClosed,
    /// Let the request through unchecked, and log it.
    FailOpen,
}

/// A connection to Redis shared by the Redis backends: reconnects by itself, bounds
/// every operation by a timeout, and keeps every key under a prefix. Cheap to clone.
///
/// Creating one does no I/O: the first command connects. So a process starts even while
/// Redis is down, and the backends' failure policies apply until it is back.
#[derive(Clone)]
pub struct RedisConnection {
    manager: ConnectionManager,
    prefix: Arc<str>,
    timeout: Duration,
    url: Arc<str>,
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: show only host and port.
        let shown = self.url.rsplit('@').next().unwrap_or_default();
        f.debug_struct("RedisConnection")
            .field("server", &shown)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisConnection {
    /// A lazy connection to `url` (`redis://host:port/db`) with keys under `prefix`;
    /// commands time out after 250 ms, connection attempts after 1 s.
    pub fn new(url: &str, prefix: &str) -> Result<Self> {
        Self::with_timeouts(
            url,
            prefix,
            Duration::from_millis(250),
            Duration::from_secs(1),
        )
    }

    /// Like [`new`](Self::new), with the command and connection timeouts.
    pub fn with_timeouts(
        url: &str,
        prefix: &str,
        command: Duration,
        connect: Duration,
    ) -> Result<Self> {
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(Error::Config(
                "redis: the key prefix must be non-empty, without spaces".into(),
            ));
        }
        let client = redis::Client::open(url).map_err(|e| Error::Config(format!("redis: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(command))
            .set_connection_timeout(Some(connect))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::Config(format!("redis: {e}")))?;
        Ok(RedisConnection {
            manager,
            prefix: prefix.into(),
            timeout: command,
            url: url.into(),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `prefix:rest`.
    pub(crate) fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// Runs `script` with `keys` and `args`, within the command timeout.
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        component: &'static str,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.manager.clone();
        match tokio::time::timeout(self.timeout * 2, inv.invoke_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::backend(component, e)),
            Err(_) => Err(Error::backend(
                component,
                format!("redis did not answer within {:?}", self.timeout * 2),
            )),
        }
    }

    /// Runs one command within the command timeout.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        component: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T> {
        let mut conn = self.manager.clone();
        match tokio::time::timeout(self.timeout * 2, cmd.query_async(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::backend(component, e)),
            Err(_) => Err(Error::backend(
                component,
                format!("redis did not answer within {:?}", self.timeout * 2),
            )),
        }
    }

    /// Deletes every key under the prefix (for tests and resets); returns how many.
    pub async fn clear(&self) -> Result<u64> {
        self.clear_matching("*").await
    }

    /// Deletes every key under the prefix matching `pattern` (a Redis glob after the
    /// prefix); returns how many.
    pub async fn clear_matching(&self, pattern: &str) -> Result<u64> {
        let mut cursor: u64 = 0;
        let mut deleted = 0u64;
        let pattern = format!("{}:{pattern}", self.prefix);
        for _ in 0..100_000 {
            let (next, keys): (u64, Vec<String>) = self
                .query(
                    "redis",
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500),
                )
                .await?;
            if !keys.is_empty() {
                deleted += self
                    .query::<u64>("redis", redis::cmd("DEL").arg(&keys))
                    .await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(deleted)
    }
}
