//! Summaries of dropped turns written by a model, asked through the pipeline itself.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use super::{ContextBudget, CountCache, Preparing, Summarizer, TokenCounter};
use crate::types::{ChatRequest, Message, ModelSpec, Role};
use crate::{Error, Pipeline, Result};

/// A running hash of a conversation prefix.
type PrefixKey = [u8; 32];

/// The instruction the summarizing model is given.
pub const SUMMARY_INSTRUCTION: &str = "You summarise the earlier part of a conversation for the assistant who continues it. \
Keep names, numbers, decisions, commitments and open questions; drop pleasantries. \
Write plain prose, at most 150 words. If a summary so far is given, update it with the new turns.";

/// Writes summaries of the turns a [`ContextBudget`] drops, with a (cheap) model asked
/// through a [`Pipeline`] — so that its rate limits, spend caps, answer cache and usage
/// records apply to the summaries too.
///
/// Summaries are cached per conversation prefix (bounded, least recently used out) and
/// built incrementally: when a longer prefix is dropped, the model is given the summary
/// so far and only the turns dropped since, so each turn is sent to the summarizing
/// model once.
///
/// Give it to a pipeline's [`ContextBudget`] and the pipeline runs it by itself: before
/// planning each request, it works out which turns the fit will drop on the request's
/// primary target and has them summarised (once per prefix; a failure is logged and the
/// turns are left out), and the fit puts the summary in their place. A fallback target
/// with a smaller window may drop more turns than the summary covers; those are left
/// out. Summary requests run through the same pipeline before the request they serve is
/// admitted, so they are rate-limited and billed as the user's own and never wait for
/// a slot it holds.
///
/// ```no_run
/// # async fn demo() -> tokenwise::Result<()> {
/// use std::sync::Arc;
/// use tokenwise::context::{ContextBudget, ModelSummarizer};
/// use tokenwise::{ChatRequest, Pipeline};
///
/// let budget = ContextBudget::default().summarizer(Arc::new(ModelSummarizer::new("gpt-4o-mini")));
/// let pipeline = Pipeline::builder().context_budget(budget).build()?;
/// # let req = ChatRequest::user_text("hi");
/// let answer = pipeline.chat(req).await?; // the dropped turns summarised first
/// # let _ = answer; Ok(()) }
/// ```
///
/// [`prepare`](Self::prepare) does the same by hand, for a given model (a budget used
/// outside a pipeline, or a target other than the primary).
pub struct ModelSummarizer {
    model: String,
    max_tokens: u32,
    feature: String,
    cache: Mutex<lru::LruCache<PrefixKey, String>>,
    counts: CountCache,
    counter: Arc<dyn TokenCounter>,
}

impl fmt::Debug for ModelSummarizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelSummarizer")
            .field("model", &self.model)
            .field("max_tokens", &self.max_tokens)
            .field("feature", &self.feature)
            .field("cached", &self.cached())
            .finish()
    }
}

impl ModelSummarizer {
    /// Summaries by `model`, at most 300 tokens each, up to 4,096 cached.
    pub fn new(model: impl Into<String>) -> Self {
        Self::with_capacity(model, 4_096)
    }

    /// Like [`new`](Self::new), caching up to `capacity` summaries.
    pub fn with_capacity(model: impl Into<String>, capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        ModelSummarizer {
            model: model.into(),
            max_tokens: 300,
            feature: "summary".into(),
            cache: Mutex::new(lru::LruCache::new(cap)),
            counts: CountCache::new(4_096),
            counter: Arc::new(super::TiktokenCounter::new()),
        }
    }

    /// The most tokens a summary may take (default 300).
    #[must_use]
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = n.max(1);
        self
    }

    /// The `meta.feature` the summary requests carry (default `summary`), for usage
    /// records and per-feature limits.
    #[must_use]
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.feature = feature.into();
        self
    }

    /// The token counter the pipeline uses, if not the default [`TiktokenCounter`]
    /// (`prepare` must count as the fit will).
    ///
    /// [`TiktokenCounter`]: super::TiktokenCounter
    #[must_use]
    pub fn counter(mut self, counter: Arc<dyn TokenCounter>) -> Self {
        self.counter = counter;
        self
    }

    /// Summaries cached.
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The running prefix keys of `msgs`: `keys[i]` covers `msgs[..=i]`.
    fn keys(msgs: &[Message]) -> Vec<PrefixKey> {
        let mut prev = [0u8; 32];
        msgs.iter()
            .map(|m| {
                let mut h = blake3::Hasher::new();
                h.update(&prev);
                h.update(role_name(m.role).as_bytes());
                h.update(&(m.content.len() as u64).to_le_bytes());
                h.update(m.content.as_bytes());
                for c in &m.tool_calls {
                    h.update(c.name.as_bytes());
                    h.update(&[0]);
                    h.update(c.arguments.as_bytes());
                    h.update(&[0]);
                }
                prev = *h.finalize().as_bytes();
                prev
            })
            .collect()
    }

    fn get(&self, key: &PrefixKey) -> Option<String> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// The summary of `dropped` (oldest first): from the cache, else written by the
    /// model through `pipeline`, starting from the longest prefix already summarised.
    /// `like` lends the summary request its identity (`meta` user, org, tier) so that
    /// limits and caps count it against the same user.
    pub async fn summarize_async(
        &self,
        pipeline: &Pipeline,
        dropped: &[Message],
        like: &ChatRequest,
    ) -> Result<Option<Message>> {
        if dropped.is_empty() {
            return Ok(None);
        }
        let keys = Self::keys(dropped);
        let n = dropped.len();
        let mut from = 0;
        let mut so_far = None;
        for j in (1..=n).rev() {
            if let Some(s) = self.get(&keys[j - 1]) {
                if j == n {
                    return Ok(Some(summary_message(&s)));
                }
                from = j;
                so_far = Some(s);
                break;
            }
        }
        let mut transcript = String::new();
        if let Some(s) = &so_far {
            transcript.push_str("Summary so far:\n");
            transcript.push_str(s);
            transcript.push_str("\n\nNew turns:\n");
        }
        for m in &dropped[from..] {
            transcript.push_str(role_name(m.role));
            transcript.push_str(": ");
            transcript.push_str(&m.content);
            for c in &m.tool_calls {
                transcript.push_str(&format!(" [calls {}({})]", c.name, c.arguments));
            }
            transcript.push('\n');
        }
        let mut req = ChatRequest::new()
            .model(self.model.clone())
            .message(Message::system(SUMMARY_INSTRUCTION))
            .message(Message::user(transcript))
            .max_tokens(self.max_tokens);
        req.meta = like.meta.clone();
        req.meta.feature = Some(self.feature.clone());
        req.meta.deferrable = None;
        let answer = pipeline.chat(req).await?;
        let text = answer.content.trim().to_owned();
        if text.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "the summarizing model `{}` returned an empty summary",
                self.model
            )));
        }
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(keys[n - 1], text.clone());
        Ok(Some(summary_message(&text)))
    }

    /// Writes the summary `req` will need when `budget` fits it into `model`'s window:
    /// works out which turns the fit drops and summarises them (once per prefix). Returns
    /// how many messages the summary stands in for (0: nothing is dropped).
    pub async fn prepare(
        &self,
        pipeline: &Pipeline,
        budget: &ContextBudget,
        model: &ModelSpec,
        req: &ChatRequest,
    ) -> Result<usize> {
        let dropped = self.dropped(budget, model, req)?;
        if dropped.is_empty() {
            return Ok(0);
        }
        self.summarize_async(pipeline, &dropped, req).await?;
        Ok(dropped.len())
    }

    /// The messages `budget` drops from `req` on `model`: the oldest non-system messages.
    fn dropped(
        &self,
        budget: &ContextBudget,
        model: &ModelSpec,
        req: &ChatRequest,
    ) -> Result<Vec<Message>> {
        dropped_by(budget, model, req, &*self.counter, &self.counts)
    }
}

/// The messages `budget` drops from `req` on `model` (the oldest non-system ones),
/// counted with `counter`.
fn dropped_by(
    budget: &ContextBudget,
    model: &ModelSpec,
    req: &ChatRequest,
    counter: &dyn TokenCounter,
    counts: &CountCache,
) -> Result<Vec<Message>> {
    let turn = super::current_turn_start(&req.messages);
    if !req.messages[..turn].iter().any(|m| m.role != Role::System) {
        return Ok(Vec::new()); // no history: nothing to drop
    }
    let mut plain = budget.clone();
    plain.summarizer = None;
    let fitted = plain.fit(req, model, counter, counts)?;
    Ok(req
        .messages
        .iter()
        .filter(|m| m.role != Role::System)
        .take(fitted.dropped_messages)
        .cloned()
        .collect())
}

#[async_trait::async_trait]
impl Summarizer for ModelSummarizer {
    /// The cached summary of exactly `dropped`, if [`prepare`](ModelSummarizer::prepare)
    /// or [`summarize_async`](ModelSummarizer::summarize_async) wrote one; never calls a
    /// model.
    fn summarize(&self, dropped: &[Message]) -> Option<Message> {
        let keys = Self::keys(dropped);
        keys.last()
            .and_then(|k| self.get(k))
            .map(|s| summary_message(&s))
    }

    /// `true`: a pipeline writes the summaries itself, before planning.
    fn prepares(&self) -> bool {
        true
    }

    /// As [`ModelSummarizer::prepare`], counting with the pipeline's own counter.
    async fn prepare(&self, ahead: Preparing<'_>) -> Result<usize> {
        let dropped = dropped_by(
            ahead.budget,
            ahead.model,
            ahead.request,
            ahead.counter,
            ahead.counts,
        )?;
        if dropped.is_empty() {
            return Ok(0);
        }
        self.summarize_async(ahead.pipeline, &dropped, ahead.request)
            .await?;
        Ok(dropped.len())
    }
}

fn summary_message(text: &str) -> Message {
    Message::system(format!("Summary of the earlier conversation: {text}"))
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "System",
        Role::User => "User",
        Role::Assistant => "Assistant",
        Role::Tool => "Tool",
    }
}
