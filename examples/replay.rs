//! Before and after: one workload replayed through a naive setup (the provider called
//! directly, every request on the large model) and through a full tokenwise pipeline,
//! on the simulated provider with realistic latency, failures, an outage and real prices.
//! Virtual time: a 20-minute workload replays in seconds, with no key and no server.
//!
//! ```text
//! cargo run --release --example replay                          # generate and replay
//! cargo run --release --example replay -- --html report.html    # also write a report
//! cargo run --release --example replay -- --generate 5000 --write-workload w.jsonl
//! cargo run --release --example replay -- --workload w.jsonl
//! cargo run --release --example replay -- --context             # with a support context
//! cargo run --release --example replay -- --breakdown           # where the money goes
//! cargo run --release --example replay -- --weak 0.1            # a tenth of nano's answers weak
//! cargo run --release --example replay -- --ladder gpt-4o-mini,gpt-4.1-mini,gpt-4o,claude-sonnet-4-5
//! ```
//!
//! The pipeline routes over a ladder of models (`--ladder`, cheapest capability tier
//! first; default `gpt-4.1-nano,gpt-4o-mini,gpt-4.1-mini,gpt-4o,claude-sonnet-4-5`) and
//! escalates weak answers to the next tier. The simulated provider answers equally well
//! on every model, so nothing is ever escalated unless told: `--weak P` makes that share
//! of the first model's answers hedge ("I'm not sure..."), each billed, then escalated
//! and billed again, to show what the cheap first rung is worth if it is weaker.
//!
//! `--context` gives every request what a support assistant sends along: a long, stable
//! system prompt (the knowledge base's policies) and six retrieved documents (chosen by
//! the question, so a repeated question brings the same ones). Both setups pay for it;
//! tokenwise budgets the documents to 1,000 tokens and compresses them, and the
//! simulated provider stands in for OpenAI's automatic prompt cache: a prefix of at
//! least 1,024 tokens seen on the same model in the last five minutes is read from the
//! cache, in 128-token steps, at the model's cached-input price.
//!
//! A workload is JSON Lines of `{"t_ms": 1200, "user": "u7", "tier": "free", "text": "..."}`.
//! The generator mixes frequently asked questions with Zipf-distributed popularity (so
//! they repeat exactly; a tenth are rewritten as paraphrases), questions about one order
//! (mostly unique), hard analytical and coding questions, and bursts from a few heavy
//! users. The provider fails 2 % of calls with a 500 and 1 % with a 429, and the large
//! model is down from minute 11 to minute 14.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokenwise::budget::BudgetWindow;
use tokenwise::cache::SemanticCache;
use tokenwise::context::{Compressor, ContextBudget, CountCache, TiktokenCounter, TokenCounter};
use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
use tokenwise::router::{ComplexityRouter, WeakAnswer};
use tokenwise::{Catalog, ChatRequest, Cost, Pipeline, ScopeKind, Served, Tier, Usage};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    t_ms: u64,
    user: String,
    tier: Tier,
    text: String,
}

const EASY: &[&str] = &[
    "How do I reset my password?",
    "What are your opening hours on weekends?",
    "Can I change my delivery address after ordering?",
    "Do you ship to Norway?",
    "How long does a refund take?",
    "Where can I download my invoice?",
    "Is there a student discount?",
    "How do I cancel my subscription?",
    "What payment methods do you accept?",
    "Can I return an item without the box?",
    "How do I contact support by phone?",
    "Do gift cards expire?",
];

const HARD: &[&str] = &[
    "Compare the annual and monthly plans for a team of 40 and explain the trade-offs step by step.",
    "Analyze why our checkout conversion dropped after the last release and propose a plan.",
    "Debug this function: ```python\ndef total(items):\n    return sum(i.price for i in items if i.qty)\n```",
    "Design a migration plan from our legacy billing system with no downtime.",
];

fn paraphrase(text: &str, rng: &mut SmallRng) -> String {
    match rng.random_range(0..3) {
        0 => text.to_lowercase(),
        1 => format!("Quick question: {}", text.to_lowercase()),
        _ => text.trim_end_matches('?').to_owned() + ", please?",
    }
}

fn generate(n: usize, seed: u64) -> Vec<Item> {
    let mut rng = SmallRng::seed_from_u64(seed);
    // Zipf(1.1) over the easy questions
    let weights: Vec<f64> = (1..=EASY.len())
        .map(|k| 1.0 / (k as f64).powf(1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut items = Vec::with_capacity(n);
    let span_ms = 20 * 60 * 1_000u64;
    for i in 0..n {
        let t_ms = i as u64 * span_ms / n as u64;
        let user = rng.random_range(0..200);
        let tier = match user % 10 {
            0..=5 => Tier::Free,
            6..=8 => Tier::Standard,
            _ => Tier::Premium,
        };
        let pick: f64 = rng.random();
        let text = if pick < 0.15 {
            // hard questions, about one of many teams or releases: rarely repeated
            format!(
                "{} (context: team {})",
                HARD[rng.random_range(0..HARD.len())],
                rng.random_range(1..400)
            )
        } else if pick < 0.60 {
            // questions about one order: mostly unique
            let order = rng.random_range(10_000..30_000);
            match rng.random_range(0..3) {
                0 => format!("Where is my order {order}?"),
                1 => format!("Can I change the delivery address of order {order}?"),
                _ => format!("Why was order {order} charged twice?"),
            }
        } else {
            let mut x = rng.random_range(0.0..total);
            let mut k = 0;
            while k + 1 < weights.len() && x >= weights[k] {
                x -= weights[k];
                k += 1;
            }
            if rng.random_bool(0.1) {
                paraphrase(EASY[k], &mut rng)
            } else {
                EASY[k].to_owned()
            }
        };
        items.push(Item {
            t_ms,
            user: format!("u{user}"),
            tier,
            text,
        });
    }
    // bursts: three heavy users fire 40 requests each within two seconds
    for (b, at) in [(0u64, 4 * 60_000u64), (1, 9 * 60_000), (2, 15 * 60_000)] {
        for j in 0..40 {
            items.push(Item {
                t_ms: at + j * 50,
                user: format!("burst{b}"),
                tier: Tier::Standard,
                text: format!("Summarise ticket {} for me", 1_000 * b + j),
            });
        }
    }
    items.sort_by_key(|i| i.t_ms);
    items
}

/// The knowledge base: the passages of the compression QA set.
const KB: &str = include_str!("../tests/data/compress_qa.json");

/// The support context: a system prompt and the passages to retrieve from.
struct Context {
    system: String,
    passages: Vec<String>,
}

impl Context {
    fn load() -> Result<Self, Box<dyn std::error::Error>> {
        let v: serde_json::Value = serde_json::from_str(KB)?;
        let mut passages: Vec<String> = v["passages"]
            .as_object()
            .ok_or("no passages")?
            .values()
            .filter_map(|p| p.as_str().map(str::to_owned))
            .collect();
        passages.sort();
        let mut system = String::from(
            "You are the support assistant of a large retailer. Answer from the policies \
             below and the documents given; say so when they do not cover the question.\n\n",
        );
        for p in passages.iter().take(5) {
            system.push_str(p);
            system.push_str("\n\n");
        }
        Ok(Context { system, passages })
    }

    /// `text` as a support request: the system prompt and six documents picked by it.
    fn request(&self, text: &str) -> ChatRequest {
        let h = blake3::hash(text.as_bytes());
        let mut req = ChatRequest::new()
            .message(tokenwise::Message::system(self.system.clone()))
            .message(tokenwise::Message::user(text));
        for (i, b) in h.as_bytes().iter().take(6).enumerate() {
            let p = &self.passages[usize::from(*b) % self.passages.len()];
            req = req.document(tokenwise::Document::new(p.clone(), 1.0 - i as f32 * 0.1));
        }
        req
    }
}

/// The simulated provider with OpenAI's automatic prompt cache in front: the stable
/// prefix (system messages, then documents, as the OpenAI wire format sends them) is
/// read from the cache when at least 1,024 tokens of it were sent to the same model in
/// the last five minutes, in 128-token steps.
///
/// With a `weak` model, that share of its answers (chosen by the request, so the same
/// request is always answered the same way) hedge instead: billed as usual, and judged
/// weak by the validator.
#[derive(Debug)]
struct PrefixCached {
    sim: SimulatedProvider,
    seen: std::sync::Mutex<lru::LruCache<(String, [u8; 32]), tokio::time::Instant>>,
    weak: Option<(String, f64)>,
}

impl PrefixCached {
    fn new(sim: SimulatedProvider) -> Self {
        PrefixCached {
            sim,
            seen: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(4_096).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            weak: None,
        }
    }

    fn weak(mut self, model: &str, share: f64) -> Self {
        self.weak = (share > 0.0).then(|| (model.to_owned(), share));
        self
    }

    /// Whether this call's answer hedges.
    fn hedges(&self, call: &ProviderCall<'_>) -> bool {
        let Some((model, share)) = &self.weak else {
            return false;
        };
        if *model != call.model.name {
            return false;
        }
        let mut h = blake3::Hasher::new();
        for m in &call.request.messages {
            h.update(m.content.as_bytes());
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.finalize().as_bytes()[..8]);
        (u64::from_le_bytes(first) as f64 / u64::MAX as f64) < *share
    }

    /// Cached tokens for a call: the longest prefix of the system prompt and documents
    /// already seen within five minutes.
    fn cached(&self, call: &ProviderCall<'_>) -> u64 {
        let counter = TiktokenCounter::new();
        let kind = call.model.tokenizer;
        let mut parts: Vec<&str> = call
            .request
            .messages
            .iter()
            .filter(|m| m.role == tokenwise::Role::System)
            .map(|m| m.content.as_str())
            .collect();
        parts.extend(call.request.documents.iter().map(|d| d.text.as_str()));
        let now = tokio::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut h = blake3::Hasher::new();
        let (mut tokens, mut best) = (0u64, 0u64);
        for p in parts {
            h.update(p.as_bytes());
            tokens += counter.count_text(p, kind) + 3;
            if tokens < 1_024 {
                continue;
            }
            let key = (call.model.name.clone(), *h.finalize().as_bytes());
            if seen
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(300))
            {
                best = tokens / 128 * 128;
            }
            seen.put(key, now);
        }
        best
    }
}

#[async_trait::async_trait]
impl Provider for PrefixCached {
    fn name(&self) -> &str {
        self.sim.name()
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<tokenwise::ChatResponse> {
        let cached = self.cached(&call);
        let hedges = self.hedges(&call);
        let mut r = self.sim.chat(call).await?;
        r.usage = r.usage.with_cached_input(cached.min(r.usage.input_tokens));
        if hedges {
            r.content = format!("I'm not sure. {}", r.content);
        }
        Ok(r)
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<tokenwise::ChatStream> {
        self.sim.stream(call).await
    }
}

fn provider() -> tokenwise::Result<SimulatedProvider> {
    SimulatedProvider::builder()
        .name("openai")
        .time_to_first_token(Duration::from_millis(450))
        .per_token(Duration::from_millis(12))
        .answer_words(15, 60)
        .server_error_rate(0.02)
        .rate_limit_rate(0.01, Duration::from_secs(2))
        .outage(
            Duration::from_secs(11 * 60),
            Duration::from_secs(14 * 60),
            Some("gpt-4o"),
        )
        .seed(7)
        .build()
}

#[derive(Debug, Default, Clone)]
struct Outcome {
    latency: Duration,
    ok: bool,
    cost: Cost,
    model: Option<String>,
    cache_hit: bool,
    escalated: bool,
    /// 1.0 for an exact cache hit, below for a semantic one.
    similarity: f32,
    usage: Usage,
    /// What the provider's prompt cache saved, in nano-dollars.
    prompt_cache_saved: i128,
    /// Prompt tokens the context budget cut (section budgets, then compression).
    budget_cut: u64,
    compression_cut: u64,
    /// Their worth at the input price of the model that answered, in nano-dollars.
    budget_saved: u64,
    compression_saved: u64,
}

/// Tokens and dollars one technique saved over a whole replay.
#[derive(Debug, Default, Clone)]
struct Saving {
    tokens: i128,
    nanos: i128,
}

/// What each technique saved, against the naive run of the same requests.
#[derive(Debug, Default)]
struct Techniques {
    rows: Vec<(&'static str, Saving)>,
    n: usize,
}

fn techniques(naive: &[Outcome], piped: &[Outcome]) -> Techniques {
    let mut exact = Saving::default();
    let mut semantic = Saving::default();
    let mut routing = Saving::default();
    let mut prompt_cache = Saving::default();
    let mut budgets = Saving::default();
    let mut compression = Saving::default();
    for (a, b) in naive.iter().zip(piped) {
        let (a_tokens, a_nanos) = (i128::from(a.usage.total()), i128::from(a.cost.as_nanos()));
        if !a.ok || !b.ok {
            continue;
        }
        if b.cache_hit {
            let s = if b.similarity >= 1.0 {
                &mut exact
            } else {
                &mut semantic
            };
            s.tokens += a_tokens;
            s.nanos += a_nanos;
            continue;
        }
        // what is left of the naive call's cost once the prompt-side techniques are
        // credited goes to routing (cheaper models, escalations and retries included)
        prompt_cache.tokens += i128::from(b.usage.cached_input_tokens);
        prompt_cache.nanos += b.prompt_cache_saved;
        budgets.tokens += i128::from(b.budget_cut);
        budgets.nanos += i128::from(b.budget_saved);
        compression.tokens += i128::from(b.compression_cut);
        compression.nanos += i128::from(b.compression_saved);
        routing.tokens += a_tokens
            - i128::from(b.usage.total())
            - i128::from(b.budget_cut)
            - i128::from(b.compression_cut);
        routing.nanos += a_nanos
            - i128::from(b.cost.as_nanos())
            - b.prompt_cache_saved
            - i128::from(b.budget_saved)
            - i128::from(b.compression_saved);
    }
    Techniques {
        rows: vec![
            ("exact cache", exact),
            ("semantic cache", semantic),
            ("routing", routing),
            ("prompt caching", prompt_cache),
            ("budgets", budgets),
            ("compression", compression),
        ],
        n: naive.len(),
    }
}

fn techniques_table(t: &Techniques, before: &Summary, after: &Summary) -> String {
    let mut s = format!(
        "{:<22} {:>14} {:>14}\n",
        "saved by", "tokens", "$ per 1K req"
    );
    let n = t.n.max(1) as f64;
    for (name, v) in &t.rows {
        s.push_str(&format!(
            "{name:<22} {:>14} {:>14}\n",
            v.tokens,
            format!("${:.4}", v.nanos as f64 / 1e9 * 1_000.0 / n)
        ));
    }
    s.push_str(&format!(
        "{:<22} {:>14} {:>14}\n",
        "total before -> after",
        "",
        format!("${:.4} -> ${:.4}", before.cost_per_1k, after.cost_per_1k)
    ));
    s
}

#[derive(Debug, Default)]
struct Summary {
    name: &'static str,
    n: usize,
    p50_ms: f64,
    p95_ms: f64,
    error_rate: f64,
    cost_per_1k: f64,
    hit_rate: f64,
    escalations: usize,
    routing: BTreeMap<String, usize>,
}

fn summarize(name: &'static str, outcomes: &[Outcome]) -> Summary {
    let mut lat: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.ok)
        .map(|o| o.latency)
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            return 0.0;
        }
        let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[idx].as_secs_f64() * 1e3
    };
    let n = outcomes.len().max(1);
    let cost: Cost = outcomes.iter().map(|o| o.cost).sum();
    let mut routing = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.ok && !o.cache_hit) {
        *routing
            .entry(o.model.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    if outcomes.iter().any(|o| o.cache_hit) {
        routing.insert(
            "(cache)".to_owned(),
            outcomes.iter().filter(|o| o.cache_hit).count(),
        );
    }
    Summary {
        name,
        n: outcomes.len(),
        p50_ms: pct(0.50),
        p95_ms: pct(0.95),
        error_rate: outcomes.iter().filter(|o| !o.ok).count() as f64 / n as f64,
        cost_per_1k: cost.as_dollars_f64() * 1_000.0 / n as f64,
        hit_rate: outcomes.iter().filter(|o| o.cache_hit).count() as f64 / n as f64,
        escalations: outcomes.iter().filter(|o| o.escalated).count(),
        routing,
    }
}

struct Progress {
    total: usize,
    shown: usize,
    label: &'static str,
}

impl Progress {
    fn tick(&mut self, done: usize) {
        let pct = done * 100 / self.total.max(1);
        if pct >= self.shown + 5 || done == self.total {
            self.shown = pct;
            let bar = "#".repeat(pct / 5) + &".".repeat(20 - pct / 5);
            eprint!("\r{:<9} [{bar}] {pct:>3}%", self.label);
            if done == self.total {
                eprintln!();
            }
        }
    }
}

async fn replay_naive(
    items: &[Item],
    context: Option<Arc<Context>>,
) -> tokenwise::Result<Vec<Outcome>> {
    let sim = Arc::new(PrefixCached::new(provider()?));
    let catalog = Catalog::builtin();
    let model = catalog.require("gpt-4o")?.clone();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(items.len());
    let mut progress = Progress {
        total: items.len(),
        shown: 0,
        label: "naive",
    };
    for (i, it) in items.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(it.t_ms)).await;
        let (sim, model, text) = (sim.clone(), model.clone(), it.text.clone());
        let context = context.clone();
        tasks.push(tokio::spawn(async move {
            let req = match &context {
                Some(c) => c.request(&text),
                None => ChatRequest::user_text(text),
            };
            let t0 = tokio::time::Instant::now();
            match sim.chat(ProviderCall::new(&req, &model)).await {
                Ok(r) => Outcome {
                    latency: t0.elapsed(),
                    ok: true,
                    cost: model.cost(&r.usage),
                    model: Some(r.model),
                    usage: r.usage,
                    ..Outcome::default()
                },
                Err(_) => Outcome {
                    latency: t0.elapsed(),
                    ..Outcome::default()
                },
            }
        }));
        progress.tick(i + 1);
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    Ok(out)
}

/// The default ladder: each capability tier's cheapest model first. Tier 1 opens on
/// `gpt-4.1-nano` (the same catalogue tier as `gpt-4o-mini`, at two thirds of its
/// price), with `gpt-4o-mini` as its fallback; `--weak` shows what escalating its weak
/// answers would cost.
const LADDER: &str = "gpt-4.1-nano,gpt-4o-mini,gpt-4.1-mini,gpt-4o,claude-sonnet-4-5";

async fn replay_pipeline(
    items: &[Item],
    context: Option<Arc<Context>>,
    ladder: &[String],
    weak: f64,
) -> tokenwise::Result<Vec<Outcome>> {
    let catalog = Catalog::builtin();
    let router = ComplexityRouter::new(&catalog, ladder)?;
    let first = ladder.first().map_or("", String::as_str);
    // documents are budgeted (1,000 tokens at most) and compressed; answers have a
    // default ceiling; history keeps the last 8 turns
    let budget = ContextBudget::default()
        .documents_max_tokens(1_000)
        .history_max_turns(8)
        .default_max_tokens(400)
        .compressor(Compressor::new());
    let pipe = Pipeline::builder()
        .provider(PrefixCached::new(provider()?).weak(first, weak))
        .cache(Arc::new(SemanticCache::builder().build()?))
        .context_budget(budget.clone())
        .router(Arc::new(router))
        .validator(Arc::new(WeakAnswer::default()))
        .rate_limit(ScopeKind::User, 20)
        .wait_for_limits(Duration::from_secs(5))
        .spend_cap(
            ScopeKind::Global,
            Cost::from_dollars(100),
            BudgetWindow::Day,
        )
        .build()?;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(items.len());
    let mut progress = Progress {
        total: items.len(),
        shown: 0,
        label: "pipeline",
    };
    for (i, it) in items.iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_millis(it.t_ms)).await;
        let pipe = pipe.clone();
        let req = match &context {
            Some(c) => c.request(&it.text),
            None => ChatRequest::user_text(it.text.clone()),
        };
        let req = req.user(it.user.clone()).tier(it.tier).org("acme");
        let budget = budget.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let asked = req.clone();
            match pipe.chat(req).await {
                Ok(r) => {
                    let spec = pipe.catalog().get(&r.model).cloned();
                    let (budget_cut, compression_cut) = spec
                        .as_deref()
                        .map_or((0, 0), |m| prompt_cuts(&budget, &asked, m));
                    let price = |tokens: u64| {
                        spec.as_deref()
                            .map_or(0, |m| m.pricing.input.cost_of(tokens).as_nanos())
                    };
                    Outcome {
                        latency: t0.elapsed(),
                        ok: true,
                        cost: r.cost,
                        cache_hit: r.served.is_cache_hit(),
                        escalated: matches!(
                            r.served,
                            Served::Provider {
                                escalated: true,
                                ..
                            }
                        ),
                        similarity: match r.served {
                            Served::Cache { similarity, .. } => similarity,
                            _ => 0.0,
                        },
                        usage: r.usage,
                        prompt_cache_saved: spec
                            .as_deref()
                            .map_or(0, |m| m.pricing.prompt_cache_saving(&r.usage)),
                        budget_cut,
                        compression_cut,
                        budget_saved: price(budget_cut),
                        compression_saved: price(compression_cut),
                        model: Some(r.model),
                    }
                }
                Err(_) => Outcome {
                    latency: t0.elapsed(),
                    ..Outcome::default()
                },
            }
        }));
        progress.tick(i + 1);
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    // each answer reports everything it was billed (escalations and hedges included),
    // so the answers add up to the usage records
    let total = pipe.usage().totals.cost;
    let counted: Cost = out.iter().map(|o| o.cost).sum();
    if total != counted {
        eprintln!(
            "warning: the usage records hold ${:.6}, the answers ${:.6}",
            total.as_dollars_f64(),
            counted.as_dollars_f64()
        );
    }
    Ok(out)
}

/// Prompt tokens `budget` cuts from `req` on `model`: by its section budgets, then by
/// its compressor.
fn prompt_cuts(
    budget: &ContextBudget,
    req: &ChatRequest,
    model: &tokenwise::ModelSpec,
) -> (u64, u64) {
    let counter = TiktokenCounter::new();
    let counts = CountCache::new(1_024);
    let whole = counter.count_request(req, model.tokenizer);
    let mut plain = budget.clone();
    plain.compressor = None;
    let fitted = |b: &ContextBudget| {
        b.fit(req, model, &counter, &counts)
            .map_or(whole, |f| f.prompt_tokens)
    };
    let budgeted = fitted(&plain).min(whole);
    let compressed = fitted(budget).min(budgeted);
    (whole - budgeted, budgeted - compressed)
}

/// What the pipeline's provider calls cost, by kind of question and answering model
/// (cache hits cost nothing and are left out; escalations count on the final model).
fn breakdown(items: &[Item], outcomes: &[Outcome]) -> String {
    let mut rows: BTreeMap<(&str, String), (usize, u64)> = BTreeMap::new();
    for (it, o) in items.iter().zip(outcomes) {
        if !o.ok || o.cache_hit {
            continue;
        }
        let kind = if it.text.contains("(context: team") {
            "hard question"
        } else if it.text.contains("order ") {
            "order question"
        } else {
            "other"
        };
        let row = rows
            .entry((kind, o.model.clone().unwrap_or_default()))
            .or_default();
        row.0 += 1;
        row.1 += o.cost.as_nanos();
    }
    let n = outcomes.len().max(1) as f64;
    let mut s = format!(
        "{:<16} {:<20} {:>8} {:>14}\n",
        "provider calls", "model", "answers", "$ per 1K req"
    );
    for ((kind, model), (count, nanos)) in rows {
        s.push_str(&format!(
            "{kind:<16} {model:<20} {count:>8} {:>14}\n",
            format!("${:.4}", nanos as f64 / 1e9 * 1_000.0 / n)
        ));
    }
    s
}

fn table(before: &Summary, after: &Summary) -> String {
    let mut s = String::new();
    let row = |s: &mut String, name: &str, a: String, b: String| {
        s.push_str(&format!("{name:<22} {a:>14} {b:>14}\n"));
    };
    row(&mut s, "", before.name.to_owned(), after.name.to_owned());
    row(
        &mut s,
        "requests",
        before.n.to_string(),
        after.n.to_string(),
    );
    row(
        &mut s,
        "p50 latency",
        format!("{:.0} ms", before.p50_ms),
        format!("{:.0} ms", after.p50_ms),
    );
    row(
        &mut s,
        "p95 latency",
        format!("{:.0} ms", before.p95_ms),
        format!("{:.0} ms", after.p95_ms),
    );
    row(
        &mut s,
        "error rate",
        format!("{:.2} %", before.error_rate * 100.0),
        format!("{:.2} %", after.error_rate * 100.0),
    );
    row(
        &mut s,
        "cost per 1K requests",
        format!("${:.4}", before.cost_per_1k),
        format!("${:.4}", after.cost_per_1k),
    );
    row(
        &mut s,
        "cache hit rate",
        format!("{:.1} %", before.hit_rate * 100.0),
        format!("{:.1} %", after.hit_rate * 100.0),
    );
    row(
        &mut s,
        "escalations",
        before.escalations.to_string(),
        after.escalations.to_string(),
    );
    for sum in [before, after] {
        s.push_str(&format!("routing ({}): ", sum.name));
        let n = sum.n.max(1) as f64;
        let parts: Vec<String> = sum
            .routing
            .iter()
            .map(|(m, c)| format!("{m} {:.1} %", *c as f64 * 100.0 / n))
            .collect();
        s.push_str(&parts.join(", "));
        s.push('\n');
    }
    s
}

fn bars(title: &str, unit: &str, values: &[(&str, f64)]) -> String {
    let max = values.iter().map(|v| v.1).fold(0.0, f64::max).max(1e-9);
    let mut svg = format!(
        "<h3>{title}</h3><svg width=\"560\" height=\"{}\">",
        values.len() * 34 + 10
    );
    for (i, (label, v)) in values.iter().enumerate() {
        let w = v / max * 360.0;
        let y = i * 34 + 5;
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{}\" font-size=\"13\">{label}</text><rect x=\"130\" y=\"{y}\" width=\"{w:.1}\" height=\"24\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\" font-size=\"13\">{v:.2} {unit}</text>",
            y + 17,
            if i % 2 == 0 { "#9aa5b1" } else { "#2f80ed" },
            136.0 + w,
            y + 17
        ));
    }
    svg.push_str("</svg>");
    svg
}

fn html(before: &Summary, after: &Summary, t: &Techniques) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokenwise replay</title><style>body{font-family:sans-serif;max-width:720px;margin:2em auto}pre{background:#f4f5f7;padding:1em}</style></head><body><h1>tokenwise replay: before and after</h1>",
    );
    h.push_str(&format!(
        "<pre>{}</pre>",
        table(before, after).replace('<', "&lt;")
    ));
    h.push_str(&format!(
        "<h3>saved by technique</h3><pre>{}</pre>",
        techniques_table(t, before, after)
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    ));
    let per_1k = |v: &Saving| v.nanos as f64 / 1e9 * 1_000.0 / t.n.max(1) as f64;
    let saved: Vec<(&str, f64)> = t.rows.iter().map(|(n, v)| (*n, per_1k(v))).collect();
    h.push_str(&bars(
        "dollars saved per 1K requests, by technique",
        "$",
        &saved,
    ));
    h.push_str(&bars(
        "p50 latency",
        "ms",
        &[(before.name, before.p50_ms), (after.name, after.p50_ms)],
    ));
    h.push_str(&bars(
        "p95 latency",
        "ms",
        &[(before.name, before.p95_ms), (after.name, after.p95_ms)],
    ));
    h.push_str(&bars(
        "cost per 1K requests",
        "$",
        &[
            (before.name, before.cost_per_1k),
            (after.name, after.cost_per_1k),
        ],
    ));
    h.push_str(&bars(
        "error rate",
        "%",
        &[
            (before.name, before.error_rate * 100.0),
            (after.name, after.error_rate * 100.0),
        ],
    ));
    let routing: Vec<(&str, f64)> = after
        .routing
        .iter()
        .map(|(m, c)| (m.as_str(), *c as f64 * 100.0 / after.n.max(1) as f64))
        .collect();
    h.push_str(&bars("routing split with tokenwise", "%", &routing));
    h.push_str("</body></html>\n");
    h
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let items = match arg(&args, "--workload") {
        Some(path) => {
            let text = std::fs::read_to_string(&path)?;
            let mut items = Vec::new();
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                items.push(
                    serde_json::from_str::<Item>(line)
                        .map_err(|e| format!("{path}:{}: {e}", n + 1))?,
                );
            }
            items.sort_by_key(|i| i.t_ms);
            items
        }
        None => {
            let n: usize = arg(&args, "--generate")
                .map(|s| s.parse())
                .transpose()?
                .unwrap_or(3_000);
            generate(
                n.clamp(1, 200_000),
                arg(&args, "--seed")
                    .map(|s| s.parse())
                    .transpose()?
                    .unwrap_or(42),
            )
        }
    };
    if let Some(path) = arg(&args, "--write-workload") {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
        for it in &items {
            writeln!(f, "{}", serde_json::to_string(it)?)?;
        }
        eprintln!("wrote {} requests to {path}", items.len());
    }
    let context = match args.iter().any(|a| a == "--context") {
        true => Some(Arc::new(Context::load()?)),
        false => None,
    };
    let ladder: Vec<String> = arg(&args, "--ladder")
        .unwrap_or_else(|| LADDER.to_owned())
        .split(',')
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    let weak: f64 = arg(&args, "--weak")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0.0);
    if !(0.0..=1.0).contains(&weak) {
        return Err(format!("--weak takes a share between 0 and 1, not {weak}").into());
    }
    let naive = replay_naive(&items, context.clone()).await?;
    let piped = replay_pipeline(&items, context, &ladder, weak).await?;
    let before = summarize("naive", &naive);
    let after = summarize("tokenwise", &piped);
    let saved = techniques(&naive, &piped);
    print!("{}", table(&before, &after));
    print!("{}", techniques_table(&saved, &before, &after));
    if args.iter().any(|a| a == "--breakdown") {
        print!("{}", breakdown(&items, &piped));
    }
    if let Some(path) = arg(&args, "--html") {
        std::fs::write(&path, html(&before, &after, &saved))?;
        println!("report written to {path}");
    }
    Ok(())
}
