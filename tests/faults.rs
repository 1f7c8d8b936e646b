//! A pipeline over the OpenAI-compatible provider in front of a fault-injecting upstream
//! (`tests/fault_upstream/mod.rs`): one fault per model, each test asserting what the caller
//! got, how many attempts the upstream saw and when, and the usage record.
//!
//! The upstream is real HTTP on loopback, so the deadlines here are real time, kept
//! short (hundreds of milliseconds); the pipeline's own clock is a manual one where the
//! breaker's open interval matters.

mod fault_upstream;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fault_upstream::{ANSWER, USAGE, Upstream, last_record, pipeline, usage};
use support::{done_of, drain, text_of};
use tokenwise::observe::Outcome;
use tokenwise::resilience::{BreakerState, RetryPolicy};
use tokenwise::{ChatRequest, Error, ManualClock, Pipeline, ProviderErrorKind, Timestamp, Usage};

fn ask(model: &str) -> ChatRequest {
    ChatRequest::user_text("Tell me about foxes.").model(model)
}

fn kind(e: &Error) -> ProviderErrorKind {
    e.as_provider()
        .unwrap_or_else(|| panic!("not a provider error: {e:?}"))
        .kind
}

/// Streams `model` through `p`: the text, whether it ended cleanly, and the error.
async fn streamed(
    p: &Pipeline,
    model: &str,
) -> (String, Option<tokenwise::StreamEnd>, Option<Error>) {
    match p.stream(ask(model)).await {
        Ok(s) => {
            let (events, err) = drain(s).await;
            (text_of(&events), done_of(&events).cloned(), err)
        }
        Err(e) => (String::new(), None, Some(e)),
    }
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured_then_answered() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up).usage_sink(u.clone()).build().unwrap();
    let r = p.chat(ask("429-retry-after")).await.unwrap();
    assert_eq!(r.content, ANSWER);
    let hits = up.hits_for("429-retry-after");
    assert_eq!(hits.len(), 2);
    let gap = hits[1].at - hits[0].at;
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(3)).contains(&gap),
        "waited {gap:?}"
    );
    let rec = last_record(&u);
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.outcome, Outcome::Provider);
    assert_eq!(rec.usage, Usage::new(USAGE.0, USAGE.1));
}

#[tokio::test]
async fn a_429_without_retry_after_rests_the_key_for_that_model_only() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up)
        .retry(RetryPolicy::none())
        .fallbacks("429-bare", ["ok"])
        .usage_sink(u.clone())
        .build()
        .unwrap();
    for _ in 0..2 {
        let r = p.chat(ask("429-bare")).await.unwrap();
        assert_eq!((r.content.as_str(), r.model.as_str()), (ANSWER, "ok"));
    }
    // The first call's 429 rested the key for `429-bare` only: the fallback on the
    // same key answered at once, and the second call did not reach the upstream for
    // `429-bare` at all.
    assert_eq!(up.hits_for("429-bare").len(), 1);
    let ok = up.hits_for("ok");
    assert_eq!(ok.len(), 2);
    let first = up.hits_for("429-bare")[0].at;
    assert!(ok[0].at - first < Duration::from_millis(450), "held back");
    let rec = last_record(&u);
    assert_eq!(rec.model.as_deref(), Some("ok"));
    assert_eq!(rec.fallbacks, 1);
    assert_eq!(rec.usage, Usage::new(USAGE.0, USAGE.1));
}

#[tokio::test]
async fn a_500_once_is_retried() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up).usage_sink(u.clone()).build().unwrap();
    let (text, end, err) = streamed(&p, "500-once").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert_eq!(end.unwrap().usage, Usage::new(USAGE.0, USAGE.1));
    assert_eq!(up.hits_for("500-once").len(), 2);
    let rec = last_record(&u);
    assert_eq!(rec.attempts, 2);
    assert!(rec.stream);
    assert_eq!(rec.outcome, Outcome::Provider);
}

#[tokio::test]
async fn a_persistent_503_and_a_reset_before_headers_fall_back_after_their_retries() {
    for model in ["503-always", "reset"] {
        let up = Upstream::start().await;
        let u = usage();
        let p = pipeline(&up)
            .fallbacks(model, ["ok"])
            .usage_sink(u.clone())
            .build()
            .unwrap();
        let r = p.chat(ask(model)).await.unwrap();
        assert_eq!((r.content.as_str(), r.model.as_str()), (ANSWER, "ok"));
        assert_eq!(up.hits_for(model).len(), 3, "{model}: retried twice");
        assert_eq!(up.hits_for("ok").len(), 1);
        let rec = last_record(&u);
        assert_eq!(rec.attempts, 4, "{model}");
        assert_eq!(rec.fallbacks, 1);
        assert_eq!(rec.usage, Usage::new(USAGE.0, USAGE.1));
        // Without a fallback the caller gets the upstream's failure.
        let p = pipeline(&up).build().unwrap();
        let e = p.chat(ask(model)).await.unwrap_err();
        let expected = if model == "reset" {
            ProviderErrorKind::Connection
        } else {
            ProviderErrorKind::Server
        };
        assert_eq!(kind(&e), expected, "{model}: {e}");
    }
}

#[tokio::test]
async fn a_silent_upstream_is_bounded_by_the_attempt_timeout() {
    let up = Upstream::start().await;
    let p = pipeline(&up)
        .attempt_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let t = Instant::now();
    let e = p.chat(ask("silent")).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert_eq!(up.hits_for("silent").len(), 3);
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_silent_upstream_fails_over_after_one_attempt() {
    let up = Upstream::start().await;
    let p = pipeline(&up)
        .attempt_timeout(Duration::from_millis(300))
        .fallbacks("silent", ["ok"])
        .build()
        .unwrap();
    let t = Instant::now();
    let r = p.chat(ask("silent")).await.unwrap();
    assert_eq!((r.content.as_str(), r.model.as_str()), (ANSWER, "ok"));
    assert_eq!(up.hits_for("silent").len(), 1);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_slow_first_token_ends_in_the_fallback_within_the_deadlines() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up)
        .fallbacks("slow-first-token", ["ok"])
        .usage_sink(u.clone())
        .build()
        .unwrap();
    let t = Instant::now();
    let (text, end, err) = streamed(&p, "slow-first-token").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert_eq!(end.unwrap().model, "ok");
    assert!(!up.hits_for("slow-first-token").is_empty());
    assert_eq!(up.hits_for("ok").len(), 1);
    // Far less than the 20 s the slow upstream takes.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert_eq!(last_record(&u).model.as_deref(), Some("ok"));
}

#[tokio::test]
async fn a_slow_first_token_fails_over_after_one_attempt() {
    let up = Upstream::start().await;
    let p = pipeline(&up)
        .fallbacks("slow-first-token", ["ok"])
        .build()
        .unwrap();
    let (text, end, err) = streamed(&p, "slow-first-token").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert!(end.is_some());
    assert_eq!(up.hits_for("slow-first-token").len(), 1);
}

#[tokio::test]
async fn a_cut_or_stalled_stream_is_never_presented_as_complete() {
    for model in ["cut-after-3", "stall-after-3"] {
        let up = Upstream::start().await;
        let u = usage();
        // Recovery off: the cut is reported as it happened.
        let p = pipeline(&up)
            .usage_sink(u.clone())
            .stream_recoveries(0)
            .build()
            .unwrap();
        let (text, end, err) = streamed(&p, model).await;
        assert_eq!(text, "The quick brown", "{model}");
        assert!(end.is_none(), "{model}: a clean end");
        assert!(
            matches!(err, Some(Error::StreamInterrupted { chunks: 3, .. })),
            "{model}: {err:?}"
        );
        assert_eq!(up.hits_for(model).len(), 1);
        let rec = last_record(&u);
        assert!(rec.outcome.is_error(), "{model}: {:?}", rec.outcome);
        // What was delivered is billed, counted locally.
        assert!(rec.usage.output_tokens >= 3, "{model}: {:?}", rec.usage);

        // Recovery on, but the only target cuts every time: the restarts repeat the
        // same three tokens (withheld), and the cut is still reported, never a clean end.
        let up = Upstream::start().await;
        let p = pipeline(&up).build().unwrap();
        let (text, end, err) = streamed(&p, model).await;
        assert_eq!(text, "The quick brown", "{model}");
        assert!(end.is_none(), "{model}: a clean end");
        assert!(
            matches!(err, Some(Error::StreamInterrupted { .. })),
            "{model}: {err:?}"
        );
        assert_eq!(up.hits_for(model).len(), 3, "two recoveries, bounded");
    }
}

#[tokio::test]
async fn a_cut_or_stalled_stream_is_recovered_into_one_whole_answer() {
    for model in ["cut-after-3", "stall-after-3"] {
        let up = Upstream::start().await;
        let u = usage();
        let p = pipeline(&up)
            .fallbacks(model, ["ok-2"])
            .usage_sink(u.clone())
            .build()
            .unwrap();
        let (text, end, err) = streamed(&p, model).await;
        assert!(err.is_none(), "{model}: {err:?}");
        assert_eq!(text, ANSWER, "{model}: the whole answer, once");
        assert!(end.is_some());
        assert_eq!(up.hits_for(model).len(), 1);
        assert_eq!(up.hits_for("ok-2").len(), 1);
        let rec = last_record(&u);
        assert_eq!(rec.outcome, Outcome::Provider);
        // Both attempts billed: the cut one's tokens and the recovery's.
        assert!(rec.usage.output_tokens >= USAGE.1 + 3, "{:?}", rec.usage);
    }
}

#[tokio::test]
async fn a_fallback_that_rejects_prefill_never_surfaces_its_400() {
    let up = Upstream::start().await;
    let p = pipeline(&up)
        .fallbacks("cut-after-3", ["rejects-prefill"])
        .build()
        .unwrap();
    let (text, end, err) = streamed(&p, "cut-after-3").await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text, ANSWER);
    assert!(end.is_some());
    // If it was asked with a prefill and refused, it was asked again without.
    let last = up.hits_for("rejects-prefill");
    let final_messages = last.last().unwrap().messages.as_array().unwrap().clone();
    assert_ne!(final_messages.last().unwrap()["role"], "assistant");
}

#[tokio::test]
async fn malformed_events_and_a_missing_done_end_cleanly_and_keep_the_breaker_closed() {
    for model in ["malformed-event", "no-done"] {
        let up = Upstream::start().await;
        let u = usage();
        let p = pipeline(&up).usage_sink(u.clone()).build().unwrap();
        // More streams than the breaker's five consecutive failures.
        for i in 0..7 {
            let (text, end, err) = streamed(&p, model).await;
            assert!(err.is_none(), "{model} #{i}: {err:?}");
            assert_eq!(text, ANSWER, "{model}");
            let end = end.unwrap();
            assert_eq!(end.usage, Usage::new(USAGE.0, USAGE.1));
            assert_eq!(end.finish_reason, tokenwise::FinishReason::Stop);
        }
        assert_eq!(up.hits_for(model).len(), 7, "{model}: one attempt each");
        assert_eq!(p.breaker_state(model), BreakerState::Closed, "{model}");
        let rec = last_record(&u);
        assert_eq!(rec.outcome, Outcome::Provider);
        assert_eq!(rec.finish_reason.as_deref(), Some("stop"));
    }
}

#[tokio::test]
async fn a_context_length_400_is_the_callers_error_at_once() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up).usage_sink(u.clone()).build().unwrap();
    let e = p.chat(ask("context-length")).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::ContextLength);
    assert!(!e.is_retryable());
    assert_eq!(up.hits_for("context-length").len(), 1);
    let rec = last_record(&u);
    assert!(rec.outcome.is_error());
    assert_eq!(rec.usage, Usage::default());
}

#[tokio::test]
async fn a_content_filter_400_is_passed_back_not_routed_around() {
    let up = Upstream::start().await;
    let u = usage();
    let p = pipeline(&up)
        .fallbacks("content-filter", ["ok"])
        .usage_sink(u.clone())
        .build()
        .unwrap();
    let e = p.chat(ask("content-filter")).await.unwrap_err();
    assert_eq!(kind(&e), ProviderErrorKind::ContentFilter);
    assert!(e.to_string().contains("content management policy"), "{e}");
    assert_eq!(up.hits_for("content-filter").len(), 1);
    assert!(up.hits_for("ok").is_empty(), "routed around the filter");
    assert_eq!(last_record(&u).cost, tokenwise::Cost::ZERO);
}

#[tokio::test]
async fn a_primary_down_then_back_is_used_again_after_the_breaker_probes() {
    let up = Upstream::start().await;
    let clock = Arc::new(ManualClock::new(Timestamp::from_secs(1_000)));
    let p = pipeline(&up)
        .retry(RetryPolicy::none())
        .fallbacks("flaky", ["ok"])
        .clock(clock.clone())
        .build()
        .unwrap();
    // Down: five failures open the breaker; the fallback answers every call.
    for _ in 0..5 {
        let r = p.chat(ask("flaky")).await.unwrap();
        assert_eq!(r.model, "ok");
    }
    assert_eq!(p.breaker_state("flaky"), BreakerState::Open);
    let r = p.chat(ask("flaky")).await.unwrap();
    assert_eq!(r.model, "ok");
    assert_eq!(
        up.hits_for("flaky").len(),
        5,
        "an open breaker sends nothing"
    );
    // Back up, and the open interval over: the probe succeeds and closes it.
    up.set_down(false);
    clock.advance(Duration::from_millis(500));
    let r = p.chat(ask("flaky")).await.unwrap();
    assert_eq!((r.content.as_str(), r.model.as_str()), (ANSWER, "flaky"));
    assert_eq!(p.breaker_state("flaky"), BreakerState::Closed);
    let r = p.chat(ask("flaky")).await.unwrap();
    assert_eq!(r.model, "flaky");
    assert_eq!(up.hits_for("flaky").len(), 7);
}
