//! Resilience through the pipeline, on paused time: retries, budgets, breakers,
//! fallbacks, deadlines, hedging, load shedding and stale answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
use tokenwise::resilience::{BreakerState, ConcurrencyConfig, Hedge, RetryPolicy};
use tokenwise::{
    ChatRequest, ChatResponse, ChatStream, Error, FinishReason, Pipeline, Priority,
    ProviderErrorKind, StreamEnd, StreamEvent, Usage,
};

fn ask(text: &str) -> ChatRequest {
    ChatRequest::user_text(text).user("ann").max_tokens(100)
}

fn fast() -> tokenwise::provider::SimulatedProviderBuilder {
    SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(100))
        .per_token(Duration::from_millis(1))
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_between_attempts() {
    let p = fast()
        .rate_limit_rate(1.0, Duration::from_secs(3))
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .no_breaker()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let e = pipe.chat(ask("busy?")).await.unwrap_err();
    let took = t0.elapsed();
    assert_eq!(p.calls(), 3);
    assert_eq!(
        e.as_provider().map(|p| p.kind),
        Some(ProviderErrorKind::RateLimited)
    );
    // two waits of at least 3 s (plus at most a little jitter), and three quick failures
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(7),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_bound_moves_to_the_next_target_at_once() {
    let p = fast()
        .rate_limit_rate(1.0, Duration::from_secs(3_600))
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .no_breaker()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let e = pipe.chat(ask("busy?")).await.unwrap_err();
    assert_eq!(p.calls(), 1, "no waiting an hour");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3_600)));
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_stops_a_retry_storm() {
    let p = fast().server_error_rate(1.0).build().unwrap();
    let policy = RetryPolicy {
        budget_ratio: 0.0,
        budget_floor_per_sec: 1,
        ..RetryPolicy::default()
    };
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .retry(policy)
        .no_breaker()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let pipe = pipe.clone();
        tasks.push(tokio::spawn(async move {
            pipe.chat(ask(&format!("q{i}"))).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_err());
    }
    // 50 first calls plus the floor of 1 retry a second over the 10 s window
    assert_eq!(p.calls(), 60);
}

/// gpt-4o falling back to claude-sonnet-4-5, no retries, no cache.
fn primary_with_fallback(p: &SimulatedProvider) -> Pipeline {
    Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .retry(RetryPolicy::none())
        .no_cache()
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn breakers_open_fail_fast_probe_and_close() {
    let p = fast()
        .outage(Duration::ZERO, Duration::from_secs(90), Some("gpt-4o"))
        .build()
        .unwrap();
    let pipe = primary_with_fallback(&p);
    for i in 0..5 {
        let r = pipe.chat(ask(&format!("a{i}"))).await.unwrap();
        assert_eq!(r.model, "claude-sonnet-4-5");
    }
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Open);
    let calls = p.calls();
    let r = pipe.chat(ask("while open")).await.unwrap();
    assert_eq!(
        r.served,
        tokenwise::Served::Provider {
            attempts: 1,
            fallbacks: 1,
            escalated: false
        }
    );
    assert_eq!(
        p.calls(),
        calls + 1,
        "the open target is skipped without a call"
    );

    // 30 s later one probe goes to the primary (still down): it reopens
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::HalfOpen);
    let r = pipe.chat(ask("probe 1")).await.unwrap();
    assert!(matches!(
        r.served,
        tokenwise::Served::Provider { attempts: 2, .. }
    ));
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Open);

    // after the outage the next probe succeeds and the primary is back
    tokio::time::advance(Duration::from_secs(60)).await;
    let r = pipe.chat(ask("probe 2")).await.unwrap();
    assert_eq!(r.model, "gpt-4o");
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn streams_cut_after_their_first_token_trip_the_breaker() {
    // every stream from the primary breaks after three chunks
    let p = fast()
        .cut_stream_after(3)
        .answer_words(30, 40)
        .build()
        .unwrap();
    // recovery off: this is about how a cut is judged (recovery would also call the
    // fallback, which cuts too, and open its breaker)
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .retry(RetryPolicy::none())
        .no_cache()
        .stream_recoveries(0)
        .build()
        .unwrap();
    for i in 0..5 {
        assert_eq!(
            pipe.breaker_state("gpt-4o"),
            BreakerState::Closed,
            "stream {i}"
        );
        let mut s = pipe.stream(ask(&format!("s{i}"))).await.unwrap();
        let mut failed = false;
        while let Some(ev) = s.next().await {
            if let Err(e) = ev {
                assert!(matches!(e, Error::StreamInterrupted { .. }), "{e}");
                failed = true;
            }
        }
        assert!(failed, "the cut is an error, never a clean end");
        drop(s);
        tokio::task::yield_now().await;
    }
    // five consecutive target failures, each after a first token: open
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Open);
    let calls = p.calls();
    let s = pipe.stream(ask("while open")).await.unwrap();
    drop(s);
    assert_eq!(p.calls(), calls + 1, "only the fallback was called");
}

#[tokio::test(start_paused = true)]
async fn streams_that_end_or_are_dropped_do_not_count_as_failures() {
    let p = fast().answer_words(30, 40).build().unwrap();
    let pipe = Pipeline::builder()
        .provider(p)
        .default_model("gpt-4o")
        .no_cache()
        .build()
        .unwrap();
    for i in 0..10 {
        let mut s = pipe.stream(ask(&format!("d{i}"))).await.unwrap();
        if i % 2 == 0 {
            while s.next().await.is_some() {}
        } else {
            let _ = s.next().await; // the client leaves after one chunk
        }
        drop(s);
        tokio::task::yield_now().await;
    }
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn client_errors_never_trip_a_breaker() {
    let p = fast().build().unwrap();
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .build()
        .unwrap();
    for _ in 0..20 {
        // over the context window: refused before any call, never a target failure
        let e = pipe
            .chat(ChatRequest::user_text("x".repeat(10)).max_tokens(200_000))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::ContextTooLong { .. }));
    }
    assert_eq!(pipe.breaker_state("gpt-4o-mini"), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn with_every_target_down_requests_fail_fast_or_come_from_the_cache() {
    let p = fast()
        .outage(Duration::from_secs(10), Duration::from_secs(3_600), None)
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .exact_cache(100, Duration::from_secs(5))
        .serve_stale_for(Duration::from_secs(3_600))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let cached = pipe.chat(ask("cached earlier")).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    // the breakers open after five failures each
    for i in 0..5 {
        assert!(pipe.chat(ask(&format!("down {i}"))).await.is_err());
    }
    assert_eq!(pipe.breaker_state("gpt-4o"), BreakerState::Open);
    assert_eq!(pipe.breaker_state("claude-sonnet-4-5"), BreakerState::Open);
    let calls = p.calls();
    let t0 = tokio::time::Instant::now();
    let e = pipe.chat(ask("anyone?")).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "fails at once");
    assert!(
        matches!(
            e,
            Error::Unavailable {
                retry_after: Some(_)
            }
        ),
        "{e}"
    );
    assert!(e.is_retryable());
    // the expired answer is served rather than an error
    let stale = pipe.chat(ask("cached earlier")).await.unwrap();
    assert!(stale.served.is_cache_hit());
    assert_eq!(stale.content, cached.content);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(p.calls(), calls, "no provider was called");
    // streams too
    let mut s = pipe.stream(ask("cached earlier")).await.unwrap();
    let mut text = String::new();
    while let Some(Ok(ev)) = s.next().await {
        if let StreamEvent::TextDelta { text: t } = ev {
            text.push_str(&t);
        }
    }
    assert_eq!(text, cached.content);
    assert!(matches!(
        pipe.stream(ask("anyone at all?")).await,
        Err(Error::Unavailable { .. })
    ));
}

/// A provider whose answers take `delay`, counting completions and cancellations.
#[derive(Debug)]
struct Slow {
    name: &'static str,
    delay: Duration,
    completed: Arc<AtomicU32>,
    cancelled: Arc<AtomicU32>,
}

struct CountDrop(Arc<AtomicU32>, bool);

impl Drop for CountDrop {
    fn drop(&mut self) {
        if self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl Provider for Slow {
    fn name(&self) -> &str {
        self.name
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        let mut guard = CountDrop(Arc::clone(&self.cancelled), true);
        tokio::time::sleep(self.delay).await;
        guard.1 = false;
        self.completed.fetch_add(1, Ordering::SeqCst);
        Ok(ChatResponse::new(
            format!("from {}", self.name),
            &call.model.name,
            self.name,
            Usage::new(100, 10),
            FinishReason::Stop,
        ))
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        tokio::time::sleep(self.delay).await;
        let end = StreamEnd::new(FinishReason::Stop, &call.model.name, self.name);
        Ok(Box::pin(stream::iter([
            Ok(StreamEvent::text(format!("from {}", self.name))),
            Ok(StreamEvent::Done(end)),
        ])))
    }
}

fn slow(name: &'static str, delay: Duration) -> (Arc<Slow>, Arc<AtomicU32>, Arc<AtomicU32>) {
    let (c, x) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    (
        Arc::new(Slow {
            name,
            delay,
            completed: Arc::clone(&c),
            cancelled: Arc::clone(&x),
        }),
        c,
        x,
    )
}

#[tokio::test(start_paused = true)]
async fn hedging_races_a_slow_target_and_cancels_the_loser() {
    let (openai, open_done, open_cancelled) = slow("openai", Duration::from_secs(10));
    let (anthropic, anth_done, _) = slow("anthropic", Duration::from_secs(1));
    let pipe = Pipeline::builder()
        .provider_for("openai", openai)
        .provider_for("anthropic", anthropic)
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .hedge(Hedge::After(Duration::from_millis(500)))
        .no_cache()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let r = pipe.chat(ask("hedge me")).await.unwrap();
    assert_eq!(
        t0.elapsed(),
        Duration::from_millis(1_500),
        "hedge at 0.5 s, answer 1 s later"
    );
    assert_eq!(r.content, "from anthropic");
    assert_eq!(
        (
            anth_done.load(Ordering::SeqCst),
            open_done.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
    assert_eq!(
        open_cancelled.load(Ordering::SeqCst),
        1,
        "the slow call was cancelled"
    );
    // both are billed: the winner's answer and the loser's prompt
    let rec = pipe.recent_usage().pop().unwrap();
    let cat = pipe.catalog();
    let winner = cat.require("claude-sonnet-4-5").unwrap().cost(&r.usage);
    assert!(rec.cost > winner, "{} vs {}", rec.cost, winner);
}

#[tokio::test(start_paused = true)]
async fn a_first_token_timeout_falls_back() {
    let (openai, _, _) = slow("openai", Duration::from_secs(30));
    let (anthropic, _, _) = slow("anthropic", Duration::from_millis(200));
    let pipe = Pipeline::builder()
        .provider_for("openai", openai)
        .provider_for("anthropic", anthropic)
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .first_token_timeout(Duration::from_secs(2))
        .retry(RetryPolicy::none())
        .no_cache()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let mut s = pipe.stream(ask("quick?")).await.unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert_eq!(first, StreamEvent::text("from anthropic"));
    assert_eq!(t0.elapsed(), Duration::from_millis(2_200));
}

/// A stream that sends one chunk, then goes silent.
#[derive(Debug)]
struct Stall;

#[async_trait]
impl Provider for Stall {
    fn name(&self) -> &str {
        "openai"
    }

    async fn chat(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        futures_util::future::pending().await
    }

    async fn stream(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        Ok(Box::pin(
            stream::iter([Ok(StreamEvent::text("hello"))]).chain(stream::pending()),
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_stream_ends_with_an_error_at_its_idle_timeout() {
    let pipe = Pipeline::builder()
        .provider(Stall)
        .default_model("gpt-4o")
        .idle_timeout(Duration::from_secs(5))
        .stream_recoveries(0) // how a cut is judged and reported, without recovery
        .build()
        .unwrap();
    let mut s = pipe.stream(ask("talk")).await.unwrap();
    assert!(matches!(
        s.next().await,
        Some(Ok(StreamEvent::TextDelta { .. }))
    ));
    let t0 = tokio::time::Instant::now();
    let e = s.next().await.unwrap().unwrap_err();
    assert!(
        matches!(e, Error::StreamInterrupted { chunks: 1, .. }),
        "{e}"
    );
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert!(s.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn the_request_deadline_bounds_retries_and_backoff() {
    let p = fast().server_error_rate(1.0).build().unwrap();
    let policy = RetryPolicy {
        max_attempts: 10,
        base: Duration::from_secs(1),
        ..RetryPolicy::default()
    };
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .retry(policy)
        .request_timeout(Duration::from_secs(3))
        .no_breaker()
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    assert!(pipe.chat(ask("doomed")).await.is_err());
    assert!(t0.elapsed() <= Duration::from_secs(3));
    assert!(p.calls() < 10);
}

#[tokio::test(start_paused = true)]
async fn ten_times_the_sustainable_load_is_shed_at_once_within_bounds() {
    let p = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_secs(1))
        .build()
        .unwrap();
    let cfg = ConcurrencyConfig {
        initial: 10,
        min: 10,
        max: 10,
        adaptive: false,
        queue_per_priority: 5,
        ..ConcurrencyConfig::default()
    };
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .concurrency(cfg)
        .no_cache()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let pipe = pipe.clone();
        let prio = [Priority::Low, Priority::Normal, Priority::High][i % 3];
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let r = pipe.chat(ask(&format!("load {i}")).priority(prio)).await;
            (r, t0.elapsed())
        }));
    }
    tokio::task::yield_now().await;
    let (in_flight, queued) = pipe.load();
    assert!(
        in_flight <= 10 && queued <= 15,
        "{in_flight} in flight, {queued} queued"
    );
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            (Ok(_), _) => ok += 1,
            (Err(Error::Overloaded { .. }), took) => {
                shed += 1;
                assert_eq!(took, Duration::ZERO, "shed at once");
            }
            (Err(e), _) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 25, "10 in flight and 15 queued are served");
    assert_eq!(shed, 275);
    assert_eq!(p.calls(), 25);
    assert_eq!(pipe.load(), (0, 0));
}
