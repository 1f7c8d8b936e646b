//! The canonical cache key.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::CacheScope;
use super::canon;
use crate::types::{CacheMode, ChatRequest, Document, GenerationParams, Message, Role};

/// A 256-bit BLAKE3 digest of a request's canonical form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// From digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CacheKey(bytes)
    }
}

/// Hashes a [`CacheKey`] for a hash map by eight of its bytes (the second eight: the
/// first pick an exact cache's shard): a digest is already uniform, so hashing it again
/// is wasted work on every lookup.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // A digest arrives as one write of its 32 bytes (after its length).
        let bytes = bytes.get(8..).filter(|b| b.len() >= 8).unwrap_or(bytes);
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(8) ^ u64::from_le_bytes(word);
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = self.0.rotate_left(8) ^ n as u64;
    }
}

/// Builds [`KeyHasher`]s: for maps keyed by [`CacheKey`] only.
pub(crate) type BuildKeyHasher = std::hash::BuildHasherDefault<KeyHasher>;

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

/// Everything that changes an answer but the final user turn, in a fixed order. Field
/// order and names are part of the key format: changing them changes every key (bump
/// `v`). The names are one letter each (distinct, which is all a field name must be
/// for the canonical form to stay unambiguous), so fewer bytes are hashed. Keys are
/// digests of this view in its canonical form (see `canon`), written as [`SharedView`]
/// then the messages; the tests check the two give the same bytes.
#[cfg(test)]
#[derive(Serialize, Clone, Copy)]
struct ContextView<'a, M> {
    v: u8,
    #[serde(rename = "p")]
    partition: &'a str,
    #[serde(rename = "n")]
    namespace: &'a str,
    #[serde(rename = "m")]
    model: &'a str,
    /// The capability tier a routed request is keyed for (see `CacheQuery::keyed`).
    #[serde(rename = "t", skip_serializing_if = "Option::is_none")]
    tier: Option<u8>,
    #[serde(rename = "g")]
    params: &'a GenerationParams,
    #[serde(rename = "d")]
    documents: &'a [Document],
    #[serde(rename = "x")]
    messages: M,
}

/// The fields of [`ContextView`] before its messages, in its order.
#[derive(Serialize)]
struct SharedView<'a> {
    v: u8,
    #[serde(rename = "p")]
    partition: &'a str,
    #[serde(rename = "n")]
    namespace: &'a str,
    #[serde(rename = "m")]
    model: &'a str,
    /// The capability tier a routed request is keyed for (see `CacheQuery::keyed`).
    #[serde(rename = "t", skip_serializing_if = "Option::is_none")]
    tier: Option<u8>,
    #[serde(rename = "g")]
    params: &'a GenerationParams,
    #[serde(rename = "d")]
    documents: &'a [Document],
}

/// The model a request that names none is keyed with.
pub(crate) const AUTO: &str = "auto";

/// The key format's version: the `v` of [`SharedView`].
const VERSION: u8 = 4;

/// The system messages of a conversation, serialized as the sequence of them (the
/// same bytes as a slice of just those messages), without copying them.
#[derive(Clone, Copy)]
struct SystemOnly<'a>(&'a [Message]);

impl Serialize for SystemOnly<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().filter(|m| m.role == Role::System))
    }
}

/// Writes `value` in its canonical form and hashes the bytes in one update, after
/// `prefix` and before `suffix`.
#[cfg(test)]
fn digest(
    buf: &mut Vec<u8>,
    prefix: &[u8],
    value: &impl Serialize,
    suffix: &[u8],
) -> Result<CacheKey, canon::Unserializable> {
    buf.clear();
    buf.extend_from_slice(prefix);
    canon::write(buf, value)?;
    buf.extend_from_slice(suffix);
    Ok(CacheKey(*blake3::hash(buf).as_bytes()))
}

thread_local! {
    /// A buffer for canonical forms, reused by the requests of a thread.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers kept between requests hold at most this many bytes.
const KEEP_BUF: usize = 64 * 1024;

/// Runs `f` with this thread's buffer emptied (or a new buffer, when the thread's is
/// in use or the thread is ending).
fn with_buf<T>(f: impl FnOnce(&mut Vec<u8>) -> Option<T>) -> Option<T> {
    let mut f = Some(f);
    let reused = BUF.try_with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        let f = f.take()?;
        buf.clear();
        let out = f(&mut buf);
        if buf.capacity() > KEEP_BUF {
            *buf = Vec::new();
        }
        Some(out)
    });
    if let Ok(Some(out)) = reused {
        return out;
    }
    // the thread's buffer was in use or gone: `f` has not run
    f.and_then(|f| f(&mut Vec::with_capacity(512)))
}

/// One request's view of the cache: its keys, partition, namespace, TTL and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheQuery {
    /// The exact key: everything that changes the answer.
    pub key: CacheKey,
    /// The same minus the final user turn: entries with equal context keys differ only
    /// in that turn, so a semantic match may compare just it.
    pub context_key: CacheKey,
    /// The final user turn, if the conversation ends with one.
    pub final_user_text: Option<String>,
    /// The same as [`context_key`](Self::context_key) without the conversation's turns:
    /// partition, namespace, model, parameters, documents and system messages only.
    /// Entries with equal base keys may differ in their history, which a semantic cache
    /// then compares by meaning (see [`history`](Self::history)).
    pub base_key: CacheKey,
    /// The texts of the user turns before the final one, oldest first (at most
    /// [`MAX_HISTORY_TURNS`], each cut to [`MAX_HISTORY_BYTES`]), or `None` when the
    /// history holds a tool call, a tool result or an assistant turn that names a
    /// number, date or name: such a conversation is only ever matched with its exact
    /// history.
    pub history: Option<Vec<String>>,
    /// The namespace.
    pub namespace: String,
    /// The tenant partition (`""`, `org:<id>` or `user:<id>`); entries never cross it.
    pub partition: String,
    /// Time to live for an answer stored under this query, if the request set one.
    pub ttl: Option<Duration>,
    /// Tags for invalidation.
    pub tags: Vec<String>,
}

impl CacheQuery {
    /// The query for `request` under tenant `scope`, or `None` when the request may not
    /// use the cache: its mode is `bypass`, or the scope is per user and the request
    /// names no user (anonymous requests are never cached under a per-user scope).
    /// Under the per-org scope, requests without an org share one partition of their own.
    pub fn for_request(request: &ChatRequest, scope: CacheScope) -> Option<CacheQuery> {
        Self::for_model(request, scope, request.model.as_deref().unwrap_or(AUTO))
    }

    /// As [`for_request`](Self::for_request), keyed by `model` instead of the model the
    /// request names: the pipeline keys a request whose model a router chose by the
    /// chosen model, so an answer from a cheaper model is never served to a request
    /// routed to a better one.
    pub fn for_model(request: &ChatRequest, scope: CacheScope, model: &str) -> Option<CacheQuery> {
        Self::keyed(request, scope, model, None, true)
    }

    /// As [`for_model`](Self::for_model). With a `tier`, every key also covers that
    /// capability tier: the pipeline keys a routed request (model `auto`) by the tier
    /// of the model that is to answer it, or that answered it, in the same one digest
    /// per key. Without `with_context` (for a cache that reads the exact key alone, see
    /// [`Cache::reads_context`](super::Cache::reads_context)), the context and base
    /// keys equal the exact key and there is no final user text or history. The exact
    /// key is the same either way.
    pub(crate) fn keyed(
        request: &ChatRequest,
        scope: CacheScope,
        model: &str,
        tier: Option<u8>,
        with_context: bool,
    ) -> Option<CacheQuery> {
        let meta = &request.meta;
        if meta.cache.mode == CacheMode::Bypass {
            return None;
        }
        // `org:<id>` or `user:<id>`, without the formatting machinery
        let prefixed = |prefix: &str, id: &str| {
            let mut s = String::with_capacity(prefix.len() + id.len());
            s.push_str(prefix);
            s.push_str(id);
            s
        };
        let partition = match scope {
            CacheScope::Global => String::new(),
            CacheScope::Org => match meta.org.as_deref() {
                Some(org) => prefixed("org:", org),
                None => "no-org".to_owned(),
            },
            CacheScope::User => prefixed("user:", meta.user.as_deref()?),
        };
        let namespace = meta.cache.namespace();
        let (context, last) = match request.messages.split_last() {
            Some((last, rest)) if last.role == Role::User => (rest, Some(last)),
            _ => (&request.messages[..], None),
        };
        // One serialization of the request. The context key digests everything but
        // the final user turn (`P`, then `C`); the exact key digests the same bytes
        // followed by that turn (`P`, `L`, the turn or a unit, `E`), so it covers
        // everything and is one digest on its own. `P` is a self-delimiting canonical
        // value and each input ends in its own tag (`C`, `E`, `B`), so no two inputs
        // are the same bytes. The context and base views differ only in their
        // messages, the last field: the fields before it are serialized once, and each
        // view's messages after them (the same bytes as serializing each whole view).
        // A request whose canonical form cannot be written (no plain data fails) is
        // not cached.
        let shared = SharedView {
            v: VERSION,
            partition: &partition,
            namespace,
            model,
            tier,
            params: &request.params,
            documents: &request.documents,
        };
        let (key, context_key, base_key) = with_buf(|buf| {
            canon::write(buf, &shared).ok()?;
            if buf.last() == Some(&canon::STRUCT_END) {
                buf.pop();
            }
            canon::write_field_name(buf, "x"); // `messages`, as ContextView names it
            let fields = buf.len();
            canon::write(buf, &context).ok()?;
            buf.push(canon::STRUCT_END);
            let context_end = buf.len();
            buf.push(b'L');
            match last {
                Some(m) => canon::write(buf, m).ok()?,
                None => canon::write(buf, &()).ok()?,
            }
            buf.push(b'E');
            if !with_context {
                let key = CacheKey(*blake3::hash(buf).as_bytes());
                return Some((key, key, key));
            }
            // `P` hashed once for both keys: an incremental digest equals the one-shot
            // digest of the same bytes.
            let mut h = blake3::Hasher::new();
            h.update(&buf[..context_end]);
            let mut c = h.clone();
            c.update(b"C");
            let context_key = CacheKey(*c.finalize().as_bytes());
            h.update(&buf[context_end..]);
            let key = CacheKey(*h.finalize().as_bytes());
            buf.truncate(fields);
            canon::write(buf, &SystemOnly(context)).ok()?;
            buf.extend_from_slice(&[canon::STRUCT_END, b'B']);
            let base_key = CacheKey(*blake3::hash(buf).as_bytes());
            Some((key, context_key, base_key))
        })?;
        // A cache that reads the exact key alone gets no history or final turn.
        let (history, final_user_text) = if with_context {
            (history_of(context), last.map(|m| m.content.clone()))
        } else {
            (None, None)
        };
        Some(CacheQuery {
            key,
            context_key,
            final_user_text,
            base_key,
            history,
            namespace: namespace.to_owned(),
            partition,
            ttl: meta.cache.ttl,
            tags: meta.cache.tags.clone(),
        })
    }
}

/// The texts of the user turns in `context` (the most recent [`MAX_HISTORY_TURNS`],
/// each cut to [`MAX_HISTORY_BYTES`]), or `None` when the history is part of the
/// question: tool traffic, or an assistant turn that names a detail ("Order 1182: two
/// blue mugs"), which is only ever matched strictly.
fn history_of(context: &[Message]) -> Option<Vec<String>> {
    let strict = context.iter().any(|m| {
        m.role == Role::Tool
            || !m.tool_calls.is_empty()
            || m.tool_call_id.is_some()
            || (m.role == Role::Assistant && super::guards::has_details(&m.content))
    });
    if strict {
        return None;
    }
    let users: Vec<&Message> = context.iter().filter(|m| m.role == Role::User).collect();
    Some(
        users[users.len().saturating_sub(MAX_HISTORY_TURNS)..]
            .iter()
            .map(|m| cut(&m.content, MAX_HISTORY_BYTES).to_owned())
            .collect(),
    )
}

impl CacheQuery {
    /// The same query narrowed to answers produced by `answered_by`: a model name, or a
    /// tier when a router chooses among models by tier. Both keys are re-derived from
    /// the old ones and the name, so answers of different models (or tiers) never meet,
    /// not even semantically, while the same name always gives the same keys.
    ///
    /// A request that names no model is keyed with the model `auto`; when a router then
    /// picks the model by the caller (a free user's small model, a premium user's large
    /// one), narrow the query by what the router picks, so that one caller's answer is
    /// never served to a caller the router would have sent elsewhere.
    ///
    /// ```
    /// use tokenwise::ChatRequest;
    /// use tokenwise::cache::{CacheQuery, CacheScope};
    ///
    /// let q = CacheQuery::for_request(&ChatRequest::user_text("Hi"), CacheScope::Global).unwrap();
    /// let small = q.clone().answered_by("tier:free");
    /// let large = q.clone().answered_by("tier:premium");
    /// assert_ne!(small.key, large.key);
    /// assert_ne!(small.context_key, large.context_key);
    /// assert_ne!(small.base_key, large.base_key);
    /// assert_eq!(small, q.answered_by("tier:free"));
    /// ```
    #[must_use]
    pub fn answered_by(mut self, answered_by: &str) -> CacheQuery {
        const PREFIX: &[u8] = b"answered_by\x00";
        let name = answered_by.as_bytes();
        // The digest of `PREFIX, tag, key, name length, name`: hashed from one stack
        // buffer when it fits (one call, no incremental hasher), else incrementally;
        // both give the same digest of the same bytes.
        let narrow = |k: &CacheKey, tag: &[u8]| {
            let mut buf = [0u8; 128];
            let n = PREFIX.len() + tag.len() + 32 + 8 + name.len();
            if n <= buf.len() {
                let mut at = 0;
                for part in [
                    PREFIX,
                    tag,
                    k.as_bytes(),
                    &(name.len() as u64).to_le_bytes(),
                    name,
                ] {
                    buf[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
                return CacheKey(*blake3::hash(&buf[..n]).as_bytes());
            }
            let mut h = blake3::Hasher::new();
            h.update(PREFIX);
            h.update(tag);
            h.update(k.as_bytes());
            h.update(&(name.len() as u64).to_le_bytes());
            h.update(name);
            CacheKey(*h.finalize().as_bytes())
        };
        self.key = narrow(&self.key, b"E");
        self.context_key = narrow(&self.context_key, b"C");
        self.base_key = narrow(&self.base_key, b"B");
        self
    }
}

/// The most earlier user turns a [`CacheQuery`] keeps in its
/// [`history`](CacheQuery::history) (the most recent ones).
pub const MAX_HISTORY_TURNS: usize = 16;

/// The most bytes of one turn a [`CacheQuery`] keeps in its history.
pub const MAX_HISTORY_BYTES: usize = 4_000;

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    fn q(r: &ChatRequest) -> CacheQuery {
        CacheQuery::for_request(r, CacheScope::Global).unwrap()
    }

    #[test]
    fn key_covers_everything_that_changes_the_answer() {
        let base = ChatRequest::new()
            .model("gpt-4o-mini")
            .message(Message::system("be brief"))
            .message(Message::user("hi"));
        let k = q(&base).key;
        assert_eq!(k, q(&base.clone()).key);
        // metadata that does not change the answer does not change the key
        assert_eq!(k, q(&base.clone().user("bob").ip("1.2.3.4")).key);
        for changed in [
            base.clone().model("gpt-4o"),
            base.clone().temperature(0.5),
            base.clone().max_tokens(10),
            base.clone()
                .document(crate::types::Document::new("doc", 0.9)),
            base.clone().cache_namespace("other"),
            ChatRequest::new()
                .model("gpt-4o-mini")
                .message(Message::system("be long"))
                .message(Message::user("hi")),
            base.clone()
                .message(Message::assistant("hello"))
                .message(Message::user("hi")),
        ] {
            assert_ne!(k, q(&changed).key, "{changed:?}");
        }
    }

    #[test]
    fn context_key_ignores_only_the_final_user_turn() {
        let a = ChatRequest::new()
            .message(Message::user("first"))
            .message(Message::assistant("ok"))
            .message(Message::user("cancel it"));
        let b = ChatRequest::new()
            .message(Message::user("first"))
            .message(Message::assistant("ok"))
            .message(Message::user("cancel that"));
        let c = ChatRequest::new()
            .message(Message::user("second"))
            .message(Message::assistant("ok"))
            .message(Message::user("cancel it"));
        assert_eq!(q(&a).context_key, q(&b).context_key);
        assert_ne!(q(&a).key, q(&b).key);
        assert_ne!(q(&a).context_key, q(&c).context_key);
        assert_eq!(q(&a).final_user_text.as_deref(), Some("cancel it"));
    }

    #[test]
    fn narrowing_digests_the_same_bytes_however_long_the_name() {
        let q = q(&ChatRequest::user_text("hi"));
        for name in ["tier:3".to_owned(), "m".repeat(300)] {
            let expect = |k: &CacheKey, tag: &[u8]| {
                let mut h = blake3::Hasher::new();
                h.update(b"answered_by\x00");
                h.update(tag);
                h.update(k.as_bytes());
                h.update(&(name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
                CacheKey(*h.finalize().as_bytes())
            };
            let n = q.clone().answered_by(&name);
            assert_eq!(n.key, expect(&q.key, b"E"));
            assert_eq!(n.context_key, expect(&q.context_key, b"C"));
            assert_eq!(n.base_key, expect(&q.base_key, b"B"));
        }
    }

    #[test]
    fn the_base_key_digests_the_system_messages_as_an_array() {
        let r = ChatRequest::new()
            .message(Message::system("be brief"))
            .message(Message::user("first"))
            .message(Message::system("and kind"))
            .message(Message::assistant("ok"))
            .message(Message::user("second"));
        let system: Vec<Message> = r.messages[..4]
            .iter()
            .filter(|m| m.role == Role::System)
            .cloned()
            .collect();
        let view = ContextView {
            v: VERSION,
            partition: "",
            namespace: "default",
            model: "auto",
            tier: None,
            params: &r.params,
            documents: &r.documents,
            messages: &system[..],
        };
        let mut buf = Vec::new();
        assert_eq!(q(&r).base_key, digest(&mut buf, b"", &view, b"B").unwrap());
        let context = ContextView {
            messages: &r.messages[..4],
            ..view
        };
        assert_eq!(
            q(&r).context_key,
            digest(&mut buf, b"", &context, b"C").unwrap()
        );
        // the exact key: the context view, `L`, the final user turn, `E`
        let mut turn = Vec::new();
        canon::write(&mut turn, &r.messages[4]).unwrap();
        let mut suffix = vec![b'L'];
        suffix.extend_from_slice(&turn);
        suffix.push(b'E');
        assert_eq!(q(&r).key, digest(&mut buf, b"", &context, &suffix).unwrap());
        // a conversation that does not end with a user turn: a unit in its place
        let r = ChatRequest::new().message(Message::assistant("no user turn last"));
        let context = ContextView {
            messages: &r.messages[..],
            ..view
        };
        let mut unit = vec![b'L'];
        canon::write(&mut unit, &()).unwrap();
        unit.push(b'E');
        assert_eq!(q(&r).key, digest(&mut buf, b"", &context, &unit).unwrap());
    }

    #[test]
    fn the_exact_key_is_the_same_with_or_without_the_context() {
        for r in [
            ChatRequest::user_text("hi"),
            ChatRequest::new()
                .message(Message::system("be brief"))
                .message(Message::user("first"))
                .message(Message::assistant("ok"))
                .message(Message::user("second"))
                .temperature(0.2),
            ChatRequest::new().message(Message::assistant("no user turn last")),
        ] {
            for tier in [None, Some(1)] {
                let full = CacheQuery::keyed(&r, CacheScope::Global, "m", tier, true).unwrap();
                let lean = CacheQuery::keyed(&r, CacheScope::Global, "m", tier, false).unwrap();
                assert_eq!(full.key, lean.key);
                assert_eq!((lean.context_key, lean.base_key), (lean.key, lean.key));
                assert!(lean.final_user_text.is_none() && lean.history.is_none());
            }
        }
    }

    #[test]
    fn a_tier_changes_every_key() {
        let r = ChatRequest::new()
            .message(Message::system("be brief"))
            .message(Message::user("first"))
            .message(Message::user("second"));
        let keyed = |tier| CacheQuery::keyed(&r, CacheScope::Global, "auto", tier, true).unwrap();
        let (none, one, two) = (keyed(None), keyed(Some(1)), keyed(Some(2)));
        assert_eq!(none, q(&r));
        for (a, b) in [(&none, &one), (&one, &two), (&none, &two)] {
            assert_ne!(a.key, b.key);
            assert_ne!(a.context_key, b.context_key);
            assert_ne!(a.base_key, b.base_key);
        }
        assert_eq!(one, keyed(Some(1)));
    }

    #[test]
    fn a_nan_temperature_is_not_keyed_as_none() {
        let r = ChatRequest::user_text("hi");
        assert_ne!(q(&r).key, q(&r.clone().temperature(f32::NAN)).key);
        assert_ne!(
            q(&r.clone().temperature(0.0)).key,
            q(&r.temperature(-0.0)).key
        );
    }

    #[test]
    fn scopes_partition_and_bypass() {
        let r = ChatRequest::user_text("hi").org("acme").user("ann");
        let org = CacheQuery::for_request(&r, CacheScope::Org).unwrap();
        let user = CacheQuery::for_request(&r, CacheScope::User).unwrap();
        let other_user = CacheQuery::for_request(&r.clone().user("bob"), CacheScope::User).unwrap();
        assert_ne!(org.key, user.key);
        assert_ne!(user.key, other_user.key);
        assert!(CacheQuery::for_request(&ChatRequest::user_text("hi"), CacheScope::User).is_none());
        assert!(
            CacheQuery::for_request(&r.clone().cache_mode(CacheMode::Bypass), CacheScope::Global)
                .is_none()
        );
    }
}
