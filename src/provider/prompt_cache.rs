//! Provider-side prompt caching: where Anthropic's `cache_control` breakpoints go, and
//! the `prompt_cache_key` sent to OpenAI-compatible APIs.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::context::{TiktokenCounter, TokenCounter};
use crate::types::{ChatRequest, Role, TokenizerKind};

/// How long a provider keeps a cached prompt prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum PromptCacheTtl {
    /// Five minutes, refreshed on every hit; writes cost 1.25× the input price.
    #[default]
    FiveMinutes,
    /// One hour; writes cost 2× the input price. Worth it for prefixes reused less
    /// often than every five minutes.
    OneHour,
}

impl PromptCacheTtl {
    /// The `cache_control` object for this lifetime.
    pub(crate) fn cache_control(self) -> Value {
        match self {
            PromptCacheTtl::FiveMinutes => json!({"type": "ephemeral"}),
            PromptCacheTtl::OneHour => json!({"type": "ephemeral", "ttl": "1h"}),
        }
    }
}

/// Where [`Anthropic`](super::Anthropic) places `cache_control` breakpoints.
///
/// On by default: up to four breakpoints go on the stable prefix of the prompt, at the
/// end of each of its sections — tool definitions, system prompt, documents, and the
/// earlier turns of the conversation (everything before the current turn) — once the
/// prefix up to that point holds at least `min_tokens` (Anthropic does not cache shorter
/// prefixes). Routes (by the request's `meta.feature`) may set their own lifetime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptCaching {
    /// Whether breakpoints are placed at all (default true).
    pub enabled: bool,
    /// Lifetime of the cached prefixes (default five minutes).
    pub ttl: PromptCacheTtl,
    /// Lifetimes by route (`meta.feature`).
    pub routes: HashMap<String, PromptCacheTtl>,
    /// The shortest prefix worth a breakpoint, in tokens (default 1,024, Anthropic's
    /// minimum for most models; some models need more, and shorter prefixes are simply
    /// not cached).
    pub min_tokens: u64,
}

impl Default for PromptCaching {
    fn default() -> Self {
        PromptCaching {
            enabled: true,
            ttl: PromptCacheTtl::FiveMinutes,
            routes: HashMap::new(),
            min_tokens: 1_024,
        }
    }
}

impl PromptCaching {
    /// No breakpoints.
    pub fn off() -> Self {
        PromptCaching {
            enabled: false,
            ..Self::default()
        }
    }

    /// The lifetime for `req`: its route's, else the default.
    pub fn ttl_for(&self, req: &ChatRequest) -> PromptCacheTtl {
        req.meta
            .feature
            .as_deref()
            .and_then(|f| self.routes.get(f))
            .copied()
            .unwrap_or(self.ttl)
    }
}

/// The breakpoints of one request: which prompt sections end with one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Breakpoints {
    pub(crate) tools: bool,
    pub(crate) system: bool,
    pub(crate) documents: bool,
    /// The index in `req.messages` of the last earlier-turn message to mark.
    pub(crate) history: Option<usize>,
}

impl Breakpoints {
    #[cfg(test)]
    pub(crate) fn any(&self) -> bool {
        self.tools || self.system || self.documents || self.history.is_some()
    }
}

/// Places breakpoints on `req`'s stable prefix. `prompt_tokens` is the whole prompt's
/// count when known, to skip counting sections of a prompt too short to cache.
pub(crate) fn breakpoints(
    caching: &PromptCaching,
    req: &ChatRequest,
    prompt_tokens: Option<u64>,
) -> Breakpoints {
    let mut out = Breakpoints::default();
    if !caching.enabled || prompt_tokens.is_some_and(|n| n < caching.min_tokens) {
        return out;
    }
    let counter = TiktokenCounter::new();
    let kind = TokenizerKind::ClaudeApprox;
    let count = |t: &str| counter.count_text(t, kind);
    let tools: u64 = req
        .params
        .tools
        .iter()
        .map(|t| count(&t.name) + count(&t.description) + count(&t.parameters.to_string()))
        .sum();
    let system: u64 = req
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| count(&m.content))
        .sum();
    let documents: u64 = req.documents.iter().map(|d| count(&d.text)).sum();
    let turn = crate::context::current_turn_start(&req.messages);
    let last_history = req.messages[..turn]
        .iter()
        .rposition(|m| m.role != Role::System);
    let history: u64 = req.messages[..turn]
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| counter.count_message(m, kind))
        .sum();
    let min = caching.min_tokens;
    let mut prefix = tools;
    out.tools = tools > 0 && prefix >= min;
    prefix += system;
    out.system = system > 0 && prefix >= min;
    prefix += documents;
    out.documents = documents > 0 && prefix >= min;
    prefix += history;
    if history > 0 && prefix >= min {
        out.history = last_history;
    }
    out
}

/// A stable `prompt_cache_key` for OpenAI-compatible APIs: the same for every request of
/// one tenant (`meta.org`, else `meta.user`) with the same prefix (system messages, tool
/// definitions and documents), so the provider routes them to the same cache.
pub(crate) fn prompt_cache_key(req: &ChatRequest) -> Option<String> {
    let mut h = blake3::Hasher::new();
    let tenant = req.meta.org.as_deref().or(req.meta.user.as_deref());
    let mut field = |tag: &[u8], s: &str| {
        h.update(tag);
        h.update(&(s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(b"t", tenant.unwrap_or_default());
    let mut any = false;
    for m in req.messages.iter().filter(|m| m.role == Role::System) {
        field(b"s", &m.content);
        any = true;
    }
    for t in &req.params.tools {
        field(b"f", &t.name);
        field(b"d", &t.description);
        field(b"p", &t.parameters.to_string());
        any = true;
    }
    for d in &req.documents {
        field(b"c", &d.text);
        any = true;
    }
    if !any {
        return None;
    }
    let hex = h.finalize().to_hex();
    Some(format!("tw-{}", &hex[..32]))
}

/// Shared prompt-caching settings of a provider.
pub(crate) type SharedCaching = Arc<PromptCaching>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Message;

    #[test]
    fn the_key_is_per_tenant_and_prefix() {
        let req = |org: &str, sys: &str, q: &str| {
            ChatRequest::new()
                .message(Message::system(sys))
                .message(Message::user(q))
                .org(org)
        };
        let a = prompt_cache_key(&req("acme", "be brief", "q1")).unwrap();
        assert_eq!(a, prompt_cache_key(&req("acme", "be brief", "q2")).unwrap());
        assert_ne!(
            a,
            prompt_cache_key(&req("other", "be brief", "q1")).unwrap()
        );
        assert_ne!(a, prompt_cache_key(&req("acme", "be long", "q1")).unwrap());
        assert_eq!(a.len(), 35);
        assert_eq!(prompt_cache_key(&ChatRequest::user_text("hi")), None);
    }

    #[test]
    fn breakpoints_need_a_long_enough_prefix() {
        let long = "The warehouse policy covers returns, refunds and delivery. ".repeat(120);
        let req = ChatRequest::new()
            .message(Message::system(long.clone()))
            .message(Message::user("old question"))
            .message(Message::assistant("old answer"))
            .message(Message::user("new question"));
        let b = breakpoints(&PromptCaching::default(), &req, None);
        assert_eq!(
            b,
            Breakpoints {
                tools: false,
                system: true,
                documents: false,
                history: Some(2),
            }
        );
        assert!(!breakpoints(&PromptCaching::off(), &req, None).any());
        assert!(!breakpoints(&PromptCaching::default(), &req, Some(900)).any());
        let short = ChatRequest::new()
            .message(Message::system("be brief"))
            .message(Message::user("hi"));
        assert!(!breakpoints(&PromptCaching::default(), &short, None).any());
    }
}
