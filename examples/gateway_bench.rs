//! What the gateway adds to a call, measured side by side with its upstream alone in one
//! run: a fixed-answer upstream (`examples/support/fixed_upstream.rs`) and the gateway
//! in front of it (no rate limits, no spend caps, the exact cache on, every prompt
//! unique so that every call is a miss), both on 127.0.0.1 in this process.
//!
//! ```text
//! cargo run --release --example gateway_bench                # defaults below
//! cargo run --release --example gateway_bench -- 5000 32 3   # calls, clients, seconds
//! cargo run --release --example gateway_bench -- --layout shared
//! cargo run --release --example gateway_bench -- --busy-poll-us 200
//! valgrind --tool=callgrind target/release/examples/gateway_bench profile gateway 1500
//! ```
//!
//! 1. Latency at one client: `calls` requests to the upstream alone and as many through
//!    the gateway, interleaved, after a warm-up; p50 and p99 of each and the difference,
//!    and the gateway's CPU time over the phase.
//! 2. Throughput: `clients` concurrent clients for `seconds` against each in turn, with
//!    the CPU time a call (of the process, and in the split layout of each part).
//!
//! Layouts: `split` (default) runs the gateway on a multi-threaded runtime of two
//! workers (`--gateway-workers N`; 1 for a single-threaded one), as the gateway example
//! does, and the load generator and the upstream each on a single-threaded runtime of
//! its own thread, as three processes would be; `shared` runs all three on one
//! multi-threaded runtime of two workers. `--busy-poll-us N` turns on the gateway's
//! busy polling (`Limits::busy_poll`, as `gateway --busy-poll-us N` does) for a window
//! of N microseconds, on one thread (`--gateway-workers 1`, the default with it).
//! `--block N` makes the one-client phase alternate N calls to each
//! target instead of one (default 1), so that the upstream alone is timed while the
//! gateway is idle, busy polling or not. `profile gateway|upstream N` makes N
//! sequential calls to one target and exits, for instruction counts under callgrind.
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

/// How the three parts (load generator, gateway, upstream) share the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Each on its own runtime, as three processes would be (the default): the
    /// gateway on a multi-threaded runtime of two workers, as `examples/gateway.rs`
    /// runs it; the load generator and the upstream each on a single-threaded one.
    Split,
    /// All on one multi-threaded runtime of two workers.
    Shared,
}

const USAGE: &str = "usage: gateway_bench [--layout split|shared] [--gateway-workers N] [--busy-poll-us N] [--block N] [calls] [clients] [seconds]\n       gateway_bench [--layout split|shared] [--gateway-workers N] [--busy-poll-us N] profile gateway|upstream N";

/// A thread's (or the process's) name and CPU time so far, user and system, from a
/// Linux `stat` file.
fn cpu_of(path: &std::path::Path) -> Option<(String, Duration)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = stat.get(open + 1..close)?.to_owned();
    // After the name: utime and stime are the 12th and 13th fields, in clock ticks of
    // 1/100 s.
    let mut f = stat.get(close + 2..)?.split_whitespace().skip(11);
    let ticks: u64 = f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?;
    Some((name, Duration::from_millis(ticks * 10)))
}

/// CPU time so far: the whole process's, and each named thread's (the gateway's, the
/// upstream's; the load generator's is the main thread's).
fn cpu_times() -> (Duration, BTreeMap<String, Duration>) {
    let total = cpu_of(std::path::Path::new("/proc/self/stat")).map_or(Duration::ZERO, |c| c.1);
    let mut by = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            if let Some((name, d)) = cpu_of(&t.path().join("stat")) {
                *by.entry(name).or_insert(Duration::ZERO) += d;
            }
        }
    }
    (total, by)
}

fn single_threaded() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `serve` (made on the thread) on its own thread, on `rt`.
fn own_thread<F, Fut>(rt: tokio::runtime::Runtime, name: &str, serve: F) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || rt.block_on(serve()))?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As `examples/gateway.rs` logs.
    gateway::init_logging();
    let mut raw: Vec<String> = std::env::args().skip(1).collect();
    let layout = match option(&mut raw, "--layout")?.as_deref() {
        None | Some("split") => Layout::Split,
        Some("shared") => Layout::Shared,
        Some(_) => return Err(USAGE.into()),
    };
    // The gateway's busy-polling window, if any (0 is none).
    let busy_us = match option(&mut raw, "--busy-poll-us")? {
        Some(n) => Some(n.parse::<u64>().map_err(|_| USAGE)?),
        None => None,
    };
    // In the split layout: the gateway's worker threads; 1 is a single-threaded runtime,
    // which busy polling needs (as `gateway --busy-poll-us` runs it).
    let workers = number(&mut raw, "--gateway-workers")?;
    let (busy_us, workers) = gateway::server::busy_poll_threads(busy_us, workers)?;
    let busy_poll = busy_us.map(Duration::from_micros);
    if busy_poll.is_some() && layout == Layout::Shared {
        return Err(
            "busy polling runs the gateway on one thread of its own: not with --layout shared"
                .into(),
        );
    }
    // One-client phase: calls to each target in turn, this many at a time.
    let block = number(&mut raw, "--block")?.unwrap_or(1) as u64;
    let layout = (layout, workers, busy_poll, block);
    match layout.0 {
        Layout::Split => single_threaded()?.block_on(run(raw, layout)),
        Layout::Shared => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(raw, layout)),
    }
}

/// Takes `name` and the value after it out of `raw`.
fn option(raw: &mut Vec<String>, name: &str) -> Result<Option<String>, &'static str> {
    let Some(i) = raw.iter().position(|a| a == name) else {
        return Ok(None);
    };
    let value = raw.get(i + 1).cloned().ok_or(USAGE)?;
    raw.drain(i..i + 2);
    Ok(Some(value))
}

/// Takes `name` and the number of 1 or more after it out of `raw`.
fn number(raw: &mut Vec<String>, name: &str) -> Result<Option<usize>, &'static str> {
    match option(raw, name)? {
        Some(v) => match v.parse() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(USAGE),
        },
        None => Ok(None),
    }
}

/// The gateway in front of `upstream`, as the bench configures it.
fn bench_gateway(upstream: std::net::SocketAddr) -> Result<Arc<Gateway>, String> {
    let cfg = GatewayConfig::from_toml(&config(&format!("http://{upstream}/v1")))?;
    let none: BTreeMap<String, String> = BTreeMap::new();
    let plan = Plan::from_config(&cfg, &Catalog::builtin(), &[], &none, false, None)?;
    Ok(Arc::new(Gateway::new(
        plan.pipeline()?,
        KeyTable::demo(),
        "gpt-4o-mini",
    )))
}

async fn serve_gateway(
    gw: Arc<Gateway>,
    listener: std::net::TcpListener,
    busy_poll: Option<Duration>,
) {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => {
            gateway::serve(
                l,
                gateway::router(gw),
                Limits {
                    busy_poll,
                    ..Limits::default()
                },
                std::future::pending::<()>(),
            )
            .await;
        }
        Err(e) => eprintln!("gateway listener: {e}"),
    }
}

async fn serve_upstream(listener: std::net::TcpListener) {
    match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => fixed_upstream::serve(l).await,
        Err(e) => eprintln!("upstream listener: {e}"),
    }
}

async fn run(
    mut raw: Vec<String>,
    (layout, workers, busy_poll, block): (Layout, usize, Option<Duration>, u64),
) -> Result<(), Box<dyn std::error::Error>> {
    // `profile TARGET N`: N sequential calls to one target and nothing else, for
    // instruction counts under callgrind (see docs/performance.md).
    let profile = match raw.first().map(String::as_str) {
        Some("profile") => {
            let target = raw.get(1).cloned().unwrap_or_default();
            let n: u64 = raw
                .get(2)
                .map_or(Ok(1_000), |s| s.parse())
                .map_err(|e| format!("{USAGE}: {e}"))?;
            if target != "gateway" && target != "upstream" {
                return Err(USAGE.into());
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
        .map_err(|e| format!("{USAGE}: {e}"))?;
    let calls = args.first().copied().unwrap_or(5_000).max(100);
    let clients = args.get(1).copied().unwrap_or(32).max(1);
    let seconds = args.get(2).copied().unwrap_or(3).max(1);

    let listener = || -> std::io::Result<(std::net::TcpListener, std::net::SocketAddr)> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let a = l.local_addr()?;
        Ok((l, a))
    };
    let (up, up_addr) = listener()?;
    let (gw_listener, gw_addr) = listener()?;
    let _gw = match layout {
        Layout::Split => {
            own_thread(single_threaded()?, "upstream", move || serve_upstream(up))?;
            // The gateway (and its pipeline) is built on its own thread's runtime.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let rt = if workers == 1 {
                single_threaded()?
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name("gateway")
                    .enable_all()
                    .build()?
            };
            own_thread(rt, "gateway", move || async move {
                match bench_gateway(up_addr) {
                    Ok(gw) => {
                        let _ = tx.send(Ok(Arc::clone(&gw)));
                        serve_gateway(gw, gw_listener, busy_poll).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            rx.recv().map_err(|e| e.to_string())??
        }
        Layout::Shared => {
            tokio::spawn(serve_upstream(up));
            let gw = bench_gateway(up_addr)?;
            tokio::spawn(serve_gateway(Arc::clone(&gw), gw_listener, busy_poll));
            gw
        }
    };
    match layout {
        Layout::Split => println!(
            "layout: split (gateway on {}, load generator and upstream on a thread each)",
            if workers == 1 {
                "one thread".to_owned()
            } else {
                format!("{workers} workers")
            }
        ),
        Layout::Shared => {
            println!("layout: shared (one multi-threaded runtime of two workers for all three)");
        }
    }
    if let Some(w) = busy_poll {
        println!(
            "gateway busy polling: {} us after each request",
            w.as_micros()
        );
    }
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
    let (_, one0) = cpu_times();
    let one_began = Instant::now();
    let mut done = 0;
    while done < calls {
        let n = block.min(calls - done);
        for _ in 0..n {
            let t = Instant::now();
            call(&client, &alone, unique()).await?;
            a.push(t.elapsed());
        }
        for _ in 0..n {
            let t = Instant::now();
            call(&client, &through, unique()).await?;
            g.push(t.elapsed());
        }
        done += n;
    }
    let one_wall = one_began.elapsed();
    let (_, one1) = cpu_times();
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
    if layout == Layout::Split {
        // The gateway's threads over the whole phase, the upstream-alone calls between
        // its own included: what busy polling spends shows here.
        let d = one1
            .get("gateway")
            .copied()
            .unwrap_or_default()
            .saturating_sub(one0.get("gateway").copied().unwrap_or_default());
        println!(
            "  gateway CPU:      {:.1} us a call through it ({:.0} % busy)",
            us(d) / calls as f64,
            100.0 * d.as_secs_f64() / one_wall.as_secs_f64()
        );
    }

    // 2. Throughput.
    let next = Arc::new(AtomicU64::new(1 << 40));
    let mut rates = Vec::new();
    for (name, target) in [("upstream alone", &alone), ("through gateway", &through)] {
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (cpu0, threads0) = cpu_times();
        let began = Instant::now();
        let until = began + Duration::from_secs(seconds);
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
        let wall = began.elapsed();
        let (cpu1, threads1) = cpu_times();
        let n = done.load(Ordering::Relaxed);
        let rate = n as f64 / seconds as f64;
        rates.push(rate);
        let per_call = |d: Duration| us(d) / n.max(1) as f64;
        println!(
            "{clients} clients, {seconds} s, {name}: {rate:.0} misses/s ({} failed), CPU {:.1} us a call",
            failed.load(Ordering::Relaxed),
            per_call(cpu1.saturating_sub(cpu0)),
        );
        if layout == Layout::Split {
            let busy: Vec<String> = threads1
                .iter()
                .filter(|(t, _)| ["gateway", "upstream", "gateway_bench"].contains(&t.as_str()))
                .map(|(t, d)| {
                    let d = d.saturating_sub(threads0.get(t).copied().unwrap_or_default());
                    let who = if t == "gateway_bench" {
                        "load generator"
                    } else {
                        t.as_str()
                    };
                    format!(
                        "{who} {:.0} % busy, {:.1} us a call",
                        100.0 * d.as_secs_f64() / wall.as_secs_f64(),
                        per_call(d)
                    )
                })
                .collect();
            println!("    {}", busy.join("; "));
        }
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
