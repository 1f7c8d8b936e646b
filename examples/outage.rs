//! A 25-minute outage of the primary model under steady traffic, on the simulated
//! provider and virtual time: no key, no server, and the 40 minutes run in about a second.
//!
//! ```text
//! cargo run --release --example outage
//! ```
//!
//! The primary (`gpt-4o`) fails with 503 from minute 5 to minute 30; the fallback
//! (`claude-sonnet-4-5`) stays healthy. Two requests a second arrive throughout. The
//! timeline shows, per minute, what users saw, how many provider calls each request
//! cost, who answered, and the primary's breaker. The last line sums it up:
//! `user_errors=N attempts_per_request=X recovery_s=Y`, where attempts are counted during
//! the outage and recovery is the time from the outage's end to the first answer from
//! the primary again.

use std::time::Duration;

use tokenwise::provider::SimulatedProvider;
use tokenwise::{ChatRequest, Pipeline, Served};

const MINUTES: u64 = 40;
const OUTAGE: (u64, u64) = (5 * 60, 30 * 60);
const PER_SECOND: u64 = 2;

struct Outcome {
    sent_s: f64,
    ok: bool,
    attempts: u32,
    primary: bool,
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> tokenwise::Result<()> {
    let provider = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(300))
        .per_token(Duration::from_millis(5))
        .outage(
            Duration::from_secs(OUTAGE.0),
            Duration::from_secs(OUTAGE.1),
            Some("gpt-4o"),
        )
        .build()?;
    let pipeline = Pipeline::builder()
        .provider(provider.clone())
        .default_model("gpt-4o")
        .fallbacks("gpt-4o", ["claude-sonnet-4-5"])
        .no_cache()
        .build()?;

    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1_000 / PER_SECOND));
    let mut breaker_by_minute = Vec::new();
    for i in 0..MINUTES * 60 * PER_SECOND {
        tick.tick().await;
        if i % (60 * PER_SECOND) == 0 {
            breaker_by_minute.push(pipeline.breaker_state("gpt-4o"));
        }
        let pipeline = pipeline.clone();
        let sent_s = start.elapsed().as_secs_f64();
        tasks.push(tokio::spawn(async move {
            let req = ChatRequest::user_text(format!("ticket {i}: where is my order?"))
                .user(format!("u{}", i % 50))
                .max_tokens(120);
            match pipeline.chat(req).await {
                Ok(r) => {
                    let attempts = match r.served {
                        Served::Provider { attempts, .. } => attempts,
                        _ => 0,
                    };
                    Outcome {
                        sent_s,
                        ok: true,
                        attempts,
                        primary: r.model == "gpt-4o",
                    }
                }
                Err(_) => Outcome {
                    sent_s,
                    ok: false,
                    attempts: 0,
                    primary: false,
                },
            }
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(o) = t.await {
            outcomes.push(o);
        }
    }

    println!("minute  requests  errors  attempts/req  primary  fallback  breaker");
    for m in 0..MINUTES {
        let in_min: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| (o.sent_s / 60.0) as u64 == m)
            .collect();
        let n = in_min.len().max(1) as f64;
        let errors = in_min.iter().filter(|o| !o.ok).count();
        let attempts: u32 = in_min.iter().map(|o| o.attempts).sum();
        let primary = in_min.iter().filter(|o| o.primary).count();
        let fallback = in_min.iter().filter(|o| o.ok && !o.primary).count();
        let marker = if m * 60 >= OUTAGE.0 && m * 60 < OUTAGE.1 {
            "  (outage)"
        } else {
            ""
        };
        println!(
            "{m:>6}  {:>8}  {errors:>6}  {:>12.2}  {primary:>7}  {fallback:>8}  {}{marker}",
            in_min.len(),
            f64::from(attempts) / n,
            breaker_by_minute
                .get(m as usize)
                .map_or("?", |b| b.as_str()),
        );
    }

    let user_errors = outcomes.iter().filter(|o| !o.ok).count();
    let during: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.sent_s >= OUTAGE.0 as f64 && o.sent_s < OUTAGE.1 as f64)
        .collect();
    let attempts_per_request =
        during.iter().map(|o| f64::from(o.attempts)).sum::<f64>() / during.len().max(1) as f64;
    let recovery_s = outcomes
        .iter()
        .filter(|o| o.primary && o.sent_s >= OUTAGE.1 as f64)
        .map(|o| o.sent_s - OUTAGE.1 as f64)
        .fold(f64::INFINITY, f64::min);
    println!(
        "\n{} requests, {} provider calls, {} user errors",
        outcomes.len(),
        provider.calls(),
        user_errors
    );
    println!(
        "user_errors={user_errors} attempts_per_request={attempts_per_request:.3} recovery_s={recovery_s:.1}"
    );
    Ok(())
}
