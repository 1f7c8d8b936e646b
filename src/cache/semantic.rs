//! The semantic cache: exact matches first, then paraphrases of the final user turn
//! among entries with the same context, behind guards.

use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::embed::{CachedEmbedder, Embedder, HashingEmbedder};
use super::guards::{GuardKind, GuardRejection, Guards, is_chatter, strip_lead_chatter};
use super::index::{IndexConfig, VectorIndex};
use super::judge::{PairFeatures, PairJudge, WordVectors, pair_features, words_for};
use super::{
    Cache, CacheKey, CacheLookup, CacheQuery, CachedAnswer, ExactCache, ExactCacheBuilder,
    Invalidation, is_cacheable,
};
use crate::clock::Clock;
use crate::types::ChatResponse;
use crate::{Error, Result};

/// The default similarity a semantic match needs.
pub const DEFAULT_THRESHOLD: f32 = 0.95;

/// Something that happened in a [`SemanticCache`], for a hook that feeds metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum CacheEvent<'a> {
    /// An answer was served: `semantic` is false for an exact match.
    Hit {
        /// 1.0 for an exact match.
        similarity: f32,
        /// Whether it was a semantic match.
        semantic: bool,
    },
    /// Nothing was served.
    Miss,
    /// A candidate above the threshold was refused by a guard.
    Rejected(&'a GuardRejection),
    /// An answer was stored.
    Stored,
}

/// A function called on every [`CacheEvent`] (keep it cheap: it runs inline).
pub type CacheHook = Arc<dyn Fn(&CacheEvent<'_>) + Send + Sync>;

/// Counters of a [`SemanticCache`] since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Answers served by an exact match.
    pub exact_hits: u64,
    /// Answers served by a semantic match.
    pub semantic_hits: u64,
    /// Lookups that served nothing.
    pub misses: u64,
    /// Candidates refused by the numbers guard.
    pub rejected_numbers: u64,
    /// Candidates refused by the entities guard.
    pub rejected_entities: u64,
    /// Candidates refused by the negation guard.
    pub rejected_negation: u64,
    /// Candidates refused by the scope guard.
    pub rejected_scope: u64,
    /// Candidates refused by the terms guard.
    pub rejected_terms: u64,
    /// Answers stored.
    pub stored: u64,
    /// Embeddings that failed (the lookup or store went on without a vector).
    pub embed_failures: u64,
}

impl CacheStats {
    /// Candidates refused by `guard`.
    pub fn rejected(&self, guard: GuardKind) -> u64 {
        match guard {
            GuardKind::Numbers => self.rejected_numbers,
            GuardKind::Entities => self.rejected_entities,
            GuardKind::Negation => self.rejected_negation,
            GuardKind::Scope => self.rejected_scope,
            GuardKind::Terms => self.rejected_terms,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    exact_hits: AtomicU64,
    semantic_hits: AtomicU64,
    misses: AtomicU64,
    rejected: [AtomicU64; 5],
    stored: AtomicU64,
    embed_failures: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// How a [`SemanticCache`] matches a follow-up question within a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ConversationMatching {
    /// A follow-up is compared with stored ones on what it depends on,
    /// the most recent user turn of substance before it (small talk such as "ok
    /// thanks" is skipped, and so are earlier topics). Both that turn and the
    /// follow-up must pass the [guards](Guards), and the two together must be as
    /// similar as the threshold asks. So a reworded history, an unrelated earlier topic
    /// or extra chatter still hits, while another entity, number or intent in the
    /// context misses. Assistant turns are not compared, so a history in which one
    /// names a number, date or name ("Order 1182: two blue mugs"), or that holds a tool
    /// call or result, is always matched strictly.
    ///
    /// Opt in: on the repository's held-out test split, all-MiniLM-L6-v2 with its
    /// [pair judge](super::PairJudge) serves 38 % of the same-context follow-ups and
    /// none whose context differs, but the lexical guards alone (no judge) let 9 % of
    /// context swaps through (see `docs/caching.md`), so it is not the default.
    Condensed,
    /// The default: only follow-ups with exactly the same history (every turn,
    /// assistant ones included) are compared. A follow-up whose context differs in
    /// any way is never served.
    #[default]
    Strict,
}

/// A stored request and an asked one as a [`SemanticCache`]'s judge sees them (see
/// [`SemanticCache::judge_pair`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct JudgedPair {
    /// The similarity the recall stage compares with the threshold.
    pub similarity: f32,
    /// The features of the two final questions.
    pub question: PairFeatures,
    /// The features of the two turns of context, for follow-ups.
    pub context: Option<PairFeatures>,
}

/// Builds a [`SemanticCache`].
#[must_use]
pub struct SemanticCacheBuilder {
    exact: ExactCacheBuilder,
    max_entries: usize,
    embedder: Option<Arc<dyn Embedder>>,
    embedding_cache: usize,
    /// `None`: the embedder's calibrated threshold, else the default.
    threshold: Option<f32>,
    namespace_threshold: HashMap<String, f32>,
    guards: Guards,
    index: IndexConfig,
    candidates: usize,
    hook: Option<CacheHook>,
    conversations: ConversationMatching,
    /// `None`: the embedder's calibrated judge; `Some(None)`: no judge.
    judge: Option<Option<PairJudge>>,
}

impl fmt::Debug for SemanticCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemanticCacheBuilder")
            .field("max_entries", &self.max_entries)
            .field("embedder", &self.embedder)
            .field("threshold", &self.threshold)
            .field("namespace_threshold", &self.namespace_threshold)
            .field("guards", &self.guards)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl SemanticCacheBuilder {
    /// The embedder (default: a 384-dimension [`HashingEmbedder`], which catches
    /// rewording but not synonyms). It is wrapped in a [`CachedEmbedder`].
    pub fn embedder(mut self, embedder: Arc<dyn Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// Recent embeddings remembered (default 10,000).
    pub fn embedding_cache(mut self, n: usize) -> Self {
        self.embedding_cache = n;
        self
    }

    /// The similarity a semantic match needs, in (0, 1]. Default: the embedder's
    /// [calibrated threshold](Embedder::calibrated_threshold) if it has one, else
    /// [`DEFAULT_THRESHOLD`] (0.95).
    pub fn threshold(mut self, t: f32) -> Self {
        self.threshold = Some(t);
        self
    }

    /// The similarity a semantic match needs in `namespace`.
    pub fn namespace_threshold(mut self, namespace: impl Into<String>, t: f32) -> Self {
        self.namespace_threshold.insert(namespace.into(), t);
        self
    }

    /// Only exact matches in `namespace`: nothing there is embedded or matched.
    pub fn exact_only(mut self, namespace: impl Into<String>) -> Self {
        self.namespace_threshold
            .insert(namespace.into(), f32::INFINITY);
        self
    }

    /// The precision stage: a [`PairJudge`] decides whether a recalled candidate asks
    /// the same thing, in place of the negation, scope and terms guards (the numbers
    /// and entities guards still refuse on their own). Default: the embedder's
    /// [calibrated judge](Embedder::calibrated_judge), if it has one; candidates are
    /// then recalled from the judge's threshold unless
    /// [`threshold`](Self::threshold) says otherwise.
    pub fn judge(mut self, judge: PairJudge) -> Self {
        self.judge = Some(Some(judge));
        self
    }

    /// No judge, even if the embedder has one: the threshold and every guard decide.
    pub fn no_judge(mut self) -> Self {
        self.judge = Some(None);
        self
    }

    /// The guards (default: all of them).
    pub fn guards(mut self, guards: Guards) -> Self {
        self.guards = guards;
        self
    }

    /// The vector index settings of each context partition.
    pub fn index(mut self, config: IndexConfig) -> Self {
        self.index = config;
        self
    }

    /// Candidates above the threshold examined per lookup before giving up (default 4):
    /// when the best is refused by a guard, the next may still be served.
    pub fn candidates(mut self, k: usize) -> Self {
        self.candidates = k;
        self
    }

    /// Answers kept (default 10,000); the least recently used is evicted first. The
    /// semantic index holds at most twice this many vectors before it drops those whose
    /// answers are gone.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n;
        self.exact = self.exact.max_entries(n);
        self
    }

    /// The default time to live (default one hour).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.exact = self.exact.ttl(ttl);
        self
    }

    /// The time to live of entries in `namespace`.
    pub fn namespace_ttl(mut self, namespace: impl Into<String>, ttl: Duration) -> Self {
        self.exact = self.exact.namespace_ttl(namespace, ttl);
        self
    }

    /// Keeps expired answers this long for stale serving (exact matches only).
    pub fn keep_stale_for(mut self, d: Duration) -> Self {
        self.exact = self.exact.keep_stale_for(d);
        self
    }

    /// The clock TTLs are measured on.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.exact = self.exact.clock(clock);
        self
    }

    /// How follow-ups in a conversation are matched (default
    /// [`ConversationMatching::Strict`]).
    pub fn conversations(mut self, matching: ConversationMatching) -> Self {
        self.conversations = matching;
        self
    }

    /// Called on every hit, miss, guard rejection and store: wire it to metrics.
    pub fn on_event(mut self, hook: CacheHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Builds the cache, or reports the first invalid setting.
    pub fn build(self) -> Result<SemanticCache> {
        let embedder = self
            .embedder
            .unwrap_or_else(|| Arc::new(HashingEmbedder::default()));
        let judge = self.judge.unwrap_or_else(|| embedder.calibrated_judge());
        let threshold = self
            .threshold
            .or_else(|| judge.as_ref().map(PairJudge::recall_threshold))
            .or_else(|| embedder.calibrated_threshold())
            .unwrap_or(DEFAULT_THRESHOLD);
        let valid = |t: f32| (t > 0.0 && t <= 1.0) || t == f32::INFINITY;
        if !valid(threshold) || !self.namespace_threshold.values().all(|t| valid(*t)) {
            return Err(Error::Config(
                "semantic cache: a threshold must be in (0, 1]".into(),
            ));
        }
        if self.candidates == 0 {
            return Err(Error::Config(
                "semantic cache: candidates must be at least 1".into(),
            ));
        }
        let dims = embedder.dimensions();
        let index = self
            .index
            .capacity(self.index.capacity.min(self.max_entries.max(1)));
        VectorIndex::new(dims, index)?; // validates the settings once
        Ok(SemanticCache {
            inner: Arc::new(Shared {
                exact: self.exact.build()?,
                embedder: CachedEmbedder::new(embedder, self.embedding_cache)?,
                dims,
                threshold,
                namespace_threshold: self.namespace_threshold,
                guards: self.guards,
                judge,
                words: WordVectors::default(),
                index,
                candidates: self.candidates,
                conversations: self.conversations,
                max_entries: self.max_entries,
                state: RwLock::new(State::default()),
                counters: Counters::default(),
                hook: self.hook,
                maintaining: AtomicUsize::new(0),
                maintained: Notify::new(),
            }),
        })
    }
}

/// The form of a question that is embedded: lowercased, sentence punctuation dropped
/// (kept between digits: "3.5", "10:30"), whitespace collapsed. Small models weigh a
/// question mark heavily in a short text; the guards still read the text as written.
pub(crate) fn embedding_text(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        let drop = matches!(
            c,
            '?' | '!'
                | '.'
                | ','
                | ';'
                | ':'
                | '"'
                | '('
                | ')'
                | '['
                | ']'
                | '{'
                | '}'
                | '¿'
                | '¡'
                | '…'
                | '“'
                | '”'
        ) && !between_digits;
        if drop || c.is_whitespace() {
            if !out.ends_with(' ') && !out.is_empty() {
                out.push(' ');
            }
        } else {
            out.extend(c.to_lowercase());
        }
    }
    // Courtesies at either end do not change an answer.
    const COURTESY: &[&str] = &[
        "please",
        "thanks",
        "thank you",
        "hi",
        "hello",
        "hey",
        "kindly",
    ];
    let mut t = out.trim();
    loop {
        let before = t.len();
        for c in COURTESY {
            if let Some(rest) = t
                .strip_prefix(c)
                .filter(|r| r.is_empty() || r.starts_with(' '))
            {
                t = rest.trim_start();
            }
            if let Some(rest) = t
                .strip_suffix(c)
                .filter(|r| r.is_empty() || r.ends_with(' '))
            {
                t = rest.trim_end();
            }
        }
        if t.len() == before {
            break;
        }
    }
    if t.is_empty() {
        out.trim().to_owned()
    } else {
        t.to_owned()
    }
}

/// A recalled candidate: index id, similarity, exact key, question, turn of context.
type Found = (u64, f32, CacheKey, Arc<str>, Option<Arc<str>>);

/// What the index knows of one stored question.
#[derive(Debug)]
struct Meta {
    key: CacheKey,
    text: Arc<str>,
    /// The turn of context the question depends on (condensed matching).
    context: Option<Arc<str>>,
    namespace: String,
    tags: Vec<String>,
}

/// Where a question is matched: its group (the exact context in strict matching, the
/// base context in condensed matching) and the turn of context it depends on.
struct Place<'q> {
    group: CacheKey,
    context: Option<&'q str>,
    /// The final question without its opening small talk.
    text: &'q str,
}

/// The text embedded for a question (and the turn it depends on).
fn embedded_form(p: &Place<'_>) -> String {
    match p.context {
        Some(c) => format!("{} . {}", embedding_text(c), embedding_text(p.text)),
        None => embedding_text(p.text),
    }
}

/// The entries of one group (one context, or one base context).
#[derive(Debug)]
struct Group {
    index: VectorIndex,
    entries: HashMap<u64, Meta>,
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<CacheKey, Group>,
    /// Exact key → (context key, index id).
    owner: HashMap<CacheKey, (CacheKey, u64)>,
    next_id: u64,
    /// Index entries over every group.
    indexed: usize,
    /// Contexts changed since maintenance was last looked for.
    touched: Vec<CacheKey>,
}

impl State {
    fn remove(&mut self, ctx: &CacheKey, id: u64) {
        let Some(g) = self.groups.get_mut(ctx) else {
            return;
        };
        if let Some(meta) = g.entries.remove(&id) {
            self.owner.remove(&meta.key);
            self.indexed = self.indexed.saturating_sub(1);
        }
        g.index.remove(id);
        if g.entries.is_empty() {
            self.groups.remove(ctx);
        } else if self.touched.last() != Some(ctx) {
            self.touched.push(*ctx);
        }
    }

    fn remove_where(&mut self, doomed: impl Fn(&Meta) -> bool) {
        let found: Vec<(CacheKey, u64)> = self
            .groups
            .iter()
            .flat_map(|(ctx, g)| {
                g.entries
                    .iter()
                    .filter(|(_, m)| doomed(m))
                    .map(|(id, _)| (*ctx, *id))
            })
            .collect();
        for (ctx, id) in found {
            self.remove(&ctx, id);
        }
    }
}

struct Shared {
    exact: ExactCache,
    embedder: CachedEmbedder,
    dims: usize,
    threshold: f32,
    namespace_threshold: HashMap<String, f32>,
    guards: Guards,
    judge: Option<PairJudge>,
    words: WordVectors,
    index: IndexConfig,
    candidates: usize,
    conversations: ConversationMatching,
    max_entries: usize,
    state: RwLock<State>,
    counters: Counters,
    hook: Option<CacheHook>,
    /// Index maintenance jobs running.
    maintaining: AtomicUsize,
    /// Notified when one ends.
    maintained: Notify,
}

/// An exact cache with semantic matching of the final user turn.
///
/// A lookup tries, in order:
/// 1. the exact key (everything that changes the answer): a hit has similarity 1.0;
/// 2. when the conversation ends with a user turn, the stored questions of the same
///    group, whose final turn (with the turn of context it depends on) is at least
///    [`threshold`](SemanticCacheBuilder::threshold) similar to this one, best first,
///    up to [`candidates`](SemanticCacheBuilder::candidates) of them. The first that
///    every [guard](Guards) accepts, on the questions and on their context turns, is
///    served.
///
/// A group is everything but the conversation's turns (model or route, parameters,
/// system prompt, tools, documents, namespace and tenant partition: the request's
/// [`base_key`](CacheQuery::base_key)); a follow-up is compared on the most recent
/// user turn of substance before it (see [`ConversationMatching`]). In
/// [`ConversationMatching::Strict`] mode the group is the whole history
/// ([`context_key`](CacheQuery::context_key)). So a follow-up such as "cancel it" is
/// never served for another conversation's context,
/// and no answer crosses a tenant partition. A candidate refused by a guard is
/// reported in [`CacheLookup::rejected`] (the pipeline copies it to
/// [`ChatResponse::guard_rejected`]), counted in [`stats`](Self::stats), passed to the
/// [`on_event`](SemanticCacheBuilder::on_event) hook and logged with `tracing` at
/// `info` level (target `tokenwise::cache`).
///
/// Each context has its own [`VectorIndex`] (a flat scan while small, an HNSW graph once
/// large). Its heavy [maintenance](super::Maintenance) (building the graph, linking new
/// questions into it, rebuilding it without removed ones) never runs inside a lookup
/// or a store: it runs on a blocking thread while lookups go on against the previous
/// graph plus an exact scan of what was added since, and is swapped in when done (one
/// job per context at a time; without a tokio runtime it runs inline). Answers live in an [`ExactCache`], which owns TTLs, LRU eviction and
/// invalidation; index entries whose answer is gone are skipped and dropped. The text
/// of a question is embedded at most once per request (a [`CachedEmbedder`] remembers
/// recent vectors), and only when its context has stored questions or it is stored.
///
/// Cheap to clone; clones share entries.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tokenwise::Result<()> {
/// use tokenwise::cache::{Cache, CacheQuery, CacheScope, SemanticCache};
/// use tokenwise::{ChatRequest, ChatResponse, FinishReason, Usage};
///
/// let cache = SemanticCache::builder().threshold(0.8).build()?;
/// let q = |text: &str| CacheQuery::for_request(&ChatRequest::user_text(text), CacheScope::Global).unwrap();
/// let answer = ChatResponse::new("Settings → Security → Reset.", "m", "p", Usage::new(12, 8), FinishReason::Stop);
/// cache.put(&q("How do I reset my password?"), &answer).await?;
///
/// let hit = cache.lookup(&q("how do i reset my password")).await?;
/// assert!(hit.answer.unwrap().similarity > 0.8);
///
/// let refused = cache.lookup(&q("How do I not reset my password?")).await?;
/// assert!(refused.answer.is_none());
/// assert!(refused.rejected.is_some());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SemanticCache {
    inner: Arc<Shared>,
}

impl fmt::Debug for SemanticCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.inner;
        f.debug_struct("SemanticCache")
            .field("entries", &s.exact.len())
            .field("embedder", &s.embedder.inner())
            .field("threshold", &s.threshold)
            .field("guards", &s.guards)
            .finish_non_exhaustive()
    }
}

impl SemanticCache {
    /// A builder with the defaults: 10,000 entries, one hour TTL, threshold 0.95, every
    /// guard, the hashing embedder.
    pub fn builder() -> SemanticCacheBuilder {
        SemanticCacheBuilder {
            exact: ExactCache::builder().max_entries(10_000),
            max_entries: 10_000,
            embedder: None,
            embedding_cache: 10_000,
            threshold: None,
            namespace_threshold: HashMap::new(),
            guards: Guards::default(),
            index: IndexConfig::default(),
            candidates: 4,
            hook: None,
            conversations: ConversationMatching::default(),
            judge: None,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every mutation leaves the maps consistent between statements that can panic
        // (none do on purpose): a poisoned lock is still usable.
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The exact cache holding the answers.
    pub fn exact(&self) -> &ExactCache {
        &self.inner.exact
    }

    /// The embedder, with its cache of recent vectors.
    pub fn embedder(&self) -> &CachedEmbedder {
        &self.inner.embedder
    }

    /// Answers held (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.inner.exact.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Questions in the semantic index, over every context.
    pub fn indexed(&self) -> usize {
        self.read().indexed
    }

    /// Contexts whose index has moved to its HNSW graph (see
    /// [`IndexConfig::graph_from`]); the others are scanned flat.
    pub fn graph_contexts(&self) -> usize {
        self.read()
            .groups
            .values()
            .filter(|g| g.index.is_graph())
            .count()
    }

    /// Counters since the cache was built.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let r = |k: GuardKind| c.rejected[k as usize].load(Ordering::Relaxed);
        CacheStats {
            exact_hits: c.exact_hits.load(Ordering::Relaxed),
            semantic_hits: c.semantic_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            rejected_numbers: r(GuardKind::Numbers),
            rejected_entities: r(GuardKind::Entities),
            rejected_negation: r(GuardKind::Negation),
            rejected_scope: r(GuardKind::Scope),
            rejected_terms: r(GuardKind::Terms),
            stored: c.stored.load(Ordering::Relaxed),
            embed_failures: c.embed_failures.load(Ordering::Relaxed),
        }
    }

    fn emit(&self, event: CacheEvent<'_>) {
        if let Some(h) = &self.inner.hook {
            h(&event);
        }
    }

    /// The threshold that applies in `namespace` (infinite: exact matches only).
    pub fn threshold_for(&self, namespace: &str) -> f32 {
        self.inner
            .namespace_threshold
            .get(namespace)
            .copied()
            .unwrap_or(self.inner.threshold)
    }

    fn miss(&self, rejected: Option<GuardRejection>) -> CacheLookup {
        bump(&self.inner.counters.misses);
        self.emit(CacheEvent::Miss);
        CacheLookup {
            answer: None,
            rejected,
        }
    }

    /// Where `query` is matched, if it ends with a user turn.
    fn place<'q>(&self, query: &'q CacheQuery) -> Option<Place<'q>> {
        let text = strip_lead_chatter(query.final_user_text.as_deref()?);
        Some(match (&query.history, self.inner.conversations) {
            (Some(history), ConversationMatching::Condensed) => Place {
                group: query.base_key,
                context: history
                    .iter()
                    .rev()
                    .map(String::as_str)
                    .find(|t| !is_chatter(t)),
                text,
            },
            _ => Place {
                group: query.context_key,
                context: None,
                text,
            },
        })
    }

    async fn embed(&self, text: &str) -> Option<Arc<[f32]>> {
        match self.inner.embedder.embed_one(text).await {
            Ok(v) if v.len() == self.inner.dims => Some(v),
            Ok(_) => None,
            Err(e) => {
                bump(&self.inner.counters.embed_failures);
                tracing::warn!(target: "tokenwise::cache", error = %e, "embedding failed; exact matching only");
                None
            }
        }
    }

    /// Looks `query` up: exact key, then semantic candidates behind the guards.
    pub async fn lookup_query(&self, query: &CacheQuery) -> CacheLookup {
        let s = &self.inner;
        if let Some(hit) = s.exact.get_now(query) {
            bump(&s.counters.exact_hits);
            self.emit(CacheEvent::Hit {
                similarity: 1.0,
                semantic: false,
            });
            return CacheLookup {
                answer: Some(hit),
                rejected: None,
            };
        }
        let threshold = self.threshold_for(&query.namespace);
        let Some(place) = self.place(query) else {
            return self.miss(None);
        };
        if !threshold.is_finite() || !self.read().groups.contains_key(&place.group) {
            return self.miss(None);
        }
        let Some(v) = self.embed(&embedded_form(&place)).await else {
            return self.miss(None);
        };
        let found: Vec<Found> = {
            let state = self.read();
            let Some(g) = state.groups.get(&place.group) else {
                return self.miss(None);
            };
            g.index
                .search(&v, s.candidates)
                .into_iter()
                .filter(|(_, sim)| *sim >= threshold)
                .filter_map(|(id, sim)| {
                    let m = g.entries.get(&id)?;
                    let context = m.context.clone();
                    Some((id, sim.min(1.0), m.key, Arc::clone(&m.text), context))
                })
                .collect()
        };
        if s.judge.is_some() {
            self.prefetch_words(&found, &place).await;
        }
        let mut rejected: Option<GuardRejection> = None;
        let mut gone = Vec::new();
        let mut answer = None;
        for (id, similarity, key, stored, stored_context) in found {
            if !s.exact.is_live(&key) {
                gone.push(id);
                continue;
            }
            // A follow-up and a question without context never stand for each other.
            if stored_context.is_some() != place.context.is_some() {
                continue;
            }
            let verdict = match &s.judge {
                Some(judge) => {
                    self.judged(
                        judge,
                        (&stored, place.text),
                        stored_context.as_deref().zip(place.context),
                        similarity,
                    )
                    .await
                }
                None => s.guards.check(&stored, place.text).or_else(|| {
                    let (stored, asked) = (stored_context.as_deref()?, place.context?);
                    let (guard, detail) = s.guards.check_context(stored, asked)?;
                    Some((guard, format!("in the context: {detail}")))
                }),
            };
            if let Some((guard, detail)) = verdict {
                let r = GuardRejection::new(guard, similarity, detail);
                bump(&s.counters.rejected[guard as usize]);
                tracing::info!(
                    target: "tokenwise::cache",
                    guard = %guard,
                    similarity,
                    detail = %r.detail,
                    "semantic match rejected by a guard"
                );
                self.emit(CacheEvent::Rejected(&r));
                rejected.get_or_insert(r);
                continue;
            }
            if let Some(response) = s.exact.get_key(&key) {
                answer = Some(CachedAnswer {
                    response,
                    similarity,
                });
                break;
            }
            gone.push(id);
        }
        if !gone.is_empty() {
            let mut state = self.write();
            for id in gone {
                state.remove(&place.group, id);
            }
            self.maintain(&mut state);
        }
        match answer {
            Some(a) => {
                bump(&s.counters.semantic_hits);
                tracing::debug!(target: "tokenwise::cache", similarity = a.similarity, "semantic hit");
                self.emit(CacheEvent::Hit {
                    similarity: a.similarity,
                    semantic: true,
                });
                CacheLookup {
                    answer: Some(a),
                    rejected,
                }
            }
            None => self.miss(rejected),
        }
    }

    /// Embeds in one call the words the judge will compare for every candidate it may
    /// judge (live, of the same shape, refused by no hard guard), so that judging them
    /// in turn embeds nothing more: a local model's call costs a forward pass however
    /// few its words. Candidates whose turn of context is compared need their words
    /// only if the context is judged, which it is only after the question passed; their
    /// words are fetched too. On failure nothing is remembered and each candidate's
    /// judging embeds (and fails) as it would have.
    async fn prefetch_words(&self, found: &[Found], place: &Place<'_>) {
        let s = &self.inner;
        let mut all: Vec<String> = Vec::new();
        for (_, _, key, stored, stored_context) in found {
            if stored_context.is_some() != place.context.is_some() || !s.exact.is_live(key) {
                continue;
            }
            let Some(question) = words_for(&s.guards, stored, place.text) else {
                continue;
            };
            let context = match stored_context.as_deref().zip(place.context) {
                Some((stored, asked)) => match words_for(&s.guards, stored, asked) {
                    Some(w) => w,
                    None => continue,
                },
                None => Vec::new(),
            };
            all.extend(question);
            all.extend(context);
        }
        all.sort_unstable();
        all.dedup();
        if all.is_empty() {
            return;
        }
        let words: Vec<&str> = all.iter().map(String::as_str).collect();
        if let Err(e) = s.words.prefetch(s.embedder.inner().as_ref(), &words).await {
            tracing::debug!(target: "tokenwise::cache", error = %e, "word vectors not prefetched");
        }
    }

    /// The judge's verdict on a candidate: `question` (stored, asked) recalled at
    /// `similarity`, with its context turns (stored, asked) if it is a follow-up. A
    /// refusal is reported under the hard guard that refused, else under the first
    /// lexical guard that objects (terms if none does).
    async fn judged(
        &self,
        judge: &PairJudge,
        question: (&str, &str),
        context: Option<(&str, &str)>,
        similarity: f32,
    ) -> Option<(GuardKind, String)> {
        let mut parts = vec![question];
        parts.extend(context);
        for (i, (stored, asked)) in parts.into_iter().enumerate() {
            let sim = if context.is_none() {
                Some(similarity)
            } else {
                None // the recall compared context and question together
            };
            let f = match self.features_at(stored, asked, sim, true).await {
                Ok(f) => f,
                Err(e) => {
                    bump(&self.inner.counters.embed_failures);
                    tracing::warn!(target: "tokenwise::cache", error = %e, "embedding failed; candidate refused");
                    return Some((GuardKind::Terms, format!("the judge could not embed: {e}")));
                }
            };
            let place = if i == 0 { "" } else { "in the context: " };
            if let Some(kind) = f.hard_refusal() {
                let detail = self
                    .inner
                    .guards
                    .check(stored, asked)
                    .map_or_else(|| kind.to_string(), |(_, d)| d);
                return Some((kind, format!("{place}{detail}")));
            }
            let p = judge.probability(&f);
            let accepted = if i == 0 {
                judge.accepts(&f)
            } else {
                judge.accepts_context(&f)
            };
            if !accepted {
                let objecting = Guards::all()
                    .with(GuardKind::Numbers, false)
                    .with(GuardKind::Entities, false)
                    .check(stored, asked);
                let (kind, why) = objecting.map_or((GuardKind::Terms, String::new()), |(k, d)| {
                    (k, format!("; {d}"))
                });
                return Some((
                    kind,
                    format!(
                        "{place}the pair judge gives {p:.2} (serves from {:.2}) at similarity {:.2}{why}",
                        judge.cutoff(),
                        f.values()[0]
                    ),
                ));
            }
        }
        None
    }

    /// What this cache's judge reads of a stored request and an asked one, without
    /// storing or serving anything: `None` when they would never be compared (no final
    /// user turn, another group, or a follow-up against a question without context).
    /// `cache_eval --train` fits a judge on these.
    pub async fn judge_pair(
        &self,
        stored: &CacheQuery,
        asked: &CacheQuery,
    ) -> Result<Option<JudgedPair>> {
        let (Some(a), Some(b)) = (self.place(stored), self.place(asked)) else {
            return Ok(None);
        };
        if a.group != b.group || a.context.is_some() != b.context.is_some() {
            return Ok(None);
        }
        let va = self.inner.embedder.embed_one(&embedded_form(&a)).await?;
        let vb = self.inner.embedder.embed_one(&embedded_form(&b)).await?;
        let similarity = va
            .iter()
            .zip(vb.iter())
            .map(|(x, y)| x * y)
            .sum::<f32>()
            .min(1.0);
        let single = a.context.is_none();
        let question = self
            .features_at(a.text, b.text, single.then_some(similarity), false)
            .await?;
        let context = match a.context.zip(b.context) {
            Some((x, y)) => Some(self.features_at(x, y, None, false).await?),
            None => None,
        };
        Ok(Some(JudgedPair {
            similarity,
            question,
            context,
        }))
    }

    async fn features_at(
        &self,
        stored: &str,
        asked: &str,
        similarity: Option<f32>,
        stop_at_hard: bool,
    ) -> Result<PairFeatures> {
        let s = &self.inner;
        let similarity = match similarity {
            Some(x) => x,
            None => {
                let a = s.embedder.embed_one(&embedding_text(stored)).await?;
                let b = s.embedder.embed_one(&embedding_text(asked)).await?;
                a.iter()
                    .zip(b.iter())
                    .map(|(x, y)| x * y)
                    .sum::<f32>()
                    .min(1.0)
            }
        };
        pair_features(
            s.embedder.inner().as_ref(),
            &s.words,
            &s.guards,
            stored,
            asked,
            similarity,
            stop_at_hard,
        )
        .await
    }

    /// The judge this cache decides with, if any.
    pub fn judge(&self) -> Option<&PairJudge> {
        self.inner.judge.as_ref()
    }

    /// Stores `response` for `query`; answers that fail [`is_cacheable`] are ignored.
    pub async fn store(&self, query: &CacheQuery, response: &ChatResponse) {
        if !is_cacheable(response) {
            return;
        }
        let s = &self.inner;
        s.exact.put_now(query, response);
        bump(&s.counters.stored);
        self.emit(CacheEvent::Stored);
        let Some(place) = self.place(query) else {
            return;
        };
        if !self.threshold_for(&query.namespace).is_finite()
            || self.read().owner.contains_key(&query.key)
        {
            return;
        }
        let Some(v) = self.embed(&embedded_form(&place)).await else {
            return;
        };
        let mut state = self.write();
        if state.owner.contains_key(&query.key) {
            return; // stored meanwhile by a concurrent request
        }
        let id = state.next_id;
        state.next_id += 1;
        let group = match state.groups.entry(place.group) {
            std::collections::hash_map::Entry::Occupied(g) => g.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                match VectorIndex::new(s.dims, s.index) {
                    Ok(mut index) => slot.insert(Group {
                        index: {
                            index.defer_maintenance();
                            index
                        },
                        entries: HashMap::new(),
                    }),
                    Err(e) => {
                        tracing::warn!(target: "tokenwise::cache", error = %e, "semantic index unavailable");
                        return;
                    }
                }
            }
        };
        let evicted = match group.index.insert(id, &v) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(target: "tokenwise::cache", error = %e, "vector not indexed");
                return;
            }
        };
        group.entries.insert(
            id,
            Meta {
                key: query.key,
                text: place.text.into(),
                context: place.context.map(Arc::from),
                namespace: query.namespace.clone(),
                tags: query.tags.clone(),
            },
        );
        state.owner.insert(query.key, (place.group, id));
        state.indexed += 1;
        if let Some(old) = evicted {
            state.remove(&place.group, old);
        }
        if state.indexed > s.max_entries.saturating_mul(2) {
            self.sweep(&mut state);
        }
        state.touched.push(place.group);
        self.maintain(&mut state);
    }

    /// Starts the maintenance due in the contexts changed since the last call.
    fn maintain(&self, state: &mut State) {
        let mut touched = std::mem::take(&mut state.touched);
        touched.sort_unstable();
        touched.dedup();
        for ctx in touched {
            self.maintain_one(state, ctx);
        }
    }

    fn maintain_one(&self, state: &mut State, ctx: CacheKey) {
        let Some(g) = state.groups.get_mut(&ctx) else {
            return;
        };
        let Some(job) = g.index.maintenance() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let done = job.run();
            g.index.apply(done);
            return;
        };
        self.inner.maintaining.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        let rebuild = job.is_rebuild();
        runtime.spawn_blocking(move || {
            let done = std::panic::catch_unwind(AssertUnwindSafe(|| job.run()));
            let mut state = this.write();
            let mut retired = None;
            if let Some(g) = state.groups.get_mut(&ctx) {
                match done {
                    Ok(done) => {
                        g.index.apply(done);
                        retired = Some(g.index.take_retired());
                    }
                    Err(_) => {
                        tracing::warn!(target: "tokenwise::cache", "semantic index maintenance failed; it will rebuild");
                        g.index.abandon_maintenance();
                    }
                }
            }
            tracing::debug!(target: "tokenwise::cache", rebuild, "semantic index maintained");
            // More may have become due while it ran.
            this.maintain_one(&mut state, ctx);
            drop(state);
            // The replaced graph is freed outside the lock.
            drop(retired);
            this.inner.maintaining.fetch_sub(1, Ordering::SeqCst);
            this.inner.maintained.notify_waiters();
        });
    }

    /// Index maintenance jobs running now.
    pub fn maintaining(&self) -> usize {
        self.inner.maintaining.load(Ordering::SeqCst)
    }

    /// Waits until no index maintenance is running (jobs started meanwhile included):
    /// for tests, and for an orderly shutdown.
    pub async fn settled(&self) {
        loop {
            let notified = self.inner.maintained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.maintaining() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Drops index entries whose answer expired or was evicted.
    fn sweep(&self, state: &mut State) {
        let exact = &self.inner.exact;
        state.remove_where(|m| !exact.is_live(&m.key));
        tracing::debug!(target: "tokenwise::cache", indexed = state.indexed, "semantic index swept");
    }

    /// Removes entries; returns how many answers were removed.
    pub fn invalidate_now(&self, what: &Invalidation) -> u64 {
        let n = self.inner.exact.invalidate_now(what);
        let mut state = self.write();
        match what {
            Invalidation::Key(k) => {
                if let Some((ctx, id)) = state.owner.get(k).copied() {
                    state.remove(&ctx, id);
                }
            }
            Invalidation::Namespace(ns) => state.remove_where(|m| &m.namespace == ns),
            Invalidation::Tag(t) => state.remove_where(|m| m.tags.iter().any(|x| x == t)),
            Invalidation::All => *state = State::default(),
        }
        self.maintain(&mut state);
        n
    }
}

#[async_trait]
impl Cache for SemanticCache {
    async fn get(&self, query: &CacheQuery) -> Result<Option<CachedAnswer>> {
        Ok(self.lookup_query(query).await.answer)
    }

    async fn lookup(&self, query: &CacheQuery) -> Result<CacheLookup> {
        Ok(self.lookup_query(query).await)
    }

    async fn put(&self, query: &CacheQuery, response: &ChatResponse) -> Result<()> {
        self.store(query, response).await;
        Ok(())
    }

    async fn invalidate(&self, what: &Invalidation) -> Result<u64> {
        Ok(self.invalidate_now(what))
    }

    async fn get_stale(
        &self,
        query: &CacheQuery,
        max_stale: Duration,
    ) -> Result<Option<CachedAnswer>> {
        Ok(self.inner.exact.get_stale_now(query, max_stale))
    }
}

#[cfg(test)]
mod tests {
    use super::embedding_text;

    #[test]
    fn embedded_text_drops_case_and_sentence_punctuation_only() {
        assert_eq!(
            embedding_text("  What is the capital of Australia?! "),
            "what is the capital of australia"
        );
        assert_eq!(
            embedding_text("It's 3.5, not 1,000 (at 10:30)."),
            "it's 3.5 not 1,000 at 10:30"
        );
        assert_eq!(embedding_text("50% off $20 + tax"), "50% off $20 + tax");
        assert_eq!(embedding_text("Hi, how do I pay? Thanks!"), "how do i pay");
        assert_eq!(embedding_text("Another one please"), "another one");
        assert_eq!(embedding_text("Hello!"), "hello", "never empty");
        assert_eq!(embedding_text("this is history"), "this is history");
    }
}
