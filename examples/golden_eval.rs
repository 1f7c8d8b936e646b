//! Golden-query evaluation for CI: run a JSON Lines set of golden queries through a
//! pipeline, score the answers, print pass rate, cost and latency, and exit non-zero
//! when the pass rate is under a threshold.
//!
//! ```text
//! cargo run --example golden_eval                         # tests/data/golden.jsonl, threshold 0.9: passes
//! cargo run --example golden_eval -- --threshold 0.95     # the same set fails the gate: exit code 1
//! cargo run --example golden_eval -- my-set.jsonl --concurrency 8 --json report.json
//! ```
//!
//! Exit codes: 0 when the pass rate meets the threshold, 1 when it does not, 2 when the
//! set cannot be read or the options are wrong. The pipeline here runs on the simulated
//! provider with tokio time paused, so it needs no key and finishes at once; in a real
//! CI job build the pipeline your service deploys (same catalogue, router, validators)
//! with real providers, and run this before the deployment step.

use std::sync::Arc;
use std::time::Duration;

use tokenwise::eval::{Evaluator, GoldenSet};
use tokenwise::provider::SimulatedProvider;
use tokenwise::router::{FnValidator, Verdict};
use tokenwise::{ChatRequest, ChatResponse, Pipeline};

struct Options {
    set: String,
    threshold: f64,
    concurrency: usize,
    json: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        set: concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/golden.jsonl").to_owned(),
        threshold: 0.9,
        concurrency: 4,
        json: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--threshold" => {
                o.threshold = value()?.parse().map_err(|e| format!("--threshold: {e}"))?;
                if !(0.0..=1.0).contains(&o.threshold) {
                    return Err("--threshold must be between 0 and 1".into());
                }
            }
            "--concurrency" => {
                o.concurrency = value()?
                    .parse()
                    .map_err(|e| format!("--concurrency: {e}"))?
            }
            "--json" => o.json = Some(value()?),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            path => o.set = path.to_owned(),
        }
    }
    Ok(o)
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    eprintln!(
        "usage: golden_eval [SET.jsonl] [--threshold 0.9] [--concurrency 4] [--json REPORT.json]"
    );
    std::process::exit(2);
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let opts = options().unwrap_or_else(|e| fail(&e));
    let set = GoldenSet::load(&opts.set).unwrap_or_else(|e| fail(&e.to_string()));

    let provider = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(300))
        .per_token(Duration::from_millis(12))
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let pipeline = Pipeline::builder()
        .provider(provider)
        .default_model("gpt-4o-mini")
        .fallbacks("gpt-4o-mini", ["claude-haiku-4-5"])
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));

    // Validators judge every answer on top of each query's own checks.
    let no_refusals = FnValidator(|_: &ChatRequest, r: &ChatResponse| {
        if r.content.trim().is_empty() || r.content.contains("As an AI") {
            Verdict::Escalate("empty answer or a refusal".into())
        } else {
            Verdict::Accept
        }
    });
    let report = Evaluator::new()
        .concurrency(opts.concurrency)
        .validator(Arc::new(no_refusals))
        .run(&pipeline, &set)
        .await;

    println!("golden set {} ({} queries)\n", opts.set, set.len());
    println!("{report}");
    if let Some(path) = &opts.json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::from)
            .and_then(|text| std::fs::write(path, text));
        if let Err(e) = written {
            fail(&format!("cannot write {path}: {e}"));
        }
        println!("report written to {path}");
    }
    let verdict = if report.meets(opts.threshold) {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "{verdict}: pass rate {:.1} % against a threshold of {:.1} %",
        report.pass_rate() * 100.0,
        opts.threshold * 100.0
    );
    if verdict == "FAIL" {
        std::process::exit(1);
    }
}
