//! The metrics of a real workload, rendered by `metrics-exporter-prometheus`, served
//! over loopback by the same `/metrics` endpoint the Prometheus example uses, and checked
//! line by line against the text exposition format.

#[path = "../examples/support/prom.rs"]
mod prom;

use std::time::Duration;

use futures_util::StreamExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokenwise::budget::BudgetWindow;
use tokenwise::observe::metrics as m;
use tokenwise::provider::SimulatedProvider;
use tokenwise::resilience::{BreakerState, RetryPolicy};
use tokenwise::{ChatRequest, Cost, Pipeline, RequestMeta, ScopeKind};

#[tokio::test(start_paused = true)]
async fn metrics_endpoint_serves_valid_prometheus_text() {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), m::DURATION_BUCKETS)
        .unwrap()
        .build_recorder();
    let handle = recorder.handle();
    let _local = metrics::set_default_local_recorder(&recorder);
    m::describe();

    // a workload with a miss, a hit, a fallback, an error, a refusal and a stream
    let p = SimulatedProvider::builder()
        .outage(Duration::ZERO, Duration::from_secs(1), Some("gpt-4o-mini"))
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p)
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .retry(RetryPolicy::none())
        .rate_limit(ScopeKind::User, 3)
        .spend_cap(ScopeKind::Global, Cost::from_dollars(1), BudgetWindow::Day)
        .build()
        .unwrap();
    let ask = |t: &str, u: &str| ChatRequest::user_text(t).user(u).max_tokens(100);
    let fallback = pipe
        .chat(ask("first \"quoted\" question", "ann"))
        .await
        .unwrap();
    assert_eq!(fallback.model, "claude-haiku-4-5");
    tokio::time::advance(Duration::from_secs(2)).await; // the outage is over
    pipe.chat(ask("second question", "bob")).await.unwrap();
    pipe.chat(ask("second question", "bob")).await.unwrap(); // a hit
    let mut s = pipe.stream(ask("a streamed one", "bob")).await.unwrap();
    while s.next().await.is_some() {}
    assert!(pipe.chat(ask("one too many", "bob")).await.is_err()); // bob's fourth this minute
    assert!(
        pipe.chat(ChatRequest::user_text("x").model("no-such-model"))
            .await
            .is_err()
    );
    let caps = pipe.budget_status(&RequestMeta::default()).await.unwrap();
    m::record_budget_status(&caps);
    m::record_breaker_state("simulated", "gpt-4o-mini", BreakerState::Closed);

    // serve /metrics on an ephemeral loopback port, in real time from here on
    tokio::time::resume();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(prom::serve(listener, handle));
    let res = prom::fetch(addr, "/metrics").await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.content_type, prom::CONTENT_TYPE);
    let ex = match prom::validate(&res.body) {
        Ok(ex) => ex,
        Err(e) => panic!("invalid exposition: {e}\n{}", res.body),
    };

    // types and help texts
    assert_eq!(ex.types[m::REQUESTS], "counter");
    assert_eq!(ex.types[m::REQUEST_DURATION], "histogram");
    assert_eq!(ex.types[m::TIME_TO_FIRST_TOKEN], "histogram");
    assert_eq!(ex.types[m::IN_FLIGHT], "gauge");
    assert_eq!(ex.types[m::BUDGET_UTILIZATION], "gauge");
    assert!(
        ex.helped.contains(m::REQUESTS),
        "describe() adds HELP lines"
    );
    for name in ex.types.keys() {
        assert!(
            m::ALL.contains(&name.as_str()),
            "{name} is not a documented metric"
        );
    }

    // values
    let ok = |model: &str, cache: &str| {
        ex.get(
            m::REQUESTS,
            &[("cache", cache), ("model", model), ("status", "ok")],
        )
    };
    assert_eq!(ok("claude-haiku-4-5", "miss"), Some(1.0));
    assert_eq!(
        ok("gpt-4o-mini", "miss"),
        Some(2.0),
        "a whole answer and a stream"
    );
    assert_eq!(ok("gpt-4o-mini", "hit"), Some(1.0));
    assert_eq!(
        ex.get(
            m::REQUESTS,
            &[
                ("cache", "miss"),
                ("model", "gpt-4o-mini"),
                ("status", "rate_limited")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        ex.sum(
            m::REQUESTS,
            &[("model", "none"), ("status", "unknown_model")]
        ),
        1.0,
        "a request never routed has no model"
    );
    assert_eq!(ex.get(m::LIMITER_REFUSALS, &[("scope", "user")]), Some(1.0));
    assert_eq!(
        ex.get(m::FALLBACKS, &[("model", "claude-haiku-4-5")]),
        Some(1.0)
    );
    assert_eq!(
        ex.get(
            m::ATTEMPTS,
            &[
                ("model", "gpt-4o-mini"),
                ("provider", "simulated"),
                ("status", "provider_server_error")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(ex.get(m::IN_FLIGHT, &[]), Some(0.0));
    assert_eq!(
        ex.get(
            &format!("{}_count", m::REQUEST_DURATION),
            &[("cache", "hit"), ("model", "gpt-4o-mini"), ("result", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        ex.get(
            &format!("{}_bucket", m::TIME_TO_FIRST_TOKEN),
            &[("cache", "miss"), ("le", "0.32"), ("model", "gpt-4o-mini")]
        ),
        Some(1.0),
        "the stream's first token came at 200 ms"
    );
    let spent: f64 = pipe.usage().totals.cost.as_nanos() as f64;
    assert_eq!(ex.sum(m::COST, &[]), spent);
    let util = ex
        .get(
            m::BUDGET_UTILIZATION,
            &[("scope", "global"), ("window", "day")],
        )
        .unwrap();
    assert!((util - spent / 1e9).abs() < 1e-12);
    assert_eq!(
        ex.get(
            m::BREAKER_STATE,
            &[("model", "gpt-4o-mini"), ("provider", "simulated")]
        ),
        Some(0.0)
    );

    // other paths are not served
    assert_eq!(prom::fetch(addr, "/").await.unwrap().status, 404);
    server.abort();
}

#[test]
fn the_checker_rejects_malformed_text() {
    let ok = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n";
    assert!(prom::validate(ok).is_ok());
    let bad = [
        ("no newline at the end", "# TYPE a counter\na 1"),
        ("untyped sample", "a 1\n"),
        ("bad value", "# TYPE a gauge\na one\n"),
        ("bad label", "# TYPE a gauge\na{1x=\"v\"} 1\n"),
        ("bad escape", "# TYPE a gauge\na{x=\"\\q\"} 1\n"),
        ("duplicate", "# TYPE a gauge\na 1\na 2\n"),
        (
            "split family",
            "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 1\n",
        ),
        (
            "histogram without +Inf",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ),
        (
            "non-cumulative buckets",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
        ),
    ];
    for (why, text) in bad {
        assert!(prom::validate(text).is_err(), "accepted {why}");
    }
}
