//! Fitting a request into a model's context window, by rules a user can predict.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use super::TokenCounter;
use crate::types::{ChatRequest, Document, Message, ModelSpec, Role, TokenizerKind};
use crate::{Error, Result};

/// Turns the conversation turns a fit drops into one message that stands in for them
/// (a summary). Called only when turns are dropped; keep it quick or precomputed.
///
/// # Implementing
///
/// ```
/// use tokenwise::context::Summarizer;
/// use tokenwise::Message;
///
/// /// Notes how many turns were left out.
/// #[derive(Debug)]
/// struct CountDropped;
///
/// impl Summarizer for CountDropped {
///     fn summarize(&self, dropped: &[Message]) -> Option<Message> {
///         Some(Message::system(format!("({} earlier messages omitted)", dropped.len())))
///     }
/// }
/// ```
///
/// A summarizer that needs I/O (a model, a store) does it ahead of the fit, in
/// [`prepare`](Self::prepare): a pipeline whose context budget holds a summarizer that
/// [`prepares`](Self::prepares) awaits it before planning each request, and `summarize`
/// then answers from what it wrote. [`ModelSummarizer`](super::ModelSummarizer) works
/// this way.
#[async_trait::async_trait]
pub trait Summarizer: Send + Sync + fmt::Debug {
    /// A message standing in for `dropped` (oldest first), or `None` to leave them out.
    fn summarize(&self, dropped: &[Message]) -> Option<Message>;

    /// Whether [`prepare`](Self::prepare) has work to do (default `false`). A pipeline
    /// asks once per request and awaits `prepare` only when this is `true`, so a
    /// summarizer without it costs nothing more.
    fn prepares(&self) -> bool {
        false
    }

    /// Writes, ahead of the fit, what [`summarize`](Self::summarize) will need for
    /// `ahead.request` on `ahead.model`. A pipeline calls it before planning, with the
    /// model the request is routed to first; a failure is logged and the request goes
    /// on without a summary. Returns how many messages the summary stands in for
    /// (default: does nothing, 0).
    async fn prepare(&self, ahead: Preparing<'_>) -> Result<usize> {
        let _ = ahead;
        Ok(0)
    }
}

/// A request about to be planned, as a pipeline hands it to [`Summarizer::prepare`]:
/// the pipeline (to ask a model through), its context budget and token counting, and
/// the model the request is routed to first.
#[derive(Debug, Clone, Copy)]
pub struct Preparing<'a> {
    /// The pipeline the request runs through.
    pub pipeline: &'a crate::Pipeline,
    /// Its context budget.
    pub budget: &'a ContextBudget,
    /// The model the fit will be for: the request's primary target.
    pub model: &'a ModelSpec,
    /// The request.
    pub request: &'a ChatRequest,
    /// The pipeline's token counter, which the fit counts with.
    pub counter: &'a dyn TokenCounter,
    /// The pipeline's cache of token counts.
    pub counts: &'a CountCache,
}

/// An instruction asking for short answers, for [`RouteBudget::brevity`].
pub const BREVITY_INSTRUCTION: &str = "Answer as briefly as the question allows: no preamble, no restating the question, no closing summary.";

/// Settings for one route (requests whose `meta.feature` names it), over the
/// [`ContextBudget`]'s own.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct RouteBudget {
    /// `max_tokens` for requests of this route that set none.
    pub max_tokens: Option<u32>,
    /// A system instruction added after the route's system prompt (off by default; see
    /// [`BREVITY_INSTRUCTION`]).
    pub brevity: Option<String>,
    /// An absolute ceiling on this route's documents, in tokens.
    pub documents_max_tokens: Option<u64>,
    /// The most earlier turns of the conversation this route keeps.
    pub history_max_turns: Option<usize>,
}

impl RouteBudget {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// `max_tokens` for requests of this route that set none.
    #[must_use]
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Adds [`BREVITY_INSTRUCTION`] to this route's prompts.
    #[must_use]
    pub fn brief(self) -> Self {
        self.brevity(BREVITY_INSTRUCTION)
    }

    /// Adds `instruction` to this route's prompts, after its system messages.
    #[must_use]
    pub fn brevity(mut self, instruction: impl Into<String>) -> Self {
        self.brevity = Some(instruction.into());
        self
    }

    /// An absolute ceiling on this route's documents, in tokens.
    #[must_use]
    pub fn documents_max_tokens(mut self, n: u64) -> Self {
        self.documents_max_tokens = Some(n);
        self
    }

    /// Keeps at most the `n` newest earlier turns.
    #[must_use]
    pub fn history_max_turns(mut self, n: usize) -> Self {
        self.history_max_turns = Some(n);
        self
    }
}

/// How a request is fitted into a window.
///
/// The sections, in order of precedence:
/// 1. **system** messages and tool definitions: never cut; if they alone overflow the
///    window, or their own budget (`system_max_tokens`, `tools_max_tokens`), the request
///    is refused with [`Error::ContextTooLong`] naming the section;
/// 2. the **current turn** (the final user message and anything after the last
///    assistant reply): never cut either;
/// 3. **documents**, most relevant first, within `documents_share` of what is left and
///    at most `documents_max_tokens`; with a [`compressor`](Self::compressor), they are
///    first cut to their sentences most relevant to the question; the first one that
///    still does not fit whole is trimmed to the rest of the budget;
/// 4. **history**, newest first, whole turns while they fit (a tool call and its results
///    stay together), at most `history_max_tokens` and `history_max_turns` turns;
///    dropped turns may be replaced by a [`Summarizer`]'s message.
///
/// Kept documents and turns stay in their original order, so the prompt's prefix
/// (system, tools, documents) is stable from one turn to the next and provider-side
/// prompt caches keep hitting.
///
/// `max_tokens`: a request that sets none gets its route's
/// [`RouteBudget::max_tokens`], else `default_max_tokens`, else what the window leaves
/// (at most the model's maximum output). Routes are keyed by the request's
/// `meta.feature`.
#[derive(Clone)]
pub struct ContextBudget {
    /// Output tokens to keep free when the request sets no `max_tokens` (default 1,024,
    /// at most the model's maximum output).
    pub output_reserve: u64,
    /// The share of the room left after system and current turn that documents may take
    /// (default 0.4).
    pub documents_share: f64,
    /// Replaces dropped history (default: none).
    pub summarizer: Option<Arc<dyn Summarizer>>,
    /// The most tokens system messages may take (never cut: over it, the request is
    /// refused). Default: no limit beyond the window.
    pub system_max_tokens: Option<u64>,
    /// The most tokens tool definitions may take (never cut: over it, the request is
    /// refused). Default: no limit beyond the window.
    pub tools_max_tokens: Option<u64>,
    /// An absolute ceiling on documents, in tokens, on top of `documents_share`
    /// (e.g. 1,500). Default: none.
    pub documents_max_tokens: Option<u64>,
    /// An absolute ceiling on earlier turns, in tokens. Default: none.
    pub history_max_tokens: Option<u64>,
    /// The most earlier turns kept (a turn is a user message and the replies to it).
    /// Default: no limit.
    pub history_max_turns: Option<usize>,
    /// `max_tokens` for requests that set none (and whose route sets none). Default:
    /// none, i.e. what the window leaves.
    pub default_max_tokens: Option<u32>,
    /// Per-route settings, by `meta.feature`.
    pub routes: HashMap<String, RouteBudget>,
    /// Cuts documents to their sentences most relevant to the question (BM25) before
    /// they are budgeted. Default: none.
    pub compressor: Option<Arc<super::Compressor>>,
}

impl fmt::Debug for ContextBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBudget")
            .field("output_reserve", &self.output_reserve)
            .field("documents_share", &self.documents_share)
            .field("summarizer", &self.summarizer.is_some())
            .field("system_max_tokens", &self.system_max_tokens)
            .field("tools_max_tokens", &self.tools_max_tokens)
            .field("documents_max_tokens", &self.documents_max_tokens)
            .field("history_max_tokens", &self.history_max_tokens)
            .field("history_max_turns", &self.history_max_turns)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("routes", &self.routes)
            .field("compressor", &self.compressor)
            .finish()
    }
}

impl Default for ContextBudget {
    fn default() -> Self {
        ContextBudget {
            output_reserve: 1_024,
            documents_share: 0.4,
            summarizer: None,
            system_max_tokens: None,
            tools_max_tokens: None,
            documents_max_tokens: None,
            history_max_tokens: None,
            history_max_turns: None,
            default_max_tokens: None,
            routes: HashMap::new(),
            compressor: None,
        }
    }
}

impl ContextBudget {
    /// Sets `documents_max_tokens`.
    #[must_use]
    pub fn documents_max_tokens(mut self, n: u64) -> Self {
        self.documents_max_tokens = Some(n);
        self
    }

    /// Sets `history_max_tokens`.
    #[must_use]
    pub fn history_max_tokens(mut self, n: u64) -> Self {
        self.history_max_tokens = Some(n);
        self
    }

    /// Sets `history_max_turns`.
    #[must_use]
    pub fn history_max_turns(mut self, n: usize) -> Self {
        self.history_max_turns = Some(n);
        self
    }

    /// Sets `system_max_tokens`.
    #[must_use]
    pub fn system_max_tokens(mut self, n: u64) -> Self {
        self.system_max_tokens = Some(n);
        self
    }

    /// Sets `tools_max_tokens`.
    #[must_use]
    pub fn tools_max_tokens(mut self, n: u64) -> Self {
        self.tools_max_tokens = Some(n);
        self
    }

    /// Sets `default_max_tokens`.
    #[must_use]
    pub fn default_max_tokens(mut self, n: u32) -> Self {
        self.default_max_tokens = Some(n);
        self
    }

    /// Sets the summarizer.
    #[must_use]
    pub fn summarizer(mut self, s: Arc<dyn Summarizer>) -> Self {
        self.summarizer = Some(s);
        self
    }

    /// Sets the document compressor.
    #[must_use]
    pub fn compressor(mut self, c: super::Compressor) -> Self {
        self.compressor = Some(Arc::new(c));
        self
    }

    /// Settings for requests whose `meta.feature` is `feature`.
    #[must_use]
    pub fn route(mut self, feature: impl Into<String>, route: RouteBudget) -> Self {
        self.routes.insert(feature.into(), route);
        self
    }

    fn route_of(&self, req: &ChatRequest) -> Option<&RouteBudget> {
        req.meta.feature.as_deref().and_then(|f| self.routes.get(f))
    }

    /// The `max_tokens` a fit gives `req`: its own, else its route's, else
    /// `default_max_tokens` (`None`: what the window leaves).
    pub fn max_tokens_for(&self, req: &ChatRequest) -> Option<u32> {
        req.params
            .max_tokens
            .or_else(|| self.route_of(req).and_then(|r| r.max_tokens))
            .or(self.default_max_tokens)
    }
}

/// What a fit kept and dropped.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Fitted<'a> {
    /// The request to send: the original when nothing had to change.
    pub request: Cow<'a, ChatRequest>,
    /// Prompt tokens of the fitted request.
    pub prompt_tokens: u64,
    /// History messages dropped.
    pub dropped_messages: usize,
    /// Documents dropped or trimmed.
    pub trimmed_documents: usize,
}

/// A text's hash and length, and the tokenizer.
type CountKey = (u64, usize, TokenizerKind);

/// Token counts of recent texts, so that re-fitting a long conversation after one new
/// turn counts only the new turn. Bounded (least recently used out).
#[derive(Debug, Clone)]
pub struct CountCache {
    map: Arc<Mutex<lru::LruCache<CountKey, u64>>>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl CountCache {
    /// A cache of up to `capacity` counts.
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        CountCache {
            map: Arc::new(Mutex::new(lru::LruCache::new(cap))),
            hasher: Default::default(),
        }
    }

    /// Tokens in `text`, counted once per text and tokenizer.
    pub fn count(&self, counter: &dyn TokenCounter, text: &str, kind: TokenizerKind) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let key = (self.hasher.hash_one(text), text.len(), kind);
        if let Some(n) = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return *n;
        }
        let n = counter.count_text(text, kind);
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, n);
        n
    }

    /// Prompt tokens of a whole request, as [`TokenCounter::count_request`] counts them,
    /// with every text's count cached.
    pub fn count_request(
        &self,
        counter: &dyn TokenCounter,
        req: &ChatRequest,
        kind: TokenizerKind,
    ) -> u64 {
        let mut n = super::TOKENS_PER_REPLY;
        for m in &req.messages {
            n += self.message(counter, m, kind);
        }
        for d in &req.documents {
            n += super::TOKENS_PER_MESSAGE + self.count(counter, &d.text, kind);
        }
        for t in &req.params.tools {
            n += self.count(counter, &t.name, kind)
                + self.count(counter, &t.description, kind)
                + self.count(counter, &t.parameters.to_string(), kind);
        }
        n
    }

    fn message(&self, counter: &dyn TokenCounter, m: &Message, kind: TokenizerKind) -> u64 {
        let mut n = super::TOKENS_PER_MESSAGE + self.count(counter, &m.content, kind);
        for c in &m.tool_calls {
            n += self.count(counter, &c.name, kind) + self.count(counter, &c.arguments, kind);
        }
        n
    }
}

impl Default for CountCache {
    fn default() -> Self {
        Self::new(65_536)
    }
}

/// Where the current turn starts: after the last assistant message (with that message
/// when its tool calls are answered in the turn); the last message at the latest.
pub(crate) fn current_turn_start(msgs: &[Message]) -> usize {
    let mut start = msgs
        .iter()
        .rposition(|m| m.role == Role::Assistant)
        .map_or(0, |i| i + 1);
    if start > 0 && start < msgs.len() && !msgs[start - 1].tool_calls.is_empty() {
        start -= 1;
    }
    start.min(msgs.len().saturating_sub(1))
}

/// Groups history into units that stay together: an assistant message with tool calls
/// and the tool results that follow it.
fn history_units(history: &[(usize, &Message)]) -> Vec<(usize, usize)> {
    let mut units = Vec::new();
    let mut i = 0;
    while i < history.len() {
        let start = i;
        i += 1;
        if !history[start].1.tool_calls.is_empty() {
            while i < history.len() && history[i].1.role == Role::Tool {
                i += 1;
            }
        }
        units.push((start, i));
    }
    units
}

impl ContextBudget {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.documents_share) {
            return Err(Error::Config(
                "context budget: documents_share must be in [0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// Fits `req` into `model`'s window.
    pub fn fit<'a>(
        &self,
        req: &'a ChatRequest,
        model: &ModelSpec,
        counter: &dyn TokenCounter,
        cache: &CountCache,
    ) -> Result<Fitted<'a>> {
        let kind = model.tokenizer;
        let window = model.context_window;
        let route = self.route_of(req);
        let max_tokens = self.max_tokens_for(req);
        let output = match max_tokens {
            Some(n) => u64::from(n).min(model.max_output),
            None => self.output_reserve.min(model.max_output),
        };
        let over_budget = |tokens: u64, limit: u64, what: &str| Error::ContextTooLong {
            model: format!("{} ({what} budget)", model.name),
            tokens,
            limit,
        };
        let too_long = |tokens: u64, what: &str| Error::ContextTooLong {
            model: format!("{} ({what})", model.name),
            tokens,
            limit: window,
        };
        let room = window.saturating_sub(output);

        // 1. system and tools: never cut
        let mut tools = 0;
        for t in &req.params.tools {
            tools += cache.count(counter, &t.name, kind)
                + cache.count(counter, &t.description, kind)
                + cache.count(counter, &t.parameters.to_string(), kind);
        }
        if let Some(limit) = self.tools_max_tokens.filter(|l| tools > *l) {
            return Err(over_budget(tools, limit, "tool definitions exceed their"));
        }
        let brevity = route
            .and_then(|r| r.brevity.as_deref())
            .filter(|b| !b.trim().is_empty())
            .map(Message::system);
        let msgs = &req.messages;
        let turn = current_turn_start(msgs);
        let mut system_idx = Vec::new();
        let mut history: Vec<(usize, &Message)> = Vec::new();
        let mut system = brevity
            .as_ref()
            .map_or(0, |m| cache.message(counter, m, kind));
        for (i, m) in msgs.iter().enumerate() {
            if m.role == Role::System {
                system_idx.push(i);
                system += cache.message(counter, m, kind);
            } else if i < turn {
                history.push((i, m));
            }
        }
        if let Some(limit) = self.system_max_tokens.filter(|l| system > *l) {
            return Err(over_budget(system, limit, "the system prompt exceeds its"));
        }
        let mut fixed = super::TOKENS_PER_REPLY + tools + system;
        if fixed + output > window {
            return Err(too_long(
                fixed + output,
                "the system prompt and tools alone",
            ));
        }
        // 2. the current turn: never cut
        for m in msgs[turn..].iter().filter(|m| m.role != Role::System) {
            fixed += cache.message(counter, m, kind);
        }
        if fixed + output > window {
            return Err(too_long(
                fixed + output,
                "the system prompt and the current turn",
            ));
        }
        let mut left = room - fixed;

        // 3. documents, compressed, then by relevance, within their budget
        let mut trimmed_documents = 0;
        let docs: Vec<Cow<'a, Document>> = match (&self.compressor, req.documents.is_empty()) {
            (Some(c), false) => {
                let question = req.last_user_text().unwrap_or_default();
                let out = c.compress(question, &req.documents, counter, kind);
                trimmed_documents += out.changed;
                out.documents.into_iter().map(Cow::Owned).collect()
            }
            _ => req.documents.iter().map(Cow::Borrowed).collect(),
        };
        let mut doc_tokens: Vec<u64> = docs
            .iter()
            .map(|d| super::TOKENS_PER_MESSAGE + cache.count(counter, &d.text, kind))
            .collect();
        let all_docs: u64 = doc_tokens.iter().sum();
        let mut keep_docs: Vec<Option<Cow<'a, Document>>> = vec![None; docs.len()];
        let mut doc_budget = (left as f64 * self.documents_share) as u64;
        if let Some(cap) = route
            .and_then(|r| r.documents_max_tokens)
            .or(self.documents_max_tokens)
        {
            doc_budget = doc_budget.min(cap);
        }
        if all_docs <= doc_budget {
            for (slot, d) in keep_docs.iter_mut().zip(&docs) {
                *slot = Some(d.clone());
            }
            left -= all_docs;
        } else {
            let mut share = doc_budget;
            let mut order: Vec<usize> = (0..docs.len()).collect();
            order.sort_by(|a, b| docs[*b].score.total_cmp(&docs[*a].score));
            for i in order {
                let d = &docs[i];
                if doc_tokens[i] <= share {
                    share -= doc_tokens[i];
                    left -= doc_tokens[i];
                    keep_docs[i] = Some(d.clone());
                    continue;
                }
                trimmed_documents += 1;
                if share > super::TOKENS_PER_MESSAGE + 16 {
                    let budget = share - super::TOKENS_PER_MESSAGE;
                    let text = trim_to(&d.text, budget, |t| counter.count_text(t, kind));
                    let n = super::TOKENS_PER_MESSAGE + counter.count_text(&text, kind);
                    if !text.is_empty() && n <= share {
                        share -= n;
                        left -= n;
                        doc_tokens[i] = n;
                        keep_docs[i] = Some(Cow::Owned(Document {
                            id: d.id.clone(),
                            text,
                            score: d.score,
                        }));
                    }
                }
            }
        }

        // 4. history, newest first, whole units, within its budgets
        let units = history_units(&history);
        let mut keep_from = units.len();
        let max_turns = route
            .and_then(|r| r.history_max_turns)
            .or(self.history_max_turns);
        let mut history_left = self.history_max_tokens.unwrap_or(u64::MAX);
        let mut turns = 0;
        for (u, (a, b)) in units.iter().enumerate().rev() {
            if max_turns.is_some_and(|max| turns >= max) {
                break;
            }
            let n: u64 = history[*a..*b]
                .iter()
                .map(|(_, m)| cache.message(counter, m, kind))
                .sum();
            if n > left || n > history_left {
                break;
            }
            left -= n;
            history_left -= n;
            keep_from = u;
            turns += history[*a..*b]
                .iter()
                .filter(|(_, m)| m.role == Role::User)
                .count();
        }
        let first_kept = units.get(keep_from).map_or(history.len(), |(a, _)| *a);
        let dropped: Vec<Message> = history[..first_kept]
            .iter()
            .map(|(_, m)| (*m).clone())
            .collect();
        let summary = match (&self.summarizer, dropped.is_empty()) {
            (Some(s), false) => s.summarize(&dropped).filter(|m| {
                let n = cache.message(counter, m, kind);
                n <= left && {
                    left -= n;
                    true
                }
            }),
            _ => None,
        };

        let changed = !dropped.is_empty()
            || trimmed_documents > 0
            || req.params.max_tokens.is_none()
            || brevity.is_some();
        let prompt_tokens = room - left;
        if !changed {
            return Ok(Fitted {
                request: Cow::Borrowed(req),
                prompt_tokens,
                dropped_messages: 0,
                trimmed_documents: 0,
            });
        }
        let mut out = req.clone();
        let kept_history: std::collections::HashSet<usize> =
            history[first_kept..].iter().map(|(i, _)| *i).collect();
        let mut messages = Vec::with_capacity(msgs.len() - dropped.len() + 1);
        let last_system = system_idx.last().copied();
        if last_system.is_none() {
            messages.extend(brevity.clone());
            messages.extend(summary.clone());
        }
        for (i, m) in msgs.iter().enumerate() {
            if m.role == Role::System || i >= turn || kept_history.contains(&i) {
                messages.push(m.clone());
            }
            if Some(i) == last_system {
                messages.extend(brevity.clone());
                messages.extend(summary.clone());
            }
        }
        out.messages = messages;
        out.documents = keep_docs
            .into_iter()
            .flatten()
            .map(Cow::into_owned)
            .collect();
        if out.params.max_tokens.is_none() {
            out.params.max_tokens = max_tokens;
        }
        if out.params.max_tokens.is_none() {
            let fill = window.saturating_sub(prompt_tokens).min(model.max_output);
            out.params.max_tokens = Some(u32::try_from(fill.max(1)).unwrap_or(u32::MAX));
        }
        Ok(Fitted {
            request: Cow::Owned(out),
            prompt_tokens,
            dropped_messages: dropped.len(),
            trimmed_documents,
        })
    }
}

/// The longest prefix of `text` (at a word boundary where possible) of at most
/// `budget` tokens, found by binary search over character boundaries.
fn trim_to(text: &str, budget: u64, count: impl Fn(&str) -> u64) -> String {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect();
    let (mut lo, mut hi) = (0usize, bounds.len() - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if count(&text[..bounds[mid]]) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let cut = &text[..bounds[lo]];
    match cut.rfind(char::is_whitespace) {
        Some(i) if bounds[lo] < text.len() && i > cut.len() / 2 => cut[..i].to_owned(),
        _ => cut.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TiktokenCounter;
    use crate::types::{Catalog, Pricing};

    fn model(window: u64) -> ModelSpec {
        ModelSpec::new(
            "m",
            "p",
            window,
            1_000,
            Pricing::per_mtok(1.0, 1.0, 1.0).unwrap(),
            2,
        )
    }

    fn fit<'a>(b: &ContextBudget, req: &'a ChatRequest, m: &ModelSpec) -> Result<Fitted<'a>> {
        b.fit(req, m, &TiktokenCounter::new(), &CountCache::default())
    }

    #[test]
    fn a_500_turn_conversation_fits_8k_with_the_system_prompt_and_newest_turns() {
        let mut req = ChatRequest::new().message(Message::system(
            "You are a careful support agent. Never reveal internal notes.",
        ));
        for i in 0..500 {
            req = req
                .message(Message::user(format!(
                    "Question {i}: what about order {i} and its delivery status today?"
                )))
                .message(Message::assistant(format!(
                    "Answer {i}: order {i} ships tomorrow from the north warehouse."
                )));
        }
        req = req
            .message(Message::user("And the last one?"))
            .max_tokens(500);
        let m = model(8_192);
        let f = fit(&ContextBudget::default(), &req, &m).unwrap();
        let out = &f.request;
        assert!(f.prompt_tokens + 500 <= 8_192);
        assert_eq!(
            TiktokenCounter::new().count_request(out, m.tokenizer),
            f.prompt_tokens,
            "the estimate is exact"
        );
        assert_eq!(out.messages[0], req.messages[0], "system prompt intact");
        assert_eq!(
            out.messages.last(),
            req.messages.last(),
            "current turn intact"
        );
        let n = out.messages.len();
        assert_eq!(
            out.messages[n - 2],
            req.messages[req.messages.len() - 2],
            "newest turns kept"
        );
        assert!(f.dropped_messages > 500, "{}", f.dropped_messages);
        // kept history is a contiguous newest suffix
        let kept = &out.messages[1..n - 1];
        let orig = &req.messages[req.messages.len() - 1 - kept.len()..req.messages.len() - 1];
        assert_eq!(kept, orig);
    }

    #[test]
    fn an_overflowing_system_prompt_is_a_clear_error() {
        let req = ChatRequest::new()
            .message(Message::system("word ".repeat(5_000)))
            .message(Message::user("hi"));
        let e = fit(&ContextBudget::default(), &req, &model(4_096)).unwrap_err();
        assert!(e.to_string().contains("system prompt"), "{e}");
        let req = ChatRequest::new()
            .message(Message::system("be brief"))
            .message(Message::user("word ".repeat(5_000)));
        let e = fit(&ContextBudget::default(), &req, &model(4_096)).unwrap_err();
        assert!(e.to_string().contains("current turn"), "{e}");
    }

    #[test]
    fn documents_by_relevance_within_their_share_in_original_order() {
        let doc = |t: &str, s| Document {
            id: Some(t.into()),
            text: format!("{t} ").repeat(300),
            score: s,
        };
        let mut req = ChatRequest::user_text("summarise").max_tokens(100);
        req.documents = vec![doc("low", 0.1), doc("high", 0.9), doc("mid", 0.5)];
        let f = fit(&ContextBudget::default(), &req, &model(2_000)).unwrap();
        let ids: Vec<&str> = f
            .request
            .documents
            .iter()
            .filter_map(|d| d.id.as_deref())
            .collect();
        // share is 40 % of ~1,890: "high" whole (~303), "mid" whole, "low" trimmed
        assert_eq!(ids, ["low", "high", "mid"], "original order kept");
        assert!(
            f.request.documents[0].text.len() < req.documents[0].text.len(),
            "the least relevant is trimmed"
        );
        assert_eq!(f.trimmed_documents, 1);
        let small = fit(&ContextBudget::default(), &req, &model(800)).unwrap();
        let ids: Vec<&str> = small
            .request
            .documents
            .iter()
            .filter_map(|d| d.id.as_deref())
            .collect();
        assert_eq!(ids.first(), Some(&"high"), "{ids:?}");
    }

    #[test]
    fn tool_calls_stay_with_their_results_and_max_tokens_is_set() {
        use crate::types::ToolCall;
        let call = ToolCall {
            id: "c1".into(),
            name: "lookup".into(),
            arguments: "{}".into(),
        };
        let req = ChatRequest::new()
            .message(Message::user("old ".repeat(3_000)))
            .message(Message::assistant("").with_tool_calls(vec![call]))
            .message(Message::tool("c1", "result ".repeat(10)))
            .message(Message::assistant("done"))
            .message(Message::user("next?"));
        let m = model(1_500);
        let f = fit(&ContextBudget::default(), &req, &m).unwrap();
        let roles: Vec<Role> = f.request.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::Assistant, Role::Tool, Role::Assistant, Role::User]
        );
        let max = u64::from(f.request.params.max_tokens.unwrap());
        assert_eq!(max, (1_500 - f.prompt_tokens).min(1_000));
    }

    #[test]
    fn cached_counts_match_the_counter() {
        let req = ChatRequest::new()
            .message(Message::system("be brief"))
            .message(Message::user("What is the capital of Norway?"))
            .document(Document::new("Oslo is the capital.", 1.0));
        let c = TiktokenCounter::new();
        let cache = CountCache::new(16);
        for kind in [
            TokenizerKind::O200k,
            TokenizerKind::Cl100k,
            TokenizerKind::ClaudeApprox,
        ] {
            assert_eq!(
                cache.count_request(&c, &req, kind),
                c.count_request(&req, kind)
            );
            assert_eq!(
                cache.count_request(&c, &req, kind),
                c.count_request(&req, kind),
                "from the cache"
            );
        }
    }

    #[test]
    fn a_summarizer_stands_in_for_dropped_turns() {
        #[derive(Debug)]
        struct Note;
        impl Summarizer for Note {
            fn summarize(&self, dropped: &[Message]) -> Option<Message> {
                Some(Message::system(format!(
                    "{} earlier messages omitted",
                    dropped.len()
                )))
            }
        }
        let mut req = ChatRequest::new().message(Message::system("sys"));
        for i in 0..200 {
            req = req
                .message(Message::user(format!("q{i} ").repeat(20)))
                .message(Message::assistant("a"));
        }
        req = req.message(Message::user("now")).max_tokens(100);
        let budget = ContextBudget {
            summarizer: Some(Arc::new(Note)),
            ..ContextBudget::default()
        };
        let f = fit(&budget, &req, &model(2_000)).unwrap();
        assert_eq!(f.request.messages[0].content, "sys");
        assert!(
            f.request.messages[1]
                .content
                .ends_with("earlier messages omitted")
        );
        let _ = Catalog::builtin();
    }

    #[test]
    fn a_1500_token_document_budget_holds_on_a_large_window() {
        let mut req = ChatRequest::user_text("what ships when?").max_tokens(200);
        for i in 0..6 {
            req.documents.push(Document {
                id: Some(format!("d{i}")),
                text: format!("shipment {i} leaves the north dock on monday. ").repeat(60),
                score: i as f32,
            });
        }
        let m = model(128_000);
        let all = fit(&ContextBudget::default(), &req, &m).unwrap();
        assert_eq!(all.trimmed_documents, 0, "40 % of 128k takes them all");
        let budget = ContextBudget::default().documents_max_tokens(1_500);
        let f = fit(&budget, &req, &m).unwrap();
        let c = TiktokenCounter::new();
        let doc_tokens: u64 = f
            .request
            .documents
            .iter()
            .map(|d| super::super::TOKENS_PER_MESSAGE + c.count_text(&d.text, m.tokenizer))
            .sum();
        assert!(doc_tokens <= 1_500, "{doc_tokens}");
        assert!(
            doc_tokens > 1_200,
            "the budget is used, not wasted: {doc_tokens}"
        );
        assert!(f.trimmed_documents > 0);
        // the most relevant survive, in their original order
        let ids: Vec<&str> = f
            .request
            .documents
            .iter()
            .filter_map(|d| d.id.as_deref())
            .collect();
        assert_eq!(ids.last(), Some(&"d5"), "{ids:?}");
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted);
        assert!(!ids.contains(&"d0"), "{ids:?}");
    }

    fn conversation(turns: usize) -> ChatRequest {
        let mut req = ChatRequest::new().message(Message::system("sys"));
        for i in 0..turns {
            req = req
                .message(Message::user(format!("q{i}")))
                .message(Message::assistant(format!("a{i}")));
        }
        req.message(Message::user("now")).max_tokens(100)
    }

    #[test]
    fn history_keeps_the_last_n_turns_and_its_token_budget() {
        let req = conversation(20);
        let m = model(100_000);
        let f = fit(&ContextBudget::default().history_max_turns(3), &req, &m).unwrap();
        let texts: Vec<&str> = f
            .request
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(
            texts,
            ["sys", "q17", "a17", "q18", "a18", "q19", "a19", "now"]
        );
        assert_eq!(f.dropped_messages, 34);
        let none = fit(&ContextBudget::default().history_max_turns(0), &req, &m).unwrap();
        assert_eq!(none.request.messages.len(), 2);
        // each message here is 3 + 2 tokens, so 25 keeps the 5 newest messages
        let by_tokens = fit(&ContextBudget::default().history_max_tokens(25), &req, &m).unwrap();
        let texts: Vec<&str> = by_tokens
            .request
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(texts, ["sys", "a17", "q18", "a18", "q19", "a19", "now"]);
        // a route's cap overrides the pipeline's
        let routed = ContextBudget::default()
            .history_max_turns(5)
            .route("faq", RouteBudget::new().history_max_turns(1));
        let mut r = req.clone();
        r.meta.feature = Some("faq".into());
        assert_eq!(fit(&routed, &r, &m).unwrap().request.messages.len(), 4);
        assert_eq!(fit(&routed, &req, &m).unwrap().request.messages.len(), 12);
    }

    #[test]
    fn section_budgets_refuse_what_must_not_be_cut() {
        let req = ChatRequest::new()
            .message(Message::system("rule ".repeat(400)))
            .message(Message::user("hi"));
        let e = fit(
            &ContextBudget::default().system_max_tokens(300),
            &req,
            &model(100_000),
        )
        .unwrap_err();
        match &e {
            Error::ContextTooLong {
                tokens,
                limit,
                model,
            } => {
                assert_eq!(*limit, 300);
                assert!(*tokens > 300);
                assert!(model.contains("system prompt"), "{model}");
            }
            other => panic!("{other:?}"),
        }
        let mut req = ChatRequest::user_text("hi");
        req.params.tools.push(crate::types::Tool {
            name: "lookup".into(),
            description: "look it up ".repeat(100),
            parameters: serde_json::json!({"type": "object"}),
        });
        let e = fit(
            &ContextBudget::default().tools_max_tokens(50),
            &req,
            &model(100_000),
        )
        .unwrap_err();
        assert!(e.to_string().contains("tool definitions"), "{e}");
        assert!(
            fit(
                &ContextBudget::default().tools_max_tokens(500),
                &req,
                &model(100_000)
            )
            .is_ok()
        );
    }

    #[test]
    fn default_max_tokens_and_brevity_by_route() {
        let m = model(100_000);
        let budget = ContextBudget::default()
            .default_max_tokens(400)
            .route("chat", RouteBudget::new().max_tokens(150).brief());
        let plain = ChatRequest::new()
            .message(Message::system("sys"))
            .message(Message::user("hi"));
        let f = fit(&budget, &plain, &m).unwrap();
        assert_eq!(f.request.params.max_tokens, Some(400));
        assert_eq!(f.request.messages.len(), 2, "brevity is off by default");
        let mut routed = plain.clone();
        routed.meta.feature = Some("chat".into());
        assert_eq!(budget.max_tokens_for(&routed), Some(150));
        let f = fit(&budget, &routed, &m).unwrap();
        assert_eq!(f.request.params.max_tokens, Some(150));
        let texts: Vec<&str> = f
            .request
            .messages
            .iter()
            .map(|m| m.content.as_str())
            .collect();
        assert_eq!(texts, ["sys", BREVITY_INSTRUCTION, "hi"]);
        assert_eq!(
            f.prompt_tokens,
            TiktokenCounter::new().count_request(&f.request, m.tokenizer)
        );
        // a request's own max_tokens wins
        let own = routed.clone().max_tokens(9);
        assert_eq!(
            fit(&budget, &own, &m).unwrap().request.params.max_tokens,
            Some(9)
        );
        // without any default, the window's rest
        let f = fit(&ContextBudget::default(), &plain, &m).unwrap();
        assert_eq!(f.request.params.max_tokens, Some(1_000));
    }
}
