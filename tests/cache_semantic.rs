//! The semantic cache, on its own and through the pipeline: paraphrases served,
//! near-misses refused and reported, contexts and tenants kept apart, TTLs, invalidation,
//! capacity, the never-store rules, streamed replay, one embedding per request, and one
//! call for the word vectors of a judged lookup.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use tokenwise::cache::{
    Cache, CacheEvent, CacheQuery, CacheScope, Embedder, ExactCache, GuardKind, HashingEmbedder,
    Invalidation, PairJudge, SemanticCache, SemanticCacheBuilder,
};
use tokenwise::provider::SimulatedProvider;
use tokenwise::{
    CacheMode, ChatRequest, ChatResponse, Error, FinishReason, ManualClock, Message, Pipeline,
    Served, StreamEvent, Timestamp, Usage,
};

/// Case and punctuation are dropped before embedding; the hashing embedder scores a
/// changed word or two between 0.7 and 0.9, so 0.7 lets these tests use it for
/// paraphrases.
fn semantic() -> SemanticCacheBuilder {
    SemanticCache::builder().threshold(0.7)
}

fn q(req: &ChatRequest) -> CacheQuery {
    CacheQuery::for_request(req, CacheScope::Global).unwrap()
}

fn text(t: &str) -> CacheQuery {
    q(&ChatRequest::user_text(t))
}

fn answer(content: &str) -> ChatResponse {
    ChatResponse::new(content, "m", "p", Usage::new(40, 20), FinishReason::Stop)
}

mod common;

use common::sim;

fn pipeline(p: &SimulatedProvider, cache: SemanticCache) -> Pipeline {
    Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .cache(Arc::new(cache))
        .build()
        .unwrap()
}

fn ask(t: &str) -> ChatRequest {
    ChatRequest::user_text(t)
        .org("acme")
        .user("ann")
        .max_tokens(200)
}

#[tokio::test(start_paused = true)]
async fn paraphrases_are_served_with_their_similarity_and_saved_cost() {
    let p = sim();
    let pipe = pipeline(&p, semantic().build().unwrap());
    let first = pipe.chat(ask("How do I reset my password?")).await.unwrap();
    let hit = pipe
        .chat(ask("How can I reset my password?"))
        .await
        .unwrap();
    assert_eq!(p.calls(), 1);
    assert_eq!(hit.content, first.content);
    assert!(hit.cost.is_zero());
    match hit.served {
        Served::Cache {
            similarity,
            saved_tokens,
            saved_cost,
        } => {
            assert!((0.7..1.0).contains(&similarity), "{similarity}");
            assert_eq!(saved_tokens, first.usage.total());
            assert_eq!(saved_cost, first.cost);
        }
        other => panic!("expected a semantic hit, got {other:?}"),
    }
    assert!(hit.guard_rejected.is_none());
    // An exact repeat is an exact hit.
    let exact = pipe.chat(ask("How do I reset my password?")).await.unwrap();
    assert!(matches!(exact.served, Served::Cache { similarity, .. } if similarity == 1.0));
}

#[tokio::test(start_paused = true)]
async fn a_near_miss_is_refused_and_the_refusal_is_visible() {
    let p = sim();
    let events = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&events);
    let cache = semantic()
        .on_event(Arc::new(move |e: &CacheEvent<'_>| {
            if let CacheEvent::Rejected(r) = e {
                assert_eq!(r.guard, GuardKind::Negation);
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }))
        .build()
        .unwrap();
    let pipe = pipeline(&p, cache.clone());
    let open = pipe
        .chat(ask("Is the clinic open on Sundays?"))
        .await
        .unwrap();
    let closed = pipe
        .chat(ask("Is the clinic closed on Sundays?"))
        .await
        .unwrap();
    assert_eq!(p.calls(), 2, "the near-miss went to the provider");
    assert!(!closed.served.is_cache_hit());
    assert_ne!(closed.content, open.content);
    let r = closed
        .guard_rejected
        .expect("the refusal is in the response");
    assert_eq!(r.guard, GuardKind::Negation);
    assert!(r.similarity >= 0.7);
    assert_eq!(cache.stats().rejected(GuardKind::Negation), 1);
    assert_eq!(events.load(Ordering::Relaxed), 1);

    // Streamed, the refusal is on the final event.
    let pipe = pipeline(&p, cache.clone());
    pipe.invalidate(&Invalidation::All).await.unwrap();
    pipe.chat(ask("Is the clinic open on Sundays?"))
        .await
        .unwrap();
    let mut s = pipe
        .stream(ask("Is the clinic closed on Sundays?"))
        .await
        .unwrap();
    let mut end = None;
    while let Some(ev) = s.next().await {
        if let StreamEvent::Done(e) = ev.unwrap() {
            end = Some(e);
        }
    }
    let end = end.unwrap();
    assert!(!end.served.is_cache_hit());
    assert_eq!(end.guard_rejected.unwrap().guard, GuardKind::Negation);
    assert_eq!(cache.stats().rejected(GuardKind::Negation), 2);

    // Without guards the same pair is served: the guard is what refused it.
    let lax = semantic()
        .guards(tokenwise::cache::Guards::none())
        .build()
        .unwrap();
    lax.put(&text("Is the clinic open on Sundays?"), &answer("open"))
        .await
        .unwrap();
    assert!(
        lax.get(&text("Is the clinic closed on Sundays?"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test(start_paused = true)]
async fn every_guard_refuses_its_near_miss() {
    let cache = semantic().threshold(0.5).build().unwrap();
    for (stored, asked, guard) in [
        (
            "Convert 5 miles to km",
            "Convert 50 miles to km",
            GuardKind::Numbers,
        ),
        (
            "Weather in Paris tomorrow",
            "Weather in Paris today",
            GuardKind::Numbers,
        ),
        (
            "Flights from Paris to Rome",
            "Flights from Rome to Paris",
            GuardKind::Entities,
        ),
        (
            "What is the capital of France?",
            "What is the capital of Spain?",
            GuardKind::Entities,
        ),
        (
            "Is it safe to eat raw eggs?",
            "Is it not safe to eat raw eggs?",
            GuardKind::Negation,
        ),
        (
            "How do I delete all my emails?",
            "How do I delete my emails?",
            GuardKind::Scope,
        ),
    ] {
        cache.put(&text(stored), &answer(stored)).await.unwrap();
        let found = cache.lookup(&text(asked)).await.unwrap();
        assert!(found.answer.is_none(), "{asked} was served {stored}");
        assert_eq!(found.rejected.map(|r| r.guard), Some(guard), "{asked}");
    }
}

#[tokio::test(start_paused = true)]
async fn follow_ups_only_match_within_their_own_conversation() {
    let cache = semantic().build().unwrap();
    let conversation = |first: &str, last: &str| {
        ChatRequest::new()
            .message(Message::user(first))
            .message(Message::assistant("Done."))
            .message(Message::user(last))
    };
    cache
        .put(
            &q(&conversation("Book a hotel in Lisbon", "Cancel it")),
            &answer("hotel cancelled"),
        )
        .await
        .unwrap();
    // The same words after another conversation: never.
    for other in ["Cancel it", "cancel it", "Cancel it!"] {
        let asked = q(&conversation("Subscribe me to the premium plan", other));
        assert!(cache.get(&asked).await.unwrap().is_none(), "{other}");
    }
    // A different system prompt, model or temperature is another context too.
    let with_system =
        conversation("Book a hotel in Lisbon", "cancel it").message(Message::system("be brief"));
    assert!(cache.get(&q(&with_system)).await.unwrap().is_none());
    let other_model = conversation("Book a hotel in Lisbon", "cancel it").model("gpt-4o");
    assert!(cache.get(&q(&other_model)).await.unwrap().is_none());
    // Reworded in the same conversation: served.
    let same = q(&conversation("Book a hotel in Lisbon", "cancel it now"));
    let hit = cache.get(&same).await.unwrap().unwrap();
    assert_eq!(hit.response.content, "hotel cancelled");
    assert!(hit.similarity < 1.0);
}

#[tokio::test(start_paused = true)]
async fn tenant_scopes_are_never_crossed() {
    for scope in [CacheScope::Org, CacheScope::User] {
        let p = sim();
        let pipe = Pipeline::builder()
            .provider(p.clone())
            .default_model("gpt-4o-mini")
            .cache(Arc::new(semantic().build().unwrap()))
            .cache_scope(scope)
            .build()
            .unwrap();
        let req = |t: &str, org: &str, user: &str| ChatRequest::user_text(t).org(org).user(user);
        pipe.chat(req("What is our refund policy?", "acme", "ann"))
            .await
            .unwrap();
        // exact and reworded, from another tenant: both go to the provider
        for (t, org, user) in [
            ("What is our refund policy?", "globex", "bob"),
            ("what is the refund policy", "initech", "dan"),
        ] {
            let r = pipe.chat(req(t, org, user)).await.unwrap();
            assert!(!r.served.is_cache_hit(), "{scope:?}: {t}");
        }
        let same_tenant = pipe
            .chat(req("what is the refund policy", "acme", "ann"))
            .await
            .unwrap();
        assert!(same_tenant.served.is_cache_hit(), "{scope:?}");
        if scope == CacheScope::User {
            let colleague = pipe
                .chat(req("what is the refund policy", "acme", "cat"))
                .await
                .unwrap();
            assert!(
                !colleague.served.is_cache_hit(),
                "per user: not for a colleague"
            );
        }
    }
}

#[tokio::test]
async fn ttl_per_namespace_and_per_request_on_the_clock() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let cache = semantic()
        .ttl(Duration::from_secs(60))
        .namespace_ttl("faq", Duration::from_secs(600))
        .clock(Arc::new(clock.clone()))
        .build()
        .unwrap();
    let in_ns = |t: &str, ns: &str| q(&ChatRequest::user_text(t).cache_namespace(ns));
    cache
        .put(&text("What are your opening hours?"), &answer("9 to 5"))
        .await
        .unwrap();
    cache
        .put(
            &in_ns("What are your opening hours?", "faq"),
            &answer("faq: 9 to 5"),
        )
        .await
        .unwrap();
    let short =
        q(&ChatRequest::user_text("Where is the office?").cache_ttl(Duration::from_secs(5)));
    cache.put(&short, &answer("Main St")).await.unwrap();
    let reworded = text("what are your opening hours");
    clock.advance(Duration::from_secs(5));
    assert!(
        cache
            .get(&text("where is the office"))
            .await
            .unwrap()
            .is_none(),
        "request TTL"
    );
    clock.advance(Duration::from_secs(54));
    assert!(cache.get(&reworded).await.unwrap().is_some(), "59 s: fresh");
    clock.advance(Duration::from_secs(1));
    assert!(
        cache.get(&reworded).await.unwrap().is_none(),
        "60 s: expired"
    );
    assert!(
        cache
            .get(&in_ns("what are your opening hours", "faq"))
            .await
            .unwrap()
            .is_some(),
        "the namespace's TTL is longer"
    );
    clock.advance(Duration::from_secs(540));
    assert!(
        cache
            .get(&in_ns("what are your opening hours", "faq"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn invalidation_by_key_namespace_and_tag_reaches_semantic_matches() {
    let cache = semantic().build().unwrap();
    let tagged = q(&ChatRequest::user_text("What do the shoes cost?").cache_tag("prices"));
    let in_faq = q(&ChatRequest::user_text("Where is the office?").cache_namespace("faq"));
    let plain = text("Who is on call today?");
    cache.put(&tagged, &answer("$80")).await.unwrap();
    cache.put(&in_faq, &answer("Main St")).await.unwrap();
    cache.put(&plain, &answer("Ann")).await.unwrap();
    assert_eq!(cache.indexed(), 3);
    assert!(
        cache
            .get(&text("what do the shoes cost"))
            .await
            .unwrap()
            .is_some()
    );

    assert_eq!(
        cache
            .invalidate(&Invalidation::Tag("prices".into()))
            .await
            .unwrap(),
        1
    );
    assert!(
        cache
            .get(&text("what do the shoes cost"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        cache
            .invalidate(&Invalidation::Namespace("faq".into()))
            .await
            .unwrap(),
        1
    );
    let reworded_faq = q(&ChatRequest::user_text("where is the office").cache_namespace("faq"));
    assert!(cache.get(&reworded_faq).await.unwrap().is_none());
    assert_eq!(
        cache
            .invalidate(&Invalidation::Key(plain.key))
            .await
            .unwrap(),
        1
    );
    assert!(
        cache
            .get(&text("who is on call today"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(cache.indexed(), 0);
    cache.put(&plain, &answer("Ann")).await.unwrap();
    assert_eq!(cache.invalidate(&Invalidation::All).await.unwrap(), 1);
    assert!(cache.is_empty());
}

#[tokio::test(start_paused = true)]
async fn capacity_bounds_answers_and_the_index() {
    let cache = semantic().max_entries(10).build().unwrap();
    for i in 0..200 {
        cache
            .put(
                &text(&format!("Question number {i} about topic {i}")),
                &answer("a"),
            )
            .await
            .unwrap();
        assert!(cache.len() <= 10);
        assert!(cache.indexed() <= 20, "{}", cache.indexed());
    }
    // the most recent are still served
    assert!(
        cache
            .get(&text("question number 199 about topic 199"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(SemanticCache::builder().threshold(1.5).build().is_err());
    assert!(SemanticCache::builder().threshold(0.0).build().is_err());
    assert!(SemanticCache::builder().max_entries(0).build().is_err());
}

#[tokio::test(start_paused = true)]
async fn thresholds_per_namespace_and_exact_only() {
    let cache = semantic()
        .namespace_threshold("strict", 0.999)
        .exact_only("legal")
        .build()
        .unwrap();
    for ns in ["default", "strict", "legal"] {
        let stored = q(&ChatRequest::user_text("How do I reset my password?").cache_namespace(ns));
        cache.put(&stored, &answer(ns)).await.unwrap();
    }
    let reworded =
        |ns: &str| q(&ChatRequest::user_text("How can I reset my password?").cache_namespace(ns));
    assert!(cache.get(&reworded("default")).await.unwrap().is_some());
    let strict = cache.lookup(&reworded("strict")).await.unwrap();
    assert!(strict.answer.is_none(), "{strict:?}");
    assert!(cache.get(&reworded("legal")).await.unwrap().is_none());
    assert_eq!(cache.indexed(), 2, "exact-only namespaces are not embedded");
    assert_eq!(cache.threshold_for("legal"), f32::INFINITY);
}

/// The hashing embedder, claiming a calibrated threshold.
#[derive(Debug)]
struct Calibrated(HashingEmbedder, f32);

#[async_trait]
impl Embedder for Calibrated {
    fn dimensions(&self) -> usize {
        self.0.dimensions()
    }
    async fn embed(&self, texts: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
        self.0.embed(texts).await
    }
    fn calibrated_threshold(&self) -> Option<f32> {
        Some(self.1)
    }
}

#[tokio::test(start_paused = true)]
async fn an_embedders_calibrated_threshold_is_the_default_and_a_set_one_wins() {
    let plain = SemanticCache::builder().build().unwrap();
    assert_eq!(
        plain.threshold_for("any"),
        tokenwise::cache::DEFAULT_THRESHOLD
    );
    let calibrated = || Arc::new(Calibrated(HashingEmbedder::default(), 0.6));
    let cache = SemanticCache::builder()
        .embedder(calibrated())
        .build()
        .unwrap();
    assert_eq!(cache.threshold_for("any"), 0.6);
    // it decides matches: a rewording scoring between 0.6 and 0.95 is served
    let stored = text("How do I reset my password?");
    cache.put(&stored, &answer("A")).await.unwrap();
    let hit = cache
        .lookup(&text("Can I reset my password?"))
        .await
        .unwrap();
    let sim = hit
        .answer
        .as_ref()
        .map(|a| a.similarity)
        .unwrap_or_default();
    assert!(hit.answer.is_some() && sim < 0.95, "{hit:?}");
    plain.put(&stored, &answer("A")).await.unwrap();
    let miss = plain
        .lookup(&text("Can I reset my password?"))
        .await
        .unwrap();
    assert!(miss.answer.is_none(), "below 0.95: {miss:?}");
    let strict = SemanticCache::builder()
        .embedder(calibrated())
        .threshold(0.97)
        .namespace_threshold("loose", 0.5)
        .build()
        .unwrap();
    assert_eq!(strict.threshold_for("any"), 0.97);
    assert_eq!(strict.threshold_for("loose"), 0.5);
}

#[tokio::test(start_paused = true)]
async fn errors_refusals_truncations_and_broken_streams_are_never_stored() {
    // Directly: neither cache stores an answer that is not complete.
    let exact = ExactCache::builder().build().unwrap();
    let sem = semantic().build().unwrap();
    for reason in [
        FinishReason::Length,
        FinishReason::ContentFilter,
        FinishReason::Truncated,
    ] {
        let r = ChatResponse::new("partial", "m", "p", Usage::new(5, 5), reason);
        exact.put(&text("q"), &r).await.unwrap();
        sem.put(&text("q"), &r).await.unwrap();
    }
    let empty = ChatResponse::new("", "m", "p", Usage::new(5, 0), FinishReason::Stop);
    sem.put(&text("q"), &empty).await.unwrap();
    assert!(exact.is_empty() && sem.is_empty() && sem.indexed() == 0);

    // Through the pipeline: a 429, a length-cut answer and a broken stream.
    let limited = SimulatedProvider::builder()
        .rate_limit_rate(1.0, Duration::from_secs(1))
        .build()
        .unwrap();
    let cache = semantic().build().unwrap();
    let pipe = pipeline(&limited, cache.clone());
    let e = pipe.chat(ask("Rate limited?")).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    assert!(cache.is_empty(), "a 429 is not stored");

    let p = sim();
    let pipe = pipeline(&p, cache.clone());
    let cut = pipe
        .chat(ChatRequest::user_text("Write a long essay").max_tokens(3))
        .await
        .unwrap();
    assert_eq!(cut.finish_reason, FinishReason::Length);
    assert!(cache.is_empty(), "a length-cut answer is not stored");

    let breaking = SimulatedProvider::builder()
        .cut_stream_after(3)
        .build()
        .unwrap();
    let pipe = pipeline(&breaking, cache.clone());
    let mut s = pipe.stream(ask("Stream and break")).await.unwrap();
    let mut failed = false;
    while let Some(ev) = s.next().await {
        failed |= matches!(ev, Err(Error::StreamInterrupted { .. }));
    }
    assert!(failed);
    assert!(cache.is_empty(), "a broken stream is not stored");
}

#[tokio::test(start_paused = true)]
async fn a_semantic_hit_asked_as_a_stream_is_replayed_as_chunks() {
    let p = sim();
    let pipe = pipeline(&p, semantic().build().unwrap());
    // stored from a stream once it completes
    let mut s = pipe
        .stream(ask("Tell me about the moon landing"))
        .await
        .unwrap();
    let mut original = String::new();
    while let Some(ev) = s.next().await {
        if let StreamEvent::TextDelta { text } = ev.unwrap() {
            original.push_str(&text);
        }
    }
    let mut s = pipe
        .stream(ask("tell me about the moon landing!"))
        .await
        .unwrap();
    let (mut replayed, mut chunks, mut end) = (String::new(), 0, None);
    while let Some(ev) = s.next().await {
        match ev.unwrap() {
            StreamEvent::TextDelta { text } => {
                replayed.push_str(&text);
                chunks += 1;
            }
            StreamEvent::Done(e) => end = Some(e),
            _ => {}
        }
    }
    assert_eq!(p.calls(), 1);
    assert_eq!(replayed, original);
    assert!(chunks > 1, "replayed as a stream of chunks");
    let end = end.unwrap();
    assert!(
        matches!(end.served, Served::Cache { similarity, saved_tokens, .. } if similarity < 1.0 && saved_tokens > 0)
    );
    assert!(end.cost.is_zero());
}

/// Counts the texts it embeds.
#[derive(Debug, Default)]
struct Counting {
    texts: AtomicU64,
}

#[async_trait]
impl Embedder for Counting {
    fn dimensions(&self) -> usize {
        384
    }
    async fn embed(&self, texts: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
        self.texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
        HashingEmbedder::default().embed(texts).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_question_is_embedded_once_per_request() {
    let counting = Arc::new(Counting::default());
    let p = sim();
    let cache = semantic().embedder(counting.clone()).build().unwrap();
    let pipe = pipeline(&p, cache);
    // first in its context: nothing to compare with, so only the store embeds it
    pipe.chat(ask("How do I export my data?")).await.unwrap();
    assert_eq!(counting.texts.load(Ordering::Relaxed), 1);
    // a miss in a populated context: read and write share one embedding
    pipe.chat(ask("What is the refund policy?")).await.unwrap();
    assert_eq!(counting.texts.load(Ordering::Relaxed), 2);
    // a semantic hit: one embedding
    let hit = pipe.chat(ask("How can I export my data?")).await.unwrap();
    assert!(hit.served.is_cache_hit());
    assert_eq!(counting.texts.load(Ordering::Relaxed), 3);
    // an exact hit: none
    pipe.chat(ask("How do I export my data?")).await.unwrap();
    assert_eq!(counting.texts.load(Ordering::Relaxed), 3);
    // bypass: none
    pipe.chat(ask("brand new question").cache_mode(CacheMode::Bypass))
        .await
        .unwrap();
    assert_eq!(counting.texts.load(Ordering::Relaxed), 3);
}

/// Fails every call.
#[derive(Debug)]
struct Broken;

#[async_trait]
impl Embedder for Broken {
    fn dimensions(&self) -> usize {
        8
    }
    async fn embed(&self, _: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
        Err(Error::backend("embedder", "down"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_embedder_degrades_to_exact_matching() {
    let cache = semantic().embedder(Arc::new(Broken)).build().unwrap();
    cache
        .put(&text("Hello there"), &answer("hi"))
        .await
        .unwrap();
    assert!(cache.get(&text("Hello there")).await.unwrap().is_some());
    assert!(cache.get(&text("hello there")).await.unwrap().is_none());
    assert!(cache.stats().embed_failures >= 1);
}

/// Counts the calls made to the embedder (not the texts).
#[derive(Debug, Default)]
struct Calls(AtomicU64);

#[async_trait]
impl Embedder for Calls {
    fn dimensions(&self) -> usize {
        384
    }
    async fn embed(&self, texts: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        HashingEmbedder::default().embed(texts).await
    }
}

fn judged(calls: &Arc<Calls>) -> SemanticCache {
    SemanticCache::builder()
        .embedder(calls.clone())
        .judge(PairJudge::minilm_l6().unwrap())
        .threshold(0.3)
        .candidates(4)
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_judged_lookup_embeds_the_words_of_all_its_candidates_in_one_call() {
    let calls = Arc::new(Calls::default());
    let cache = judged(&calls);
    for (i, t) in [
        "how do i reset my password on the portal",
        "how do i reset my password on the website",
        "how do i reset my password in the mobile app",
        "how do i reset my password at the kiosk",
    ]
    .into_iter()
    .enumerate()
    {
        cache
            .put(&text(t), &answer(&format!("a{i}")))
            .await
            .unwrap();
    }
    let before = calls.0.load(Ordering::Relaxed);
    let found = cache
        .lookup(&text("how can i recover my login through the helpdesk"))
        .await
        .unwrap();
    // every candidate was judged (none served), each with words of its own
    assert!(found.answer.is_none());
    let stats = cache.stats();
    let refused: u64 = GuardKind::ALL.iter().map(|k| stats.rejected(*k)).sum();
    assert!(refused >= 2, "{stats:?}");
    // the question, then one call for the words of every candidate
    assert_eq!(calls.0.load(Ordering::Relaxed) - before, 2);
}

#[tokio::test(start_paused = true)]
async fn candidates_a_hard_guard_refuses_have_no_words_embedded() {
    let calls = Arc::new(Calls::default());
    let cache = judged(&calls);
    for n in [1182, 1183, 1184] {
        let t = format!("where is my order {n} right now");
        cache.put(&text(&t), &answer(&t)).await.unwrap();
    }
    let before = calls.0.load(Ordering::Relaxed);
    let found = cache
        .lookup(&text("where is my order 77 at the moment"))
        .await
        .unwrap();
    assert!(found.answer.is_none());
    assert_eq!(cache.stats().rejected(GuardKind::Numbers), 3);
    // the question only
    assert_eq!(calls.0.load(Ordering::Relaxed) - before, 1);
}
