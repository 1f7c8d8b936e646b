//! The usage of an answer: the reported one when it is plausible, else a bounded local
//! count done off the runtime's workers within the call's deadline.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::client::{HttpCore, Sent, after, earliest};
use crate::context::TokenCounter;
use crate::types::{ChatRequest, ChatResponse, ModelSpec, TokenizerKind, Usage};

impl HttpCore {
    /// The usage of an answer: the reported one when it is plausible for what was
    /// asked, else a local count of the prompt and `output` (see [`count_usage`]), done
    /// off the runtime's workers and within the call's total deadline.
    pub(crate) async fn settle_usage(
        &self,
        request: &ChatRequest,
        model: &ModelSpec,
        reported: Option<Usage>,
        output: impl FnOnce() -> String,
        sent: &Sent,
    ) -> Usage {
        if let Some(u) = reported {
            match implausible(&u, request, model) {
                None => return u,
                Some(why) => tracing::warn!(
                    provider = %self.name,
                    model = %model.name,
                    "implausible usage replaced by a local count: {why}"
                ),
            }
        }
        let deadline = earliest(
            self.total_deadline(sent.start),
            after(Instant::now(), Some(MAX_COUNT_TIME)),
        );
        let output = output();
        let rough = rough_usage(request, output.len());
        let counter = Arc::clone(&self.counter);
        let request = request.clone();
        let tokenizer = model.tokenizer;
        let task = tokio::task::spawn_blocking(move || {
            count_usage(counter.as_ref(), &request, &output, tokenizer)
        });
        let counted = match deadline {
            Some(at) => tokio::time::timeout_at(at, task).await.ok(),
            None => Some(task.await),
        };
        match counted {
            Some(Ok(u)) => u,
            // Out of time (the task finishes on its own, its text capped) or failed:
            // a rough estimate from the sizes.
            _ => rough,
        }
    }
}

impl HttpCore {
    /// `r` with its usage settled (see [`settle_usage`](Self::settle_usage)).
    pub(crate) async fn settle_answer(
        &self,
        call: &crate::provider::ProviderCall<'_>,
        mut r: ChatResponse,
        reported: Option<Usage>,
        sent: &Sent,
    ) -> ChatResponse {
        let output = || {
            let mut out = r.content.clone();
            for c in &r.tool_calls {
                out.push_str(&c.arguments);
            }
            out
        };
        let usage = self
            .settle_usage(call.request, call.model, reported, output, sent)
            .await;
        r.usage = usage;
        r
    }
}

/// The longest time spent counting the tokens of an answer that came without usage.
const MAX_COUNT_TIME: Duration = Duration::from_secs(2);
/// The most of an answer's text counted with the tokenizer; the rest is estimated at
/// the rate of the counted part.
pub(crate) const MAX_COUNTED_BYTES: usize = 64 << 10;

/// The prompt and `output` counted with `counter`, `output` beyond
/// [`MAX_COUNTED_BYTES`] estimated at the rate of its counted part. Marked estimated.
pub(crate) fn count_usage(
    counter: &dyn TokenCounter,
    request: &ChatRequest,
    output: &str,
    tokenizer: TokenizerKind,
) -> Usage {
    let mut cut = output.len().min(MAX_COUNTED_BYTES);
    while !output.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = output.get(..cut).unwrap_or_default();
    let mut out_tokens = counter.count_text(head, tokenizer);
    let rest = (output.len() - cut) as u64;
    if rest > 0 {
        let rate = if cut == 0 || out_tokens == 0 {
            // One token per four bytes, the usual rate of English text.
            (1, 4)
        } else {
            (out_tokens, cut as u64)
        };
        let more = u128::from(rest) * u128::from(rate.0) / u128::from(rate.1).max(1);
        out_tokens = out_tokens.saturating_add(u64::try_from(more).unwrap_or(u64::MAX));
    }
    Usage::new(counter.count_request(request, tokenizer), out_tokens).estimated()
}

/// A usage estimate from sizes alone: four bytes a token.
fn rough_usage(request: &ChatRequest, output_bytes: usize) -> Usage {
    let prompt: usize = request
        .messages
        .iter()
        .map(|m| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.len())
                    .sum::<usize>()
        })
        .chain(request.documents.iter().map(|d| d.text.len()))
        .sum();
    Usage::new(
        (prompt as u64).div_ceil(4),
        (output_bytes as u64).div_ceil(4),
    )
    .estimated()
}

/// Why `u` cannot be the usage of an answer to `request` on `model`, if it cannot: more
/// output than `max_tokens` (or the model's limits) allow, or more input than the
/// context window holds, each with a 10 % margin.
pub(crate) fn implausible(u: &Usage, request: &ChatRequest, model: &ModelSpec) -> Option<String> {
    let margin = |n: u64| n.saturating_add(n / 10).saturating_add(64);
    let window = model.context_window.max(model.max_output);
    let out_cap = match request.params.max_tokens {
        Some(n) => u64::from(n),
        None if window > 0 => window,
        None => u64::from(u32::MAX),
    };
    if u.output_tokens > margin(out_cap) {
        return Some(format!(
            "{} output tokens, at most {out_cap} possible",
            u.output_tokens
        ));
    }
    let in_cap = if model.context_window > 0 {
        model.context_window
    } else {
        u64::from(u32::MAX)
    };
    if u.input_tokens > margin(in_cap) {
        return Some(format!(
            "{} input tokens, the context window holds {in_cap}",
            u.input_tokens
        ));
    }
    None
}
