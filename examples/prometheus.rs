//! A pipeline serving simulated traffic, with its metrics exported to Prometheus on a
//! loopback port. No API key, no network beyond 127.0.0.1.
//!
//! ```text
//! cargo run --example prometheus                          # ~3 s of traffic, then a self-check
//! cargo run --example prometheus -- --port 9184 --serve-for 300
//! ```
//!
//! Options: `--port N` (default 0: any free port), `--requests N` (default 400, at most
//! 100,000), `--serve-for SECS` (keep serving after the traffic, at most 3,600; default
//! 0). Point Prometheus at the printed address with the rules in `docs/ops/alerts.yml`
//! and import `docs/ops/dashboard.json` into Grafana to see the dashboard fill in.
//!
//! The traffic: fifty users and a batch job in three organisations, half of them repeating one of thirty
//! questions (so the cache answers), some streamed, some asking a model by name; a
//! provider that fails 8 % of calls and has a two-second outage on the primary model
//! (so calls are retried, its circuit breaker opens and requests fall back, or fail
//! where there is nothing to fall back to); a per-user rate
//! limit that the batch job runs into; a validator that escalates short answers; and daily spend caps, sampled into
//! the budget gauges every second. When the traffic is done the example fetches its own
//! `/metrics` over loopback, checks that it is valid Prometheus text, prints a summary,
//! and exits non-zero if it is not.

#[path = "support/prom.rs"]
mod prom;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokenwise::budget::BudgetSampler;
use tokenwise::budget::BudgetWindow;
use tokenwise::observe::metrics as m;
use tokenwise::provider::SimulatedProvider;
use tokenwise::router::{FnValidator, Verdict};
use tokenwise::{ChatRequest, ChatResponse, Cost, Pipeline, RequestMeta, ScopeKind};

const QUESTIONS: &[&str] = &[
    "How do I reset my password?",
    "What payment methods do you accept?",
    "Can I change my delivery address after ordering?",
    "Do you ship to Norway?",
    "How long do refunds take?",
    "Where is my order?",
    "How do I cancel my subscription?",
    "Is there a student discount?",
    "How do I export my data?",
    "What is your uptime guarantee?",
    "Summarise ticket 101",
    "Summarise ticket 102",
    "Summarise ticket 103",
    "Translate 'good morning' to French",
    "Write a haiku about latency",
    "Explain rate limiting in one paragraph",
    "What does a circuit breaker do?",
    "Compare plan A and plan B",
    "Draft a reply to an angry customer",
    "List three ways to cut cloud costs",
    "Classify this ticket: printer on fire",
    "Extract the invoice number from: INV-2291 due Friday",
    "What is GCRA?",
    "Give me a regex for email addresses",
    "How do I rotate an API key safely?",
    "What changed in the last release?",
    "Recommend a book about distributed systems",
    "Explain exponential backoff",
    "What is a token?",
    "Why is my bill higher this month?",
];
const ORGS: &[&str] = &["acme", "globex", "initech"];
const FEATURES: &[&str] = &["support", "search", "summarise"];
const WORKERS: usize = 8;

struct Options {
    port: u16,
    requests: usize,
    serve_for: Duration,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        port: 0,
        requests: 400,
        serve_for: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => o.port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--requests" => {
                o.requests = value()?.parse().map_err(|e| format!("--requests: {e}"))?;
                o.requests = o.requests.min(100_000);
            }
            "--serve-for" => {
                let s: u64 = value()?.parse().map_err(|e| format!("--serve-for: {e}"))?;
                o.serve_for = Duration::from_secs(s.min(3_600));
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\nusage: prometheus [--port N] [--requests N] [--serve-for SECS]");
            std::process::exit(2);
        }
    };

    // 1. The exporter: a recorder with histogram buckets, and /metrics on loopback.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), m::DURATION_BUCKETS)?
        .install_recorder()?;
    m::describe();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(prom::serve(listener, handle.clone()));
    let upkeep = tokio::spawn({
        let handle = handle.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        }
    });
    println!("serving Prometheus metrics on http://{addr}/metrics");

    // 2. A pipeline over a simulated provider with faults.
    let provider = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(20))
        .per_token(Duration::from_millis(1))
        .server_error_rate(0.05)
        .rate_limit_rate(0.03, Duration::from_secs(1))
        .outage(
            Duration::from_millis(500),
            Duration::from_millis(2_500),
            Some("gpt-4o-mini"),
        )
        .seed(7)
        .build()?;
    let pipeline = Pipeline::builder()
        .provider(provider)
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .escalate("gpt-4o-mini", ["gpt-4o"])
        .validator(Arc::new(FnValidator(
            |_: &ChatRequest, r: &ChatResponse| {
                if r.content.split_whitespace().count() < 20 {
                    Verdict::Escalate("answer too short".into())
                } else {
                    Verdict::Accept
                }
            },
        )))
        .rate_limit(ScopeKind::User, 10)
        .spend_cap(ScopeKind::Global, Cost::from_cents(10), BudgetWindow::Day)
        .spend_cap(ScopeKind::Org, Cost::from_cents(4), BudgetWindow::Day)
        .max_in_flight(64)
        .build()?;
    let mut watched = vec![RequestMeta::default()];
    watched.extend(ORGS.iter().map(|o| ChatRequest::new().org(*o).meta));
    let sampler = BudgetSampler::spawn(pipeline.clone(), watched, Duration::from_secs(1))?;

    // 3. Bounded traffic: `requests` in all, spread over WORKERS tasks.
    let started = tokio::time::Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let pipeline = pipeline.clone();
        let n = opts.requests / WORKERS + usize::from(w < opts.requests % WORKERS);
        workers.push(tokio::spawn(async move {
            for i in 0..n {
                let k = i * WORKERS + w;
                let q = QUESTIONS[(k * 7 + k / 3) % QUESTIONS.len()];
                // half the traffic repeats a question; the other half is new
                let text = if k.is_multiple_of(2) {
                    q.to_owned()
                } else {
                    format!("{q} (case {k})")
                };
                let mut req = ChatRequest::user_text(text)
                    .user(if k.is_multiple_of(13) {
                        "batch-bot".to_owned() // bursts past its rate limit
                    } else {
                        format!("user{}", k % 50)
                    })
                    .org(ORGS[k % ORGS.len()])
                    .feature(FEATURES[(k / 5) % FEATURES.len()])
                    .max_tokens(120);
                if k.is_multiple_of(11) {
                    req = req.model("gpt-4o"); // asked by name: no fallback
                }
                if k.is_multiple_of(7) {
                    if let Ok(mut s) = pipeline.stream(req).await {
                        while let Some(Ok(_)) = s.next().await {}
                    }
                } else {
                    let _ = pipeline.chat(req).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    BudgetSampler::sample(&pipeline, &[RequestMeta::default()]).await;
    println!(
        "sent {} requests in {:.1} s",
        opts.requests,
        started.elapsed().as_secs_f64()
    );

    // 4. Check our own /metrics over loopback.
    let res = prom::fetch(addr, "/metrics").await?;
    let check = if res.status != 200 {
        Err(format!("GET /metrics answered {}", res.status))
    } else {
        prom::validate(&res.body)
    };
    let ex = match check {
        Ok(ex) => ex,
        Err(e) => {
            eprintln!("/metrics is NOT valid Prometheus text: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "/metrics is valid Prometheus text: {} families, {} samples, {} bytes",
        ex.types.len(),
        ex.samples.len(),
        res.body.len()
    );
    let total = ex.sum(m::REQUESTS, &[]);
    let hits = ex.sum(m::REQUESTS, &[("cache", "hit")]);
    println!(
        "requests {total}, cache hit rate {:.1} %, errors and refusals {}, fallbacks {}, escalations {}, spent ${:.6}, saved ${:.6}",
        100.0 * hits / total.max(1.0),
        total - ex.sum(m::REQUESTS, &[("status", "ok")]),
        ex.sum(m::FALLBACKS, &[]),
        ex.sum(m::ESCALATIONS, &[]),
        ex.sum(m::COST, &[]) / 1e9,
        ex.sum(m::COST_SAVED, &[]) / 1e9,
    );
    let mut breakers: Vec<_> = ex
        .samples
        .iter()
        .filter(|((name, _), _)| name == m::BREAKER_STATE)
        .map(|((_, labels), v)| {
            let state = match *v as u8 {
                0 => "closed",
                1 => "half-open",
                _ => "open",
            };
            format!(
                "{} {state}",
                labels.get("model").map_or("?", String::as_str)
            )
        })
        .collect();
    breakers.sort();
    println!("circuit breakers: {}", breakers.join(", "));
    if let Some(u) = ex.get(
        m::BUDGET_UTILIZATION,
        &[("scope", "global"), ("window", "day")],
    ) {
        println!("global daily cap {:.1} % used", u * 100.0);
    }
    println!("\nsome lines of it:");
    for line in res
        .body
        .lines()
        .filter(|l| l.starts_with("tokenwise_requests_total"))
        .take(10)
    {
        println!("  {line}");
    }
    println!("\nusage report:\n{}", pipeline.usage());

    if !opts.serve_for.is_zero() {
        println!(
            "serving http://{addr}/metrics for {} s more",
            opts.serve_for.as_secs()
        );
        tokio::time::sleep(opts.serve_for).await;
    }
    drop(sampler);
    upkeep.abort();
    server.abort();
    Ok(())
}
