//! A full run with every observability output captured (trace and log lines with all
//! span fields, Prometheus text, JSON Lines usage records, reports, Debug output) never
//! shows the provider's API key, and never shows prompt text.

mod observe_support;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokenwise::budget::BudgetWindow;
use tokenwise::eval::{Evaluator, GoldenQuery, GoldenSet};
use tokenwise::observe::{JsonlSink, metrics as m};
use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
use tokenwise::resilience::RetryPolicy;
use tokenwise::{
    ChatRequest, ChatResponse, ChatStream, Cost, Pipeline, ProviderError, ProviderErrorKind,
    ScopeKind,
};
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;

const KEY: &str = "sk-live-7Hq9ZpX2vW4mR8tY1uB6nC3dK0";
const PROMPT_MARK: &str = "zebra-umbrella-4821";

/// A key that never prints.
struct Key(String);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A provider that, like an HTTP client, holds a key and refuses to work without the
/// right one.
#[derive(Debug)]
struct Keyed {
    key: Key,
    inner: SimulatedProvider,
    authenticated: AtomicU64,
}

impl Keyed {
    fn check(&self) -> tokenwise::Result<()> {
        if self.key.0 != KEY {
            return Err(ProviderError::new(
                ProviderErrorKind::Auth,
                "simulated",
                "invalid API key",
            )
            .with_status(401)
            .into());
        }
        self.authenticated.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl Provider for Keyed {
    fn name(&self) -> &str {
        "simulated"
    }
    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        self.check()?;
        self.inner.chat(call).await
    }
    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        self.check()?;
        self.inner.stream(call).await
    }
}

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_run_never_shows_the_api_key_or_the_prompts() {
    // every output captured
    let logs = Buf::default();
    let capture = observe_support::Capture::default();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_span_events(FmtSpan::FULL)
        .with_target(true);
    let subscriber = tracing_subscriber::registry()
        .with(fmt)
        .with(capture.clone())
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    let _tracing = tracing::subscriber::set_default(subscriber);
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    m::describe();
    let jsonl = Buf::default();
    let sink = Arc::new(JsonlSink::new(jsonl.clone()).unwrap());

    let provider = Arc::new(Keyed {
        key: Key(KEY.to_owned()),
        inner: SimulatedProvider::builder()
            .server_error_rate(0.2)
            .seed(3)
            .build()
            .unwrap(),
        authenticated: AtomicU64::new(0),
    });
    let pipe = Pipeline::builder()
        .provider_arc(provider.clone())
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .retry(RetryPolicy::none())
        .rate_limit(ScopeKind::User, 8)
        .spend_cap(ScopeKind::Org, Cost::from_micros(1_000), BudgetWindow::Day)
        .usage_sink(sink.clone())
        .build()
        .unwrap();
    let wrong = Pipeline::builder()
        .provider(Keyed {
            key: Key("sk-wrong".into()),
            inner: SimulatedProvider::new(),
            authenticated: AtomicU64::new(0),
        })
        .default_model("gpt-4o-mini")
        .usage_sink(sink.clone())
        .build()
        .unwrap();

    // hits, misses, fallbacks, provider errors, refusals, streams, an auth failure
    let mut errors = Vec::new();
    for i in 0..30 {
        let prompt = format!("question {} about {PROMPT_MARK} and more", i % 12);
        let req = ChatRequest::user_text(prompt)
            .user(format!("u{}", i % 3))
            .org(if i % 2 == 0 { "acme" } else { "globex" })
            .max_tokens(100);
        if i % 5 == 0 {
            match pipe.stream(req).await {
                Ok(mut s) => {
                    while let Some(ev) = s.next().await {
                        if let Err(e) = ev {
                            errors.push(e);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        } else if let Err(e) = pipe.chat(req).await {
            errors.push(e);
        }
    }
    errors.push(
        wrong
            .chat(ChatRequest::user_text(PROMPT_MARK))
            .await
            .unwrap_err(),
    );
    let golden =
        GoldenSet::new(vec![GoldenQuery::new("g", format!("golden {PROMPT_MARK}"))]).unwrap();
    let eval = Evaluator::new().run(&pipe, &golden).await;
    tokio::time::advance(Duration::from_secs(1)).await;
    sink.flush().unwrap();

    // the run exercised what it should have
    let report = pipe.usage();
    assert!(
        provider.authenticated.load(Ordering::Relaxed) > 10,
        "the key was used: {report}"
    );
    assert!(report.totals.cache_hits > 0, "{report}");
    assert!(
        report.errors_by_reason.contains_key("rate_limited"),
        "{report}"
    );
    assert!(
        report.errors_by_reason.contains_key("budget_exceeded"),
        "{report}"
    );
    assert!(errors.iter().any(|e| e.reason() == "provider_auth"));
    assert!(
        pipe.recent_usage().iter().any(|r| r.fallbacks > 0),
        "{report}"
    );
    assert!(!capture.closed("gen_ai.attempt").is_empty());

    let outputs = [
        ("trace and log lines", logs.text()),
        ("captured span fields", capture.dump()),
        ("prometheus text", prometheus.render()),
        ("usage records (JSON Lines)", jsonl.text()),
        (
            "usage report",
            format!("{report}\n{}", serde_json::to_string(&report).unwrap()),
        ),
        ("recent usage (Debug)", format!("{:?}", pipe.recent_usage())),
        (
            "errors (Display and Debug)",
            format!(
                "{errors:?} {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ),
        ("eval report", format!("{eval} {eval:?}")),
        ("sink (Debug)", format!("{sink:?}")),
        ("pipeline (Debug)", format!("{pipe:?} {wrong:?}")),
    ];
    for (what, text) in &outputs {
        assert!(!text.is_empty(), "{what} captured nothing");
        assert!(!text.contains(KEY), "the API key leaked into {what}");
        assert!(
            !text.contains(&KEY[8..20]),
            "part of the API key leaked into {what}"
        );
        if *what != "pipeline (Debug)" {
            // (the pipeline's Debug shows its cache, which holds answers by design)
            assert!(
                !text.contains(PROMPT_MARK),
                "prompt text leaked into {what}"
            );
        }
    }
    assert!(outputs[0].1.contains("gen_ai.chat"), "spans were logged");
    assert!(
        outputs[0].1.contains("tokenwise.cost_usd"),
        "span fields were logged"
    );

    // and the captures would have seen a leak
    tracing::info!(leak = KEY, "control");
    metrics::counter!("control_total", "leak" => KEY).increment(1);
    assert!(logs.text().contains(KEY));
    assert!(prometheus.render().contains(KEY));
}
