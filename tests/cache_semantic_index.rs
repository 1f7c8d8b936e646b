//! The semantic cache's vectors and index, end to end: embedders of any scale are
//! normalised and broken vectors refused, the HNSW graph path serves and refuses like
//! the flat scan, answers are kept apart by the model or tier that produced them, a
//! `Cache` of one's own can report a similarity, and follow-ups are matched on the
//! context they depend on.

use std::sync::Arc;

use async_trait::async_trait;
use tokenwise::cache::{
    Cache, CacheQuery, CacheScope, CachedAnswer, ConversationMatching, Embedder, HashingEmbedder,
    IndexConfig, Invalidation, SemanticCache,
};
use tokenwise::{ChatRequest, ChatResponse, FinishReason, Message, Usage};

fn text(t: &str) -> CacheQuery {
    CacheQuery::for_request(&ChatRequest::user_text(t), CacheScope::Global).unwrap()
}

fn answer(content: &str) -> ChatResponse {
    ChatResponse::new(content, "m", "p", Usage::new(40, 20), FinishReason::Stop)
}

/// The hashing embedder's vectors times a factor (or broken on purpose).
#[derive(Debug)]
struct Scaled(f32);

#[async_trait]
impl Embedder for Scaled {
    fn dimensions(&self) -> usize {
        384
    }
    async fn embed(&self, texts: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
        let e = HashingEmbedder::default();
        Ok(texts
            .iter()
            .map(|t| e.embed_one(t).iter().map(|x| x * self.0).collect())
            .collect())
    }
}

#[tokio::test(start_paused = true)]
async fn a_custom_embedders_scale_does_not_change_similarities() {
    let unit = SemanticCache::builder().threshold(0.7).build().unwrap();
    let scaled = SemanticCache::builder()
        .threshold(0.7)
        .embedder(Arc::new(Scaled(40.0)))
        .build()
        .unwrap();
    let tiny = SemanticCache::builder()
        .threshold(0.7)
        .embedder(Arc::new(Scaled(1e-3)))
        .build()
        .unwrap();
    let stored = text("How do I reset my password?");
    let asked = text("How can I reset my password?");
    let mut sims = Vec::new();
    for cache in [&unit, &scaled, &tiny] {
        cache.put(&stored, &answer("A")).await.unwrap();
        let hit = cache.get(&asked).await.unwrap().expect("a paraphrase");
        sims.push(hit.similarity);
        // an unrelated question stays below the threshold whatever the scale
        assert!(
            cache
                .get(&text("What is the weather in Paris tomorrow?"))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert!(sims[0] < 0.99, "a reworded question: {sims:?}");
    for s in &sims[1..] {
        assert!((s - sims[0]).abs() < 1e-4, "{sims:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn zero_and_non_finite_vectors_are_embedding_failures_not_matches() {
    for bad in [0.0, f32::NAN, f32::INFINITY] {
        let cache = SemanticCache::builder()
            .threshold(0.5)
            .embedder(Arc::new(Scaled(bad)))
            .build()
            .unwrap();
        cache
            .put(&text("How do I reset my password?"), &answer("A"))
            .await
            .unwrap();
        assert_eq!(cache.indexed(), 0, "{bad}: nothing indexed");
        // exact matching still works; nothing semantic is served
        let q = text("How do I reset my password?");
        assert!(cache.get(&q).await.unwrap().is_some());
        let other = text("How can I reset my password?");
        assert!(cache.get(&other).await.unwrap().is_none());
        assert!(cache.stats().embed_failures >= 1, "{bad}");
    }
    // and the refusal is a typed error at the embedder wrapper
    let e = tokenwise::cache::CachedEmbedder::new(Arc::new(Scaled(0.0)), 8).unwrap();
    assert!(matches!(
        e.embed_one("anything").await,
        Err(tokenwise::Error::InvalidRequest(_))
    ));
}

/// 300 distinct questions: a topic word and an action word per question.
fn questions() -> Vec<String> {
    const TOPICS: [&str; 20] = [
        "invoice",
        "password",
        "passport",
        "mortgage",
        "thermostat",
        "router",
        "vaccine",
        "warranty",
        "pension",
        "visa",
        "printer",
        "subscription",
        "lease",
        "refund",
        "compiler",
        "payroll",
        "tuition",
        "insulin",
        "luggage",
        "dividend",
    ];
    const ACTIONS: [&str; 15] = [
        "renew", "cancel", "download", "update", "transfer", "check", "replace", "report", "reset",
        "share", "print", "track", "dispute", "activate", "schedule",
    ];
    let mut out = Vec::new();
    for t in TOPICS {
        for a in ACTIONS {
            out.push(format!("How do I {a} my {t} online?"));
        }
    }
    out
}

#[tokio::test(start_paused = true)]
async fn the_graph_path_serves_paraphrases_and_refuses_near_misses_like_the_scan() {
    let cache = SemanticCache::builder()
        .threshold(0.8)
        .index(IndexConfig::default().graph_from(64))
        .build()
        .unwrap();
    let qs = questions();
    for (i, question) in qs.iter().enumerate() {
        cache
            .put(&text(question), &answer(&format!("answer {i}")))
            .await
            .unwrap();
    }
    assert_eq!(cache.indexed(), qs.len());
    // the graph is built on a blocking thread; lookups meanwhile scan
    let early = cache.get(&text(&qs[1].to_lowercase())).await.unwrap();
    assert_eq!(early.unwrap().response.content, "answer 1");
    cache.settled().await;
    assert_eq!(cache.maintaining(), 0);
    assert_eq!(
        cache.graph_contexts(),
        1,
        "the one context moved to its graph"
    );
    let mut served = 0;
    for (i, question) in qs.iter().enumerate().step_by(7) {
        // a near repeat: casing, punctuation and a courtesy
        let asked = format!("{} please", question.to_uppercase().trim_end_matches('?'));
        let hit = cache.lookup(&text(&asked)).await.unwrap();
        let a = hit.answer.expect("a near repeat is served");
        assert_eq!(a.response.content, format!("answer {i}"), "{asked}");
        assert!(a.similarity > 0.95);
        served += 1;
        // negated: the nearest candidate is refused by a guard, nothing is served
        let negated = question.replace("How do I", "How do I not");
        let refused = cache.lookup(&text(&negated)).await.unwrap();
        assert!(refused.answer.is_none(), "{negated}: {refused:?}");
        assert!(refused.rejected.is_some(), "{negated}");
    }
    assert_eq!(served, qs.len().div_ceil(7));
    // an invalidated entry is gone from the graph's results too
    cache
        .invalidate(&Invalidation::Key(text(&qs[0]).key))
        .await
        .unwrap();
    assert_eq!(cache.indexed(), qs.len() - 1);
    let after = cache.get(&text(&qs[0].to_lowercase())).await.unwrap();
    assert!(
        after
            .as_ref()
            .is_none_or(|a| a.response.content != "answer 0"),
        "{after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn answers_of_one_model_or_tier_are_never_served_for_another() {
    let cache = SemanticCache::builder().threshold(0.7).build().unwrap();
    let asked = text("How do I reset my password?");
    cache
        .put(
            &asked.clone().answered_by("tier:free"),
            &answer("small model"),
        )
        .await
        .unwrap();
    let free = cache
        .get(&asked.clone().answered_by("tier:free"))
        .await
        .unwrap();
    assert_eq!(free.unwrap().response.content, "small model");
    for other in [asked.clone().answered_by("tier:premium"), asked.clone()] {
        assert!(cache.get(&other).await.unwrap().is_none(), "exact");
    }
    let reworded = text("how can I reset my password").answered_by("tier:premium");
    assert!(cache.get(&reworded).await.unwrap().is_none(), "semantic");
    let reworded = text("how can I reset my password").answered_by("tier:free");
    assert!(cache.get(&reworded).await.unwrap().is_some());
}

#[test]
fn a_custom_cache_reports_its_similarity() {
    let a = CachedAnswer::new(answer("x"), 0.91).unwrap();
    assert_eq!(a.similarity, 0.91);
    assert_eq!(
        CachedAnswer::new(answer("x"), 1.0).unwrap(),
        CachedAnswer::exact(answer("x"))
    );
    for bad in [f32::NAN, 1.5, -2.0, f32::INFINITY] {
        assert!(CachedAnswer::new(answer("x"), bad).is_err(), "{bad}");
    }
}

fn conversation(context: &str, follow_up: &str) -> CacheQuery {
    conversation_with(&[], context, follow_up)
}

fn conversation_with(earlier: &[(&str, &str)], context: &str, follow_up: &str) -> CacheQuery {
    let mut r = ChatRequest::new();
    for (user, assistant) in earlier {
        r = r
            .message(Message::user(*user))
            .message(Message::assistant(*assistant));
    }
    let r = r
        .message(Message::user(context))
        .message(Message::assistant("Understood."))
        .message(Message::user(follow_up));
    CacheQuery::for_request(&r, CacheScope::Global).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_follow_up_is_served_when_its_context_is_the_same_and_never_when_it_differs() {
    let cache = SemanticCache::builder()
        .threshold(0.7)
        .conversations(tokenwise::cache::ConversationMatching::Condensed)
        .build()
        .unwrap();
    cache
        .put(
            &conversation(
                "I bought a blender from you last week.",
                "How do I return it?",
            ),
            &answer("returns: blender"),
        )
        .await
        .unwrap();
    let served = |q: CacheQuery| {
        let cache = cache.clone();
        async move { cache.get(&q).await.unwrap().map(|a| a.response.content) }
    };
    let hit = Some("returns: blender".to_owned());
    // another assistant reply, an earlier unrelated topic, chatter: the same context
    let other_reply = ChatRequest::new()
        .message(Message::user("I bought a blender from you last week."))
        .message(Message::assistant("Thanks for letting me know."))
        .message(Message::user("How do I return it?"));
    let other_reply = CacheQuery::for_request(&other_reply, CacheScope::Global).unwrap();
    assert_eq!(served(other_reply).await, hit);
    let earlier = [("What's the capital of Peru?", "Lima.")];
    let q = conversation_with(
        &earlier,
        "I bought a blender from you last week.",
        "How do I return it?",
    );
    assert_eq!(served(q).await, hit, "an earlier topic");
    let chatter = ChatRequest::new()
        .message(Message::user("I bought a blender from you last week."))
        .message(Message::assistant("Okay."))
        .message(Message::user("ok thanks"))
        .message(Message::assistant("You're welcome!"))
        .message(Message::user("How do I return it?"));
    let chatter = CacheQuery::for_request(&chatter, CacheScope::Global).unwrap();
    assert_eq!(served(chatter).await, hit, "small talk in between");
    let q = conversation(
        "I bought a blender from you last week.",
        "ok and how do I return it?",
    );
    assert_eq!(served(q).await, hit, "small talk before the follow-up");
    // another entity, number or intent in the context: never
    for context in [
        "I bought a laptop from you last week.",
        "I bought a blender from you 3 weeks ago.",
        "I bought a blender from you last month.",
        "I want to keep the blender I bought last week, not return it.",
        "My brother bought a blender from you last week.",
    ] {
        let q = conversation(context, "How do I return it?");
        let found = cache.lookup(&q).await.unwrap();
        assert!(found.answer.is_none(), "{context}: {found:?}");
    }
    // and the same follow-up without any context is another question
    assert_eq!(served(text("How do I return it?")).await, None);
}

#[tokio::test(start_paused = true)]
async fn strict_conversation_matching_needs_the_exact_history() {
    let cache = SemanticCache::builder()
        .threshold(0.7)
        .conversations(ConversationMatching::Strict)
        .build()
        .unwrap();
    let stored = conversation(
        "I bought a blender from you last week.",
        "How do I return it?",
    );
    cache.put(&stored, &answer("A")).await.unwrap();
    let reworded = conversation(
        "I bought a blender from you last week.",
        "how do i return it",
    );
    assert!(
        cache.get(&reworded).await.unwrap().is_some(),
        "same history"
    );
    let earlier = [("What's the capital of Peru?", "Lima.")];
    let q = conversation_with(
        &earlier,
        "I bought a blender from you last week.",
        "How do I return it?",
    );
    assert!(cache.get(&q).await.unwrap().is_none(), "another history");
}

#[tokio::test(start_paused = true)]
async fn a_detail_named_by_the_assistant_keeps_the_history_strict() {
    let cache = SemanticCache::builder().threshold(0.7).build().unwrap();
    let order = |reply: &str| {
        let r = ChatRequest::new()
            .message(Message::user("Show me my last order."))
            .message(Message::assistant(reply))
            .message(Message::user("Return it"));
        CacheQuery::for_request(&r, CacheScope::Global).unwrap()
    };
    let mugs = order("Order 1182: two blue mugs.");
    assert!(mugs.history.is_none(), "matched strictly");
    cache.put(&mugs, &answer("mugs returned")).await.unwrap();
    let lamp = order("Order 1190: a desk lamp.");
    assert!(cache.get(&lamp).await.unwrap().is_none());
    assert!(cache.get(&mugs).await.unwrap().is_some());
}
