//! Event streams: the translation of one API's SSE events into stream events, the
//! bounded reading of the body, and what makes a stream complete.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::stream;
use serde_json::Value;

use super::client::{HttpCore, Sent, after, scrub, snippet};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::sse::{SseDecoder, SseEvent};
use crate::types::{
    ChatRequest, ChatResponse, ChatStream, FinishReason, ModelSpec, StreamEnd, StreamEvent, Usage,
};
use crate::{Error, Result};

/// What a provider's stream knows when it ends, for [`HttpCore::end_stream`].
pub(crate) struct StreamEnding {
    /// The text and tool arguments delivered, for counting when no usage came.
    pub(crate) delivered: String,
    pub(crate) usage: Option<Usage>,
    pub(crate) finish: Option<FinishReason>,
}

/// What a streamed call asked for: the request and the model.
#[derive(Debug, Clone)]
pub(crate) struct Asked {
    pub(crate) request: ChatRequest,
    pub(crate) model: ModelSpec,
}

impl Asked {
    pub(crate) fn new(request: &ChatRequest, model: &ModelSpec) -> Self {
        Asked {
            request: request.clone(),
            model: model.clone(),
        }
    }
}

impl HttpCore {
    /// The JSON payload of a stream event. Text that is not JSON is the server's error
    /// message when the event is named `error`, else a malformed event.
    pub(crate) fn event_json(
        &self,
        ev: &SseEvent,
        data: &str,
    ) -> std::result::Result<Value, EventError> {
        serde_json::from_str(data).map_err(|e| {
            if ev.event == "error" {
                EventError::Failed(self.error(
                    ProviderErrorKind::Server,
                    format!("error in the stream: {}", snippet(data.as_bytes())),
                ))
            } else {
                EventError::Malformed(format!("a stream event is not valid JSON ({e})"))
            }
        })
    }

    /// The last two events of a stream: its usage (checked, or counted by tokenwise
    /// when the provider sent none or an implausible one) and its end.
    pub(crate) async fn end_stream(
        &self,
        asked: &Asked,
        ending: StreamEnding,
        sent: &Sent,
        out: &mut VecDeque<StreamEvent>,
    ) {
        let StreamEnding {
            delivered,
            usage,
            finish,
        } = ending;
        let usage = self
            .settle_usage(&asked.request, &asked.model, usage, || delivered, sent)
            .await;
        let finish = finish.unwrap_or_else(|| FinishReason::Other("unknown".into()));
        out.push_back(StreamEvent::Usage(usage));
        let mut end = StreamEnd::new(finish, &asked.model.name, &self.name);
        end.usage = usage;
        out.push_back(StreamEvent::Done(end));
    }
}

/// How many malformed events (not JSON, or not of the expected shape) one stream may
/// skip; one more fails it with [`ProviderErrorKind::InvalidResponse`].
pub const MAX_MALFORMED_EVENTS: u32 = 3;

/// `tokenwise_stream_malformed_events_total`: stream events skipped as malformed, by
/// `provider`.
pub const STREAM_MALFORMED_EVENTS: &str = "tokenwise_stream_malformed_events_total";

/// Why a stream event could not be used.
#[derive(Debug)]
pub(crate) enum EventError {
    /// Not JSON, or not of the expected shape: skipped, up to [`MAX_MALFORMED_EVENTS`].
    Malformed(String),
    /// The stream failed: an error event, say.
    Failed(ProviderError),
}

impl From<ProviderError> for EventError {
    fn from(e: ProviderError) -> Self {
        EventError::Failed(e)
    }
}

/// Turns one API's SSE events into stream events.
pub(crate) trait Translate: Send + 'static {
    /// Handles one event, pushing the text and tool-call deltas it carries to `out`;
    /// `Ok(true)` at the stream's end marker.
    fn event(
        &mut self,
        core: &HttpCore,
        ev: SseEvent,
        out: &mut VecDeque<StreamEvent>,
    ) -> std::result::Result<bool, EventError>;

    /// Whether the stream has said how the answer finished: then a clean end of the
    /// body completes it, end marker or not.
    fn has_finish(&self) -> bool;

    /// What the call asked for.
    fn asked(&self) -> &Asked;

    /// What the stream knows at its end.
    fn ending(&mut self) -> StreamEnding;
}

struct StreamState<T> {
    core: Arc<HttpCore>,
    resp: crate::provider::http::Response,
    sent: Sent,
    decoder: SseDecoder,
    events: VecDeque<SseEvent>,
    translator: T,
    out: VecDeque<StreamEvent>,
    bytes: u64,
    chunks: u64,
    malformed: u32,
    finished: bool,
    /// A decoding error to report once the events decoded before it are handled.
    pending: Option<ProviderError>,
}

impl<T: Translate> StreamState<T> {
    fn fail(&mut self, e: ProviderError) -> Error {
        self.finished = true;
        self.out.clear();
        let e = match &self.sent.key {
            Some(lease) => {
                let mut e = e;
                e.message = scrub(&e.message, lease.key());
                e
            }
            None => e,
        };
        if self.chunks == 0 {
            e.into()
        } else {
            Error::StreamInterrupted {
                chunks: self.chunks,
                reason: e.to_string(),
            }
        }
    }

    /// Queues the usage and the end, and marks the stream finished.
    async fn complete(&mut self) {
        let ending = self.translator.ending();
        let core = Arc::clone(&self.core);
        core.end_stream(self.translator.asked(), ending, &self.sent, &mut self.out)
            .await;
        self.finished = true;
    }

    /// Reads until at least one SSE event is decoded; `Ok(false)` at the end of the body.
    async fn fill(&mut self) -> std::result::Result<bool, ProviderError> {
        let first_token = if self.chunks == 0 {
            after(self.sent.start, self.core.deadlines.first_byte)
        } else {
            None
        };
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        while self.events.is_empty() {
            let Some(chunk) = self
                .core
                .next_chunk(&mut self.resp, &self.sent, first_token)
                .await?
            else {
                return Ok(false);
            };
            self.bytes = self.bytes.saturating_add(chunk.len() as u64);
            if self.bytes > self.core.max_stream_bytes {
                return Err(self.core.error(
                    ProviderErrorKind::InvalidResponse,
                    format!(
                        "the stream exceeds the cap of {} bytes",
                        self.core.max_stream_bytes
                    ),
                ));
            }
            let mut decoded = Vec::new();
            let result = self.decoder.feed(&chunk, &mut decoded);
            self.events.extend(decoded);
            if let Err(e) = result {
                let e = self
                    .core
                    .error(ProviderErrorKind::InvalidResponse, e.to_string());
                if self.events.is_empty() {
                    return Err(e);
                }
                // Handle what came before; the error comes back on the next read.
                self.pending = Some(e);
                break;
            }
        }
        Ok(true)
    }

    async fn next(&mut self) -> Option<Result<StreamEvent>> {
        loop {
            if let Some(ev) = self.out.pop_front() {
                if matches!(
                    ev,
                    StreamEvent::TextDelta { .. } | StreamEvent::ToolCallDelta(_)
                ) {
                    self.chunks += 1;
                }
                return Some(Ok(ev));
            }
            if self.finished {
                return None;
            }
            let ev = match self.events.pop_front() {
                Some(ev) => ev,
                None => match self.fill().await {
                    Ok(true) => continue,
                    // A clean end of the body: complete if the answer said how it
                    // finished, cut otherwise.
                    Ok(false) if self.translator.has_finish() => {
                        self.complete().await;
                        continue;
                    }
                    Ok(false) => {
                        let e = self.core.error(
                            ProviderErrorKind::Connection,
                            "the stream ended without a finish reason",
                        );
                        return Some(Err(self.fail(e)));
                    }
                    Err(e) => return Some(Err(self.fail(e))),
                },
            };
            match self.translator.event(&self.core, ev, &mut self.out) {
                Ok(true) => self.complete().await,
                Ok(false) => {}
                Err(EventError::Malformed(why)) => {
                    self.malformed += 1;
                    metrics::counter!(STREAM_MALFORMED_EVENTS, "provider" => self.core.name.clone())
                        .increment(1);
                    tracing::debug!(provider = %self.core.name, "skipped a malformed stream event: {why}");
                    if self.malformed > MAX_MALFORMED_EVENTS {
                        let e = self.core.error(
                            ProviderErrorKind::InvalidResponse,
                            format!(
                                "more than {MAX_MALFORMED_EVENTS} malformed events in the stream; the last: {why}"
                            ),
                        );
                        return Some(Err(self.fail(e)));
                    }
                }
                Err(EventError::Failed(e)) => return Some(Err(self.fail(e))),
            }
        }
    }
}

/// A stream of `resp`'s SSE body, translated by `translator`.
pub(crate) fn sse_stream<T: Translate>(
    core: Arc<HttpCore>,
    resp: crate::provider::http::Response,
    sent: Sent,
    translator: T,
) -> ChatStream {
    let decoder = SseDecoder::with_max_event_bytes(core.max_event_bytes);
    let state = StreamState {
        core,
        resp,
        sent,
        decoder,
        events: VecDeque::new(),
        translator,
        out: VecDeque::new(),
        bytes: 0,
        chunks: 0,
        malformed: 0,
        finished: false,
        pending: None,
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        let item = st.next().await?;
        Some((item, st))
    }))
}

/// A whole answer as a stream: its text, tool calls, usage and end.
pub(crate) fn replay(r: ChatResponse) -> ChatStream {
    let mut events: Vec<Result<StreamEvent>> = Vec::new();
    if !r.content.is_empty() {
        events.push(Ok(StreamEvent::text(r.content.clone())));
    }
    for (i, call) in r.tool_calls.iter().enumerate() {
        let mut d = crate::types::ToolCallDelta::new(
            u32::try_from(i).unwrap_or(u32::MAX),
            call.arguments.clone(),
        );
        d.id = Some(call.id.clone());
        d.name = Some(call.name.clone());
        events.push(Ok(StreamEvent::ToolCallDelta(d)));
    }
    events.push(Ok(StreamEvent::Usage(r.usage)));
    let mut end = StreamEnd::new(r.finish_reason.clone(), &r.model, &r.provider);
    end.usage = r.usage;
    events.push(Ok(StreamEvent::Done(end)));
    Box::pin(stream::iter(events))
}
