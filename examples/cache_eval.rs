//! How often the semantic cache serves a stored answer to a second question, for pairs
//! that need the same answer and pairs that do not.
//!
//! ```text
//! cargo run --release --example cache_eval -- --split test
//! cargo run --release --example cache_eval --features local-embeddings -- \
//!     --split test --embedder minilm:/path/to/all-MiniLM-L6-v2
//! cargo run --release --example cache_eval -- --pairs tests/data/cache_pairs.jsonl
//! ```
//!
//! `--split calibration|validation|test` reads `tests/data/cache_pairs_<split>.jsonl`
//! (made by `tests/data/gen_cache_pairs.py`, split by question so that no wording of
//! one split appears in another): thresholds and rules are fitted on `calibration`,
//! checked on `validation`, and `test` is what is reported. `--pairs FILE` reads any
//! file of the same form.
//!
//! Each line of the pairs file is `{"a": Q, "b": Q, "same_answer": bool, "category": "…"}`
//! where a question `Q` is a text or a conversation (`[{"role": "user", "content": "…"}, …]`).
//! For every pair, `a` is stored with a marker answer and `b` is asked (with its own
//! history, for a conversation); `b` is served when the marker comes back. Pairs are
//! isolated from one another (one namespace each).
//!
//! Then the lookup latency: `--latency-entries N` (default 10,000) questions made from
//! the file's are stored in one context, and every pair's second question is looked up
//! there, timed from the request to the decision (embedding, index search and guards
//! included; the embedder's cache of recent vectors is bypassed).
//!
//! Before the last line, a `goals` line gives what the goals are checked on: single-turn
//! same/different rates, the worst different-answer category, multi-turn same/different
//! and the lookup p99. The last line is
//! `same_answer_served=0.xx different_answer_served=0.xx` (over every pair).
//!
//! Options: `--threshold T` (default: the embedder's calibrated threshold, 0.9 for
//! all-MiniLM-L6-v2, else 0.95), `--no-guards`, `--show` (print every pair
//! whose outcome is wrong: a same-answer pair not served, a different-answer one served).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use tokenwise::cache::{
    Cache, CacheQuery, CacheScope, ConversationMatching, Embedder, Guards, HashingEmbedder,
    SemanticCache,
};
use tokenwise::{ChatRequest, ChatResponse, FinishReason, Message, Role, Usage};

#[derive(Deserialize)]
#[serde(untagged)]
enum Question {
    Text(String),
    Conversation(Vec<Turn>),
}

#[derive(Deserialize)]
struct Turn {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Pair {
    a: Question,
    b: Question,
    same_answer: bool,
    #[serde(default)]
    category: Option<String>,
}

fn request(q: &Question, namespace: &str) -> Result<ChatRequest, String> {
    let req = match q {
        Question::Text(t) => ChatRequest::user_text(t.clone()),
        Question::Conversation(turns) => {
            let mut r = ChatRequest::new();
            for t in turns {
                let role = match t.role.as_str() {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => return Err(format!("unknown role `{other}`")),
                };
                r = r.message(Message::new(role, t.content.clone()));
            }
            r
        }
    };
    Ok(req.cache_namespace(namespace))
}

fn text_of(q: &Question) -> String {
    match q {
        Question::Text(t) => t.clone(),
        Question::Conversation(turns) => turns
            .iter()
            .map(|t| format!("{}: {}", t.role, t.content))
            .collect::<Vec<_>>()
            .join(" | "),
    }
}

struct Args {
    latency_entries: usize,
    pairs: String,
    embedder: String,
    threshold: Option<f32>,
    guards: bool,
    show: bool,
    condensed: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        latency_entries: 10_000,
        pairs: String::new(),
        embedder: "hashing".into(),
        threshold: None,
        guards: true,
        show: false,
        condensed: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--pairs" => a.pairs = it.next().ok_or("--pairs needs a file")?,
            "--split" => {
                let split = it.next().ok_or("--split needs a name")?;
                if !["calibration", "validation", "test"].contains(&split.as_str()) {
                    return Err(format!(
                        "--split: `{split}` is not calibration, validation or test"
                    ));
                }
                a.pairs = format!(
                    "{}/tests/data/cache_pairs_{split}.jsonl",
                    env!("CARGO_MANIFEST_DIR")
                );
            }
            "--latency-entries" => {
                a.latency_entries = it
                    .next()
                    .ok_or("--latency-entries needs a value")?
                    .replace('_', "")
                    .parse()
                    .map_err(|e| format!("--latency-entries: {e}"))?;
            }
            "--embedder" => a.embedder = it.next().ok_or("--embedder needs a value")?,
            "--threshold" => {
                a.threshold = Some(
                    it.next()
                        .ok_or("--threshold needs a value")?
                        .parse()
                        .map_err(|e| format!("--threshold: {e}"))?,
                );
            }
            "--no-guards" => a.guards = false,
            "--conversations" => {
                a.condensed = match it.next().as_deref() {
                    Some("strict") => false,
                    Some("condensed") => true,
                    _ => return Err("--conversations needs strict or condensed".into()),
                }
            }
            "--show" => a.show = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.pairs.is_empty() {
        return Err("usage: cache_eval (--split calibration|validation|test | --pairs FILE) [--embedder hashing|minilm:DIR] [--threshold T] [--no-guards] [--conversations strict|condensed] [--show] [--latency-entries N]".into());
    }
    Ok(a)
}

fn embedder(spec: &str) -> Result<Arc<dyn Embedder>, String> {
    if spec == "hashing" {
        return Ok(Arc::new(HashingEmbedder::default()));
    }
    if let Some(dir) = spec.strip_prefix("minilm:") {
        #[cfg(feature = "local-embeddings")]
        {
            let m = tokenwise::cache::MiniLmEmbedder::load(dir).map_err(|e| e.to_string())?;
            return Ok(Arc::new(m));
        }
        #[cfg(not(feature = "local-embeddings"))]
        {
            return Err(format!(
                "minilm:{dir} needs the example built with --features local-embeddings"
            ));
        }
    }
    Err(format!("unknown embedder `{spec}` (hashing or minilm:DIR)"))
}

#[derive(Default)]
struct Tally {
    same: u32,
    same_served: u32,
    different: u32,
    different_served: u32,
    rejected: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("cache_eval: {e}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), String> {
    let args = args()?;
    let text = std::fs::read_to_string(&args.pairs)
        .map_err(|e| format!("cannot read {}: {e}", args.pairs))?;
    let pairs: Vec<Pair> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect::<Result<_, _>>()?;
    let mut builder = SemanticCache::builder()
        .embedder(embedder(&args.embedder)?)
        .conversations(if args.condensed {
            ConversationMatching::Condensed
        } else {
            ConversationMatching::Strict
        });
    if let Some(t) = args.threshold {
        builder = builder.threshold(t);
    }
    let cache = builder
        .guards(if args.guards {
            Guards::all()
        } else {
            Guards::none()
        })
        .max_entries(pairs.len().max(1) * 2)
        .build()
        .map_err(|e| e.to_string())?;
    let mut by_category: BTreeMap<String, Tally> = BTreeMap::new();
    let mut total = Tally::default();
    let (mut single, mut multi) = (Tally::default(), Tally::default());
    let started = std::time::Instant::now();
    for (i, pair) in pairs.iter().enumerate() {
        let ns = format!("pair-{i}");
        let query = |q: &Question| -> Result<CacheQuery, String> {
            let req = request(q, &ns)?;
            CacheQuery::for_request(&req, CacheScope::Global)
                .ok_or_else(|| "the request may not use the cache".to_owned())
        };
        let (qa, qb) = (query(&pair.a)?, query(&pair.b)?);
        let marker = format!("marker answer {i}");
        let answer = ChatResponse::new(&marker, "m", "p", Usage::new(10, 10), FinishReason::Stop);
        cache.put(&qa, &answer).await.map_err(|e| e.to_string())?;
        let found = cache.lookup(&qb).await.map_err(|e| e.to_string())?;
        let served = found
            .answer
            .as_ref()
            .is_some_and(|a| a.response.content == marker);
        let category = pair.category.clone().unwrap_or_else(|| "(none)".into());
        let kind = if is_multi_turn(pair) {
            &mut multi
        } else {
            &mut single
        };
        for t in [
            by_category.entry(category.clone()).or_default(),
            &mut total,
            kind,
        ] {
            if pair.same_answer {
                t.same += 1;
                t.same_served += u32::from(served);
            } else {
                t.different += 1;
                t.different_served += u32::from(served);
            }
            t.rejected += u32::from(found.rejected.is_some());
        }
        if args.show && served != pair.same_answer {
            let why = match (&found.answer, &found.rejected) {
                (Some(a), _) => format!("served at {:.3}", a.similarity),
                (None, Some(r)) => {
                    format!("{} guard at {:.3}: {}", r.guard, r.similarity, r.detail)
                }
                (None, None) => "below the threshold".into(),
            };
            println!(
                "  [{category}] same_answer={} {why}\n    a: {}\n    b: {}",
                pair.same_answer,
                text_of(&pair.a),
                text_of(&pair.b)
            );
        }
    }
    let rate = |n: u32, d: u32| {
        if d == 0 {
            "   -".to_owned()
        } else {
            format!("{:.2}", f64::from(n) / f64::from(d))
        }
    };
    println!(
        "pairs={} embedder={} threshold={} guards={} seconds={:.1}",
        pairs.len(),
        args.embedder.split(':').next().unwrap_or("?"),
        cache.threshold_for("pair-0"),
        if args.guards { "on" } else { "off" },
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<30} {:>5} {:>11} {:>11} {:>9}",
        "category", "pairs", "same:served", "diff:served", "rejected"
    );
    for (name, t) in &by_category {
        println!(
            "{:<30} {:>5} {:>11} {:>11} {:>9}",
            name,
            t.same + t.different,
            format!("{}:{}", t.same, rate(t.same_served, t.same)),
            format!("{}:{}", t.different, rate(t.different_served, t.different)),
            t.rejected
        );
    }
    let stats = cache.stats();
    println!(
        "guard rejections: numbers={} entities={} negation={} scope={} terms={}",
        stats.rejected_numbers,
        stats.rejected_entities,
        stats.rejected_negation,
        stats.rejected_scope,
        stats.rejected_terms
    );
    let frac = |n: u32, d: u32| {
        if d == 0 {
            0.0
        } else {
            f64::from(n) / f64::from(d)
        }
    };
    let (p50, p99) = latency(&args, &pairs).await?;
    println!(
        "lookup latency at {} entries in one context: p50_ms={p50:.2} p99_ms={p99:.2} (embedding, search and guards)",
        args.latency_entries
    );
    let worst = by_category
        .iter()
        .filter(|(_, t)| t.different > 0)
        .map(|(name, t)| (frac(t.different_served, t.different), name.as_str()))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, "-"));
    println!(
        "goals single_same={:.3} single_different={:.3} worst_different_category={:.3} ({}) multi_same={:.3} multi_different={:.3} lookup_p99_ms={p99:.2}",
        frac(single.same_served, single.same),
        frac(single.different_served, single.different),
        worst.0,
        worst.1,
        frac(multi.same_served, multi.same),
        frac(multi.different_served, multi.different),
    );
    println!(
        "same_answer_served={:.2} different_answer_served={:.2}",
        frac(total.same_served, total.same),
        frac(total.different_served, total.different)
    );
    Ok(())
}

fn is_multi_turn(pair: &Pair) -> bool {
    let turns = |q: &Question| match q {
        Question::Text(_) => 1,
        Question::Conversation(t) => t.iter().filter(|t| t.role == "user").count(),
    };
    turns(&pair.a) > 1 || turns(&pair.b) > 1
}

/// The final user text of a question.
fn last_text(q: &Question) -> Option<&str> {
    match q {
        Question::Text(t) => Some(t),
        Question::Conversation(turns) => turns
            .iter()
            .rev()
            .find(|t| t.role == "user")
            .map(|t| t.content.as_str()),
    }
}

/// Lookup latency with `args.latency_entries` questions stored in one context: the
/// file's questions, then the same with an order number, until there are enough.
async fn latency(args: &Args, pairs: &[Pair]) -> Result<(f64, f64), String> {
    let n = args.latency_entries;
    if n == 0 {
        return Ok((0.0, 0.0));
    }
    let emb = embedder(&args.embedder)?;
    let mut builder = SemanticCache::builder()
        .embedder(Arc::clone(&emb))
        // the embedder's cache would answer repeated texts without embedding them
        .embedding_cache(1);
    if let Some(t) = args.threshold {
        builder = builder.threshold(t);
    }
    let cache = builder
        .guards(if args.guards {
            Guards::all()
        } else {
            Guards::none()
        })
        .max_entries(n + 1)
        .build()
        .map_err(|e| e.to_string())?;
    let texts: Vec<&str> = pairs.iter().filter_map(|p| last_text(&p.a)).collect();
    if texts.is_empty() {
        return Ok((0.0, 0.0));
    }
    let answer = ChatResponse::new("stored", "m", "p", Usage::new(10, 10), FinishReason::Stop);
    let q = |t: &str| {
        CacheQuery::for_request(&ChatRequest::user_text(t), CacheScope::Global)
            .ok_or_else(|| "the request may not use the cache".to_owned())
    };
    for i in 0..n {
        let base = texts[i % texts.len()];
        let t = if i < texts.len() {
            base.to_owned()
        } else {
            format!("{base} (order {})", i / texts.len())
        };
        cache
            .put(&q(&t)?, &answer)
            .await
            .map_err(|e| e.to_string())?;
    }
    cache.settled().await;
    let mut lat = Vec::new();
    for p in pairs.iter().take(2_000) {
        let Some(t) = last_text(&p.b) else {
            continue;
        };
        let query = q(t)?;
        let started = std::time::Instant::now();
        let found = cache.lookup(&query).await.map_err(|e| e.to_string())?;
        lat.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(found);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok((pct(0.5), pct(0.99)))
}
