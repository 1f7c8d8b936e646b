//! The pipeline core: one attempt loop for whole answers and streams, so balancing,
//! breakers, validators, cascades, hedging and the kill switch behave alike for both;
//! anonymous requests never bypass a scope; deadlines never overflow.

mod common;

use std::sync::Arc;
use std::time::Duration;

use tokenwise::budget::BudgetWindow;
use tokenwise::provider::SimulatedProvider;
use tokenwise::resilience::{BreakerConfig, BreakerState, Hedge, RetryPolicy};
use tokenwise::router::{Balance, Deployments, FnValidator, Verdict};
use tokenwise::{
    Anonymous, ChatRequest, ChatResponse, Cost, Error, FinishReason, Pipeline, ScopeKind, Served,
};

use common::{drain, sim, sim_paced, spent};

fn named(name: &str, first_token: Duration) -> SimulatedProvider {
    SimulatedProvider::builder()
        .name(name)
        .time_to_first_token(first_token)
        .per_token(Duration::from_millis(1))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn latency_aware_balancing_prefers_the_fast_deployment_for_whole_answers() {
    let fast = named("fast", Duration::from_millis(20));
    let slow = named("slow", Duration::from_millis(600));
    let pipe = Pipeline::builder()
        .deployments(
            "gpt-4o-mini",
            Deployments::new(Balance::PowerOfTwo)
                .add(fast.clone(), 1)
                .add(slow.clone(), 1),
        )
        .default_model("gpt-4o-mini")
        .no_cache()
        .build()
        .unwrap();
    for i in 0..10 {
        pipe.chat(ChatRequest::user_text(format!("warm-up {i}")))
            .await
            .unwrap();
    }
    let (f0, s0) = (fast.calls(), slow.calls());
    for i in 0..100 {
        pipe.chat(ChatRequest::user_text(format!("question {i}")))
            .await
            .unwrap();
    }
    let (f, s) = (fast.calls() - f0, slow.calls() - s0);
    assert_eq!(f + s, 100);
    assert!(
        f >= 80,
        "fast {f} / slow {s}: whole answers feed the balancer"
    );
}

#[tokio::test(start_paused = true)]
async fn one_failing_deployment_does_not_open_its_healthy_siblings_breaker() {
    let bad = SimulatedProvider::builder()
        .name("bad")
        .server_error_rate(1.0)
        .build()
        .unwrap();
    let good = named("good", Duration::from_millis(10));
    let pipe = Pipeline::builder()
        .deployments(
            "gpt-4o-mini",
            Deployments::new(Balance::Weighted)
                .add(bad.clone(), 1)
                .add(good.clone(), 1),
        )
        .default_model("gpt-4o-mini")
        .no_cache()
        .retry(RetryPolicy::none())
        .breaker(BreakerConfig {
            consecutive_failures: 3,
            ..BreakerConfig::default()
        })
        .build()
        .unwrap();
    let mut ok = 0;
    for i in 0..40 {
        if pipe
            .chat(ChatRequest::user_text(format!("q {i}")))
            .await
            .is_ok()
        {
            ok += 1;
        }
    }
    let states = pipe.deployment_breaker_states("gpt-4o-mini");
    assert_eq!(
        states,
        vec![
            ("gpt-4o-mini@bad".to_owned(), BreakerState::Open),
            ("gpt-4o-mini@good".to_owned(), BreakerState::Closed),
        ]
    );
    assert_eq!(pipe.breaker_state("gpt-4o-mini"), BreakerState::Closed);
    assert_eq!(bad.calls(), 3, "the bad deployment is skipped once open");
    assert_eq!(
        ok, 37,
        "every call after the third went to the healthy deployment"
    );
    // streams too
    let (_, end, err) = drain(pipe.stream(ChatRequest::user_text("s")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(end.unwrap().provider, "good");
}

fn escalating(
    from: &'static str,
) -> Arc<FnValidator<impl Fn(&ChatRequest, &ChatResponse) -> Verdict>> {
    Arc::new(FnValidator(move |_: &ChatRequest, r: &ChatResponse| {
        if r.model == from {
            Verdict::Escalate("too small".into())
        } else {
            Verdict::Accept
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn a_cascade_and_a_validator_work_on_a_stream() {
    let p = sim();
    let pipe = common::builder(&p, "gpt-4o-mini")
        .escalate("gpt-4o-mini", ["gpt-4o"])
        .validator(escalating("gpt-4o-mini"))
        .spend_cap(ScopeKind::User, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let (text, end, err) = drain(
        pipe.stream(ChatRequest::user_text("hard question").user("ann"))
            .await
            .unwrap(),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    let end = end.unwrap();
    assert_eq!(end.model, "gpt-4o", "the weak first answer was replaced");
    assert!(!text.is_empty());
    assert!(matches!(
        end.served,
        Served::Provider {
            escalated: true,
            ..
        }
    ));
    assert_eq!(p.calls(), 2);
    let rec = pipe.recent_usage().pop().unwrap();
    let cat = pipe.catalog();
    let mini = cat.require("gpt-4o-mini").unwrap();
    let big = cat.require("gpt-4o").unwrap();
    assert!(
        rec.cost > big.cost(&end.usage).min(mini.cost(&end.usage)),
        "both tiers are billed"
    );
    assert!(
        rec.cost < big.cost(&end.usage),
        "the first tier at its own price"
    );
    assert_eq!((end.cost, end.usage), (rec.cost, rec.usage));
    assert!(rec.escalated);
    assert_eq!(spent(&pipe, "ann").await, (rec.cost, Cost::ZERO));

    // An answer the validator accepts is released as a stream from the first tier.
    let p = sim();
    let pipe = common::builder(&p, "gpt-4o-mini")
        .escalate("gpt-4o-mini", ["gpt-4o"])
        .validator(escalating("never"))
        .build()
        .unwrap();
    let (text, end, err) = drain(pipe.stream(ChatRequest::user_text("easy")).await.unwrap()).await;
    assert!(err.is_none());
    let end = end.unwrap();
    assert_eq!(end.model, "gpt-4o-mini");
    assert!(!text.is_empty());
    assert_eq!(p.calls(), 1);
    let rec = pipe.recent_usage().pop().unwrap();
    assert!(!rec.is_cache_hit() && !rec.cost.is_zero());
}

#[tokio::test(start_paused = true)]
async fn claude_and_gpt_streams_with_max_tokens_are_never_cut_before_it() {
    for model in [
        "claude-haiku-4-5",
        "gpt-4o-mini",
        "gpt-4o",
        "claude-sonnet-4-5",
    ] {
        for max_tokens in [7u32, 50, 300] {
            let p = SimulatedProvider::builder()
                .answer_words(400, 400)
                .seed(u64::from(max_tokens))
                .build()
                .unwrap();
            let pipe = common::builder(&p, model).no_cache().build().unwrap();
            let (_, end, err) = drain(
                pipe.stream(ChatRequest::user_text("tell me everything").max_tokens(max_tokens))
                    .await
                    .unwrap(),
            )
            .await;
            assert!(err.is_none(), "{model}: {err:?}");
            let end = end.unwrap();
            assert_eq!(
                end.finish_reason,
                FinishReason::Length,
                "{model} at {max_tokens}: the provider's own limit ends the stream, not the kill switch"
            );
            assert!(end.truncated.is_none());
            assert!(end.usage.output_tokens <= u64::from(max_tokens));
            assert!(end.usage.output_tokens + 3 >= u64::from(max_tokens));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn anonymous_requests_are_limited_and_capped_in_a_shared_bucket() {
    let p = sim();
    let pipe = common::builder(&p, "gpt-4o-mini")
        .no_cache()
        .rate_limit(ScopeKind::User, 2)
        .build()
        .unwrap();
    pipe.chat(ChatRequest::user_text("a")).await.unwrap();
    pipe.chat(ChatRequest::user_text("b")).await.unwrap();
    let e = pipe.chat(ChatRequest::user_text("c")).await.unwrap_err();
    assert!(
        matches!(&e, Error::RateLimited { scope, .. } if scope.to_string() == "user:<anonymous>"),
        "{e}"
    );
    // a named user has a bucket of its own
    pipe.chat(ChatRequest::user_text("d").user("ann"))
        .await
        .unwrap();

    // spend caps: anonymous requests share one cap
    let pipe = common::builder(&p, "gpt-4o-mini")
        .no_cache()
        .spend_cap(ScopeKind::User, Cost::from_micros(30), BudgetWindow::Day)
        .build()
        .unwrap();
    let mut refused = None;
    for i in 0..50 {
        if let Err(e) = pipe
            .chat(ChatRequest::user_text(format!("question {i}")).max_tokens(50))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(Error::BudgetExceeded { .. })),
        "anonymous spend is capped: {refused:?}"
    );
    let st = pipe
        .budget_status(&ChatRequest::user_text("").meta)
        .await
        .unwrap();
    assert_eq!(st[0].scope.to_string(), "user:<anonymous>");
    assert!(st[0].spent <= Cost::from_micros(30));

    // or refused outright
    let pipe = common::builder(&p, "gpt-4o-mini")
        .rate_limit(ScopeKind::User, 100)
        .anonymous(Anonymous::Refuse)
        .build()
        .unwrap();
    let before = p.calls();
    let e = pipe
        .chat(ChatRequest::user_text("who am I"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e}");
    let e = pipe.stream(ChatRequest::user_text("who am I")).await.err();
    assert!(matches!(e, Some(Error::InvalidRequest(_))));
    assert_eq!(p.calls(), before);
    pipe.chat(ChatRequest::user_text("who am I").user("ann"))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn huge_timeouts_build_and_run_without_overflow() {
    let p = sim();
    let pipe = common::builder(&p, "gpt-4o-mini")
        .request_timeout(Duration::MAX)
        .attempt_timeout(Duration::MAX)
        .first_token_timeout(Duration::MAX)
        .idle_timeout(Duration::MAX)
        .serve_stale_for(Duration::MAX)
        .wait_for_limits(Duration::MAX)
        .rate_limit(ScopeKind::Global, 1000)
        .build()
        .unwrap();
    pipe.chat(ChatRequest::user_text("whole")).await.unwrap();
    let (_, end, err) = drain(
        pipe.stream(ChatRequest::user_text("streamed"))
            .await
            .unwrap(),
    )
    .await;
    assert!(err.is_none() && end.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_stream_holds_its_deployment_until_it_ends() {
    let a = named("a", Duration::from_millis(10));
    let b = named("b", Duration::from_millis(10));
    let pipe = Pipeline::builder()
        .deployments(
            "gpt-4o-mini",
            Deployments::new(Balance::LeastInFlight)
                .add(a.clone(), 1)
                .add(b.clone(), 1),
        )
        .default_model("gpt-4o-mini")
        .no_cache()
        .build()
        .unwrap();
    // A long stream opened and left unread holds its deployment...
    let long = pipe
        .stream(ChatRequest::user_text("long one"))
        .await
        .unwrap();
    let (held_a, held_b) = (a.calls(), b.calls());
    // ...so every later call goes to the other one while it lasts.
    for i in 0..6 {
        pipe.chat(ChatRequest::user_text(format!("q {i}")))
            .await
            .unwrap();
    }
    if held_a == 1 {
        assert_eq!((a.calls(), b.calls()), (1, held_b + 6));
    } else {
        assert_eq!((a.calls(), b.calls()), (held_a + 6, 1));
    }
    drop(long);
}

#[tokio::test(start_paused = true)]
async fn a_silent_target_fails_over_at_once_instead_of_being_retried() {
    let silent = SimulatedProvider::builder()
        .timeout_rate(1.0, Duration::from_secs(600))
        .build()
        .unwrap();
    let backup = sim();
    let pipe = Pipeline::builder()
        .provider_for("openai", Arc::new(silent.clone()))
        .provider_for("anthropic", Arc::new(backup.clone()))
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .attempt_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let r = pipe.chat(ChatRequest::user_text("hello?")).await.unwrap();
    assert_eq!(r.model, "claude-haiku-4-5");
    assert_eq!(silent.calls(), 1, "the silent route is not retried");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());

    // a stream whose first token is slow moves on after the failover first-token limit
    let slow = sim_paced(Duration::from_secs(20), Duration::from_millis(5));
    let pipe = Pipeline::builder()
        .provider_for("openai", Arc::new(slow.clone()))
        .provider_for("anthropic", Arc::new(backup.clone()))
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .no_cache()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let (_, end, err) = drain(pipe.stream(ChatRequest::user_text("stream")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(end.unwrap().model, "claude-haiku-4-5");
    assert_eq!(slow.calls(), 1);
    assert!(t0.elapsed() < Duration::from_secs(12), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn streams_are_hedged_before_their_first_token() {
    let slow = sim_paced(Duration::from_secs(3), Duration::from_millis(5));
    let fast = sim_paced(Duration::from_millis(50), Duration::from_millis(5));
    let pipe = Pipeline::builder()
        .provider_for("openai", Arc::new(slow.clone()))
        .provider_for("anthropic", Arc::new(fast.clone()))
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .hedge(Hedge::After(Duration::from_millis(200)))
        .first_token_timeout(Duration::from_secs(30))
        .no_cache()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let s = pipe.stream(ChatRequest::user_text("race")).await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let (_, end, err) = drain(s).await;
    assert!(err.is_none());
    assert_eq!(end.unwrap().model, "claude-haiku-4-5");
    assert_eq!((slow.calls(), fast.calls()), (1, 1));
}

/// Counts every text it is asked to count, at a fixed 3,000 tokens a text.
#[derive(Debug, Default)]
struct Tally(std::sync::atomic::AtomicUsize);

impl tokenwise::context::TokenCounter for Tally {
    fn count_text(&self, _text: &str, _tokenizer: tokenwise::TokenizerKind) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        3_000
    }
}

#[tokio::test(start_paused = true)]
async fn the_router_reads_the_pipelines_one_count_of_the_prompt() {
    let catalog = tokenwise::Catalog::builtin();
    let router = tokenwise::router::ComplexityRouter::new(
        &catalog,
        ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"],
    )
    .unwrap();
    let tally = Arc::new(Tally::default());
    let pipe = Pipeline::builder()
        .provider(sim())
        .router(Arc::new(router))
        .token_counter(tally.clone())
        .no_cache()
        .build()
        .unwrap();
    let answer = pipe
        .chat(ChatRequest::user_text("a short question"))
        .await
        .unwrap();
    // The configured counter says 3,000 tokens, a long prompt: the router saw that
    // count, not its own, and chose a higher tier than a short question would get.
    assert_ne!(answer.model, "gpt-4o-mini", "the router counted on its own");
    // One text, counted once for the router, admission, the budget and the provider.
    assert_eq!(tally.0.load(std::sync::atomic::Ordering::Relaxed), 1);
}
