//! An OpenAI-compatible gateway: any OpenAI client (curl, the official SDKs, LangChain,
//! ...) talks to tokenwise as if it were OpenAI, and every call goes through a pipeline
//! with caching, per-user rate limits, spend caps, load shedding and fallbacks.
//!
//! ```text
//! cargo run --example gateway                                # simulated upstream, port 8080
//! cargo run --example gateway -- --port 0 --self-check       # drive itself once and exit (CI)
//! OPENAI_API_KEY=sk-... cargo run --example gateway -- --upstream https://api.openai.com/v1
//! cargo run --example gateway -- --config examples/gateway.toml --check   # check a file
//! ```
//!
//! Options:
//! - `--config FILE`: a TOML file naming the upstreams (OpenAI-compatible servers and
//!   Anthropic, each with the environment variable of its key), the models each serves,
//!   fallback chains, rate limits, spend caps, timeouts and the gateway's keys file; see
//!   `examples/gateway.toml`. Not with `--upstream`.
//! - `--check`: read and check everything (the configuration, the keys, the pipeline),
//!   print what would be served and the limits in force, and exit without serving.
//! - `--port N`: the port on 127.0.0.1 (default 8080; 0 for any free port).
//! - `--upstream URL`: an OpenAI-compatible base URL (up to and including `/v1`) instead
//!   of the offline simulated provider; the key comes from `OPENAI_API_KEY`, if set, and
//!   never leaves the gateway. It serves the catalogue's `openai` models.
//! - `--model NAME`: the model for requests that name none or `auto` (default
//!   `gpt-4o-mini`, or the configuration's `default_model`).
//! - `--catalog FILE`: TOML model entries merged into the built-in catalogue (for an
//!   upstream serving models the catalogue does not list, with their prices).
//! - `--fallback PRIMARY=FALLBACK`: when PRIMARY fails, try FALLBACK (repeatable; several
//!   for one primary are tried in the order given).
//! - `--keys FILE`: the gateway's API keys, TOML (`.toml`) or JSON; else the
//!   configuration's `keys_file`; else JSON from `TOKENWISE_GATEWAY_KEYS`; else the
//!   built-in demo keys.
//! - `--serve-for SECS`: stop by itself after SECS seconds.
//! - `--workers N`: the runtime's worker threads (default 2, or 1 with busy polling); 1 runs the gateway on a
//!   single-threaded runtime, which spares it the wake-ups between workers (each
//!   request wakes the idle worker once) at the price of one core at most.
//! - `--busy-poll-us N`: after each request starts or finishes, keep polling the sockets
//!   for N microseconds before the runtime may sleep (default off, or the
//!   configuration's `busy_poll_us`; at most 10,000): lower latency where waking an idle
//!   CPU is slow, for up to N microseconds of CPU time after each request while traffic
//!   is sparse. It runs the gateway on one thread (`--workers` above 1 is refused).
//! - `--self-check`: once serving, send a whole request, a streamed one and a model
//!   list to itself over loopback, check the answers' shapes, and exit (non-zero on a
//!   failure) unless `--serve-for` says to keep serving.
//!
//! See `docs/gateway.md` for the status codes, headers and limits.

#[path = "gateway/mod.rs"]
mod gateway;

use std::sync::Arc;
use std::time::Duration;

use gateway::config::{Env, GatewayConfig, Plan};
use gateway::{Gateway, KeyTable, Limits, keys};
use tokenwise::Catalog;

struct Options {
    port: Option<u16>,
    config: Option<String>,
    check: bool,
    upstream: Option<String>,
    model: Option<String>,
    catalog: Option<String>,
    fallbacks: Vec<String>,
    keys: Option<String>,
    serve_for: Option<Duration>,
    self_check: bool,
    /// As given; the default (2, or 1 with busy polling) is settled by `threads`.
    workers: Option<usize>,
    busy_poll_us: Option<u64>,
}

const USAGE: &str = "usage: gateway [--config FILE] [--check] [--port N] [--upstream URL] [--model NAME] [--catalog FILE] [--fallback PRIMARY=FALLBACK]... [--keys FILE] [--serve-for SECS] [--workers N] [--busy-poll-us N] [--self-check]";

fn options() -> Result<Options, String> {
    let mut o = Options {
        port: None,
        config: None,
        check: false,
        upstream: None,
        model: None,
        catalog: None,
        fallbacks: Vec::new(),
        keys: None,
        serve_for: None,
        self_check: false,
        workers: None,
        busy_poll_us: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => o.port = Some(value()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--config" => o.config = Some(value()?),
            "--check" => o.check = true,
            "--upstream" => o.upstream = Some(value()?),
            "--model" => o.model = Some(value()?),
            "--catalog" => o.catalog = Some(value()?),
            "--fallback" => o.fallbacks.push(value()?),
            "--keys" => o.keys = Some(value()?),
            "--serve-for" => {
                let s: u64 = value()?.parse().map_err(|e| format!("--serve-for: {e}"))?;
                o.serve_for = Some(Duration::from_secs(s));
            }
            "--self-check" => o.self_check = true,
            "--workers" => {
                o.workers = match value()?.parse() {
                    Ok(n) if n > 0 => Some(n),
                    _ => return Err("--workers: a number of threads, 1 or more".into()),
                };
            }
            "--busy-poll-us" => {
                let n: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--busy-poll-us: {e}"))?;
                o.busy_poll_us = Some(n);
            }
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.config.is_some() && o.upstream.is_some() {
        return Err(
            "--config and --upstream do not go together: name upstreams in the file".into(),
        );
    }
    Ok(o)
}

/// The key table, what to say about it, and whether it is the demo table.
fn key_table(path: Option<&str>) -> Result<(KeyTable, String, bool), String> {
    if let Some(path) = path {
        let t = KeyTable::load(path)?;
        let n = t.len();
        return Ok((t, format!("{n} keys from {path}"), false));
    }
    if let Ok(json) = std::env::var(keys::KEYS_ENV) {
        if !json.trim().is_empty() {
            let t = KeyTable::from_json(&json).map_err(|e| format!("{}: {e}", keys::KEYS_ENV))?;
            let n = t.len();
            return Ok((t, format!("{n} keys from ${}", keys::KEYS_ENV), false));
        }
    }
    let demo: Vec<String> = keys::DEMO_KEYS
        .iter()
        .map(|(k, user, org, tier)| format!("{k} ({user}@{org}, {tier:?})"))
        .collect();
    Ok((
        KeyTable::demo(),
        format!("built-in demo keys: {}", demo.join(", ")),
        true,
    ))
}

/// What the configuration file says beyond the plan (the command line wins).
#[derive(Default)]
struct FileSays {
    keys: Option<String>,
    port: Option<u16>,
}

/// What to serve, from the configuration file or the command line, and what else the
/// file says.
fn plan(o: &Options) -> Result<(Plan, FileSays), String> {
    let mut catalog = Catalog::builtin();
    if let Some(path) = &o.catalog {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        catalog = catalog
            .merge_toml(&text)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    match &o.config {
        Some(path) => {
            let mut cfg = GatewayConfig::load(path)?;
            if let Some(m) = &o.model {
                cfg.default_model = Some(m.clone());
            }
            let plan = Plan::from_config(&cfg, &catalog, &o.fallbacks, &Env, o.check, None)
                .map_err(|e| format!("{path}: {e}"))?;
            // A relative keys file is read next to the configuration.
            let keys = cfg.keys_file.as_ref().map(|k| {
                let p = std::path::Path::new(k);
                match std::path::Path::new(path).parent() {
                    Some(dir) if p.is_relative() => dir.join(p).to_string_lossy().into_owned(),
                    _ => k.clone(),
                }
            });
            Ok((
                plan,
                FileSays {
                    keys,
                    port: cfg.port,
                },
            ))
        }
        None => {
            let key = std::env::var("OPENAI_API_KEY")
                .ok()
                .map(|k| k.trim().to_owned())
                .filter(|k| !k.is_empty());
            let model = o.model.as_deref().unwrap_or("gpt-4o-mini");
            let plan =
                Plan::from_options(&catalog, o.upstream.as_deref(), key, model, &o.fallbacks)?;
            Ok((plan, FileSays::default()))
        }
    }
}

/// The busy-polling window in microseconds (the command line's, else the
/// configuration file's; 0 is off) and the runtime's worker threads: busy polling runs
/// the gateway on one thread, where it polls the sockets itself (see `docs/gateway.md`).
fn threads(o: &Options) -> Result<(Option<u64>, usize), String> {
    let from_file = match (&o.config, o.busy_poll_us) {
        (Some(path), None) => {
            GatewayConfig::load(path)
                .map_err(|e| format!("{path}: {e}"))?
                .busy_poll_us
        }
        _ => None,
    };
    gateway::server::busy_poll_threads(o.busy_poll_us.or(from_file), o.workers)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("{e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let (busy, workers) = match threads(&opts) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(opts, busy))
}

/// Serves as `opts` say, busy polling for `busy_us` microseconds after each request
/// if set (as settled by `threads`).
async fn run(opts: Options, busy_us: Option<u64>) -> Result<(), Box<dyn std::error::Error>> {
    gateway::init_logging();

    let (plan, file) = match plan(&opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let (keys, keys_said, demo_keys) =
        match key_table(opts.keys.as_deref().or(file.keys.as_deref())) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(2);
            }
        };
    let pipeline = match plan.pipeline() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("the pipeline cannot be built: {e}");
            std::process::exit(2);
        }
    };
    let limits = Limits {
        busy_poll: busy_us.map(Duration::from_micros),
        ..Limits::default()
    };
    let busy_said = match limits.busy_poll {
        Some(w) => format!(
            "busy polling: {} us after each request, on one thread",
            w.as_micros()
        ),
        None => "busy polling: off".to_owned(),
    };
    if opts.check {
        println!("{}", plan.describe());
        println!("keys: {keys_said}");
        println!("{busy_said}");
        println!("configuration OK");
        return Ok(());
    }
    let port = opts.port.or(file.port).unwrap_or(8080);
    let mut gw = Gateway::new(pipeline, keys, &plan.default_model).limits(limits);
    for s in &plan.secrets {
        gw = gw.secret(s.clone());
    }
    let gw = Arc::new(gw);
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e} (try --port 0 for any free port)");
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr()?;
    let app = gateway::router(Arc::clone(&gw));

    println!("tokenwise gateway on http://{addr}/v1");
    println!("{}", plan.describe());
    println!("keys: {keys_said}");
    println!("{busy_said}");
    let key = if demo_keys {
        keys::DEMO_KEYS[0].0
    } else {
        "$GATEWAY_KEY"
    };
    println!("\ntry it:\n");
    println!(
        "  curl http://{addr}/v1/chat/completions \\\n    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"gpt-4o-mini\", \"messages\": [{{\"role\": \"user\", \"content\": \"What does a circuit breaker do?\"}}]}}'\n"
    );
    println!(
        "  curl -N http://{addr}/v1/chat/completions \\\n    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"gpt-4o-mini\", \"stream\": true, \"stream_options\": {{\"include_usage\": true}}, \"messages\": [{{\"role\": \"user\", \"content\": \"Explain rate limiting\"}}]}}'\n"
    );
    println!("  curl http://{addr}/v1/models -H 'Authorization: Bearer {key}'\n");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = gw.limits_ref().clone();
    let server = tokio::spawn(gateway::serve(listener, app, limits, async {
        let _ = stop_rx.await;
    }));

    let mut failed = false;
    if opts.self_check {
        match self_check(addr, keys::DEMO_KEYS[0].0, !demo_keys).await {
            Ok(summary) => println!("self-check passed: {summary}"),
            Err(e) => {
                eprintln!("self-check FAILED: {e}");
                failed = true;
            }
        }
    }
    match opts.serve_for {
        Some(d) => {
            if !d.is_zero() {
                println!("serving for {} s", d.as_secs());
            }
            tokio::time::sleep(d).await;
        }
        None if opts.self_check => {}
        None => std::future::pending::<()>().await,
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    println!("usage:\n{}", gw.pipeline().usage());
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Drives the gateway once over loopback, as a client would.
async fn self_check(
    addr: std::net::SocketAddr,
    demo_key: &str,
    custom_keys: bool,
) -> Result<String, String> {
    if custom_keys {
        return Err(format!(
            "--self-check uses the demo keys; run it without --keys and ${}",
            keys::KEYS_ENV
        ));
    }
    let client = tokenwise::provider::http_client_builder()
        .map_err(|e| e.to_string())?
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{addr}/v1/chat/completions");
    let ask = |stream: bool| {
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "stream": stream,
            "stream_options": if stream { serde_json::json!({"include_usage": true}) } else { serde_json::Value::Null },
            "messages": [{"role": "user", "content": "What does a circuit breaker do?"}],
        });
        client
            .post(&url)
            .bearer_auth(demo_key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    // Whole.
    let res = ask(false).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let cache = res
        .headers()
        .get("x-tokenwise-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let text = res.text().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("whole answer: HTTP {status}: {text}"));
    }
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    if v["object"] != "chat.completion"
        || content.is_empty()
        || !v["usage"]["total_tokens"].is_u64()
    {
        return Err(format!("whole answer has the wrong shape: {text}"));
    }
    // Streamed (the same question, so the cache replays it).
    let res = ask(true).await.map_err(|e| e.to_string())?;
    if res.status() != 200 {
        return Err(format!("stream: HTTP {}", res.status()));
    }
    let sse = res.text().await.map_err(|e| e.to_string())?;
    let datas: Vec<&str> = sse
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    let mut streamed = String::new();
    let mut usage = false;
    for d in &datas {
        if *d == "[DONE]" {
            continue;
        }
        let c: serde_json::Value =
            serde_json::from_str(d).map_err(|e| format!("bad chunk {d}: {e}"))?;
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            streamed.push_str(t);
        }
        usage |= c["usage"]["total_tokens"].is_u64();
    }
    if datas.last() != Some(&"[DONE]") || !usage || streamed != content {
        return Err(format!("the stream has the wrong shape:\n{sse}"));
    }
    // Models.
    let res = client
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(demo_key)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&res.text().await.map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let models = v["data"].as_array().map_or(0, Vec::len);
    if v["object"] != "list" || models == 0 {
        return Err("GET /v1/models has the wrong shape".into());
    }
    Ok(format!(
        "whole answer ({} chars, cache {cache}), stream of {} events ending in [DONE], {models} models",
        content.len(),
        datas.len()
    ))
}
