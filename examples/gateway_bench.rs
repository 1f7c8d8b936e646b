//! What the gateway adds to a call, measured side by side with its upstream alone in one
//! run: a fixed-answer upstream (`examples/support/fixed_upstream.rs`) and the gateway
//! in front of it (no rate limits, no spend caps, the exact cache on, every prompt
//! unique so that every call is a miss), both on 127.0.0.1 in this process.
//!
//! ```text
//! cargo run --release --example gateway_bench                # defaults below
//! cargo run --release --example gateway_bench -- 5000 32 3   # calls, clients, seconds
//! ```
//!
//! 1. Latency at one client: `calls` requests to the upstream alone and as many through
//!    the gateway, interleaved, after a warm-up; p50 and p99 of each and the difference.
//! 2. Throughput: `clients` concurrent clients for `seconds` against each in turn.
//!
//! See docs/performance.md for figures taken with it.

#[allow(dead_code, unreachable_pub)]
#[path = "gateway/mod.rs"]
mod gateway;

#[path = "support/fixed_upstream.rs"]
mod fixed_upstream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway::config::{GatewayConfig, Plan};
use gateway::{Gateway, KeyTable, Limits};
use tokenwise::Catalog;

const KEYS: [&str; 3] = ["sk-demo-alice", "sk-demo-bob", "sk-demo-carol"];

fn config(upstream: &str) -> String {
    format!(
        r#"
default_model = "gpt-4o-mini"
[upstreams.fixed]
kind = "openai"
base_url = "{upstream}"
[[models]]
name = "gpt-4o-mini"
upstream = "fixed"
[limits]
user_rpm = 0
org_tpm = 0
global_rpm = 0
[spend_caps]
user_cents_per_day = 0
org_cents_per_day = 0
"#
    )
}

struct Target {
    /// Parsed once: parsing a URL costs about as much as the rest of building a request.
    url: reqwest::Url,
    key: Option<&'static str>,
}

async fn call(client: &reqwest::Client, t: &Target, n: u64) -> Result<(), String> {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Question number {n}: what does a gateway add?"}}]}}"#
    );
    let mut req = client
        .post(t.url.clone())
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = t.key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.map_err(|e| e.to_string())?;
    let status = res.status();
    let hit = res
        .headers()
        .get("x-tokenwise-cache")
        .is_some_and(|v| v.as_bytes() == b"hit");
    let text = res.bytes().await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&text)));
    }
    if hit {
        return Err("a cache hit: the prompts must be unique".into());
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    // `profile TARGET N`: N sequential calls to one target and nothing else, for
    // instruction counts under callgrind (see docs/performance.md).
    let profile = match raw.first().map(String::as_str) {
        Some("profile") => {
            let target = raw.get(1).cloned().unwrap_or_default();
            let n: u64 = raw
                .get(2)
                .map_or(Ok(1_000), |s| s.parse())
                .map_err(|e| format!("usage: gateway_bench profile gateway|upstream N: {e}"))?;
            if target != "gateway" && target != "upstream" {
                return Err("usage: gateway_bench profile gateway|upstream N".into());
            }
            raw.clear();
            Some((target == "gateway", n))
        }
        _ => None,
    };
    let args: Vec<u64> = raw
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("usage: gateway_bench [calls] [clients] [seconds]: {e}"))?;
    let calls = args.first().copied().unwrap_or(5_000).max(100);
    let clients = args.get(1).copied().unwrap_or(32).max(1);
    let seconds = args.get(2).copied().unwrap_or(3).max(1);

    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = up.local_addr()?;
    tokio::spawn(fixed_upstream::serve(up));
    let cfg = GatewayConfig::from_toml(&config(&format!("http://{up_addr}/v1")))?;
    let none: BTreeMap<String, String> = BTreeMap::new();
    let plan = Plan::from_config(&cfg, &Catalog::builtin(), &[], &none, false, None)?;
    let gw = Arc::new(Gateway::new(
        plan.pipeline()?,
        KeyTable::demo(),
        "gpt-4o-mini",
    ));
    let gw_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gw_addr = gw_listener.local_addr()?;
    tokio::spawn(gateway::serve(
        gw_listener,
        gateway::router(Arc::clone(&gw)),
        Limits::default(),
        std::future::pending::<()>(),
    ));
    let alone = Arc::new(Target {
        url: format!("http://{up_addr}/v1/chat/completions").parse()?,
        key: None,
    });
    let through = Arc::new(Target {
        url: format!("http://{gw_addr}/v1/chat/completions").parse()?,
        key: Some(KEYS[0]),
    });
    let client = tokenwise::provider::http_client_builder()?
        .no_proxy()
        .tcp_nodelay(true)
        .build()?;
    let next = AtomicU64::new(0);
    let unique = || next.fetch_add(1, Ordering::Relaxed);

    if let Some((gateway, n)) = profile {
        let t = if gateway { &through } else { &alone };
        for _ in 0..n {
            call(&client, t, unique()).await?;
        }
        println!(
            "profile: {n} calls to the {}",
            if gateway { "gateway" } else { "upstream" }
        );
        return Ok(());
    }

    // 1. One client, interleaved.
    for _ in 0..(calls / 10) {
        call(&client, &alone, unique()).await?;
        call(&client, &through, unique()).await?;
    }
    let mut a = Vec::with_capacity(calls as usize);
    let mut g = Vec::with_capacity(calls as usize);
    for _ in 0..calls {
        let t = Instant::now();
        call(&client, &alone, unique()).await?;
        a.push(t.elapsed());
        let t = Instant::now();
        call(&client, &through, unique()).await?;
        g.push(t.elapsed());
    }
    a.sort_unstable();
    g.sort_unstable();
    let (a50, a99) = (percentile(&a, 0.5), percentile(&a, 0.99));
    let (g50, g99) = (percentile(&g, 0.5), percentile(&g, 0.99));
    println!("one client, {calls} misses each (microseconds):");
    println!(
        "  upstream alone:   p50 {:8.1}  p99 {:8.1}",
        us(a50),
        us(a99)
    );
    println!(
        "  through gateway:  p50 {:8.1}  p99 {:8.1}",
        us(g50),
        us(g99)
    );
    println!(
        "  added:            p50 {:8.1}  p99 {:8.1}",
        us(g50) - us(a50),
        us(g99) - us(a99)
    );

    // 2. Throughput.
    let next = Arc::new(AtomicU64::new(1 << 40));
    let mut rates = Vec::new();
    for (name, target) in [("upstream alone", &alone), ("through gateway", &through)] {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for c in 0..clients {
            let (client, done, failed, next) = (
                client.clone(),
                Arc::clone(&done),
                Arc::clone(&failed),
                Arc::clone(&next),
            );
            let mut target = Target {
                url: target.url.clone(),
                key: target.key,
            };
            if target.key.is_some() {
                // Spread over the demo keys: the gateway holds 16 in flight per user.
                target.key = Some(KEYS[(c % 3) as usize]);
            }
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match call(&client, &target, next.fetch_add(1, Ordering::Relaxed)).await {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        let rate = done.load(Ordering::Relaxed) as f64 / seconds as f64;
        rates.push(rate);
        println!(
            "{clients} clients, {seconds} s, {name}: {rate:.0} misses/s ({} failed)",
            failed.load(Ordering::Relaxed)
        );
    }
    println!(
        "summary: added_p50_us={:.1} added_p99_us={:.1} upstream_rps={:.0} gateway_rps={:.0}",
        us(g50) - us(a50),
        us(g99) - us(a99),
        rates[0],
        rates[1]
    );
    Ok(())
}
