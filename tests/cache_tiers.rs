//! Routed requests and the answer cache: an answer from a model of the request's
//! capability tier or a higher one may serve it, never one from a lower tier; a request
//! naming its model is only served that model's answers.

use std::sync::Arc;
use std::time::Duration;

use tokenwise::provider::SimulatedProvider;
use tokenwise::resilience::RetryPolicy;
use tokenwise::router::{ComplexityRouter, ComplexityRules};
use tokenwise::{Catalog, ChatRequest, Pipeline, Tier};

const HARD: &str = "Compare these two designs and prove which one scales:\n```rust\nfn a() {}\n```";

fn pipeline(sim: SimulatedProvider) -> Pipeline {
    let catalog = Catalog::builtin();
    let router =
        ComplexityRouter::new(&catalog, ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]).unwrap();
    Pipeline::builder()
        .provider(sim)
        .router(Arc::new(router))
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

fn ask(text: &str, tier: Tier) -> ChatRequest {
    ChatRequest::user_text(text).tier(tier).max_tokens(50)
}

#[tokio::test(start_paused = true)]
async fn a_stronger_models_answer_serves_a_weaker_route_never_the_reverse() {
    let pipe = pipeline(SimulatedProvider::builder().build().unwrap());

    // a paying user's hard question goes to gpt-4o; a free user's to gpt-4.1-mini
    let paid = pipe.chat(ask(HARD, Tier::Standard)).await.unwrap();
    assert_eq!(paid.model, "gpt-4o");
    let free = pipe.chat(ask(HARD, Tier::Free)).await.unwrap();
    assert!(
        free.served.is_cache_hit(),
        "gpt-4o's answer serves the free route"
    );
    assert_eq!(free.model, "gpt-4o");
    assert_eq!(free.content, paid.content);

    // the other way round: a free answer never reaches a paying user
    let other = "Analyze and compare both plans step by step:\n```rust\nfn b() {}\n```";
    let free = pipe.chat(ask(other, Tier::Free)).await.unwrap();
    assert_eq!(free.model, "gpt-4.1-mini");
    let paid = pipe.chat(ask(other, Tier::Standard)).await.unwrap();
    assert!(!paid.served.is_cache_hit());
    assert_eq!(paid.model, "gpt-4o");
    // ...and now both are cached, each user gets their own tier's
    let again = pipe.chat(ask(other, Tier::Free)).await.unwrap();
    assert!(again.served.is_cache_hit());
    assert_eq!(again.model, "gpt-4.1-mini", "its own tier first");

    // an easy question on the smallest model is not served to a request naming a model
    let easy = pipe
        .chat(ask("What time is it in Oslo?", Tier::Free))
        .await
        .unwrap();
    assert_eq!(easy.model, "gpt-4o-mini");
    let named = pipe
        .chat(ask("What time is it in Oslo?", Tier::Free).model("gpt-4o-mini"))
        .await
        .unwrap();
    assert!(
        !named.served.is_cache_hit(),
        "a named model keeps its own entries"
    );
    let usage = pipe.usage();
    assert_eq!(usage.totals.cache_hits, 2);
}

#[tokio::test(start_paused = true)]
async fn a_fallbacks_answer_is_stored_under_its_own_tier() {
    // the small model is down for the first minute: its requests fall back to gpt-4.1-mini
    let sim = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(60), Some("gpt-4o-mini"))
        .build()
        .unwrap();
    // premium users get tier 2 at least
    let catalog = Catalog::builtin();
    let rules = ComplexityRules {
        premium_min_tier: 2,
        ..ComplexityRules::default()
    };
    let router = ComplexityRouter::new(&catalog, ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"])
        .unwrap()
        .with_rules(rules);
    let pipe = Pipeline::builder()
        .provider(sim)
        .router(Arc::new(router))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let q = "What time is it in Oslo?";
    let free = pipe.chat(ask(q, Tier::Free)).await.unwrap();
    assert_eq!(free.model, "gpt-4.1-mini", "a fallback answered");
    // a premium request, routed to tier 2, is served that answer: it is a tier-2 one
    let premium = pipe.chat(ask(q, Tier::Premium)).await.unwrap();
    assert!(premium.served.is_cache_hit());
    assert_eq!(premium.model, "gpt-4.1-mini");
    // and so is the next free request, after the outage
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(
        pipe.chat(ask(q, Tier::Free))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
}

/// Counts lookups on an exact cache.
#[derive(Debug)]
struct Counting(tokenwise::cache::ExactCache, std::sync::atomic::AtomicUsize);

#[async_trait::async_trait]
impl tokenwise::cache::Cache for Counting {
    async fn get(
        &self,
        q: &tokenwise::cache::CacheQuery,
    ) -> tokenwise::Result<Option<tokenwise::cache::CachedAnswer>> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.get(q).await
    }
    async fn put(
        &self,
        q: &tokenwise::cache::CacheQuery,
        r: &tokenwise::ChatResponse,
    ) -> tokenwise::Result<()> {
        self.0.put(q, r).await
    }
    async fn invalidate(&self, what: &tokenwise::cache::Invalidation) -> tokenwise::Result<u64> {
        self.0.invalidate(what).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_miss_looks_only_in_tiers_that_hold_answers() {
    let cache = Arc::new(Counting(
        tokenwise::cache::ExactCache::builder()
            .max_entries(100)
            .build()
            .unwrap(),
        Default::default(),
    ));
    let pipe = Pipeline::builder()
        .provider(SimulatedProvider::builder().build().unwrap())
        .default_model("gpt-4o-mini")
        .cache(cache.clone())
        .build()
        .unwrap();
    let lookups = || cache.1.load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..5 {
        pipe.chat(ask(&format!("question {i}"), Tier::Standard))
            .await
            .unwrap();
    }
    // every request goes to one tier: one lookup per miss, none in the empty tiers above
    assert_eq!(lookups(), 5);

    // once a higher tier holds an answer, a miss looks there too
    pipe.chat(ask("named", Tier::Standard).model("gpt-4o"))
        .await
        .unwrap();
    let before = lookups();
    pipe.chat(ask("a new question", Tier::Standard))
        .await
        .unwrap();
    assert_eq!(
        lookups() - before,
        1,
        "a named model's answer is not a routed tier"
    );
}
