//! Spans and metrics of a pipeline, checked name by name and label by label with a
//! capturing tracing subscriber and a capturing metrics recorder: a miss, a hit, an
//! error, refusals, a fallback, an escalation and streams.

mod observe_support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use metrics_util::debugging::DebuggingRecorder;
use tokenwise::budget::BudgetWindow;
use tokenwise::budget::Degrade;
use tokenwise::observe::metrics as m;
use tokenwise::provider::SimulatedProvider;
use tokenwise::resilience::{BreakerConfig, BreakerState, RetryPolicy};
use tokenwise::router::{FnValidator, Verdict};
use tokenwise::{ChatRequest, ChatResponse, Cost, Pipeline, PipelineBuilder, ScopeKind};

use observe_support::{Capture, snapshot};

const MINI: &str = "gpt-4o-mini";
const HAIKU: &str = "claude-haiku-4-5";

mod common;

use common::sim;

/// No retries, so that every scenario makes a known number of calls (retries have
/// their own test).
fn builder(p: &SimulatedProvider) -> PipelineBuilder {
    Pipeline::builder()
        .provider(p.clone())
        .default_model(MINI)
        .retry(RetryPolicy::none())
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest::user_text(text)
        .user("ann")
        .org("acme")
        .feature("faq")
        .max_tokens(200)
}

fn secs(d: f64) -> Duration {
    Duration::from_secs_f64(d)
}

#[tokio::test(start_paused = true)]
async fn a_miss_then_a_hit() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    let pipe = builder(&sim()).build().unwrap();
    let miss = pipe.chat(ask("What is GCRA?")).await.unwrap();
    let hit = pipe.chat(ask("What is GCRA?")).await.unwrap();
    assert!(hit.served.is_cache_hit());

    // metrics
    let mx = snapshot(&snap);
    let ok_miss = [("model", MINI), ("status", "ok"), ("cache", "miss")];
    let ok_hit = [("model", MINI), ("status", "ok"), ("cache", "hit")];
    assert_eq!(mx.counter(m::REQUESTS, &ok_miss), 1);
    assert_eq!(mx.counter(m::REQUESTS, &ok_hit), 1);
    assert_eq!(mx.series(m::REQUESTS).len(), 2);
    assert_eq!(
        mx.counter(m::TOKENS, &[("model", MINI), ("type", "input")]),
        miss.usage.input_tokens,
        "a hit bills no tokens"
    );
    assert_eq!(
        mx.counter(m::TOKENS, &[("model", MINI), ("type", "output")]),
        miss.usage.output_tokens
    );
    assert_eq!(
        mx.counter(m::COST, &[("model", MINI)]),
        miss.cost.as_nanos()
    );
    assert_eq!(
        mx.counter(m::COST_SAVED, &[("model", MINI)]),
        miss.cost.as_nanos()
    );
    assert_eq!(
        mx.counter(
            m::ATTEMPTS,
            &[("provider", "simulated"), ("model", MINI), ("status", "ok")]
        ),
        1,
        "the hit made no provider call"
    );
    let took = secs(0.1) + Duration::from_millis(5) * (miss.usage.output_tokens as u32 - 1);
    let miss_latency = mx.histogram(
        m::REQUEST_DURATION,
        &[("model", MINI), ("cache", "miss"), ("result", "ok")],
    );
    assert_eq!(miss_latency.len(), 1);
    assert!(
        (miss_latency[0] - took.as_secs_f64()).abs() < 1e-6,
        "{miss_latency:?} vs {took:?}"
    );
    assert_eq!(
        mx.histogram(m::REQUEST_DURATION, &[("cache", "hit")]),
        vec![0.0],
        "a hit is instant on paused time"
    );
    assert_eq!(
        mx.histogram(
            m::ATTEMPT_DURATION,
            &[("provider", "simulated"), ("model", MINI)]
        )
        .len(),
        1
    );
    assert!(
        mx.histogram(m::TIME_TO_FIRST_TOKEN, &[]).is_empty(),
        "not streamed"
    );
    assert_eq!(
        mx.gauge(m::IN_FLIGHT, &[]),
        Some(0.0),
        "both requests finished"
    );
    for v in mx.label_values() {
        assert!(
            !["ann", "acme", "faq"].contains(&v.as_str()),
            "tenant id {v} in a label"
        );
    }

    // spans
    let chats = cap.closed("gen_ai.chat");
    assert_eq!(chats.len(), 2, "{}", cap.dump());
    let (c, h) = (&chats[0], &chats[1]);
    assert_eq!(c.get("otel.name"), "chat auto");
    assert_eq!(c.get("gen_ai.operation.name"), "chat");
    assert_eq!(c.get("gen_ai.request.model"), "auto");
    assert_eq!(c.get("gen_ai.request.max_tokens"), "200");
    assert_eq!(c.get("gen_ai.provider.name"), "simulated");
    assert_eq!(c.get("gen_ai.response.model"), MINI);
    assert_eq!(
        c.get("gen_ai.usage.input_tokens"),
        miss.usage.input_tokens.to_string()
    );
    assert_eq!(
        c.get("gen_ai.usage.output_tokens"),
        miss.usage.output_tokens.to_string()
    );
    assert_eq!(c.get("gen_ai.response.finish_reasons"), "stop");
    assert_eq!(c.get("tokenwise.user"), "ann");
    assert_eq!(c.get("tokenwise.org"), "acme");
    assert_eq!(c.get("tokenwise.feature"), "faq");
    assert_eq!(c.get("tokenwise.messages"), "1");
    assert_eq!(c.get("tokenwise.stream"), "false");
    assert_eq!(c.get("tokenwise.route"), MINI);
    assert_eq!(c.get("tokenwise.cache_hit"), "false");
    assert_eq!(
        c.get("tokenwise.cost_usd"),
        miss.cost.as_dollars_f64().to_string()
    );
    assert_eq!(c.get("tokenwise.saved_usd"), "0");
    assert_eq!(c.get("tokenwise.attempts"), "1");
    assert_eq!(c.get("tokenwise.fallbacks"), "0");
    assert_eq!(c.get("tokenwise.escalated"), "false");
    assert_eq!(c.get("tokenwise.outcome"), "provider");
    assert_eq!(
        c.get("tokenwise.latency_ms"),
        (took.as_secs_f64() * 1e3).to_string()
    );
    for absent in [
        "error.type",
        "otel.status_code",
        "tokenwise.cache_similarity",
        "tokenwise.ttft_ms",
        "tokenwise.degrade_mode",
        "tokenwise.guard_rejections",
        "tokenwise.refusal_reason",
    ] {
        assert!(!c.has(absent), "{absent} on a plain miss: {c:?}");
    }

    assert_eq!(h.get("tokenwise.cache_hit"), "true");
    assert_eq!(h.get("tokenwise.cache_similarity"), "1");
    assert_eq!(
        h.get("tokenwise.saved_usd"),
        miss.cost.as_dollars_f64().to_string()
    );
    assert_eq!(h.get("tokenwise.cost_usd"), "0");
    assert_eq!(h.get("tokenwise.attempts"), "0");
    assert_eq!(h.get("gen_ai.usage.input_tokens"), "0");
    assert_eq!(h.get("tokenwise.outcome"), "cache_hit");

    let attempts = cap.closed("gen_ai.attempt");
    assert_eq!(attempts.len(), 1, "only the miss called the provider");
    let a = &attempts[0];
    assert_eq!(a.parent.as_deref(), Some("gen_ai.chat"));
    assert_eq!(a.get("otel.name"), format!("chat {MINI}"));
    assert_eq!(a.get("otel.kind"), "client");
    assert_eq!(a.get("gen_ai.provider.name"), "simulated");
    assert_eq!(a.get("gen_ai.request.model"), MINI);
    assert_eq!(a.get("gen_ai.response.model"), MINI);
    assert_eq!(
        a.get("gen_ai.usage.output_tokens"),
        miss.usage.output_tokens.to_string()
    );
    assert_eq!(a.get("tokenwise.attempt"), "1");
    assert_eq!(a.get("tokenwise.retry"), "0");
    assert_eq!(a.get("tokenwise.stream"), "false");
    assert!(!a.has("error.type"));

    // usage records carry the same story
    let recs = pipe.recent_usage();
    assert_eq!(recs[0].route, vec![MINI.to_owned()]);
    assert_eq!(recs[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(recs[1].similarity, Some(1.0));
    assert_eq!(recs[1].saved, miss.cost);
}

#[tokio::test(start_paused = true)]
async fn an_error_and_refusals() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    // a provider outage with nowhere to fall back to
    let down = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(600), None)
        .build()
        .unwrap();
    let pipe = builder(&down)
        .rate_limit(ScopeKind::Global, 1)
        .build()
        .unwrap();
    let e = pipe.chat(ask("anyone?")).await.unwrap_err();
    assert_eq!(e.reason(), "provider_server_error");
    // the global limit of one a minute refuses the next
    let refused = pipe.chat(ask("again?")).await.unwrap_err();
    assert_eq!(refused.reason(), "rate_limited");

    // a spend cap too small for any request
    let broke = builder(&sim())
        .spend_cap(ScopeKind::User, Cost::from_nanos(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let capped = broke.chat(ask("pricey?")).await.unwrap_err();
    assert_eq!(capped.reason(), "budget_exceeded");

    let mx = snapshot(&snap);
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[
                ("model", MINI),
                ("status", "provider_server_error"),
                ("cache", "miss")
            ]
        ),
        1,
        "a failure is attributed to the model it was routed to"
    );
    assert_eq!(
        mx.counter(m::REQUESTS, &[("model", MINI), ("status", "rate_limited")]),
        1
    );
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[("model", MINI), ("status", "budget_exceeded")]
        ),
        1
    );
    assert_eq!(mx.counter(m::LIMITER_REFUSALS, &[("scope", "global")]), 1);
    assert_eq!(mx.counter(m::BUDGET_REFUSALS, &[("scope", "user")]), 1);
    assert_eq!(
        mx.counter(
            m::ATTEMPTS,
            &[
                ("provider", "simulated"),
                ("model", MINI),
                ("status", "provider_server_error")
            ]
        ),
        1
    );
    assert_eq!(
        mx.counter(m::ATTEMPTS, &[]),
        1,
        "refusals never reach a provider"
    );
    assert_eq!(
        mx.histogram(m::REQUEST_DURATION, &[("result", "error")])
            .len(),
        3
    );
    assert_eq!(mx.counter(m::COST, &[]), 0);

    let chats = cap.closed("gen_ai.chat");
    assert_eq!(chats.len(), 3);
    let failed = &chats[0];
    assert_eq!(failed.get("otel.status_code"), "error");
    assert_eq!(failed.get("error.type"), "provider_server_error");
    assert_eq!(failed.get("tokenwise.outcome"), "provider_server_error");
    assert_eq!(failed.get("tokenwise.attempts"), "1");
    assert!(!failed.has("gen_ai.response.finish_reasons"));
    assert!(
        !failed.has("tokenwise.refusal_reason"),
        "a failure is not a refusal"
    );
    let limited = &chats[1];
    assert_eq!(limited.get("error.type"), "rate_limited");
    assert_eq!(limited.get("tokenwise.refusal_reason"), "rate_limited");
    assert_eq!(limited.get("tokenwise.refusal_scope"), "global");
    assert_eq!(limited.get("tokenwise.attempts"), "0");
    let over = &chats[2];
    assert_eq!(over.get("tokenwise.refusal_reason"), "budget_exceeded");
    assert_eq!(over.get("tokenwise.refusal_scope"), "user");

    let attempts = cap.closed("gen_ai.attempt");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].get("error.type"), "provider_server_error");
    assert_eq!(attempts[0].get("otel.status_code"), "error");

    let rec = &pipe.recent_usage()[1];
    assert_eq!(rec.refusal_scope, Some(ScopeKind::Global));
}

#[tokio::test(start_paused = true)]
async fn a_fallback_and_an_escalation() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    let p = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(600), Some(MINI))
        .build()
        .unwrap();
    let pipe = builder(&p).fallbacks(MINI, [HAIKU]).build().unwrap();
    let r = pipe.chat(ask("are you there?")).await.unwrap();
    assert_eq!(r.model, HAIKU);

    let esc = builder(&sim())
        .escalate(MINI, ["gpt-4o"])
        .validator(Arc::new(FnValidator(
            |_: &ChatRequest, r: &ChatResponse| {
                if r.model == MINI {
                    Verdict::Escalate("too small".into())
                } else {
                    Verdict::Accept
                }
            },
        )))
        .build()
        .unwrap();
    let better = esc.chat(ask("hard question")).await.unwrap();
    assert_eq!(better.model, "gpt-4o");

    let mx = snapshot(&snap);
    assert_eq!(
        mx.counter(m::REQUESTS, &[("model", HAIKU), ("status", "ok")]),
        1
    );
    assert_eq!(mx.counter(m::FALLBACKS, &[("model", HAIKU)]), 1);
    assert_eq!(mx.counter(m::FALLBACKS, &[]), 1);
    assert_eq!(
        mx.counter(
            m::ATTEMPTS,
            &[("model", MINI), ("status", "provider_server_error")]
        ),
        1
    );
    assert_eq!(
        mx.counter(m::ATTEMPTS, &[("model", HAIKU), ("status", "ok")]),
        1
    );
    assert_eq!(mx.counter(m::ESCALATIONS, &[("model", "gpt-4o")]), 1);
    assert_eq!(
        mx.counter(m::ATTEMPTS, &[("model", MINI), ("status", "ok")]),
        1
    );
    assert_eq!(
        mx.counter(m::ATTEMPTS, &[("model", "gpt-4o"), ("status", "ok")]),
        1
    );
    let rec = esc.recent_usage().pop().unwrap();
    assert_eq!(
        mx.counter(m::COST, &[("model", "gpt-4o")]),
        rec.cost.as_nanos(),
        "both escalation calls are billed to the request"
    );

    let chats = cap.closed("gen_ai.chat");
    let fb = &chats[0];
    assert_eq!(fb.get("tokenwise.route"), format!("{MINI},{HAIKU}"));
    assert_eq!(fb.get("tokenwise.attempts"), "2");
    assert_eq!(fb.get("tokenwise.fallbacks"), "1");
    assert_eq!(fb.get("gen_ai.response.model"), HAIKU);
    assert!(!fb.has("error.type"), "the request succeeded");
    let attempts = cap.closed("gen_ai.attempt");
    assert_eq!(attempts.len(), 4);
    assert_eq!(attempts[0].get("gen_ai.request.model"), MINI);
    assert_eq!(attempts[0].get("error.type"), "provider_server_error");
    assert_eq!(attempts[1].get("gen_ai.request.model"), HAIKU);
    assert_eq!(attempts[1].get("tokenwise.attempt"), "2");
    assert!(!attempts[1].has("error.type"));
    let escalated = &chats[1];
    assert_eq!(escalated.get("tokenwise.escalated"), "true");
    assert_eq!(escalated.get("tokenwise.attempts"), "2");
    assert_eq!(escalated.get("gen_ai.response.model"), "gpt-4o");
}

async fn drain(mut s: tokenwise::ChatStream) -> Option<tokenwise::Error> {
    while let Some(ev) = s.next().await {
        if let Err(e) = ev {
            return Some(e);
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn streams_whole_replayed_and_cut() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    let pipe = builder(&sim()).build().unwrap();
    assert!(
        drain(pipe.stream(ask("stream me")).await.unwrap())
            .await
            .is_none()
    );
    assert!(
        drain(pipe.stream(ask("stream me")).await.unwrap())
            .await
            .is_none()
    ); // replayed
    let cut = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(100))
        .cut_stream_after(3)
        .build()
        .unwrap();
    // recovery off: this is about how a cut stream is reported
    let broken = builder(&cut).stream_recoveries(0).build().unwrap();
    let e = drain(broken.stream(ask("cut me")).await.unwrap())
        .await
        .unwrap();
    assert_eq!(e.reason(), "stream_interrupted");

    let recs: Vec<_> = pipe
        .recent_usage()
        .into_iter()
        .chain(broken.recent_usage())
        .collect();
    let mx = snapshot(&snap);
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[("model", MINI), ("status", "ok"), ("cache", "miss")]
        ),
        1
    );
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[("model", MINI), ("status", "ok"), ("cache", "hit")]
        ),
        1
    );
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[("model", MINI), ("status", "stream_interrupted")]
        ),
        1
    );
    assert_eq!(
        mx.histogram(
            m::TIME_TO_FIRST_TOKEN,
            &[("model", MINI), ("cache", "miss")]
        ),
        vec![0.1, 0.1],
        "the provider's 100 ms to the first token, whole or cut"
    );
    assert_eq!(
        mx.histogram(m::TIME_TO_FIRST_TOKEN, &[("model", MINI), ("cache", "hit")]),
        vec![0.0]
    );
    assert_eq!(
        recs[0].time_to_first_token,
        Some(Duration::from_millis(100))
    );
    let full = mx.histogram(m::REQUEST_DURATION, &[("cache", "miss"), ("result", "ok")]);
    assert_eq!(full, vec![recs[0].latency.as_secs_f64()]);
    assert!(full[0] > 0.1);
    // the cut stream is billed for what it delivered
    assert_eq!(
        mx.counter(m::COST, &[("model", MINI)]),
        (recs[0].cost + recs[2].cost).as_nanos()
    );
    assert!(!recs[2].cost.is_zero());
    assert_eq!(mx.gauge(m::IN_FLIGHT, &[]), Some(0.0), "every stream ended");
    assert_eq!(
        mx.histogram(m::ATTEMPT_DURATION, &[("model", MINI)]),
        vec![0.1, 0.1]
    );

    let chats = cap.closed("gen_ai.chat");
    assert_eq!(chats.len(), 3, "{}", cap.dump());
    let s = &chats[0];
    assert_eq!(s.get("tokenwise.stream"), "true");
    assert_eq!(s.get("tokenwise.ttft_ms"), "100");
    assert_eq!(s.get("gen_ai.response.finish_reasons"), "stop");
    assert_eq!(
        s.get("gen_ai.usage.output_tokens"),
        recs[0].usage.output_tokens.to_string()
    );
    let replay = &chats[1];
    assert_eq!(replay.get("tokenwise.cache_hit"), "true");
    assert_eq!(replay.get("tokenwise.ttft_ms"), "0");
    let broken_span = &chats[2];
    assert_eq!(broken_span.get("error.type"), "stream_interrupted");
    assert_eq!(broken_span.get("tokenwise.ttft_ms"), "100");
    let attempts = cap.closed("gen_ai.attempt");
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.get("tokenwise.stream") == "true"));
    assert!(
        attempts
            .iter()
            .all(|a| a.get("tokenwise.latency_ms") == "100")
    );
}

#[tokio::test(start_paused = true)]
async fn an_open_stream_counts_as_in_flight() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let pipe = builder(&sim()).build().unwrap();
    let mut s = pipe.stream(ask("long answer")).await.unwrap();
    let _ = s.next().await;
    assert_eq!(snapshot(&snap).gauge(m::IN_FLIGHT, &[]), Some(1.0));
    drop(s);
}

#[tokio::test(start_paused = true)]
async fn a_fallback_stream_and_a_dropped_stream() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    let p = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(100))
        .outage(Duration::ZERO, Duration::from_secs(600), Some(MINI))
        .build()
        .unwrap();
    let pipe = builder(&p).fallbacks(MINI, [HAIKU]).build().unwrap();
    assert!(
        drain(pipe.stream(ask("fall back")).await.unwrap())
            .await
            .is_none()
    );
    let mut dropped = pipe.stream(ask("drop me")).await.unwrap();
    let _ = dropped.next().await;
    drop(dropped);

    let mx = snapshot(&snap);
    assert_eq!(
        mx.counter(m::FALLBACKS, &[("model", HAIKU)]),
        2,
        "both streams fell back"
    );
    assert_eq!(
        mx.counter(
            m::REQUESTS,
            &[("model", HAIKU), ("status", "stream_dropped")]
        ),
        1
    );
    // the failed primary (25 ms) then the fallback's first token (100 ms)
    assert_eq!(
        mx.histogram(m::TIME_TO_FIRST_TOKEN, &[("model", HAIKU)]),
        vec![0.125, 0.125]
    );
    assert_eq!(mx.gauge(m::IN_FLIGHT, &[]), Some(0.0));
    let chats = cap.closed("gen_ai.chat");
    assert_eq!(chats[0].get("tokenwise.fallbacks"), "1");
    assert_eq!(chats[0].get("tokenwise.route"), format!("{MINI},{HAIKU}"));
    assert_eq!(chats[1].get("error.type"), "stream_dropped");
}

#[tokio::test]
async fn future_features_have_their_names_ready() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    m::describe();
    m::record_breaker_state("openai", "gpt-4o", BreakerState::Open);
    m::record_breaker_state("openai", "gpt-4o-mini", BreakerState::HalfOpen);

    let pipe = Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model(MINI)
        .spend_cap(ScopeKind::Global, Cost::from_dollars(10), BudgetWindow::Day)
        .spend_cap(ScopeKind::Org, Cost::from_dollars(2), BudgetWindow::Month)
        .build()
        .unwrap();
    let meta = ask("x").meta;
    let caps = pipe.budget_status(&meta).await.unwrap();
    m::record_budget_status(&caps);

    let mx = snapshot(&snap);
    assert_eq!(
        mx.gauge(
            m::BREAKER_STATE,
            &[("provider", "openai"), ("model", "gpt-4o")]
        ),
        Some(2.0)
    );
    assert_eq!(
        mx.gauge(m::BREAKER_STATE, &[("model", "gpt-4o-mini")]),
        Some(1.0)
    );
    assert_eq!(
        mx.gauge(m::BUDGET_LIMIT, &[("scope", "global"), ("window", "day")]),
        Some(10.0)
    );
    assert_eq!(
        mx.gauge(
            m::BUDGET_UTILIZATION,
            &[("scope", "org:acme"), ("window", "month")]
        ),
        Some(0.0)
    );
    assert_eq!(mx.gauge(m::BUDGET_SPENT, &[("scope", "global")]), Some(0.0));
}

#[tokio::test(start_paused = true)]
async fn the_budget_sampler_tracks_spend() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let pipe = builder(&sim())
        .spend_cap(
            ScopeKind::Global,
            Cost::from_micros(1_000),
            BudgetWindow::Day,
        )
        .build()
        .unwrap();
    let sampler = tokenwise::budget::BudgetSampler::spawn(
        pipe.clone(),
        vec![tokenwise::RequestMeta::default()],
        Duration::from_secs(10),
    )
    .unwrap();
    let r = pipe.chat(ask("spend a little")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await; // paused: one sampling period
    let ratio = snapshot(&snap)
        .gauge(
            m::BUDGET_UTILIZATION,
            &[("scope", "global"), ("window", "day")],
        )
        .unwrap();
    let want = r.cost.as_nanos() as f64 / Cost::from_micros(1_000).as_nanos() as f64;
    assert!((ratio - want).abs() < 1e-12, "{ratio} vs {want}");
    drop(sampler);
    assert!(
        tokenwise::budget::BudgetSampler::spawn(pipe, vec![], Duration::ZERO).is_err(),
        "a zero period is refused"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_an_open_breaker_and_a_degrade_mode() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let cap = Capture::default();
    let _tracing = cap.install();

    // the primary is down: one retry, then the breaker opens and the fallback answers
    let p = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(600), Some(MINI))
        .build()
        .unwrap();
    let pipe = builder(&p)
        .fallbacks(MINI, [HAIKU])
        .retry(RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        })
        .breaker(BreakerConfig {
            consecutive_failures: 2,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    assert_eq!(pipe.chat(ask("first")).await.unwrap().model, HAIKU);
    assert_eq!(pipe.breaker_state(MINI), BreakerState::Open);
    assert_eq!(pipe.chat(ask("second")).await.unwrap().model, HAIKU);

    let mx = snapshot(&snap);
    // the catalogue names the provider of each model; the breaker gauge uses it
    assert_eq!(
        mx.gauge(m::BREAKER_STATE, &[("provider", "openai"), ("model", MINI)]),
        Some(2.0)
    );
    assert_eq!(
        mx.gauge(
            m::BREAKER_STATE,
            &[("provider", "anthropic"), ("model", HAIKU)]
        ),
        Some(0.0)
    );
    assert_eq!(
        mx.counter(
            m::ATTEMPTS,
            &[("model", MINI), ("status", "provider_server_error")]
        ),
        2,
        "a call and its retry; the second request found the breaker open"
    );

    // a spend cap 10 % used sends requests for gpt-4o to the cheaper model
    let thrifty = builder(&sim())
        .spend_cap(ScopeKind::Global, Cost::from_cents(1), BudgetWindow::Day)
        .degrade_at(10, Degrade::CheaperModel(MINI.into()))
        .build()
        .unwrap();
    let mut degraded_at = None;
    for i in 0..20 {
        let r = thrifty
            .chat(ask(&format!("expensive {i}")).model("gpt-4o"))
            .await
            .unwrap();
        if r.model == MINI {
            degraded_at = Some(i);
            break;
        }
    }
    let degraded_at = degraded_at.expect("the cap degrades requests once 10 % is spent");
    assert!(degraded_at > 0, "the first request was not degraded");

    let mx = snapshot(&snap);
    assert_eq!(mx.counter(m::DEGRADED, &[("mode", "cheaper_model")]), 1);
    assert_eq!(
        mx.counter(m::REQUESTS, &[("model", MINI), ("status", "ok")]),
        1
    );
    assert_eq!(
        mx.counter(m::REQUESTS, &[("model", "gpt-4o"), ("status", "ok")]),
        degraded_at as u64
    );

    let attempts = cap.closed("gen_ai.attempt");
    let retries: Vec<_> = attempts
        .iter()
        .map(|a| (a.get("gen_ai.request.model"), a.get("tokenwise.retry")))
        .collect();
    assert_eq!(retries[..3], [(MINI, "0"), (MINI, "1"), (HAIKU, "0")]);
    assert_eq!(
        retries[3],
        (HAIKU, "0"),
        "the open breaker skipped the primary"
    );
    let chats = cap.closed("gen_ai.chat");
    assert_eq!(chats[0].get("tokenwise.attempts"), "3");
    assert_eq!(chats[1].get("tokenwise.attempts"), "1");
    assert!(!chats[2].has("tokenwise.degrade_mode"));
    let last = chats.last().unwrap();
    assert_eq!(last.get("tokenwise.degrade_mode"), "cheaper_model");
    assert_eq!(last.get("gen_ai.request.model"), "gpt-4o");
    assert_eq!(last.get("gen_ai.response.model"), MINI);
    let recs = thrifty.recent_usage();
    assert_eq!(recs[0].degrade_mode, None);
    assert_eq!(
        recs.last().unwrap().degrade_mode.as_deref(),
        Some("cheaper_model")
    );
}
