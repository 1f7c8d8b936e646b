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
//! included; the embedder's cache of recent vectors is bypassed), then the time of
//! embedding each of those questions alone (one call each), the lookup's largest part.
//!
//! Before the last line, a `goals` line gives what the goals are checked on: single-turn
//! same/different rates, the worst different-answer category, multi-turn same/different
//! and the lookup p99. The last line is
//! `same_answer_served=0.xx different_answer_served=0.xx` (over every pair).
//!
//! Options: `--threshold T` (default: the judge's recall threshold when the embedder
//! has a judge, else its calibrated threshold, else 0.95), `--no-guards`, `--no-judge`
//! (the threshold and the lexical guards only), `--show` (print every pair
//! whose outcome is wrong: a same-answer pair not served, a different-answer one served).
//!
//! `--train` fits the pair judge instead (see `src/cache/judge.rs`): its weights on the
//! calibration split's pairs (each question pair, and each pair of context turns of a
//! follow-up), then its recall threshold and cutoff on the validation split (the most
//! same-answer pairs served with at most 1 % of different-answer single-turn pairs, no
//! category above 2 % and no different-answer follow-up), and writes it to
//! `src/cache/judge_minilm_l6.txt` (or `--judge-out FILE`):
//!
//! ```text
//! cargo run --release --features local-embeddings --example cache_eval -- \
//!     --train --embedder minilm:/path/to/all-MiniLM-L6-v2
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use tokenwise::cache::{
    Cache, CacheQuery, CacheScope, ConversationMatching, Embedder, Guards, HashingEmbedder,
    JudgedPair, PairFeatures, PairJudge, SemanticCache,
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
    judge: bool,
    train: bool,
    judge_out: String,
    dump: Option<String>,
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
        judge: true,
        train: false,
        dump: None,
        judge_out: format!(
            "{}/src/cache/judge_minilm_l6.txt",
            env!("CARGO_MANIFEST_DIR")
        ),
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
            "--no-judge" => a.judge = false,
            "--train" => a.train = true,
            "--dump-features" => a.dump = Some(it.next().ok_or("--dump-features needs a file")?),
            "--judge-out" => a.judge_out = it.next().ok_or("--judge-out needs a file")?,
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
    if a.pairs.is_empty() && !a.train {
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
    if args.train {
        return train(&args).await;
    }
    let pairs = read_pairs(&args.pairs)?;
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
    if !args.judge {
        builder = builder.no_judge();
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
        "pairs={} embedder={} threshold={} guards={} judge={} seconds={:.1}",
        pairs.len(),
        args.embedder.split(':').next().unwrap_or("?"),
        cache.threshold_for("pair-0"),
        if args.guards { "on" } else { "off" },
        cache
            .judge()
            .map_or_else(|| "off".to_owned(), |j| format!("cutoff {}", j.cutoff())),
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
    let Latency {
        p50,
        p99,
        embed_p50,
        embed_p99,
    } = latency(&args, &pairs).await?;
    println!(
        "lookup latency at {} entries in one context: p50_ms={p50:.2} p99_ms={p99:.2} (embedding, search and guards)",
        args.latency_entries
    );
    if args.latency_entries > 0 {
        println!(
            "of which the embedding of the question alone: p50_ms={embed_p50:.2} p99_ms={embed_p99:.2}"
        );
    }
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

/// Lookup latency percentiles, in milliseconds.
#[derive(Default)]
struct Latency {
    p50: f64,
    p99: f64,
    /// The same questions embedded on their own (one call each, no cache).
    embed_p50: f64,
    embed_p99: f64,
}

/// Lookup latency with `args.latency_entries` questions stored in one context: the
/// file's questions, then the same with an order number, until there are enough. Then
/// the time of embedding each question alone, for the share of the lookup it takes.
async fn latency(args: &Args, pairs: &[Pair]) -> Result<Latency, String> {
    let n = args.latency_entries;
    if n == 0 {
        return Ok(Latency::default());
    }
    let emb = embedder(&args.embedder)?;
    let mut builder = SemanticCache::builder()
        .embedder(Arc::clone(&emb))
        // the embedder's cache would answer repeated texts without embedding them
        .embedding_cache(1);
    if let Some(t) = args.threshold {
        builder = builder.threshold(t);
    }
    if !args.judge {
        builder = builder.no_judge();
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
        return Ok(Latency::default());
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
    let asked: Vec<&str> = pairs
        .iter()
        .take(2_000)
        .filter_map(|p| last_text(&p.b))
        .collect();
    let mut lat = Vec::new();
    for t in &asked {
        let query = q(t)?;
        let started = std::time::Instant::now();
        let found = cache.lookup(&query).await.map_err(|e| e.to_string())?;
        lat.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(found);
    }
    let mut embed = Vec::new();
    for t in &asked {
        let started = std::time::Instant::now();
        let v = emb.embed(&[t]).await.map_err(|e| e.to_string())?;
        embed.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(v);
    }
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Latency {
        p50: pct(&mut lat, 0.5),
        p99: pct(&mut lat, 0.99),
        embed_p50: pct(&mut embed, 0.5),
        embed_p99: pct(&mut embed, 0.99),
    })
}

fn read_pairs(path: &str) -> Result<Vec<Pair>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("{path} line {}: {e}", i + 1)))
        .collect()
}

/// The user turns of a question.
fn user_turns(q: &Question) -> Vec<&str> {
    match q {
        Question::Text(t) => vec![t.as_str()],
        Question::Conversation(turns) => turns
            .iter()
            .filter(|t| t.role == "user")
            .map(|t| t.content.as_str())
            .collect(),
    }
}

/// One pair as the judge sees it, with what it is.
struct Judged {
    pair: Option<JudgedPair>,
    same: bool,
    multi: bool,
    category: String,
    /// Whether the final questions differ (else only the context does).
    questions_differ: bool,
    /// Whether the earlier user turns differ.
    contexts_differ: bool,
}

async fn judge_split(cache: &SemanticCache, split: &str) -> Result<Vec<Judged>, String> {
    let path = format!(
        "{}/tests/data/cache_pairs_{split}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    let pairs = read_pairs(&path)?;
    let mut out = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let ns = format!("pair-{i}");
        let q = |x: &Question| -> Result<CacheQuery, String> {
            CacheQuery::for_request(&request(x, &ns)?, CacheScope::Global)
                .ok_or_else(|| "the request may not use the cache".to_owned())
        };
        let judged = cache
            .judge_pair(&q(&p.a)?, &q(&p.b)?)
            .await
            .map_err(|e| e.to_string())?;
        let (ua, ub) = (user_turns(&p.a), user_turns(&p.b));
        let norm = |t: &str| t.to_lowercase();
        out.push(Judged {
            pair: judged,
            same: p.same_answer,
            multi: is_multi_turn(p),
            category: p.category.clone().unwrap_or_default(),
            questions_differ: norm(ua.last().copied().unwrap_or(""))
                != norm(ub.last().copied().unwrap_or("")),
            contexts_differ: ua.len() != ub.len()
                || ua.iter().zip(&ub).any(|(x, y)| norm(x) != norm(y)),
        });
    }
    Ok(out)
}

/// Whether `judge` serves the pair (recall threshold `recall`).
fn served(j: &Judged, judge: &PairJudge, recall: f32) -> bool {
    let Some(p) = &j.pair else {
        return false;
    };
    p.similarity >= recall
        && judge.accepts(&p.question)
        && p.context.as_ref().is_none_or(|c| judge.accepts_context(c))
}

struct Score {
    single_same: f64,
    single_diff: f64,
    worst: f64,
    multi_same: f64,
    multi_diff: f64,
}

fn score(set: &[Judged], judge: &PairJudge, recall: f32) -> Score {
    let mut cats: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    let (mut ss, mut sd, mut ms, mut md) = ((0, 0), (0, 0), (0, 0), (0, 0));
    for j in set {
        let s = u32::from(served(j, judge, recall));
        let t = match (j.multi, j.same) {
            (false, true) => &mut ss,
            (false, false) => &mut sd,
            (true, true) => &mut ms,
            (true, false) => &mut md,
        };
        t.0 += s;
        t.1 += 1;
        if !j.same {
            let c = cats.entry(j.category.as_str()).or_default();
            c.0 += s;
            c.1 += 1;
        }
    }
    let f = |(n, d): (u32, u32)| {
        if d == 0 {
            0.0
        } else {
            f64::from(n) / f64::from(d)
        }
    };
    Score {
        single_same: f(ss),
        single_diff: f(sd),
        worst: cats.values().map(|c| f(*c)).fold(0.0, f64::max),
        multi_same: f(ms),
        multi_diff: f(md),
    }
}

/// Fits the judge on calibration, chooses its recall threshold and cutoff on
/// validation, writes it, and prints both splits' figures.
async fn train(args: &Args) -> Result<(), String> {
    let cache = SemanticCache::builder()
        .embedder(embedder(&args.embedder)?)
        .conversations(ConversationMatching::Condensed)
        .no_judge()
        .build()
        .map_err(|e| e.to_string())?;
    let calibration = judge_split(&cache, "calibration").await?;
    let validation = judge_split(&cache, "validation").await?;
    if let Some(path) = &args.dump {
        let mut out = String::new();
        for (name, set) in [("calibration", &calibration), ("validation", &validation)] {
            for j in set {
                let line = serde_json::json!({
                    "split": name,
                    "category": j.category,
                    "same": j.same,
                    "multi": j.multi,
                    "questions_differ": j.questions_differ,
                    "contexts_differ": j.contexts_differ,
                    "similarity": j.pair.as_ref().map(|p| p.similarity),
                    "question": j.pair.as_ref().map(|p| p.question.values().to_vec()),
                    "question_hard": j.pair.as_ref().map(|p| p.question.hard_refusal().is_some()),
                    "context": j.pair.as_ref().and_then(|p| p.context.map(|c| c.values().to_vec())),
                    "context_hard": j.pair.as_ref().and_then(|p| p.context.map(|c| c.hard_refusal().is_some())),
                });
                out.push_str(&line.to_string());
                out.push('\n');
            }
        }
        std::fs::write(path, out).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    // Calibration samples: each question pair, and each pair of context turns; for a
    // different-answer follow-up only the part that differs is a negative example.
    let mut samples: Vec<(PairFeatures, bool)> = Vec::new();
    for j in &calibration {
        let Some(p) = &j.pair else {
            continue;
        };
        if j.same || !j.multi || j.questions_differ {
            samples.push((p.question, j.same));
        }
        if let Some(c) = &p.context {
            if j.same || j.contexts_differ {
                samples.push((*c, j.same));
            }
        }
    }
    // Only the pairs a cache would judge: the hard guards refuse the rest anyway.
    samples.retain(|(f, _)| f.hard_refusal().is_none());
    let positives = samples.iter().filter(|(_, s)| *s).count();
    println!(
        "calibration samples: {} ({positives} same answer)",
        samples.len()
    );
    let base = PairJudge::fit(&samples, 1e-4, 0.5, 0.5).map_err(|e| e.to_string())?;
    // The settings are tried from the strictest down; the first best is kept.
    let mut best: Option<(f64, PairJudge)> = None;
    for r in (0..=8).rev() {
        let recall = 0.5 + 0.05 * r as f32;
        for context in [0.97, 0.95, 0.93, 0.9, 0.0] {
            for c in (0..=48).rev() {
                let cutoff = 0.5 + 0.01 * c as f32;
                let judge = base
                    .clone()
                    .with_cutoff(cutoff)
                    .and_then(|j| j.with_recall_threshold(recall))
                    .and_then(|j| j.with_context_similarity(context))
                    .map_err(|e| e.to_string())?;
                let s = score(&validation, &judge, recall);
                if s.single_diff > 0.01 || s.worst > 0.02 || s.multi_diff > 0.0 {
                    continue;
                }
                let value = s.single_same + s.multi_same.min(0.5);
                if best.as_ref().is_none_or(|(v, _)| value > v + 1e-9) {
                    best = Some((value, judge));
                }
            }
        }
    }
    let (_, judge) = best.ok_or("no setting meets the limits on validation")?;
    let (recall, cutoff) = (judge.recall_threshold(), judge.cutoff());
    for (name, set) in [("calibration", &calibration), ("validation", &validation)] {
        let s = score(set, &judge, recall);
        println!(
            "{name}: recall {recall:.2} cutoff {cutoff:.2} context {:.2}: single_same={:.3} single_different={:.3} worst_different_category={:.3} multi_same={:.3} multi_different={:.3}",
            judge.context_similarity(),
            s.single_same,
            s.single_diff,
            s.worst,
            s.multi_same,
            s.multi_diff
        );
    }
    let text = format!(
        "# The pair judge for all-MiniLM-L6-v2, written by\n# cargo run --release --features local-embeddings --example cache_eval -- --train --embedder minilm:DIR\n{}",
        judge.to_text()
    );
    std::fs::write(&args.judge_out, text)
        .map_err(|e| format!("cannot write {}: {e}", args.judge_out))?;
    println!("wrote {}", args.judge_out);
    Ok(())
}
