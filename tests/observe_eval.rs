//! Golden-query evaluation over the shipped golden set, on the simulated provider with
//! paused time.

use std::sync::Arc;
use std::time::Duration;

use tokenwise::eval::{Evaluator, GoldenQuery, GoldenSet};
use tokenwise::provider::SimulatedProvider;
use tokenwise::router::{FnValidator, Verdict};
use tokenwise::{ChatRequest, ChatResponse, Pipeline};

const SET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/golden.jsonl");

fn pipeline() -> Pipeline {
    Pipeline::builder()
        .provider(
            SimulatedProvider::builder()
                .time_to_first_token(Duration::from_millis(300))
                .per_token(Duration::from_millis(12))
                .build()
                .unwrap(),
        )
        .default_model("gpt-4o-mini")
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_golden_set_scores_pass_rate_cost_and_latency() {
    let set = GoldenSet::load(SET).unwrap();
    assert_eq!(set.len(), 12);
    let pipe = pipeline();
    let report = Evaluator::new().run(&pipe, &set).await;

    assert_eq!((report.passed(), report.total()), (11, 12));
    let failed: Vec<_> = report.failures().collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, "order-json");
    assert_eq!(
        failed[0].failures,
        vec!["answer is not valid JSON".to_owned()]
    );
    assert!(report.meets(0.9));
    assert!(!report.meets(0.95));

    // scoring details
    let by_id = |id: &str| report.results.iter().find(|r| r.id == id).unwrap();
    assert_eq!(by_id("reset-password").similarity, Some(1.0));
    let partial = by_id("ticket-4312").similarity.unwrap();
    assert!(partial > 0.3 && partial < 0.9, "{partial}");
    assert_eq!(by_id("backoff").model.as_deref(), Some("claude-haiku-4-5"));
    assert_eq!(by_id("rotate-key").model.as_deref(), Some("gpt-4o"));

    // cost and latency add up with what the pipeline recorded
    let usage = pipe.usage();
    assert_eq!(report.cost(), usage.totals.cost);
    assert_eq!(usage.by_user["golden-eval"].requests, 12);
    assert_eq!(usage.by_feature["summarise"].requests, 1);
    let lat = report.latency_quantile(1.0);
    assert!(
        lat >= Duration::from_millis(300) && lat < Duration::from_secs(5),
        "{lat:?}"
    );
    assert!(report.latency_quantile(0.5) <= lat);

    let text = report.to_string();
    assert!(
        text.contains("11 of 12 golden queries passed (91.7 %)"),
        "{text}"
    );
    assert!(
        text.contains("order-json: answer is not valid JSON"),
        "{text}"
    );

    // the report serializes for a CI artifact
    let json = serde_json::to_string(&report).unwrap();
    let back: tokenwise::eval::EvalReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

#[tokio::test(start_paused = true)]
async fn validators_errors_and_the_cache() {
    let pipe = pipeline();
    let mut q = GoldenQuery::new("short", "Say something");
    q.expect.max_latency_ms = Some(1); // no simulated answer is that fast
    let unknown = {
        let mut q = GoldenQuery::new("unknown-model", "hello");
        q.model = Some("no-such-model".into());
        q
    };
    let set = GoldenSet::new(vec![GoldenQuery::new("plain", "Say hi"), q, unknown]).unwrap();
    let strict = Evaluator::new()
        .concurrency(1)
        .validator(Arc::new(FnValidator(
            |_: &ChatRequest, _: &ChatResponse| Verdict::Escalate("never good enough".into()),
        )));
    let report = strict.run(&pipe, &set).await;
    assert_eq!(report.passed(), 0);
    assert_eq!(
        report.results[0].failures,
        vec!["validator: never good enough".to_owned()]
    );
    assert!(
        report.results[1]
            .failures
            .iter()
            .any(|f| f.starts_with("latency"))
    );
    assert_eq!(report.results[2].error.as_deref(), Some("unknown_model"));
    assert!(report.results[2].failures[0].starts_with("no answer"));

    // the cache is bypassed by default, so a second run calls the models again...
    let plain = GoldenSet::new(vec![GoldenQuery::new("plain", "Say hi")]).unwrap();
    let again = Evaluator::new().run(&pipe, &plain).await;
    assert!(!again.results[0].cache_hit);
    assert_eq!(pipe.usage().totals.cache_hits, 0);
    // ...unless asked to use it (the bypassed runs never wrote it either)
    let cached = Evaluator::new().use_cache(true);
    assert!(!cached.run(&pipe, &plain).await.results[0].cache_hit);
    assert!(cached.run(&pipe, &plain).await.results[0].cache_hit);

    assert!(GoldenSet::new(vec![]).unwrap().is_empty());
    assert!(
        !Evaluator::new()
            .run(&pipe, &GoldenSet::default())
            .await
            .meets(0.0)
    );
}
