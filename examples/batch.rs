//! A nightly job through the batch path, offline: 1,000 ticket summaries sent to a
//! simulated batch API, with progress, then the same work done live, to compare costs.
//!
//! ```text
//! cargo run --example batch
//! ```
//!
//! The simulated batch API stands in for OpenAI's: batches of at most 250 requests that
//! take 20 minutes, the first of which expires half done (its unfinished requests are
//! sent once more), and one result line in 200 that cannot be read. Tokio's clock is
//! paused, so the simulated hours take no real time. The run fails (exit code 1) if the
//! batch path does not cost about half the live one.

use std::process::ExitCode;
use std::time::Duration;

use tokenwise::batch::{BatchLimits, SimulatedBatch};
use tokenwise::provider::SimulatedProvider;
use tokenwise::{BatchOptions, ChatRequest, Cost, Pipeline, WarmOptions};

const MODEL: &str = "gpt-4o-mini";
const TICKETS: usize = 1_000;

fn tickets() -> Vec<ChatRequest> {
    (0..TICKETS)
        .map(|i| {
            ChatRequest::user_text(format!(
                "Summarise support ticket #{i} in two sentences for the morning report."
            ))
            .user("nightly-report")
            .max_tokens(120)
        })
        .collect()
}

fn bar(done: usize, total: usize) -> String {
    let width = 40;
    let filled = (done * width).checked_div(total).unwrap_or(width);
    format!(
        "[{}{}] {done:>5}/{total}",
        "#".repeat(filled),
        ".".repeat(width - filled)
    )
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> tokenwise::Result<bool> {
    let answers = SimulatedProvider::new();
    let batch_api = SimulatedBatch::builder()
        .name("openai")
        .answers(answers.clone())
        .limits(BatchLimits::new(250, 10_000_000))
        .latency(Duration::from_secs(20 * 60))
        .expire_first(1)
        .malformed_every(200)
        .build()?;
    let mut options = BatchOptions::default();
    options.poll_interval = Duration::from_secs(60);
    let pipeline = Pipeline::builder()
        .provider(answers.clone())
        .default_model(MODEL)
        .batch_provider(batch_api.clone())
        .batch_options(options)
        .build()?;

    // Yesterday's most common questions are already in the cache.
    let warmed = pipeline
        .warm(
            tickets().into_iter().take(40).collect(),
            WarmOptions::default(),
        )
        .await?;
    println!(
        "warmed the cache with {} answers for {}",
        warmed.stored, warmed.cost
    );

    let started = tokio::time::Instant::now();
    let mut handle = pipeline.batch(tickets()).await?;
    let mut last = usize::MAX;
    while let Some(p) = handle.progress_changed().await {
        if p.finished() != last {
            last = p.finished();
            println!(
                "{}  {} batches sent, {} open, {} from cache, {} failed",
                bar(p.finished(), p.total),
                p.batches,
                p.open_batches,
                p.cached,
                p.failed
            );
        }
        if p.is_done() {
            break;
        }
    }
    let progress = handle.progress();
    let outcomes = handle.collect().await;
    let answered: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok())
        .filter(|r| !r.served.is_cache_hit())
        .collect();
    let batch_cost: Cost = answered.iter().map(|r| r.cost).sum();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.result
                .as_ref()
                .err()
                .map(|e| format!("#{}: {e}", o.index))
        })
        .collect();
    println!(
        "\nbatch path: {} answered in {:?} (simulated), {} from cache, {} failed, {} batches, {}",
        answered.len(),
        started.elapsed(),
        progress.cached,
        failed.len(),
        progress.batches,
        batch_cost
    );
    for f in failed.iter().take(3) {
        println!("  failed {f}");
    }

    // The same answered requests, live, on a fresh pipeline.
    let live = Pipeline::builder()
        .provider(answers)
        .default_model(MODEL)
        .no_cache()
        .build()?;
    let mut live_cost = Cost::ZERO;
    for o in outcomes
        .iter()
        .filter(|o| o.result.as_ref().is_ok_and(|r| !r.served.is_cache_hit()))
    {
        live_cost += live.chat(tickets().swap_remove(o.index)).await?.cost;
    }
    let ratio = batch_cost.as_dollars_f64() / live_cost.as_dollars_f64();
    println!(
        "live path:  the same {} requests cost {live_cost}\nbatch / live = {:.1} %",
        answered.len(),
        ratio * 100.0
    );
    let ok = (0.45..=0.55).contains(&ratio) && outcomes.len() == TICKETS;
    if !ok {
        eprintln!("expected the batch path at about half the live cost, every item answered once");
    }
    Ok(ok)
}
