//! A cache shared by every replica through Redis (cargo feature `redis`).

use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    Cache, CacheKey, CacheLookup, CacheQuery, CachedAnswer, Invalidation, SemanticCache,
    is_cacheable,
};
use crate::redis_conn::RedisConnection;
use crate::types::ChatResponse;
use crate::{Error, Result};

/// Stores an entry and indexes it by namespace and tags. KEYS: entry, then index sets.
/// ARGV: body, ttl ms.
static PUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
",
    )
});

/// Deletes every entry of an index set, and the set. KEYS: the set.
static DROP_INDEXED: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local members = redis.call('SMEMBERS', KEYS[1])
local n = 0
for _, k in ipairs(members) do n = n + redis.call('DEL', k) end
redis.call('DEL', KEYS[1])
return n
",
    )
});

/// One cached answer as stored in Redis and sent to the other replicas.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    key: String,
    context_key: String,
    final_user_text: Option<String>,
    /// Absent in entries written before it existed: the context key stands in.
    #[serde(default)]
    base_key: Option<String>,
    /// Absent in older entries: matched with their exact history only.
    #[serde(default)]
    history: Option<Vec<String>>,
    namespace: String,
    partition: String,
    ttl_ms: Option<u64>,
    tags: Vec<String>,
    response: ChatResponse,
}

fn hex_to_key(s: &str) -> Option<CacheKey> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(CacheKey::from_bytes(out))
}

impl Entry {
    fn of(q: &CacheQuery, response: &ChatResponse) -> Self {
        Entry {
            key: q.key.to_string(),
            context_key: q.context_key.to_string(),
            final_user_text: q.final_user_text.clone(),
            base_key: Some(q.base_key.to_string()),
            history: q.history.clone(),
            namespace: q.namespace.clone(),
            partition: q.partition.clone(),
            ttl_ms: q
                .ttl
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            tags: q.tags.clone(),
            response: response.clone(),
        }
    }

    fn query(&self) -> Option<CacheQuery> {
        let context_key = hex_to_key(&self.context_key)?;
        Some(CacheQuery {
            key: hex_to_key(&self.key)?,
            context_key,
            base_key: match &self.base_key {
                Some(b) => hex_to_key(b)?,
                None => context_key,
            },
            history: self.history.clone(),
            final_user_text: self.final_user_text.clone(),
            namespace: self.namespace.clone(),
            partition: self.partition.clone(),
            ttl: self.ttl_ms.map(Duration::from_millis),
            tags: self.tags.clone(),
        })
    }
}

/// An event on the replicas' stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Event {
    Put { origin: String, entry: Box<Entry> },
    Invalidate { origin: String, what: Selector },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
enum Selector {
    Key(String),
    Namespace(String),
    Tag(String),
    All,
}

impl Selector {
    fn of(what: &Invalidation) -> Option<Self> {
        Some(match what {
            Invalidation::Key(k) => Selector::Key(k.to_string()),
            Invalidation::Namespace(n) => Selector::Namespace(n.clone()),
            Invalidation::Tag(t) => Selector::Tag(t.clone()),
            Invalidation::All => Selector::All,
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }

    fn invalidation(&self) -> Option<Invalidation> {
        Some(match self {
            Selector::Key(k) => Invalidation::Key(hex_to_key(k)?),
            Selector::Namespace(n) => Invalidation::Namespace(n.clone()),
            Selector::Tag(t) => Invalidation::Tag(t.clone()),
            Selector::All => Invalidation::All,
        })
    }
}

/// Most events kept on the stream (approximately): a replica that starts replays them
/// to warm its semantic index.
const STREAM_LEN: usize = 10_000;

/// A cache shared by every replica: answers (exact entries with their TTL, and the
/// question, context and metadata of semantic entries) live in Redis, and each replica
/// keeps a local [`SemanticCache`] in step through a Redis stream of inserts and
/// invalidations, so an answer cached by one replica is a hit, exact or semantic, on all.
///
/// - `get`: the local cache (exact, then semantic); on a miss, the exact entry in Redis
///   (written by a replica whose event has not arrived yet, or before this one started).
/// - `put`: local, then Redis (`SET` with the TTL) and an event on the stream.
/// - `invalidate`: local, in Redis (by key, or every entry of a namespace or tag), and an
///   event so the other replicas drop theirs.
/// - A replica starting up replays the stream (the last 10,000 events) to warm its index.
/// - Vectors are computed by each replica's embedder from the stored question: with the
///   same model on every replica they are the same vectors.
/// - Redis errors never fail a request: the cache falls back to the local one (fail
///   open) and logs.
///
/// Build it inside a tokio runtime: [`RedisCache::start`] spawns the stream reader, which
/// stops when the last clone of the cache is dropped.
#[derive(Debug, Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    local: SemanticCache,
    conn: RedisConnection,
    origin: String,
}

impl RedisCache {
    /// A shared cache over `local`, with entries in Redis under `conn`'s prefix; `reader`
    /// is a second connection (to the same server) for the stream, which blocks.
    pub fn start(
        local: SemanticCache,
        conn: RedisConnection,
        reader: RedisConnection,
    ) -> Result<Self> {
        let origin = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let inner = Arc::new(Inner {
            local,
            conn,
            origin,
        });
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("redis cache: start it inside a tokio runtime".into()))?;
        handle.spawn(follow(Arc::downgrade(&inner), reader));
        Ok(RedisCache { inner })
    }

    /// The local cache.
    pub fn local(&self) -> &SemanticCache {
        &self.inner.local
    }

    fn entry_key(&self, key: &str) -> String {
        self.inner.conn.key(&format!("cache:e:{key}"))
    }

    fn index_key(&self, kind: &str, name: &str) -> String {
        self.inner.conn.key(&format!("cache:{kind}:{name}"))
    }

    fn stream_key(conn: &RedisConnection) -> String {
        conn.key("cache:events")
    }

    async fn publish(&self, event: &Event) {
        let Ok(body) = serde_json::to_string(event) else {
            return;
        };
        let conn = &self.inner.conn;
        let cmd = redis::cmd("XADD")
            .arg(Self::stream_key(conn))
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_LEN)
            .arg("*")
            .arg("e")
            .arg(body)
            .clone();
        if let Err(e) = conn.query::<String>("cache", &cmd).await {
            tracing::warn!(error = %e, "redis cache: event not published");
        }
    }
}

/// One stream's events as XREAD returns them: (stream, [(id, [(field, value)])]).
type StreamReply = (String, Vec<(String, Vec<(String, String)>)>);

/// Applies the other replicas' events to the local cache until the cache is dropped.
async fn follow(cache: Weak<Inner>, reader: RedisConnection) {
    let stream = RedisCache::stream_key(&reader);
    let mut last = "0-0".to_owned();
    loop {
        let Some(inner) = cache.upgrade() else { return };
        let cmd = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last)
            .clone();
        let reply: Result<Option<Vec<StreamReply>>> = reader.query("cache", &cmd).await;
        match reply {
            Ok(Some(streams)) => {
                for (_, events) in streams {
                    for (id, fields) in events {
                        last = id;
                        let Some((_, body)) = fields.into_iter().find(|(k, _)| k == "e") else {
                            continue;
                        };
                        match serde_json::from_str::<Event>(&body) {
                            Ok(Event::Put { origin, entry }) if origin != inner.origin => {
                                if let Some(q) = entry.query() {
                                    inner.local.store(&q, &entry.response).await;
                                }
                            }
                            Ok(Event::Invalidate { origin, what }) if origin != inner.origin => {
                                if let Some(w) = what.invalidation() {
                                    inner.local.invalidate_now(&w);
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "redis cache: unreadable event skipped")
                            }
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "redis cache: stream unreachable, retrying");
                drop(inner);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, query: &CacheQuery) -> Result<Option<CachedAnswer>> {
        Ok(self.lookup(query).await?.answer)
    }

    async fn lookup(&self, query: &CacheQuery) -> Result<CacheLookup> {
        let local = self.inner.local.lookup_query(query).await;
        if local.answer.is_some() {
            return Ok(local);
        }
        let cmd = redis::cmd("GET")
            .arg(self.entry_key(&query.key.to_string()))
            .clone();
        match self.inner.conn.query::<Option<String>>("cache", &cmd).await {
            Ok(Some(body)) => match serde_json::from_str::<Entry>(&body) {
                Ok(entry) => {
                    self.inner.local.store(query, &entry.response).await;
                    Ok(CacheLookup {
                        answer: Some(CachedAnswer::exact(entry.response)),
                        rejected: local.rejected,
                    })
                }
                Err(e) => {
                    tracing::warn!(error = %e, "redis cache: unreadable entry ignored");
                    Ok(local)
                }
            },
            Ok(None) => Ok(local),
            Err(e) => {
                tracing::warn!(error = %e, "redis cache unreachable: local cache only (fail open)");
                Ok(local)
            }
        }
    }

    async fn put(&self, query: &CacheQuery, response: &ChatResponse) -> Result<()> {
        if !is_cacheable(response) {
            return Ok(());
        }
        self.inner.local.store(query, response).await;
        let entry = Entry::of(query, response);
        let ttl = self.inner.local.exact().ttl_of(query);
        if let Ok(body) = serde_json::to_string(&entry) {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut keys = vec![
                self.entry_key(&entry.key),
                self.index_key("ns", &entry.namespace),
            ];
            keys.extend(entry.tags.iter().map(|t| self.index_key("tag", t)));
            if let Err(e) = self
                .inner
                .conn
                .eval::<i64>("cache", &PUT, &keys, &[body, ms.to_string()])
                .await
            {
                tracing::warn!(error = %e, "redis cache unreachable: stored locally only (fail open)");
                return Ok(());
            }
        }
        self.publish(&Event::Put {
            origin: self.inner.origin.clone(),
            entry: Box::new(entry),
        })
        .await;
        Ok(())
    }

    async fn invalidate(&self, what: &Invalidation) -> Result<u64> {
        let n = self.inner.local.invalidate_now(what);
        let conn = &self.inner.conn;
        let removed = match what {
            Invalidation::Key(k) => {
                conn.query::<u64>(
                    "cache",
                    redis::cmd("DEL").arg(self.entry_key(&k.to_string())),
                )
                .await
            }
            Invalidation::Namespace(ns) => {
                conn.eval::<u64>("cache", &DROP_INDEXED, &[self.index_key("ns", ns)], &[])
                    .await
            }
            Invalidation::Tag(t) => {
                conn.eval::<u64>("cache", &DROP_INDEXED, &[self.index_key("tag", t)], &[])
                    .await
            }
            _ => conn.clear_matching("cache:*").await,
        };
        if let Err(e) = removed {
            tracing::warn!(error = %e, "redis cache unreachable: invalidated locally only");
        }
        if let Some(sel) = Selector::of(what) {
            self.publish(&Event::Invalidate {
                origin: self.inner.origin.clone(),
                what: sel,
            })
            .await;
        }
        Ok(n)
    }
}
