//! Admission and spend through the pipeline: degrade modes, waiting for limits,
//! per-model quotas, the stream kill switch and cost limits.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use tokenwise::budget::{BudgetWindow, Degrade};
use tokenwise::limiter::TargetLimits;
use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, ChatStream, Cost, Error, FinishReason, ModelSpec, Pipeline,
    PipelineBuilder, Pricing, ProviderErrorKind, ScopeKind, StreamEnd, StreamEvent, Truncation,
    Usage,
};

mod common;

use common::{sim, spent};

fn builder(p: &SimulatedProvider) -> PipelineBuilder {
    common::builder(p, "gpt-4o")
}

fn ask(text: &str, user: &str) -> ChatRequest {
    ChatRequest::user_text(text).user(user).max_tokens(100)
}

/// A provider that streams `words` words and ignores `max_tokens`, reporting no usage.
#[derive(Debug)]
struct Chatty {
    words: usize,
}

#[async_trait]
impl Provider for Chatty {
    fn name(&self) -> &str {
        "openai"
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        let text = vec!["word"; self.words].join(" ");
        Ok(ChatResponse::new(
            text,
            &call.model.name,
            "openai",
            Usage::new(10, self.words as u64),
            FinishReason::Stop,
        ))
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        let mut events: Vec<tokenwise::Result<StreamEvent>> = (0..self.words)
            .map(|_| Ok(StreamEvent::text(" word")))
            .collect();
        events.push(Ok(StreamEvent::Done(StreamEnd::new(
            FinishReason::Stop,
            &call.model.name,
            "openai",
        ))));
        Ok(Box::pin(stream::iter(events)))
    }
}

async fn drain(mut s: ChatStream) -> (u64, Option<StreamEnd>, Option<Error>) {
    let mut chunks = 0;
    while let Some(ev) = s.next().await {
        match ev {
            Ok(StreamEvent::TextDelta { .. }) => chunks += 1,
            Ok(StreamEvent::Done(end)) => return (chunks, Some(end), None),
            Ok(_) => {}
            Err(e) => return (chunks, None, Some(e)),
        }
    }
    (chunks, None, None)
}

#[tokio::test(start_paused = true)]
async fn the_kill_switch_ends_a_stream_at_its_token_limit_and_commits_the_cost() {
    let pipe = Pipeline::builder()
        .provider(Chatty { words: 500 })
        .default_model("gpt-4o")
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let (chunks, end, err) = drain(
        pipe.stream(ask("go on", "ann").max_tokens(20))
            .await
            .unwrap(),
    )
    .await;
    assert!(err.is_none());
    let end = end.expect("a truncated stream still ends with Done");
    assert_eq!(end.finish_reason, FinishReason::Truncated);
    assert_eq!(
        end.truncated,
        Some(Truncation::OutputTokens { max_tokens: 20 })
    );
    assert_eq!(
        chunks, 20,
        "one token a chunk: the 21st crosses the limit and is not sent"
    );
    assert!(end.usage.estimated);
    assert_eq!(
        end.usage.output_tokens, 21,
        "the crossing chunk was generated, so it is billed"
    );
    let (spent_now, reserved) = spent(&pipe, "ann").await;
    assert_eq!((spent_now, reserved), (end.cost, Cost::ZERO));
    // never cached: the same request streams from the provider again
    let (_, end2, _) = drain(
        pipe.stream(ask("go on", "ann").max_tokens(20))
            .await
            .unwrap(),
    )
    .await;
    assert!(!end2.unwrap().served.is_cache_hit());
}

#[tokio::test(start_paused = true)]
async fn the_kill_switch_ends_a_stream_at_its_cost_limit() {
    let pipe = Pipeline::builder()
        .provider(Chatty { words: 5_000 })
        .default_model("gpt-4o")
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .max_cost_per_request(Cost::from_micros(500))
        .build()
        .unwrap();
    let req = ChatRequest::user_text("go on")
        .user("ann")
        .max_tokens(10_000);
    let (chunks, end, _) = drain(pipe.stream(req).await.unwrap()).await;
    let end = end.unwrap();
    assert_eq!(
        end.truncated,
        Some(Truncation::Cost {
            max_cost: Cost::from_micros(500)
        })
    );
    // gpt-4o output is $10 / 1M tokens: $0.0005 buys 50 tokens, less the prompt
    assert!((40..=50).contains(&chunks), "{chunks}");
    let per_token = Cost::from_nanos(10_000);
    assert!(end.cost > Cost::from_micros(500) && end.cost <= Cost::from_micros(500) + per_token);
    assert_eq!(spent(&pipe, "ann").await.0, end.cost);
}

#[tokio::test(start_paused = true)]
async fn a_whole_request_over_its_cost_limit_is_refused_up_front() {
    let p = sim();
    let pipe = builder(&p).build().unwrap();
    let e = pipe
        .chat(
            ask("hi", "ann")
                .max_tokens(10_000)
                .max_cost(Cost::from_micros(10)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidRequest(ref m) if m.contains("limit")),
        "{e}"
    );
    assert_eq!(p.calls(), 0);
    pipe.chat(
        ask("hi", "ann")
            .max_tokens(10)
            .max_cost(Cost::from_micros(500)),
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn degrade_to_a_cheaper_model_then_cache_only_then_refuse() {
    let p = sim();
    let pipe = builder(&p)
        .spend_cap(
            ScopeKind::User,
            Cost::from_micros(10_000),
            BudgetWindow::Day,
        )
        .degrade_at(30, Degrade::CheaperModel("o4-mini".into()))
        .degrade_at(60, Degrade::CacheOnly)
        .degrade_at(90, Degrade::Refuse)
        .build()
        .unwrap();
    let mut models = Vec::new();
    let mut first_refusal = None;
    for i in 0..100 {
        match pipe
            .chat(ask(&format!("question {i}"), "ann").max_tokens(300))
            .await
        {
            Ok(r) => models.push(r.model),
            Err(e) => {
                first_refusal = Some((i, e));
                break;
            }
        }
    }
    assert_eq!(models.first().map(String::as_str), Some("gpt-4o"));
    assert!(models.iter().any(|m| m == "o4-mini"), "{models:?}");
    let idx = models.iter().position(|m| m == "o4-mini").unwrap();
    assert!(
        models[idx..].iter().all(|m| m == "o4-mini"),
        "no return to the dear model: {models:?}"
    );
    let (_, e) = first_refusal.expect("cache-only must refuse a miss eventually");
    assert!(matches!(e, Error::BudgetExceeded { .. }), "{e}");
    // cache-only still serves a hit
    let hit = pipe
        .chat(ask("question 0", "ann").max_tokens(300))
        .await
        .unwrap();
    assert!(hit.served.is_cache_hit());
    let calls = p.calls();
    // Refuse: once past 90 %, even a cached answer is refused.
    let pipe2 = builder(&p)
        .spend_cap(
            ScopeKind::User,
            Cost::from_micros(10_000),
            BudgetWindow::Day,
        )
        .degrade_at(90, Degrade::Refuse)
        .build()
        .unwrap();
    pipe2
        .chat(ask("cached", "bob").max_tokens(80))
        .await
        .unwrap();
    let hit = pipe2
        .chat(ask("cached", "bob").max_tokens(80))
        .await
        .unwrap();
    assert!(hit.served.is_cache_hit());
    let mut n = 0;
    while pipe2
        .chat(ask(&format!("fill {n}"), "bob").max_tokens(80))
        .await
        .is_ok()
    {
        n += 1;
        assert!(n < 500);
    }
    let used = pipe2.budget_status(&ask("", "bob").meta).await.unwrap()[0].used_percent();
    assert!(used >= 90, "{used}");
    let e = pipe2
        .chat(ask("cached", "bob").max_tokens(80))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::BudgetExceeded { .. }),
        "refuse mode refuses hits too: {e}"
    );
    assert!(p.calls() > calls);
}

#[tokio::test(start_paused = true)]
async fn waiting_for_limits_admits_after_the_exact_retry_after() {
    let p = sim();
    let pipe = builder(&p)
        .rate_limit(ScopeKind::User, 2)
        .wait_for_limits(Duration::from_secs(60))
        .no_cache()
        .build()
        .unwrap();
    pipe.chat(ask("a", "ann")).await.unwrap();
    pipe.chat(ask("b", "ann")).await.unwrap();
    let t0 = tokio::time::Instant::now();
    pipe.chat(ask("c", "ann")).await.unwrap();
    let waited = t0.elapsed();
    // one request every 30 s; the two calls took some virtual time already; up to 10 % jitter
    assert!(
        waited >= Duration::from_secs(25) && waited <= Duration::from_secs(34),
        "{waited:?}"
    );

    let impatient = builder(&p)
        .rate_limit(ScopeKind::User, 2)
        .wait_for_limits(Duration::from_secs(5))
        .no_cache()
        .build()
        .unwrap();
    impatient.chat(ask("a", "bob")).await.unwrap();
    impatient.chat(ask("b", "bob")).await.unwrap();
    let t0 = tokio::time::Instant::now();
    let e = impatient.chat(ask("c", "bob")).await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { .. }));
    assert_eq!(
        t0.elapsed(),
        Duration::ZERO,
        "a wait longer than max_wait is refused at once"
    );
}

#[tokio::test(start_paused = true)]
async fn per_model_quotas_skip_to_the_next_target_without_calling_the_provider() {
    let p = sim();
    let limits = TargetLimits::builder()
        .requests_per_minute("gpt-4o", 1)
        .build()
        .unwrap();
    let pipe = builder(&p)
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .target_limits(limits.clone())
        .no_cache()
        .build()
        .unwrap();
    assert_eq!(pipe.chat(ask("one", "ann")).await.unwrap().model, "gpt-4o");
    let r = pipe.chat(ask("two", "ann")).await.unwrap();
    assert_eq!(r.model, "claude-sonnet-4-5");
    assert_eq!(p.calls(), 2, "the over-quota target was never called");

    let alone = builder(&p)
        .target_limits(limits)
        .no_cache()
        .build()
        .unwrap();
    let e = alone.chat(ask("three", "ann")).await.unwrap_err();
    assert_eq!(
        e.as_provider().map(|p| p.kind),
        Some(ProviderErrorKind::RateLimited)
    );
    assert!(e.retry_after().is_some());
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn unknown_models_are_refused_or_priced_never_free() {
    let p = sim();
    let pipe = builder(&p).build().unwrap();
    assert!(matches!(
        pipe.chat(ask("x", "ann").model("brand-new")).await,
        Err(Error::UnknownModel(_))
    ));

    let zero = ModelSpec::new(
        "*",
        "openai",
        128_000,
        8_192,
        Pricing::per_mtok(0.0, 0.0, 0.0).unwrap(),
        2,
    );
    assert!(matches!(
        Catalog::builtin().with_unknown_models(zero),
        Err(Error::Config(_))
    ));
    let template = ModelSpec::new(
        "*",
        "openai",
        128_000,
        8_192,
        Pricing::per_mtok(5.0, 20.0, 5.0).unwrap(),
        2,
    );
    let pipe = builder(&p)
        .catalog(Catalog::builtin().with_unknown_models(template).unwrap())
        .build()
        .unwrap();
    let r = pipe.chat(ask("x", "ann").model("brand-new")).await.unwrap();
    assert_eq!(r.model, "brand-new");
    assert!(!r.cost.is_zero());
    assert_eq!(
        r.cost,
        Pricing::per_mtok(5.0, 20.0, 5.0).unwrap().cost(&r.usage)
    );
}

#[tokio::test(start_paused = true)]
async fn budget_alerts_fire_from_pipeline_traffic() {
    use std::sync::Mutex;
    use tokenwise::budget::MemoryBudget;
    let p = sim();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let budget = MemoryBudget::builder()
        .cap(
            ScopeKind::Global,
            Cost::from_micros(5_000),
            BudgetWindow::Month,
        )
        .on_alert(move |a| sink.lock().unwrap().push(a.threshold_percent))
        .build()
        .unwrap();
    let pipe = builder(&p).budget(Arc::new(budget)).build().unwrap();
    let mut i = 0;
    while pipe.chat(ask(&format!("q{i}"), "ann")).await.is_ok() {
        i += 1;
        assert!(i < 500);
    }
    let fired = seen.lock().unwrap().clone();
    assert!(fired.starts_with(&[50, 80]), "{fired:?}");
    assert!(
        fired.len() <= 3 && fired.windows(2).all(|w| w[0] < w[1]),
        "each threshold once: {fired:?}"
    );
}
