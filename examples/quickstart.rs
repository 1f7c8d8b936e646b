//! A small mixed workload through a pipeline on the simulated provider: no API key, no
//! server, no network.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It shows exact repeats answered by the cache, a burst over one user's rate limit, a
//! user running into a daily spend cap, a few distinct questions, and one streamed
//! answer. Tokio time is paused, so the simulated latencies (200 ms to the first token,
//! 10 ms a token) are virtual and the whole run takes well under a second.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use tokenwise::budget::BudgetWindow;
use tokenwise::provider::SimulatedProvider;
use tokenwise::{ChatRequest, Cost, Pipeline, ScopeKind, Served, StreamEvent};

struct Step {
    at_ms: u64,
    user: &'static str,
    text: &'static str,
    stream: bool,
}

const fn ask(at_ms: u64, user: &'static str, text: &'static str) -> Step {
    Step {
        at_ms,
        user,
        text,
        stream: false,
    }
}

#[rustfmt::skip]
const WORKLOAD: &[Step] = &[
    ask(0,      "alice", "How do I reset my password?"),
    ask(1_000,  "alice", "What payment methods do you accept?"),
    ask(2_000,  "bob",   "How do I reset my password?"),
    ask(3_000,  "alice", "How do I reset my password?"),
    // dave bursts past his limit of 5 requests a minute
    ask(4_000,  "dave",  "Summarise ticket 101"),
    ask(4_000,  "dave",  "Summarise ticket 102"),
    ask(4_000,  "dave",  "Summarise ticket 103"),
    ask(4_000,  "dave",  "Summarise ticket 104"),
    ask(4_000,  "dave",  "Summarise ticket 105"),
    ask(4_000,  "dave",  "Summarise ticket 106"),
    ask(4_000,  "dave",  "Summarise ticket 107"),
    // carol asks the larger model until her daily cap stops her
    ask(10_000, "carol", "Draft a detailed migration plan for our billing database"),
    ask(12_000, "carol", "Draft a detailed rollout plan for the new search service"),
    ask(14_000, "carol", "Draft a detailed incident review for last week's outage"),
    ask(16_000, "carol", "Draft a detailed hiring plan for the platform team"),
    ask(18_000, "carol", "Draft a detailed budget proposal for next quarter"),
    ask(20_000, "bob",   "What payment methods do you accept?"),
    ask(21_000, "erin",  "Can I change my delivery address after ordering?"),
    ask(22_000, "erin",  "Do you ship to Norway?"),
    Step { at_ms: 23_000, user: "frank", text: "Explain how refunds work, step by step", stream: true },
    ask(24_000, "frank", "How do I reset my password?"),
];

struct Row {
    latency: Duration,
    outcome: String,
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> tokenwise::Result<()> {
    let provider = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(200))
        .per_token(Duration::from_millis(10))
        .build()?;
    let pipeline = Pipeline::builder()
        .provider(provider.clone())
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .rate_limit(ScopeKind::User, 5)
        .token_limit(ScopeKind::Global, 200_000)
        .spend_cap(ScopeKind::User, Cost::from_micros(2_500), BudgetWindow::Day)
        .spend_cap(
            ScopeKind::Global,
            Cost::from_dollars(10),
            BudgetWindow::Month,
        )
        .max_in_flight(64)
        .build()?;

    println!(
        "tokenwise quickstart: {} requests on the simulated provider",
        WORKLOAD.len()
    );
    println!(
        "(latencies are simulated provider time; tokio time is paused, so the run is instant)\n"
    );
    println!(
        "{:>3}  {:<6} {:<24} {:<17} {:>6} {:>10} {:>8}  question",
        "#", "user", "served by", "model", "tokens", "cost", "latency"
    );

    let start = tokio::time::Instant::now();
    let mut rows = Vec::new();
    for (i, step) in WORKLOAD.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms)).await;
        let mut req = ChatRequest::user_text(step.text)
            .user(step.user)
            .org("acme")
            .max_tokens(150);
        if step.user == "carol" {
            // carol asks for the larger model; her worst case is reserved at its prices
            req = req.model("gpt-4o");
        }
        let t0 = tokio::time::Instant::now();
        let (served_by, model, tokens, cost) = if step.stream {
            match pipeline.stream(req).await {
                Ok(mut s) => {
                    let mut chunks = 0;
                    let mut end = None;
                    while let Some(ev) = s.next().await {
                        match ev? {
                            StreamEvent::TextDelta { .. } => chunks += 1,
                            StreamEvent::Done(e) => end = Some(e),
                            _ => {}
                        }
                    }
                    match end {
                        Some(e) => (
                            format!("stream/{chunks}"),
                            e.model,
                            e.usage.total().to_string(),
                            e.cost.to_string(),
                        ),
                        None => ("stream?".into(), "-".into(), "-".into(), "-".into()),
                    }
                }
                Err(e) => (
                    format!("refused: {}", e.reason()),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            }
        } else {
            match pipeline.chat(req).await {
                Ok(r) => {
                    let by = match r.served {
                        Served::Cache { .. } => "cache".to_owned(),
                        Served::Provider { fallbacks: 0, .. } => "provider".to_owned(),
                        Served::Provider { fallbacks, .. } => format!("fallback+{fallbacks}"),
                        _ => "other".to_owned(),
                    };
                    (by, r.model, r.usage.total().to_string(), r.cost.to_string())
                }
                Err(e) => (
                    format!("refused: {}", e.reason()),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ),
            }
        };
        let latency = t0.elapsed();
        println!(
            "{:>3}  {:<6} {:<24} {:<17} {:>6} {:>10} {:>6}ms  {}",
            i + 1,
            step.user,
            served_by,
            model,
            tokens,
            cost,
            latency.as_millis(),
            step.text
        );
        rows.push(Row {
            latency,
            outcome: served_by,
        });
    }

    let report = pipeline.usage();
    let t = report.totals;
    let mut served: Vec<Duration> = rows
        .iter()
        .filter(|r| !r.outcome.starts_with("refused"))
        .map(|r| r.latency)
        .collect();
    served.sort();
    let pct = |p: f64| -> u128 {
        if served.is_empty() {
            return 0;
        }
        let idx = ((served.len() as f64 * p).ceil() as usize).clamp(1, served.len()) - 1;
        served[idx].as_millis()
    };
    let refusals: BTreeMap<_, _> = report.errors_by_reason.iter().collect();
    println!("\nsummary");
    println!("  requests          {}", t.requests);
    println!("  provider calls    {}", provider.calls());
    println!("  cache hits        {}", t.cache_hits);
    println!(
        "  tokens            {} in, {} out",
        t.input_tokens, t.output_tokens
    );
    println!("  cost              {}", t.cost);
    println!("  cost saved        {} (by cache hits)", t.saved);
    println!(
        "  latency (served)  p50 {} ms, p95 {} ms",
        pct(0.50),
        pct(0.95)
    );
    println!(
        "  refusals          {}",
        if refusals.is_empty() {
            "none".to_owned()
        } else {
            refusals
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(())
}
