//! What the gateway serves and how: its upstreams, the models each serves, fallback
//! chains, rate limits, spend caps and timeouts, from a TOML file (`--config`) or from
//! the command line (`--upstream`, `--catalog`, `--fallback`). See `docs/gateway.md`
//! and `examples/gateway.toml`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokenwise::budget::BudgetWindow;
use tokenwise::limiter::GcraLimiter;
use tokenwise::provider::{
    ANTHROPIC_BASE_URL, Anthropic, ApiKey, OPENAI_BASE_URL, OpenAiCompatible, Provider,
    SimulatedProvider,
};
use tokenwise::resilience::{ConcurrencyConfig, RetryPolicy};
use tokenwise::{Catalog, Cost, ModelSpec, Pipeline, ScopeKind};

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The port on 127.0.0.1 (the command line's `--port` wins).
    pub port: Option<u16>,
    /// Busy polling after each request, in microseconds (0 or absent: off; the command
    /// line's `--busy-poll-us` wins). See `docs/gateway.md`.
    pub busy_poll_us: Option<u64>,
    /// The model for requests that name none or `auto`.
    pub default_model: Option<String>,
    /// The gateway's own client keys (the command line's `--keys` wins).
    pub keys_file: Option<String>,
    /// Upstreams by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// The models served: each names its upstream; a catalogue model needs nothing
    /// more, another needs its limits and prices (the catalogue's fields).
    #[serde(default)]
    pub models: Vec<toml::Table>,
    /// Fallback chains: model → the models to try, in order, when it fails.
    #[serde(default)]
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Rate limits.
    #[serde(default)]
    pub limits: RateLimits,
    /// Spend caps.
    #[serde(default)]
    pub spend_caps: SpendCaps,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retries on the same model before its fallbacks.
    #[serde(default)]
    pub retry: Retry,
}

/// Retries on the same model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts per model, the first included (default 3; 1 for none).
    pub attempts: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 3 }
    }
}

/// Which API an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamKind {
    /// The OpenAI chat completions API (OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, ...).
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

/// One upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The API it speaks.
    pub kind: UpstreamKind,
    /// Its base URL (default: OpenAI's or Anthropic's).
    pub base_url: Option<String>,
    /// The environment variable holding its API key (required for Anthropic).
    pub key_env: Option<String>,
    /// Requests a minute per key, the upstream's own per-key limit.
    pub key_rpm: Option<u64>,
    /// Tokens a minute per key.
    pub key_tpm: Option<u64>,
    /// The longest Retry-After honoured, in seconds (default 300).
    pub max_retry_after_secs: Option<u64>,
}

/// The gateway's rate limits; 0 turns one off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Requests a minute per user (default 60).
    pub user_rpm: u64,
    /// Tokens a minute per organisation (default 400,000).
    pub org_tpm: u64,
    /// Requests a minute in all (default 6,000).
    pub global_rpm: u64,
    /// The share of the per-user and per-org rates `free` keys get (default 0.5).
    pub free_multiplier: f64,
    /// The share `premium` keys get (default 2).
    pub premium_multiplier: f64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            user_rpm: 60,
            org_tpm: 400_000,
            global_rpm: 6_000,
            free_multiplier: 0.5,
            premium_multiplier: 2.0,
        }
    }
}

/// Daily spend caps in US cents; 0 turns one off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpendCaps {
    /// Per user and day (default 100, a dollar).
    pub user_cents_per_day: u64,
    /// Per organisation and day (default 2,000, twenty dollars).
    pub org_cents_per_day: u64,
}

impl Default for SpendCaps {
    fn default() -> Self {
        SpendCaps {
            user_cents_per_day: 100,
            org_cents_per_day: 2_000,
        }
    }
}

/// Timeouts in seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// One attempt on one upstream (default 120).
    pub attempt_secs: u64,
    /// A stream's first token (default 30).
    pub first_token_secs: u64,
    /// The longest silence inside a stream (default 30).
    pub idle_secs: u64,
    /// The whole request, retries and fallbacks included (default: none).
    pub request_secs: Option<u64>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            attempt_secs: 120,
            first_token_secs: 30,
            idle_secs: 30,
            request_secs: None,
        }
    }
}

impl GatewayConfig {
    /// Parses a configuration file's text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        Self::from_toml(&text).map_err(|e| format!("{path}: {e}"))
    }
}

/// Where upstream keys come from: the environment, or (in tests) a table.
pub trait KeySource {
    /// The value of `var`, if set and not blank.
    fn key(&self, var: &str) -> Option<String>;
}

/// Keys from the process environment.
#[derive(Debug, Clone, Copy)]
pub struct Env;

impl KeySource for Env {
    fn key(&self, var: &str) -> Option<String> {
        ApiKey::from_env(var).map(|k| k.expose_secret().to_owned())
    }
}

impl KeySource for BTreeMap<String, String> {
    fn key(&self, var: &str) -> Option<String> {
        self.get(var).filter(|v| !v.trim().is_empty()).cloned()
    }
}

/// One upstream, built.
#[derive(Debug)]
pub struct Upstream {
    /// Its name, as the served models' `provider` field says.
    pub name: String,
    /// Where it is, for the startup lines (no credentials).
    pub shown: String,
    /// The provider.
    pub provider: Arc<dyn Provider>,
}

/// What the gateway serves, ready to become a pipeline.
#[derive(Debug)]
pub struct Plan {
    /// The served models only: `/v1/models` lists these.
    pub catalog: Catalog,
    /// The upstreams by name; empty for the simulated provider.
    pub upstreams: Vec<Upstream>,
    /// The model for requests that name none.
    pub default_model: String,
    /// Fallback chains.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Rate limits.
    pub limits: RateLimits,
    /// Spend caps.
    pub spend_caps: SpendCaps,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries.
    pub retry: Retry,
    /// Upstream keys, kept out of every answer and log line.
    pub secrets: Vec<String>,
    /// Environment variables named for keys but not set (allowed only by `--check`).
    pub missing_keys: Vec<String>,
}

fn upstream_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A URL without its credentials, for printing.
pub fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Err(_) => "an unparsable URL".to_owned(),
    }
}

fn build_upstream(
    name: &str,
    up: &UpstreamConfig,
    keys: &dyn KeySource,
    allow_missing_keys: bool,
    client: Option<&reqwest::Client>,
    plan_secrets: &mut Vec<String>,
    missing: &mut Vec<String>,
) -> Result<Upstream, String> {
    let key = match &up.key_env {
        Some(var) => match keys.key(var) {
            Some(k) => {
                plan_secrets.push(k.trim().to_owned());
                Some(k.trim().to_owned())
            }
            None if allow_missing_keys => {
                missing.push(var.clone());
                // A stand-in so that the rest can be checked.
                Some("unset-key-for-the-check".to_owned())
            }
            None => return Err(format!("upstream `{name}`: ${var} is not set")),
        },
        None if up.kind == UpstreamKind::Anthropic => {
            return Err(format!("upstream `{name}`: Anthropic needs `key_env`"));
        }
        None => None,
    };
    let retry_cap = Duration::from_secs(up.max_retry_after_secs.unwrap_or(300));
    let err = |e: tokenwise::Error| format!("upstream `{name}`: {e}");
    let (provider, url): (Arc<dyn Provider>, String) = match up.kind {
        UpstreamKind::Openai => {
            let url = up
                .base_url
                .clone()
                .unwrap_or_else(|| OPENAI_BASE_URL.into());
            let mut b = OpenAiCompatible::builder()
                .name(name)
                .base_url(url.as_str())
                .max_retry_after(retry_cap);
            if let Some(c) = client {
                b = b.http_client(c.clone());
            }
            if let Some(k) = key {
                b = b.api_key(k).key_limits(up.key_rpm, up.key_tpm);
            } else if up.key_rpm.is_some() || up.key_tpm.is_some() {
                return Err(format!("upstream `{name}`: key limits need `key_env`"));
            }
            (Arc::new(b.build().map_err(err)?), url)
        }
        UpstreamKind::Anthropic => {
            let url = up
                .base_url
                .clone()
                .unwrap_or_else(|| ANTHROPIC_BASE_URL.into());
            let mut b = Anthropic::builder()
                .name(name)
                .base_url(url.as_str())
                .max_retry_after(retry_cap);
            if let Some(c) = client {
                b = b.http_client(c.clone());
            }
            if let Some(k) = key {
                b = b.api_key(k).key_limits(up.key_rpm, up.key_tpm);
            }
            (Arc::new(b.build().map_err(err)?), url)
        }
    };
    Ok(Upstream {
        name: name.to_owned(),
        shown: shown_url(&url),
        provider,
    })
}

/// The spec of a served model: the base catalogue's entry (if any) overlaid with the
/// entry's own fields, its provider set to its upstream.
fn served_model(base: &Catalog, entry: &toml::Table) -> Result<ModelSpec, String> {
    let name = entry
        .get("name")
        .and_then(toml::Value::as_str)
        .ok_or("a [[models]] entry needs a `name`")?;
    let upstream = entry
        .get("upstream")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| format!("model `{name}` needs an `upstream`"))?;
    if entry.contains_key("provider") {
        return Err(format!(
            "model `{name}`: say `upstream`, not `provider`, in the gateway's file"
        ));
    }
    let mut table = match base.get(name) {
        Some(spec) => toml::Table::try_from(&**spec).map_err(|e| e.to_string())?,
        None => toml::Table::new(),
    };
    for (k, v) in entry {
        if k != "upstream" {
            table.insert(k.clone(), v.clone());
        }
    }
    table.insert("provider".into(), toml::Value::String(upstream.to_owned()));
    toml::Value::Table(table).try_into().map_err(|e| {
        format!("model `{name}`: {e} (a model not in the catalogue needs its limits and prices)")
    })
}

/// Adds `--fallback PRIMARY=FALLBACK` pairs to `chains`.
pub fn add_fallbacks(
    chains: &mut BTreeMap<String, Vec<String>>,
    pairs: &[String],
) -> Result<(), String> {
    for pair in pairs {
        let (a, b) = pair
            .split_once('=')
            .filter(|(a, b)| !a.trim().is_empty() && !b.trim().is_empty())
            .ok_or_else(|| format!("--fallback {pair}: expected PRIMARY=FALLBACK"))?;
        let chain = chains.entry(a.trim().to_owned()).or_default();
        if !chain.iter().any(|m| m == b.trim()) {
            chain.push(b.trim().to_owned());
        }
    }
    Ok(())
}

impl Plan {
    /// The plan of a configuration file, over `base` (the built-in catalogue plus any
    /// `--catalog`), with `--fallback` pairs added. `allow_missing_keys` (for
    /// `--check`) notes unset key variables instead of failing. `client`, if given, is
    /// the HTTP client every upstream uses.
    pub fn from_config(
        cfg: &GatewayConfig,
        base: &Catalog,
        fallbacks: &[String],
        keys: &dyn KeySource,
        allow_missing_keys: bool,
        client: Option<&reqwest::Client>,
    ) -> Result<Plan, String> {
        if cfg.upstreams.is_empty() {
            return Err("the configuration names no [upstreams]".into());
        }
        let mut secrets = Vec::new();
        let mut missing = Vec::new();
        let mut upstreams = Vec::new();
        for (name, up) in &cfg.upstreams {
            if !upstream_name_ok(name) {
                return Err(format!(
                    "upstream name `{name}`: use letters, digits, `-` and `_`"
                ));
            }
            upstreams.push(build_upstream(
                name,
                up,
                keys,
                allow_missing_keys,
                client,
                &mut secrets,
                &mut missing,
            )?);
        }
        if cfg.models.is_empty() {
            return Err("the configuration serves no [[models]]".into());
        }
        let mut catalog = Catalog::empty();
        for entry in &cfg.models {
            let spec = served_model(base, entry)?;
            if !cfg.upstreams.contains_key(&spec.provider) {
                return Err(format!(
                    "model `{}`: no upstream named `{}`",
                    spec.name, spec.provider
                ));
            }
            if catalog.get(&spec.name).is_some() {
                return Err(format!("model `{}` is listed twice", spec.name));
            }
            catalog = catalog.with_model(spec).map_err(|e| e.to_string())?;
        }
        let mut chains = cfg.fallbacks.clone();
        add_fallbacks(&mut chains, fallbacks)?;
        let default_model = match &cfg.default_model {
            Some(m) => m.clone(),
            None => {
                let mut names: Vec<&str> = catalog.models().map(|m| m.name.as_str()).collect();
                names.sort_unstable();
                names.first().map(|s| (*s).to_owned()).unwrap_or_default()
            }
        };
        let plan = Plan {
            catalog,
            upstreams,
            default_model,
            fallbacks: chains,
            limits: cfg.limits.clone(),
            spend_caps: cfg.spend_caps.clone(),
            timeouts: cfg.timeouts.clone(),
            retry: cfg.retry.clone(),
            secrets,
            missing_keys: missing,
        };
        plan.check()?;
        Ok(plan)
    }

    /// The plan of the command line alone: one OpenAI-compatible upstream named
    /// `openai` serving the catalogue's `openai` models, or (with no upstream) the
    /// offline simulated provider serving every model.
    pub fn from_options(
        base: &Catalog,
        upstream: Option<&str>,
        upstream_key: Option<String>,
        default_model: &str,
        fallbacks: &[String],
    ) -> Result<Plan, String> {
        let mut chains = BTreeMap::new();
        let mut secrets = Vec::new();
        let (catalog, upstreams) = match upstream {
            Some(url) => {
                let mut b = OpenAiCompatible::builder().base_url(url);
                if let Some(k) = upstream_key {
                    b = b.api_key(k.as_str());
                    secrets.push(k);
                }
                let provider: Arc<dyn Provider> = Arc::new(b.build().map_err(|e| e.to_string())?);
                let mut served = Catalog::empty();
                for m in base.models().filter(|m| m.provider == "openai") {
                    served = served
                        .with_model((**m).clone())
                        .map_err(|e| e.to_string())?;
                }
                let up = Upstream {
                    name: "openai".into(),
                    shown: shown_url(url),
                    provider,
                };
                (served, vec![up])
            }
            None => {
                // The demo's fallback, on the simulated provider.
                chains.insert("gpt-4o-mini".into(), vec!["claude-haiku-4-5".into()]);
                (base.clone(), Vec::new())
            }
        };
        add_fallbacks(&mut chains, fallbacks)?;
        let plan = Plan {
            catalog,
            upstreams,
            default_model: default_model.to_owned(),
            fallbacks: chains,
            limits: RateLimits::default(),
            spend_caps: SpendCaps::default(),
            timeouts: Timeouts::default(),
            retry: Retry::default(),
            secrets,
            missing_keys: Vec::new(),
        };
        plan.check()?;
        Ok(plan)
    }

    /// Every model named (default, fallbacks) is served.
    fn check(&self) -> Result<(), String> {
        let served = |m: &str| self.catalog.get(m).is_some();
        if !served(&self.default_model) {
            return Err(format!(
                "the default model `{}` is not served",
                self.default_model
            ));
        }
        for (primary, chain) in &self.fallbacks {
            for m in std::iter::once(primary).chain(chain) {
                if !served(m) {
                    return Err(format!(
                        "fallback chain of `{primary}`: model `{m}` is not served"
                    ));
                }
            }
        }
        let f = &self.limits;
        for (what, m) in [
            ("free_multiplier", f.free_multiplier),
            ("premium_multiplier", f.premium_multiplier),
        ] {
            if !(m.is_finite() && m > 0.0) {
                return Err(format!("limits.{what} must be a positive number"));
            }
        }
        if !(1..=10).contains(&self.retry.attempts) {
            return Err("retry.attempts must be from 1 to 10".into());
        }
        let t = &self.timeouts;
        if t.attempt_secs == 0 || t.first_token_secs == 0 || t.idle_secs == 0 {
            return Err("timeouts must be at least 1 second".into());
        }
        Ok(())
    }

    /// The pipeline: each served model goes to the upstream its entry names.
    pub fn pipeline(&self) -> Result<Pipeline, String> {
        let err = |e: tokenwise::Error| e.to_string();
        let l = &self.limits;
        let mut limiter = GcraLimiter::builder();
        let mut any = false;
        for (n, scope, tokens) in [
            (l.user_rpm, ScopeKind::User, false),
            (l.org_tpm, ScopeKind::Org, true),
            (l.global_rpm, ScopeKind::Global, false),
        ] {
            if n > 0 {
                any = true;
                limiter = if tokens {
                    limiter.tokens_per_minute(scope, n)
                } else {
                    limiter.requests_per_minute(scope, n)
                };
            }
        }
        let mut b = Pipeline::builder()
            .catalog(self.catalog.clone())
            .default_model(&self.default_model)
            // 256 in flight, 16 per user; when full, requests wait up to 2 s in a
            // queue per priority (premium keys first, free keys last), then get 503.
            .concurrency(ConcurrencyConfig {
                initial: 256,
                min: 256,
                max: 256,
                adaptive: false,
                queue_per_priority: 64,
                max_queue_wait: Duration::from_secs(2),
                per_key: Some((ScopeKind::User, 16)),
                ..ConcurrencyConfig::default()
            })
            .attempt_timeout(Duration::from_secs(self.timeouts.attempt_secs))
            .first_token_timeout(Duration::from_secs(self.timeouts.first_token_secs))
            .idle_timeout(Duration::from_secs(self.timeouts.idle_secs));
        if any {
            let limiter = limiter
                .free_multiplier(l.free_multiplier)
                .premium_multiplier(l.premium_multiplier)
                .build()
                .map_err(err)?;
            b = b.limiter(Arc::new(limiter));
        }
        b = b.retry(RetryPolicy {
            max_attempts: self.retry.attempts,
            ..RetryPolicy::default()
        });
        if let Some(s) = self.timeouts.request_secs {
            b = b.request_timeout(Duration::from_secs(s));
        }
        let caps = &self.spend_caps;
        if caps.user_cents_per_day > 0 {
            b = b.spend_cap(
                ScopeKind::User,
                Cost::from_cents(caps.user_cents_per_day),
                BudgetWindow::Day,
            );
        }
        if caps.org_cents_per_day > 0 {
            b = b.spend_cap(
                ScopeKind::Org,
                Cost::from_cents(caps.org_cents_per_day),
                BudgetWindow::Day,
            );
        }
        if self.upstreams.is_empty() {
            let sim = SimulatedProvider::builder()
                .time_to_first_token(Duration::from_millis(150))
                .per_token(Duration::from_millis(15))
                .build()
                .map_err(err)?;
            b = b.provider(sim);
        }
        for up in &self.upstreams {
            b = b.provider_for(up.name.as_str(), Arc::clone(&up.provider));
        }
        for (primary, chain) in &self.fallbacks {
            b = b.fallbacks(primary.as_str(), chain.iter().map(String::as_str));
        }
        b.build().map_err(err)
    }

    /// The lines printed at startup: upstreams, models, fallbacks, and the limits,
    /// caps and timeouts in force.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.upstreams.is_empty() {
            let _ = writeln!(s, "upstream: the simulated provider (offline)");
        }
        for up in &self.upstreams {
            let mut models: Vec<&str> = self
                .catalog
                .models()
                .filter(|m| m.provider == up.name)
                .map(|m| m.name.as_str())
                .collect();
            models.sort_unstable();
            let _ = writeln!(
                s,
                "upstream {}: {} serving {}",
                up.name,
                up.shown,
                if models.is_empty() {
                    "no model".to_owned()
                } else {
                    models.join(", ")
                }
            );
        }
        let _ = writeln!(s, "default model: {}", self.default_model);
        for (primary, chain) in &self.fallbacks {
            let _ = writeln!(s, "fallbacks: {primary} -> {}", chain.join(" -> "));
        }
        let l = &self.limits;
        let rate = |n: u64, what: &str| {
            if n == 0 {
                format!("no {what} limit")
            } else {
                format!("{n} {what}")
            }
        };
        let _ = writeln!(
            s,
            "rate limits: {}, {}, {} (free keys x{}, premium keys x{})",
            rate(l.user_rpm, "requests/min per user"),
            rate(l.org_tpm, "tokens/min per org"),
            rate(l.global_rpm, "requests/min in all"),
            l.free_multiplier,
            l.premium_multiplier
        );
        let cap = |c: u64, who: &str| {
            if c == 0 {
                format!("none per {who}")
            } else {
                format!("${}.{:02}/day per {who}", c / 100, c % 100)
            }
        };
        let _ = writeln!(
            s,
            "spend caps: {}, {}",
            cap(self.spend_caps.user_cents_per_day, "user"),
            cap(self.spend_caps.org_cents_per_day, "org")
        );
        let t = &self.timeouts;
        let _ = writeln!(
            s,
            "timeouts: attempt {} s, first token {} s, idle {} s, request {}",
            t.attempt_secs,
            t.first_token_secs,
            t.idle_secs,
            t.request_secs
                .map_or_else(|| "unlimited".to_owned(), |r| format!("{r} s"))
        );
        let _ = writeln!(
            s,
            "retries: {} attempt(s) per model before its fallbacks",
            self.retry.attempts
        );
        let _ = write!(
            s,
            "in flight: 256 at most, 16 per user, 64 more queued per priority for up to 2 s"
        );
        for var in &self.missing_keys {
            let _ = write!(s, "\nnote: ${var} is not set (needed to serve)");
        }
        s
    }
}
