//! The funnel's contract, end to end on the simulated provider with paused time.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokenwise::budget::BudgetWindow;
use tokenwise::cache::Invalidation;
use tokenwise::observe::Outcome;
use tokenwise::provider::{ProviderService, SimulatedProvider};
use tokenwise::router::{FnValidator, Verdict};
use tokenwise::{
    CacheMode, ChatRequest, Cost, Error, FinishReason, Pipeline, PipelineBuilder, Scope, ScopeKind,
    Served, StreamEvent,
};

mod common;

use common::{sim, spent};

fn builder(p: &SimulatedProvider) -> PipelineBuilder {
    common::builder(p, "gpt-4o-mini")
}

fn ask(text: &str, user: &str) -> ChatRequest {
    ChatRequest::user_text(text).user(user).max_tokens(200)
}

#[tokio::test(start_paused = true)]
async fn a_cache_hit_spends_no_budget_and_is_served_over_the_cap() {
    let p = sim();
    let pipe = builder(&p)
        .spend_cap(ScopeKind::User, Cost::from_micros(300), BudgetWindow::Day)
        .build()
        .unwrap();
    let first = pipe.chat(ask("What is GCRA?", "ann")).await.unwrap();
    assert!(!first.cost.is_zero());
    let (spent_after_miss, reserved) = spent(&pipe, "ann").await;
    assert_eq!(spent_after_miss, first.cost);
    assert_eq!(reserved, Cost::ZERO);

    let hit = pipe.chat(ask("What is GCRA?", "ann")).await.unwrap();
    assert_eq!(hit.content, first.content);
    assert_eq!(hit.cost, Cost::ZERO);
    match hit.served {
        Served::Cache {
            similarity,
            saved_tokens,
            saved_cost,
        } => {
            assert_eq!(similarity, 1.0);
            assert_eq!(saved_tokens, first.usage.total());
            assert_eq!(saved_cost, first.cost);
        }
        other => panic!("expected a cache hit, got {other:?}"),
    }
    assert_eq!(
        spent(&pipe, "ann").await.0,
        spent_after_miss,
        "a hit spends nothing"
    );
    assert_eq!(p.calls(), 1);

    // Exhaust the cap with distinct questions until one is refused...
    let mut refused = None;
    for i in 0..50 {
        match pipe.chat(ask(&format!("Question number {i}"), "ann")).await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the cap must refuse eventually");
    assert!(
        matches!(e, Error::BudgetExceeded { scope: Scope::User(ref u), .. } if u == "ann"),
        "{e}"
    );
    let calls = p.calls();
    // ...and the cached answer is still served, at no cost, without a provider call.
    let again = pipe.chat(ask("What is GCRA?", "ann")).await.unwrap();
    assert!(again.served.is_cache_hit());
    assert_eq!(p.calls(), calls);
    // Spend never went over the cap.
    assert!(spent(&pipe, "ann").await.0 <= Cost::from_micros(300));
}

#[tokio::test(start_paused = true)]
async fn refused_requests_never_reach_the_provider_and_consume_nothing_elsewhere() {
    let p = sim();
    let pipe = builder(&p)
        .rate_limit(ScopeKind::User, 100)
        .rate_limit(ScopeKind::Global, 3)
        .token_limit(ScopeKind::User, 100_000)
        .build()
        .unwrap();
    for u in ["a", "b", "c"] {
        pipe.chat(ask(&format!("hello from {u}"), u)).await.unwrap();
    }
    assert_eq!(p.calls(), 3);
    let mut wait = Duration::ZERO;
    for _ in 0..5 {
        let e = pipe.chat(ask("one more", "d")).await.unwrap_err();
        match e {
            Error::RateLimited { scope, retry_after } => {
                assert_eq!(scope, Scope::Global);
                // 3 a minute: one every 20 s, less the virtual time the three calls took
                assert!(
                    retry_after <= Duration::from_secs(20) && retry_after > Duration::from_secs(15)
                );
                wait = retry_after;
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(p.calls(), 3, "refused requests never reach the provider");
    // One nanosecond early is still too early; the exact retry_after is enough.
    tokio::time::advance(wait - Duration::from_nanos(1)).await;
    assert!(matches!(
        pipe.chat(ask("one more", "d")).await,
        Err(Error::RateLimited { .. })
    ));
    tokio::time::advance(Duration::from_nanos(1)).await;
    // "d" gets through: its refusals consumed nothing of its own user or token quota.
    pipe.chat(ask("one more", "d")).await.unwrap();
    let report = pipe.usage();
    assert_eq!(report.errors_by_reason["rate_limited"], 6);
    assert_eq!(report.totals.requests, 10);
}

#[tokio::test(start_paused = true)]
async fn a_budget_refusal_refunds_the_token_charge() {
    let p = sim();
    let pipe = builder(&p)
        .token_limit(ScopeKind::User, 1_000)
        .spend_cap(ScopeKind::User, Cost::from_nanos(1), BudgetWindow::Day)
        .build()
        .unwrap();
    // Each attempt charges ~200 + prompt tokens; without refunds the fifth would be rate limited.
    for _ in 0..10 {
        let e = pipe.chat(ask("expensive", "ann")).await.unwrap_err();
        assert!(matches!(e, Error::BudgetExceeded { .. }), "{e}");
    }
    assert_eq!(p.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn cache_ttl_expires_on_paused_time() {
    let p = sim();
    let pipe = builder(&p)
        .exact_cache(100, Duration::from_secs(60))
        .build()
        .unwrap();
    pipe.chat(ask("ttl?", "ann")).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        pipe.chat(ask("ttl?", "ann"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        !pipe
            .chat(ask("ttl?", "ann"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert_eq!(p.calls(), 2);
    // per-request TTL, bypass and refresh
    pipe.chat(ask("short", "ann").cache_ttl(Duration::from_secs(1)))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        !pipe
            .chat(ask("short", "ann"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert!(
        !pipe
            .chat(ask("short", "ann").cache_mode(CacheMode::Bypass))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert!(
        !pipe
            .chat(ask("short", "ann").cache_mode(CacheMode::Refresh))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert!(
        pipe.chat(ask("short", "ann"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert_eq!(pipe.invalidate(&Invalidation::All).await.unwrap(), 2);
    assert!(
        !pipe
            .chat(ask("short", "ann"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
}

#[tokio::test(start_paused = true)]
async fn truncated_answers_are_never_cached() {
    let p = sim();
    let pipe = builder(&p).build().unwrap();
    let req = ChatRequest::user_text("Write a long essay").max_tokens(3);
    let r = pipe.chat(req.clone()).await.unwrap();
    assert_eq!(r.finish_reason, FinishReason::Length);
    assert!(!pipe.chat(req).await.unwrap().served.is_cache_hit());
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn tenants_never_share_cached_answers() {
    let p = sim();
    let pipe = builder(&p).build().unwrap();
    pipe.chat(ask("shared?", "ann").org("acme")).await.unwrap();
    assert!(
        !pipe
            .chat(ask("shared?", "bob").org("globex"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert!(
        pipe.chat(ask("shared?", "cat").org("acme"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
}

#[tokio::test(start_paused = true)]
async fn an_outage_falls_back_to_the_next_target() {
    let p = SimulatedProvider::builder()
        .outage(
            Duration::ZERO,
            Duration::from_secs(600),
            Some("gpt-4o-mini"),
        )
        .build()
        .unwrap();
    let pipe = builder(&p)
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .build()
        .unwrap();
    let r = pipe.chat(ask("are you there?", "ann")).await.unwrap();
    assert_eq!(r.model, "claude-haiku-4-5");
    // three calls to the primary (the first and two retries), then the fallback
    assert_eq!(
        r.served,
        Served::Provider {
            attempts: 4,
            fallbacks: 1,
            escalated: false
        }
    );
    // priced at the model that answered
    let spec = pipe.catalog().require("claude-haiku-4-5").unwrap();
    assert_eq!(r.cost, spec.cost(&r.usage));

    // without a fallback, the typed provider error comes back
    let pipe = builder(&p).build().unwrap();
    let e = pipe.chat(ask("are you there?", "ann")).await.unwrap_err();
    assert!(e.is_retryable());
    assert_eq!(e.as_provider().unwrap().status, Some(503));
}

#[tokio::test(start_paused = true)]
async fn oversized_prompts_get_a_typed_error_or_a_larger_model() {
    let p = sim();
    let huge = "word ".repeat(140_000);
    let pipe = builder(&p).build().unwrap();
    let e = pipe
        .chat(ChatRequest::user_text(huge.clone()).model("gpt-4o-mini"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::ContextTooLong { limit: 128_000, .. }),
        "{e}"
    );
    assert_eq!(p.calls(), 0);
    let pipe = builder(&p)
        .fallbacks("gpt-4o-mini", ["gpt-4.1-mini"])
        .build()
        .unwrap();
    let r = pipe
        .chat(
            ChatRequest::user_text(huge)
                .model("gpt-4o-mini")
                .max_tokens(10),
        )
        .await
        .unwrap();
    assert_eq!(r.model, "gpt-4.1-mini");
}

#[tokio::test(start_paused = true)]
async fn overload_is_refused_at_once() {
    let p = sim();
    let pipe = builder(&p).max_in_flight(2).no_cache().build().unwrap();
    let a = tokio::spawn({
        let pipe = pipe.clone();
        async move { pipe.chat(ask("slow one", "a")).await }
    });
    let b = tokio::spawn({
        let pipe = pipe.clone();
        async move { pipe.chat(ask("slow two", "b")).await }
    });
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let e = pipe.chat(ask("third", "c")).await.unwrap_err();
    assert!(matches!(e, Error::Overloaded { .. }), "{e}");
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    pipe.chat(ask("third", "c")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rejected_answer_escalates_once_and_both_costs_are_recorded() {
    let p = sim();
    let pipe = builder(&p)
        .escalate("gpt-4o-mini", ["gpt-4o"])
        .validator(Arc::new(FnValidator(
            |_: &ChatRequest, r: &tokenwise::ChatResponse| {
                if r.model == "gpt-4o-mini" {
                    Verdict::Escalate("too small".into())
                } else {
                    Verdict::Accept
                }
            },
        )))
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let r = pipe.chat(ask("hard question", "ann")).await.unwrap();
    assert_eq!(r.model, "gpt-4o");
    assert!(matches!(
        r.served,
        Served::Provider {
            attempts: 2,
            escalated: true,
            ..
        }
    ));
    let rec = pipe.recent_usage().pop().unwrap();
    assert_eq!(
        (r.cost, r.usage),
        (rec.cost, rec.usage),
        "the answer reports everything it was billed, as its record does"
    );
    assert_eq!(spent(&pipe, "ann").await.0, rec.cost);
    assert_eq!(p.calls(), 2);
    // the cache keeps the answering call's own usage: the record holds more
    let again = pipe.chat(ask("hard question", "ann")).await.unwrap();
    assert!(again.served.is_cache_hit());
    let cat = pipe.catalog();
    let own = cat.require("gpt-4o").unwrap().cost(&again.usage);
    assert!(
        own > Cost::ZERO && rec.cost > own,
        "both attempts are billed"
    );
    assert!(rec.usage.total() > again.usage.total());
}

async fn collect(mut s: tokenwise::ChatStream) -> (String, Vec<StreamEvent>, Option<Error>) {
    let mut text = String::new();
    let mut events = Vec::new();
    while let Some(ev) = s.next().await {
        match ev {
            Ok(ev) => {
                if let StreamEvent::TextDelta { text: t } = &ev {
                    text.push_str(t);
                }
                events.push(ev);
            }
            Err(e) => return (text, events, Some(e)),
        }
    }
    (text, events, None)
}

#[tokio::test(start_paused = true)]
async fn streams_are_metered_cached_and_replayed() {
    let p = sim();
    let pipe = builder(&p)
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let (text, events, err) = collect(pipe.stream(ask("stream me", "ann")).await.unwrap()).await;
    assert!(err.is_none());
    let Some(StreamEvent::Done(end)) = events.last() else {
        panic!("no Done: {events:?}")
    };
    assert!(!end.cost.is_zero());
    assert_eq!(spent(&pipe, "ann").await, (end.cost, Cost::ZERO));

    // replayed from the cache, as chunks, at no cost
    let (again, events, err) = collect(pipe.stream(ask("stream me", "ann")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(again, text);
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, StreamEvent::TextDelta { .. }))
            .count()
            > 1
    );
    let Some(StreamEvent::Done(end2)) = events.last() else {
        panic!()
    };
    assert!(end2.served.is_cache_hit());
    assert_eq!(end2.cost, Cost::ZERO);
    assert_eq!(p.calls(), 1);
    // and a whole request is answered from the streamed entry
    let whole = pipe.chat(ask("stream me", "ann")).await.unwrap();
    assert!(whole.served.is_cache_hit());
    assert_eq!(whole.content, text);
}

#[tokio::test(start_paused = true)]
async fn a_cut_stream_is_an_error_commits_what_it_used_and_is_not_cached() {
    let p = SimulatedProvider::builder()
        .cut_stream_after(4)
        .build()
        .unwrap();
    let pipe = builder(&p)
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .stream_recoveries(0) // this is about how a cut is reported
        .build()
        .unwrap();
    let (text, events, err) = collect(pipe.stream(ask("cut me", "ann")).await.unwrap()).await;
    assert!(
        matches!(err, Some(Error::StreamInterrupted { chunks: 4, .. })),
        "{err:?}"
    );
    assert!(!events.iter().any(|e| matches!(e, StreamEvent::Done(_))));
    assert!(!text.is_empty());
    let (spent_now, reserved) = spent(&pipe, "ann").await;
    assert!(!spent_now.is_zero(), "the partial stream is billed");
    assert_eq!(reserved, Cost::ZERO);
    let rec = pipe.recent_usage().pop().unwrap();
    assert!(rec.usage.estimated);
    assert_eq!(rec.outcome, Outcome::Error("stream_interrupted".into()));
    // not cached: asking again calls the provider again
    let _ = collect(pipe.stream(ask("cut me", "ann")).await.unwrap()).await;
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_commits_what_it_used() {
    let p = sim();
    let pipe = builder(&p)
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .max_in_flight(1)
        .build()
        .unwrap();
    let mut s = pipe.stream(ask("drop me", "ann")).await.unwrap();
    let (_, reserved) = spent(&pipe, "ann").await;
    assert!(
        !reserved.is_zero(),
        "the worst case is reserved while streaming"
    );
    let _ = s.next().await;
    let _ = s.next().await;
    drop(s);
    let (spent_now, reserved) = spent(&pipe, "ann").await;
    assert!(!spent_now.is_zero());
    assert_eq!(reserved, Cost::ZERO);
    assert_eq!(
        pipe.recent_usage().pop().unwrap().outcome,
        Outcome::Error("stream_dropped".into())
    );
    // the in-flight slot was released with it
    pipe.chat(ask("next", "ann")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_before_its_first_token_falls_back() {
    let p = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(60), Some("gpt-4o-mini"))
        .build()
        .unwrap();
    let pipe = builder(&p)
        .fallbacks("gpt-4o-mini", ["gpt-4.1-mini"])
        .build()
        .unwrap();
    let (_, events, err) = collect(pipe.stream(ask("fallback stream", "ann")).await.unwrap()).await;
    assert!(err.is_none());
    let Some(StreamEvent::Done(end)) = events.last() else {
        panic!()
    };
    assert_eq!(end.model, "gpt-4.1-mini");
}

#[tokio::test(start_paused = true)]
async fn the_pipeline_is_a_tower_service_and_the_layers_compose() {
    use tokenwise::budget::{BudgetLayer, MemoryBudget};
    use tokenwise::cache::{CacheLayer, CacheScope, ExactCache};
    use tokenwise::limiter::{GcraLimiter, RateLimitLayer};
    use tower::{Service, ServiceBuilder, ServiceExt};

    let p = sim();
    let mut pipe = builder(&p).build().unwrap();
    let r = pipe
        .ready()
        .await
        .unwrap()
        .call(ask("via tower", "ann"))
        .await
        .unwrap();
    assert_eq!(r.model, "gpt-4o-mini");

    let cat = tokenwise::Catalog::builtin();
    let budget = Arc::new(
        MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
            .build()
            .unwrap(),
    );
    let limiter = GcraLimiter::builder()
        .requests_per_minute(ScopeKind::User, 2)
        .build()
        .unwrap();
    let usage = Arc::new(tokenwise::observe::MemoryUsage::default());
    let mut svc = ServiceBuilder::new()
        .layer(tokenwise::observe::ObserveLayer::new(usage.clone()))
        .layer(RateLimitLayer::new(Arc::new(limiter), cat.clone()))
        .layer(CacheLayer::new(
            Arc::new(ExactCache::builder().build().unwrap()),
            CacheScope::Global,
        ))
        .layer(BudgetLayer::new(budget.clone(), cat.clone()))
        .service(ProviderService::new(p.clone(), cat));
    let req = ask("layers", "ann").model("gpt-4o-mini");
    let first = svc.ready().await.unwrap().call(req.clone()).await.unwrap();
    let second = svc.ready().await.unwrap().call(req.clone()).await.unwrap();
    assert!(second.served.is_cache_hit());
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(req.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::RateLimited { .. }));
    let st = budget.status_now(&req.meta);
    assert_eq!(st[0].spent, first.cost);
    let report = usage.report();
    assert_eq!(
        (
            report.totals.requests,
            report.totals.cache_hits,
            report.totals.errors
        ),
        (3, 1, 1)
    );
    assert_eq!(report.totals.cost, first.cost);
    assert_eq!(report.totals.saved, first.cost);
}

#[tokio::test]
async fn invalid_configuration_and_requests_are_typed_errors() {
    let p = sim();
    assert!(matches!(Pipeline::builder().build(), Err(Error::Config(_))));
    assert!(matches!(
        builder(&p).default_model("no-such-model").build(),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        builder(&p).max_in_flight(0).build(),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        builder(&p).rate_limit(ScopeKind::User, 0).build(),
        Err(Error::Config(_))
    ));
    let pipe = builder(&p).build().unwrap();
    assert!(matches!(
        pipe.chat(ChatRequest::new()).await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        pipe.chat(ChatRequest::user_text("x").temperature(9.0))
            .await,
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        pipe.chat(ChatRequest::user_text("x").model("nope")).await,
        Err(Error::UnknownModel(_))
    ));
    assert_eq!(p.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_call_releases_its_reservation_and_pays_for_the_prompt() {
    let p = sim();
    let pipe = builder(&p)
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    // The caller gives up 50 ms into a call that takes hundreds.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), pipe.chat(ask("slow", "ann"))).await;
    assert!(gave_up.is_err());
    assert_eq!(p.calls(), 1);
    let (spent_now, reserved) = spent(&pipe, "ann").await;
    assert_eq!(reserved, Cost::ZERO, "nothing stays reserved");
    let spec = pipe.catalog().require("gpt-4o-mini").unwrap();
    let prompt = tokenwise::context::TiktokenCounter::new();
    let prompt_tokens =
        tokenwise::TokenCounter::count_request(&prompt, &ask("slow", "ann"), spec.tokenizer);
    assert_eq!(spent_now, spec.pricing.input.cost_of(prompt_tokens));
    // and the call has its usage record, with what it was charged
    let rec = pipe
        .recent_usage()
        .pop()
        .expect("a record for the abandoned call");
    assert_eq!(
        rec.outcome,
        tokenwise::observe::Outcome::Error("cancelled".into())
    );
    assert_eq!(rec.cost, spent_now);
    assert_eq!(rec.usage.input_tokens, prompt_tokens);
    assert!(rec.usage.estimated);
    assert_eq!(rec.user.as_deref(), Some("ann"));
    assert_eq!(rec.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(pipe.usage().totals.requests, 1);
}

#[tokio::test(start_paused = true)]
async fn a_guard_rejection_is_reported_on_the_answer_and_the_usage_record() {
    use tokenwise::cache::SemanticCache;
    let p = sim();
    let pipe = builder(&p)
        .cache(Arc::new(
            SemanticCache::builder().threshold(0.5).build().unwrap(),
        ))
        .build()
        .unwrap();
    pipe.chat(ask("Is the clinic open on Sundays?", "ann"))
        .await
        .unwrap();
    let r = pipe
        .chat(ask("Is the clinic not open on Sundays?", "ann"))
        .await
        .unwrap();
    assert!(
        !r.served.is_cache_hit(),
        "a negation is not the same question"
    );
    assert!(
        r.guard_rejected.is_some(),
        "the refused candidate is reported"
    );
    assert_eq!(pipe.recent_usage().pop().unwrap().guard_rejections, 1);
    assert_eq!(p.calls(), 2);
}
