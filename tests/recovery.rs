//! Streams cut after their first token are recovered: continued where they stopped on
//! a model that accepts assistant prefill, or restarted with the text already sent
//! withheld. The caller gets one whole answer, or a typed error; never a spliced
//! answer and never a clean end after a cut.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use tokenwise::provider::{Provider, ProviderCall};
use tokenwise::{
    ChatRequest, ChatResponse, ChatStream, Error, FinishReason, Pipeline, ProviderError,
    ProviderErrorKind, Role, StreamEnd, StreamEvent, Usage,
};

mod common;

use common::drain;

const ANSWER: &str = "The quick brown fox jumps over the lazy dog and runs far away.";

/// How one call of the test provider behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Call {
    /// The whole answer.
    Whole,
    /// `n` chunks, then a connection reset.
    CutAfter(usize),
    /// `n` chunks, then silence.
    StallAfter(usize),
    /// Another answer altogether.
    Different,
    /// A 400 if the request ends with an assistant message (prefill refused).
    RejectPrefill,
}

/// Streams `ANSWER` word by word, each call as scripted (the last entry repeats).
/// With an assistant prefill that is a prefix of `ANSWER`, it continues from there.
#[derive(Debug)]
struct Scripted {
    script: Vec<Call>,
    calls: AtomicUsize,
    prefills: Mutex<Vec<String>>,
}

impl Scripted {
    fn new(script: &[Call]) -> Arc<Self> {
        Arc::new(Scripted {
            script: script.to_vec(),
            calls: AtomicUsize::new(0),
            prefills: Mutex::new(Vec::new()),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// Five-character chunks, so a cut may fall inside a word.
fn words(text: &str) -> Vec<String> {
    text.as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

#[async_trait]
impl Provider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn chat(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        Err(ProviderError::new(ProviderErrorKind::BadRequest, "scripted", "streams only").into())
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let how = self.script[n.min(self.script.len() - 1)];
        let prefill = call
            .request
            .messages
            .last()
            .filter(|m| m.role == Role::Assistant)
            .map(|m| m.content.clone());
        if let Some(p) = &prefill {
            self.prefills.lock().unwrap().push(p.clone());
            if how == Call::RejectPrefill {
                return Err(ProviderError::new(
                    ProviderErrorKind::BadRequest,
                    "scripted",
                    "this model does not support assistant prefill",
                )
                .with_status(400)
                .into());
            }
        }
        let text = match how {
            Call::Different => "A wholly different reply about something else.".to_owned(),
            _ => match &prefill {
                Some(p) => ANSWER.strip_prefix(p.as_str()).unwrap_or(ANSWER).to_owned(),
                None => ANSWER.to_owned(),
            },
        };
        let chunks = words(&text);
        let out = chunks.len() as u64;
        let mut events: Vec<tokenwise::Result<StreamEvent>> = Vec::new();
        let keep = match how {
            Call::CutAfter(k) | Call::StallAfter(k) => k.min(chunks.len()),
            _ => chunks.len(),
        };
        for c in &chunks[..keep] {
            events.push(Ok(StreamEvent::text(c.clone())));
        }
        let model = call.model.name.clone();
        match how {
            Call::CutAfter(_) => {
                events.push(Err(Error::StreamInterrupted {
                    chunks: keep as u64,
                    reason: "connection reset".into(),
                }));
                Ok(Box::pin(stream::iter(events)))
            }
            Call::StallAfter(_) => Ok(Box::pin(stream::iter(events).chain(stream::pending()))),
            _ => {
                events.push(Ok(StreamEvent::Usage(Usage::new(20, out))));
                events.push(Ok(StreamEvent::Done(StreamEnd::new(
                    FinishReason::Stop,
                    model,
                    "scripted",
                ))));
                Ok(Box::pin(stream::iter(events)))
            }
        }
    }
}

fn pipeline(p: &Arc<Scripted>, model: &str) -> Pipeline {
    Pipeline::builder()
        .provider_arc(p.clone())
        .default_model(model)
        .no_cache()
        .no_breaker()
        .idle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_is_restarted_and_its_repeat_withheld() {
    let p = Scripted::new(&[Call::CutAfter(3), Call::Whole]);
    let pipe = pipeline(&p, "gpt-4o-mini");
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER, "the caller sees the answer once, whole");
    let end = end.unwrap();
    assert_eq!(end.finish_reason, FinishReason::Stop);
    assert_eq!(p.calls(), 2);
    assert!(
        p.prefills.lock().unwrap().is_empty(),
        "gpt-4o-mini takes no prefill"
    );
    // both attempts billed: the cut one for what it produced (estimated), the restart in full
    let rec = pipe.recent_usage().pop().unwrap();
    assert_eq!(rec.attempts, 2);
    let full = words(ANSWER).len() as u64;
    assert!(rec.usage.output_tokens > full, "{:?}", rec.usage);
    assert!(rec.usage.estimated);
    assert_eq!(end.cost, rec.cost);
    let cat = pipe.catalog();
    assert!(
        rec.cost
            > cat
                .require("gpt-4o-mini")
                .unwrap()
                .cost(&Usage::new(20, full))
    );
}

/// Cuts after a partial word, so the delivered text does not end with whitespace.
#[tokio::test(start_paused = true)]
async fn a_continuation_carries_the_delivered_text_as_prefill() {
    #[derive(Debug)]
    struct MidWord(AtomicUsize, Mutex<Vec<String>>);
    #[async_trait]
    impl Provider for MidWord {
        fn name(&self) -> &str {
            "midword"
        }
        async fn chat(&self, _c: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
            Err(ProviderError::new(ProviderErrorKind::BadRequest, "midword", "no").into())
        }
        async fn stream(&self, c: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let model = c.model.name.clone();
            if n == 0 {
                let ev: Vec<tokenwise::Result<StreamEvent>> = vec![
                    Ok(StreamEvent::text("The qu")),
                    Err(Error::StreamInterrupted {
                        chunks: 1,
                        reason: "reset".into(),
                    }),
                ];
                return Ok(Box::pin(stream::iter(ev)));
            }
            let last = c.request.messages.last().unwrap();
            assert_eq!(last.role, Role::Assistant);
            self.1.lock().unwrap().push(last.content.clone());
            let rest = ANSWER
                .strip_prefix(last.content.as_str())
                .unwrap()
                .to_owned();
            let ev: Vec<tokenwise::Result<StreamEvent>> = vec![
                Ok(StreamEvent::text(rest)),
                Ok(StreamEvent::Usage(Usage::new(25, 12))),
                Ok(StreamEvent::Done(StreamEnd::new(
                    FinishReason::Stop,
                    model,
                    "midword",
                ))),
            ];
            Ok(Box::pin(stream::iter(ev)))
        }
    }
    let p = Arc::new(MidWord(AtomicUsize::new(0), Mutex::new(Vec::new())));
    let pipe = Pipeline::builder()
        .provider_arc(p.clone())
        .default_model("claude-haiku-4-5")
        .no_cache()
        .build()
        .unwrap();
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert_eq!(*p.1.lock().unwrap(), vec!["The qu".to_owned()]);
    let end = end.unwrap();
    // the continuation's own usage plus the cut attempt's estimate
    assert!(end.usage.output_tokens > 12 && end.usage.input_tokens > 25);
}

#[tokio::test(start_paused = true)]
async fn a_refused_prefill_falls_back_to_a_restart_and_its_400_is_never_the_answer() {
    let catalog = tokenwise::Catalog::builtin();
    let p = Scripted::new(&[Call::CutAfter(3), Call::RejectPrefill, Call::Whole]);
    // a model whose catalogue entry says it takes prefill, cut mid-word
    let pipe = Pipeline::builder()
        .provider_arc(p.clone())
        .catalog(catalog)
        .default_model("claude-haiku-4-5")
        .no_cache()
        .build()
        .unwrap();
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert!(end.is_some());
    assert_eq!(p.calls(), 3, "cut, prefill refused, restart");
    assert_eq!(
        *p.prefills.lock().unwrap(),
        vec!["The quick brown".to_owned()]
    );
}

#[tokio::test(start_paused = true)]
async fn a_restart_that_differs_ends_with_a_typed_error_never_a_spliced_answer() {
    let p = Scripted::new(&[Call::CutAfter(3), Call::Different]);
    let pipe = pipeline(&p, "gpt-4o-mini");
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(end.is_none(), "never a clean end");
    let err = err.expect("a typed error");
    assert!(matches!(err, Error::StreamInterrupted { .. }), "{err}");
    assert!(err.to_string().contains("differs"), "{err}");
    assert_eq!(
        text, "The quick brown",
        "only the text of the first attempt"
    );
    assert_eq!(p.calls(), 2, "no second restart after a divergence");
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_recovered_after_its_idle_timeout() {
    let p = Scripted::new(&[Call::StallAfter(2), Call::Whole]);
    let pipe = pipeline(&p, "gpt-4o-mini");
    let t0 = tokio::time::Instant::now();
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert!(end.is_some());
    assert!(t0.elapsed() >= Duration::from_secs(2) && t0.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn recovery_is_bounded_and_can_be_turned_off() {
    let p = Scripted::new(&[Call::CutAfter(3)]);
    let pipe = pipeline(&p, "gpt-4o-mini");
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(end.is_none());
    assert!(matches!(err, Some(Error::StreamInterrupted { .. })));
    assert_eq!(text, "The quick brown");
    assert_eq!(p.calls(), 3, "two recoveries, then the cut is reported");
    let rec = pipe.recent_usage().pop().unwrap();
    assert!(rec.outcome.is_error());

    let p = Scripted::new(&[Call::CutAfter(3), Call::Whole]);
    let pipe = pipeline(&p, "gpt-4o-mini");
    let req = ChatRequest::user_text("fox?").without_stream_recovery();
    let (_, end, err) = drain(pipe.stream(req).await.unwrap()).await;
    assert!(end.is_none() && err.is_some());
    assert_eq!(p.calls(), 1);

    let p = Scripted::new(&[Call::CutAfter(3), Call::Whole]);
    let pipe = Pipeline::builder()
        .provider_arc(p.clone())
        .default_model("gpt-4o-mini")
        .no_cache()
        .stream_recoveries(0)
        .build()
        .unwrap();
    let (_, end, err) = drain(pipe.stream(ChatRequest::user_text("fox?")).await.unwrap()).await;
    assert!(end.is_none() && err.is_some());
    assert_eq!(p.calls(), 1);
}

/// A pipeline with an exact cache and, if given, `fallback` behind `model`.
fn cached_pipeline(p: &Arc<Scripted>, model: &str, fallback: Option<&str>) -> Pipeline {
    let mut b = Pipeline::builder()
        .provider_arc(p.clone())
        .default_model(model)
        .exact_cache(100, Duration::from_secs(600))
        .no_breaker()
        .idle_timeout(Duration::from_secs(2));
    if let Some(f) = fallback {
        b = b.fallbacks(model, [f]);
    }
    b.build().unwrap()
}

/// Streams `question` to its end (the cache write happens before the final event).
async fn stream_whole(pipe: &Pipeline, question: &str) -> String {
    let (text, end, err) =
        drain(pipe.stream(ChatRequest::user_text(question)).await.unwrap()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(end.is_some());
    text
}

#[tokio::test(start_paused = true)]
async fn a_stream_recovered_on_its_own_model_is_cached() {
    let p = Scripted::new(&[Call::CutAfter(3), Call::Whole]);
    let pipe = cached_pipeline(&p, "gpt-4o-mini", None);
    assert_eq!(stream_whole(&pipe, "fox?").await, ANSWER);
    assert_eq!(p.calls(), 2, "cut, restart");
    let rec = pipe.recent_usage().pop().unwrap();
    assert_eq!(rec.model.as_deref(), Some("gpt-4o-mini"));
    // the same question again: the recovered answer, from the cache
    assert_eq!(stream_whole(&pipe, "fox?").await, ANSWER);
    assert_eq!(p.calls(), 2, "served from the cache");
}

#[tokio::test(start_paused = true)]
async fn a_stream_finished_by_another_model_is_not_cached_under_the_first() {
    let p = Scripted::new(&[Call::CutAfter(3), Call::Whole]);
    let pipe = cached_pipeline(&p, "gpt-4o-mini", Some("gpt-4.1-mini"));
    assert_eq!(stream_whole(&pipe, "fox?").await, ANSWER);
    assert_eq!(p.calls(), 2, "cut, then recovered on the next target");
    let rec = pipe.recent_usage().pop().unwrap();
    assert_eq!(
        rec.model.as_deref(),
        Some("gpt-4.1-mini"),
        "the fallback finished the answer"
    );
    // the opening model's key holds no answer that another model wrote
    assert_eq!(stream_whole(&pipe, "fox?").await, ANSWER);
    assert_eq!(p.calls(), 3, "asked the provider again, not the cache");
}
