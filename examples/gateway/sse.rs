//! Streamed answers as server-sent events.
//!
//! A writer task moves the pipeline's events into a bounded channel that the response
//! body reads. When the client goes away (the body is dropped) or stops reading for the
//! write-stall timeout (the channel stays full), the task drops the pipeline's stream,
//! which settles what was used. A stream that breaks after its first token ends with an
//! error event and no `[DONE]`; a body abandoned without even that is cut off, so the
//! client's HTTP library sees a broken response rather than a clean end.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokenwise::{ChatStream, StreamEvent};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::wire::{self, Chunks};

/// How far to read ahead, before the response starts, to tell a cached replay (whose
/// events are all ready at once) from a live answer: events, and bytes of text.
const PEEK_EVENTS: usize = 4096;
const PEEK_BYTES: usize = 256 * 1024;

/// What the body reads.
#[derive(Debug)]
enum Frame {
    Data(Bytes),
    /// The answer ended as it should (after `[DONE]` or an error event).
    End,
}

/// A streamed answer, started.
pub struct Started {
    /// The response body.
    pub body: axum::body::Body,
    /// `Some(true)` when the cache answered, `Some(false)` when a provider did, `None`
    /// when it cannot be told before the stream ends.
    pub cache_hit: Option<bool>,
}

/// What the writer needs besides the stream.
pub struct Writer {
    /// Formats chunks.
    pub chunks: Chunks,
    /// Frames buffered between the writer and the client.
    pub buffer: usize,
    /// How long the writer waits for room before it gives the client up.
    pub stall: Duration,
    /// Scrubs secrets from error text.
    pub redact: Box<dyn Fn(&str) -> String + Send + Sync>,
    /// For the log line.
    pub request_id: String,
}

/// Starts streaming `stream` to the client.
pub fn start(mut stream: ChatStream, w: Writer) -> Started {
    // Read ahead whatever is ready now, within bounds: a cache hit is replayed from
    // memory, so its `Done` (which says how it was served) is among these; a stream that
    // has to wait is a live answer; past the bounds, it cannot be told up front.
    let mut ready = Vec::new();
    let mut bytes = 0;
    let mut cache_hit = None;
    while ready.len() < PEEK_EVENTS && bytes < PEEK_BYTES {
        match stream.next().now_or_never() {
            Some(Some(item)) => {
                let last = match &item {
                    Ok(StreamEvent::Done(end)) => {
                        cache_hit = Some(end.served.is_cache_hit());
                        true
                    }
                    Ok(StreamEvent::TextDelta { text }) => {
                        bytes += text.len();
                        false
                    }
                    Ok(StreamEvent::ToolCallDelta(d)) => {
                        bytes += d.arguments.len();
                        false
                    }
                    Err(_) => true,
                    Ok(_) => false,
                };
                ready.push(item);
                if last {
                    break;
                }
            }
            Some(None) => break,
            None => {
                cache_hit = Some(false); // a replay never waits
                break;
            }
        }
    }
    let (tx, rx) = mpsc::channel(w.buffer.max(1));
    tokio::spawn(pump(stream, ready, tx, w));
    let body = futures_util::stream::unfold((rx, false), |(mut rx, cut)| async move {
        if cut {
            return None;
        }
        match rx.recv().await {
            Some(Frame::Data(b)) => Some((Ok(b), (rx, false))),
            Some(Frame::End) => None,
            None => Some((
                Err(std::io::Error::other("the answer stream was abandoned")),
                (rx, true),
            )),
        }
    });
    Started {
        body: axum::body::Body::from_stream(body),
        cache_hit,
    }
}

/// How the writer finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Failed,
    ClientGone,
}

async fn pump(
    mut stream: ChatStream,
    ready: Vec<tokenwise::Result<StreamEvent>>,
    tx: mpsc::Sender<Frame>,
    w: Writer,
) {
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { tx.send_timeout(Frame::Data(b), w.stall).await.is_ok() }
    };
    let c = &w.chunks;
    let mut ready = ready.into_iter();
    let mut outcome = if send(c.role()).await {
        None
    } else {
        Some(Outcome::ClientGone)
    };
    while outcome.is_none() {
        let item = match ready.next() {
            Some(item) => Some(item),
            None => tokio::select! {
                biased;
                () = tx.closed() => { outcome = Some(Outcome::ClientGone); break; }
                item = stream.next() => item,
            },
        };
        let sent = match item {
            Some(Ok(StreamEvent::TextDelta { text })) => send(c.text(&text)).await,
            Some(Ok(StreamEvent::ToolCallDelta(d))) => send(c.tool_call(&d)).await,
            Some(Ok(StreamEvent::Done(end))) => {
                tracing::debug!(
                    request_id = %w.request_id,
                    model = %end.model,
                    cache = end.served.is_cache_hit(),
                    tokens = end.usage.total(),
                    cost = %end.cost,
                    "stream finished"
                );
                let mut ok = send(c.finish(&end.finish_reason, &end.model)).await;
                if ok && c.include_usage {
                    ok = send(c.usage(&end.usage, &end.model)).await;
                }
                if ok {
                    // A comment line: every SSE client skips it; people and scripts can read it.
                    let note = format!(
                        ": tokenwise cache={} cost_usd={} model={}\n\n",
                        if end.served.is_cache_hit() {
                            "hit"
                        } else {
                            "miss"
                        },
                        super::dollars(end.cost),
                        end.model,
                    );
                    ok =
                        send(Bytes::from(note)).await && send(Bytes::from_static(wire::DONE)).await;
                }
                outcome = Some(if ok {
                    Outcome::Done
                } else {
                    Outcome::ClientGone
                });
                ok
            }
            Some(Ok(_)) => true, // usage comes again with `Done`
            Some(Err(e)) => {
                let err = ApiError::from_pipeline(&e, &*w.redact);
                tracing::warn!(
                    request_id = %w.request_id,
                    reason = e.reason(),
                    "stream failed after it started"
                );
                outcome = Some(Outcome::Failed);
                send(wire::event(&err.body())).await
            }
            None => {
                let err = ApiError::from_pipeline(
                    &tokenwise::Error::StreamInterrupted {
                        chunks: 0,
                        reason: "ended without a final event".into(),
                    },
                    &*w.redact,
                );
                outcome = Some(Outcome::Failed);
                send(wire::event(&err.body())).await
            }
        };
        if !sent {
            outcome = Some(Outcome::ClientGone);
        }
    }
    // Dropping the pipeline's stream settles it: a cut or abandoned stream commits what
    // it used.
    drop(stream);
    match outcome {
        Some(Outcome::Done | Outcome::Failed) => {
            // A clean end of the body; a client that got no `[DONE]` knows it broke.
            let _ = tx.send_timeout(Frame::End, w.stall).await;
        }
        _ => tracing::debug!(request_id = %w.request_id, "client gone or stalled; stream dropped"),
    }
}
