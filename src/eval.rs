//! Golden-query evaluation: send a fixed set of queries through a pipeline, score the
//! answers, and report pass rate, cost and latency, for a check in CI before a
//! deployment (a new model, a new prompt, a new routing rule).
//!
//! A golden set is a JSON Lines file, one query per line:
//!
//! ```text
//! {"id": "refund-window", "prompt": "How long do I have to return an item?", "expect": {"contains": ["30 days"]}}
//! {"id": "greeting", "prompt": "Say hello", "model": "gpt-4o-mini", "expect": {"reference": "Hello! How can I help?", "min_similarity": 0.6}}
//! {"id": "order-json", "prompt": "Return order 7 as JSON", "expect": {"json": true, "max_cost_usd": 0.001}}
//! ```
//!
//! Each query may name a `system` prompt, a `model`, `max_tokens` and a `feature`, and
//! sets its checks under `expect` (all optional; a query with none passes when it is
//! answered at all):
//!
//! | check | passes when |
//! | --- | --- |
//! | `contains` | every listed text occurs in the answer (case and spacing ignored) |
//! | `not_contains` | none of the listed texts occurs |
//! | `equals` | the answer equals the text (case and spacing ignored) |
//! | `reference` | the answer's word-overlap F1 with the reference is at least `min_similarity` (default 0.8) |
//! | `json` | the answer (inside a ```` ``` ```` fence or not) is valid JSON |
//! | `max_cost_usd` | the query cost at most this much |
//! | `max_latency_ms` | the answer took at most this long |
//!
//! Validators ([`Validator`]) added to the [`Evaluator`] judge every answer too: a
//! [`Verdict::Escalate`] fails the query with its reason. Unknown fields are errors, so a
//! misspelt check never passes silently.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> tokenwise::Result<()> {
//! use tokenwise::eval::{Evaluator, GoldenSet};
//! use tokenwise::provider::SimulatedProvider;
//! use tokenwise::Pipeline;
//!
//! let pipeline = Pipeline::builder()
//!     .provider(SimulatedProvider::new())
//!     .default_model("gpt-4o-mini")
//!     .build()?;
//! let set = GoldenSet::from_jsonl(r#"
//!     {"id": "smoke", "prompt": "Are you there?"}
//!     {"id": "strict", "prompt": "Reply in JSON", "expect": {"json": true}}
//! "#)?;
//! let report = Evaluator::new().run(&pipeline, &set).await;
//! assert_eq!((report.passed(), report.total()), (1, 2));
//! assert!(!report.meets(0.9)); // a CI step would exit non-zero here
//! println!("{report}");
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::router::{Validator, Verdict};
use crate::types::{CacheMode, ChatRequest, Cost, Message, Usage};
use crate::{Error, Pipeline, Result};

/// The most queries one golden set holds.
pub const MAX_QUERIES: usize = 10_000;
/// The largest golden-set file [`GoldenSet::load`] reads.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The default `min_similarity` for `reference` checks.
pub const DEFAULT_MIN_SIMILARITY: f64 = 0.8;

/// What a golden query's answer must satisfy. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Expect {
    /// Texts that must all occur in the answer (case and spacing ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contains: Vec<String>,
    /// Texts that must not occur in the answer (case and spacing ignored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_contains: Vec<String>,
    /// The answer, exactly (case and spacing ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    /// A reference answer to compare against by word overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The least word-overlap F1 with `reference` that passes (0 to 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_similarity: Option<f64>,
    /// The answer must be valid JSON.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub json: bool,
    /// The most the query may cost, in dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// The longest the answer may take, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_ms: Option<u64>,
}

/// One golden query: a prompt and what its answer must satisfy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GoldenQuery {
    /// A unique, stable name for reports.
    pub id: String,
    /// The user's message.
    pub prompt: String,
    /// A system prompt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The model to ask (default: the pipeline's router decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The output token limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// The feature to attribute the query to (in usage records and limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// The checks.
    #[serde(default)]
    pub expect: Expect,
}

impl GoldenQuery {
    /// A query with no checks beyond being answered.
    pub fn new(id: impl Into<String>, prompt: impl Into<String>) -> Self {
        GoldenQuery {
            id: id.into(),
            prompt: prompt.into(),
            system: None,
            model: None,
            max_tokens: None,
            feature: None,
            expect: Expect::default(),
        }
    }

    /// The request this query sends, attributed to `user`.
    pub fn request(&self, user: &str, use_cache: bool) -> ChatRequest {
        let mut req = ChatRequest::new();
        if let Some(s) = &self.system {
            req = req.message(Message::system(s.clone()));
        }
        req = req.message(Message::user(self.prompt.clone())).user(user);
        if let Some(m) = &self.model {
            req = req.model(m.clone());
        }
        if let Some(n) = self.max_tokens {
            req = req.max_tokens(n);
        }
        if let Some(f) = &self.feature {
            req = req.feature(f.clone());
        }
        if !use_cache {
            req = req.cache_mode(CacheMode::Bypass);
        }
        req
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("a query needs a non-empty `id`".into());
        }
        if self.prompt.trim().is_empty() {
            return Err(format!("query `{}` has an empty `prompt`", self.id));
        }
        let e = &self.expect;
        if let Some(s) = e.min_similarity {
            if !(0.0..=1.0).contains(&s) {
                return Err(format!(
                    "query `{}`: min_similarity must be between 0 and 1, got {s}",
                    self.id
                ));
            }
            if e.reference.is_none() {
                return Err(format!(
                    "query `{}`: min_similarity needs a `reference`",
                    self.id
                ));
            }
        }
        if let Some(c) = e.max_cost_usd {
            if Cost::try_from_dollars_f64(c).is_none() {
                return Err(format!(
                    "query `{}`: max_cost_usd must be a non-negative amount, got {c}",
                    self.id
                ));
            }
        }
        Ok(())
    }
}

/// A validated set of golden queries: ids unique, prompts non-empty, at most
/// [`MAX_QUERIES`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GoldenSet {
    queries: Vec<GoldenQuery>,
}

impl GoldenSet {
    /// A set of `queries`, or the first problem with them.
    pub fn new(queries: Vec<GoldenQuery>) -> Result<Self> {
        if queries.len() > MAX_QUERIES {
            return Err(Error::Config(format!(
                "a golden set holds at most {MAX_QUERIES} queries, got {}",
                queries.len()
            )));
        }
        let mut ids = HashSet::with_capacity(queries.len());
        for q in &queries {
            q.check().map_err(Error::Config)?;
            if !ids.insert(q.id.as_str()) {
                return Err(Error::Config(format!(
                    "golden query id `{}` appears twice",
                    q.id
                )));
            }
        }
        Ok(GoldenSet { queries })
    }

    /// Parses JSON Lines: one query per line; blank lines and lines starting with `#`
    /// or `//` are skipped. Errors name the line.
    pub fn from_jsonl(text: &str) -> Result<Self> {
        let mut queries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
                continue;
            }
            if queries.len() == MAX_QUERIES {
                return Err(Error::Config(format!(
                    "a golden set holds at most {MAX_QUERIES} queries"
                )));
            }
            let q: GoldenQuery = serde_json::from_str(line)
                .map_err(|e| Error::Config(format!("golden set line {}: {e}", i + 1)))?;
            q.check()
                .map_err(|e| Error::Config(format!("golden set line {}: {e}", i + 1)))?;
            queries.push(q);
        }
        Self::new(queries)
    }

    /// Reads and parses a JSON Lines file of at most [`MAX_FILE_BYTES`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cannot = |e: std::io::Error| {
            Error::Config(format!("cannot read golden set {}: {e}", path.display()))
        };
        let file = std::fs::File::open(path).map_err(cannot)?;
        let mut text = String::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(cannot)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::Config(format!(
                "golden set {} is larger than {MAX_FILE_BYTES} bytes",
                path.display()
            )));
        }
        Self::from_jsonl(&text)
    }

    /// The queries, in file order.
    pub fn queries(&self) -> &[GoldenQuery] {
        &self.queries
    }

    /// How many queries.
    pub fn len(&self) -> usize {
        self.queries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }
}

/// How one golden query fared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueryResult {
    /// The query's id.
    pub id: String,
    /// Whether every check passed.
    pub passed: bool,
    /// What failed, one line each.
    pub failures: Vec<String>,
    /// The word-overlap F1 with the reference, if the query has one.
    pub similarity: Option<f64>,
    /// The model that answered.
    pub model: Option<String>,
    /// Tokens billed.
    pub usage: Usage,
    /// What the query cost.
    pub cost: Cost,
    /// How long it took.
    #[serde(rename = "latency_ns", with = "crate::observe::duration_ns")]
    pub latency: Duration,
    /// Whether the cache answered.
    pub cache_hit: bool,
    /// The error's reason, if the pipeline failed.
    pub error: Option<String>,
}

/// The outcome of a golden run. `Display` prints a summary, a line per query, and the
/// failures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EvalReport {
    /// One result per query, in the set's order.
    pub results: Vec<QueryResult>,
}

impl EvalReport {
    /// Queries run.
    pub fn total(&self) -> usize {
        self.results.len()
    }

    /// Queries that passed.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed).count()
    }

    /// Passed over total (0 for an empty run).
    pub fn pass_rate(&self) -> f64 {
        if self.results.is_empty() {
            0.0
        } else {
            self.passed() as f64 / self.total() as f64
        }
    }

    /// Whether the pass rate is at least `threshold` (0 to 1). An empty run never
    /// meets a threshold: a golden set that ran nothing proves nothing.
    pub fn meets(&self, threshold: f64) -> bool {
        !self.results.is_empty() && self.pass_rate() >= threshold
    }

    /// Total cost.
    pub fn cost(&self) -> Cost {
        self.results.iter().map(|r| r.cost).sum()
    }

    /// Total tokens billed.
    pub fn usage(&self) -> Usage {
        self.results.iter().fold(Usage::default(), |a, r| {
            Usage::new(
                a.input_tokens + r.usage.input_tokens,
                a.output_tokens + r.usage.output_tokens,
            )
        })
    }

    /// The latency below which `q` (0 to 1) of the queries fell (nearest rank).
    pub fn latency_quantile(&self, q: f64) -> Duration {
        let mut l: Vec<Duration> = self.results.iter().map(|r| r.latency).collect();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l.sort_unstable();
        let rank = (q.clamp(0.0, 1.0) * l.len() as f64).ceil() as usize;
        l[rank.clamp(1, l.len()) - 1]
    }

    /// The queries that failed.
    pub fn failures(&self) -> impl Iterator<Item = &QueryResult> {
        self.results.iter().filter(|r| !r.passed)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1_000.0)
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<6} {:<28} {:<20} {:>12} {:>10}  note",
            "result", "query", "model", "cost", "latency"
        )?;
        for r in &self.results {
            let note = match (&r.error, r.similarity) {
                (Some(e), _) => e.clone(),
                (None, Some(s)) => format!("similarity {s:.2}"),
                (None, None) => String::new(),
            };
            let id: String = r.id.chars().take(28).collect();
            let model: String = r.model.as_deref().unwrap_or("-").chars().take(20).collect();
            let line = format!(
                "{:<6} {:<28} {:<20} {:>12} {:>10}  {note}",
                if r.passed { "pass" } else { "FAIL" },
                id,
                model,
                r.cost.to_string(),
                ms(r.latency)
            );
            writeln!(f, "{}", line.trim_end())?;
        }
        let usage = self.usage();
        writeln!(
            f,
            "\n{} of {} golden queries passed ({:.1} %)",
            self.passed(),
            self.total(),
            self.pass_rate() * 100.0
        )?;
        writeln!(
            f,
            "cost {} ({} input and {} output tokens); latency p50 {}, p95 {}, max {}",
            self.cost(),
            usage.input_tokens,
            usage.output_tokens,
            ms(self.latency_quantile(0.5)),
            ms(self.latency_quantile(0.95)),
            ms(self.latency_quantile(1.0))
        )?;
        let mut failed = self.failures().peekable();
        if failed.peek().is_some() {
            writeln!(f, "\nfailures:")?;
            for r in failed {
                for why in &r.failures {
                    writeln!(f, "  {}: {why}", r.id)?;
                }
            }
        }
        Ok(())
    }
}

/// Runs golden sets through a pipeline. Cheap to clone.
///
/// By default it bypasses the cache (an evaluation should measure the models, not
/// yesterday's answers), runs four queries at a time, and attributes its requests to
/// the user `golden-eval`.
#[derive(Debug, Clone)]
#[must_use]
pub struct Evaluator {
    validators: Vec<Arc<dyn Validator>>,
    concurrency: usize,
    use_cache: bool,
    user: String,
    min_similarity: f64,
}

impl Default for Evaluator {
    fn default() -> Self {
        Evaluator {
            validators: Vec::new(),
            concurrency: 4,
            use_cache: false,
            user: "golden-eval".into(),
            min_similarity: DEFAULT_MIN_SIMILARITY,
        }
    }
}

/// The most queries an evaluator runs at once.
pub const MAX_CONCURRENCY: usize = 64;

impl Evaluator {
    /// An evaluator with the defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also judges every answer with `validator`.
    pub fn validator(mut self, validator: Arc<dyn Validator>) -> Self {
        self.validators.push(validator);
        self
    }

    /// Runs up to `n` queries at once (1 to [`MAX_CONCURRENCY`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.clamp(1, MAX_CONCURRENCY);
        self
    }

    /// Lets cached answers count (default: the cache is bypassed).
    pub fn use_cache(mut self, yes: bool) -> Self {
        self.use_cache = yes;
        self
    }

    /// The user the evaluation's requests are attributed to.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = user.into();
        self
    }

    /// The `min_similarity` for `reference` checks that set none (clamped to 0..=1).
    pub fn min_similarity(mut self, s: f64) -> Self {
        self.min_similarity = if s.is_nan() {
            DEFAULT_MIN_SIMILARITY
        } else {
            s.clamp(0.0, 1.0)
        };
        self
    }

    /// Runs every query of `set` and scores the answers.
    pub async fn run(&self, pipeline: &Pipeline, set: &GoldenSet) -> EvalReport {
        let results = futures_util::stream::iter(set.queries())
            .map(|q| self.run_one(pipeline, q))
            .buffered(self.concurrency)
            .collect()
            .await;
        EvalReport { results }
    }

    /// Runs one query and scores its answer.
    pub async fn run_one(&self, pipeline: &Pipeline, q: &GoldenQuery) -> QueryResult {
        let req = q.request(&self.user, self.use_cache);
        let started = tokio::time::Instant::now();
        let answered = pipeline.chat(req.clone()).await;
        let latency = started.elapsed();
        let mut result = QueryResult {
            id: q.id.clone(),
            passed: false,
            failures: Vec::new(),
            similarity: None,
            model: None,
            usage: Usage::default(),
            cost: Cost::ZERO,
            latency,
            cache_hit: false,
            error: None,
        };
        let answer = match answered {
            Ok(a) => a,
            Err(e) => {
                result.error = Some(e.reason().to_owned());
                result.failures.push(format!("no answer: {e}"));
                return result;
            }
        };
        result.model = Some(answer.model.clone());
        result.usage = answer.usage;
        result.cost = answer.cost;
        result.cache_hit = answer.served.is_cache_hit();
        let e = &q.expect;
        let text = normalize(&answer.content);
        for needle in &e.contains {
            if !text.contains(&normalize(needle)) {
                result.failures.push(format!("answer lacks {needle:?}"));
            }
        }
        for needle in &e.not_contains {
            if text.contains(&normalize(needle)) {
                result.failures.push(format!("answer contains {needle:?}"));
            }
        }
        if let Some(want) = &e.equals {
            if text != normalize(want) {
                result.failures.push("answer differs from `equals`".into());
            }
        }
        if let Some(reference) = &e.reference {
            let s = similarity(&answer.content, reference);
            result.similarity = Some(s);
            let min = e.min_similarity.unwrap_or(self.min_similarity);
            if s < min {
                result.failures.push(format!(
                    "similarity {s:.2} to the reference is under {min:.2}"
                ));
            }
        }
        if e.json && !is_json(&answer.content) {
            result.failures.push("answer is not valid JSON".into());
        }
        if let Some(max) = e.max_cost_usd.and_then(Cost::try_from_dollars_f64) {
            if answer.cost > max {
                result
                    .failures
                    .push(format!("cost {} is over {max}", answer.cost));
            }
        }
        if let Some(max) = e.max_latency_ms {
            if latency > Duration::from_millis(max) {
                result
                    .failures
                    .push(format!("latency {} is over {max} ms", ms(latency)));
            }
        }
        for v in &self.validators {
            if let Verdict::Escalate(why) = v.validate(&req, &answer).await {
                result.failures.push(format!("validator: {why}"));
            }
        }
        result.passed = result.failures.is_empty();
        result
    }
}

/// Lowercase with runs of whitespace made one space.
fn normalize(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn words(s: &str) -> HashMap<String, u32> {
    let mut m = HashMap::new();
    for w in s
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *m.entry(w.to_lowercase()).or_insert(0) += 1;
    }
    m
}

/// Word-overlap F1 between `answer` and `reference` (1.0 for two empty texts).
pub fn similarity(answer: &str, reference: &str) -> f64 {
    let (a, r) = (words(answer), words(reference));
    let (na, nr): (u32, u32) = (a.values().sum(), r.values().sum());
    if na == 0 && nr == 0 {
        return 1.0;
    }
    if na == 0 || nr == 0 {
        return 0.0;
    }
    let common: u32 = a
        .iter()
        .map(|(w, n)| (*n).min(r.get(w).copied().unwrap_or(0)))
        .sum();
    if common == 0 {
        return 0.0;
    }
    let p = f64::from(common) / f64::from(na);
    let rc = f64::from(common) / f64::from(nr);
    2.0 * p * rc / (p + rc)
}

/// Whether `s` is JSON, bare or in a Markdown code fence.
fn is_json(s: &str) -> bool {
    let t = s.trim();
    let t = match t.strip_prefix("```") {
        Some(rest) => {
            let body = rest.split_once('\n').map_or("", |(_, b)| b);
            body.trim_end().strip_suffix("```").unwrap_or(body)
        }
        None => t,
    };
    serde_json::from_str::<serde_json::Value>(t.trim()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoring_helpers() {
        assert_eq!(similarity("the cat sat", "The cat sat."), 1.0);
        assert_eq!(similarity("", ""), 1.0);
        assert_eq!(similarity("dog", "cat"), 0.0);
        let s = similarity("the cat sat on the mat", "the cat sat");
        assert!((s - 2.0 * 0.5 * 1.0 / 1.5).abs() < 1e-9, "{s}");
        assert!(is_json(r#"{"a": 1}"#));
        assert!(is_json("```json\n{\"a\": [1, 2]}\n```"));
        assert!(!is_json("the answer is 42"));
        assert_eq!(normalize("  Thirty\n DAYS "), "thirty days");
    }

    #[test]
    fn bad_sets_are_refused_with_the_line() {
        let e =
            GoldenSet::from_jsonl("{\"id\":\"a\",\"prompt\":\"x\"}\n{\"id\":\"b\"}").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = GoldenSet::from_jsonl(r#"{"id":"a","prompt":"x","expect":{"contain":["y"]}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = GoldenSet::from_jsonl(
            "{\"id\":\"a\",\"prompt\":\"x\"}\n# comment\n{\"id\":\"a\",\"prompt\":\"y\"}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = GoldenSet::from_jsonl(
            r#"{"id":"a","prompt":"x","expect":{"reference":"r","min_similarity":2}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("between 0 and 1"), "{e}");
        assert!(GoldenSet::load("/no/such/golden.jsonl").is_err());
    }

    #[test]
    fn quantiles_and_thresholds() {
        let mut report = EvalReport::default();
        assert!(!report.meets(0.0), "an empty run proves nothing");
        for (i, passed) in [true, true, true, false].into_iter().enumerate() {
            report.results.push(QueryResult {
                id: format!("q{i}"),
                passed,
                failures: Vec::new(),
                similarity: None,
                model: None,
                usage: Usage::new(10, 5),
                cost: Cost::from_nanos(100),
                latency: Duration::from_millis(100 * (i as u64 + 1)),
                cache_hit: false,
                error: None,
            });
        }
        assert_eq!(report.pass_rate(), 0.75);
        assert!(report.meets(0.75) && !report.meets(0.76));
        assert_eq!(report.cost(), Cost::from_nanos(400));
        assert_eq!(report.latency_quantile(0.5), Duration::from_millis(200));
        assert_eq!(report.latency_quantile(1.0), Duration::from_millis(400));
        assert_eq!(report.usage().total(), 60);
    }
}
