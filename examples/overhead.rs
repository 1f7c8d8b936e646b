//! What tokenwise adds to every call: a bare provider call against the same call through
//! the full pipeline, in one run, on an instant in-process provider (so only tokenwise's
//! own work is measured).
//!
//! ```text
//! cargo run --release --example overhead
//! ```
//!
//! The pipeline has everything on: per-user and global rate limits on requests and
//! tokens, per-user and global spend caps, the exact cache, circuit breakers, retries,
//! the usage report. Misses are unique questions (cache misses that reach the
//! provider); hits repeat one question. The exact cache has the default capacity
//! (10,000 answers) and is full when misses are timed, so each timed miss also evicts
//! the oldest answer, and so is the cache of token counts (65,536 texts by default),
//! which every new text passes through: the steady state of a service that has run for
//! a while. A line above the last one gives the misses of caches still filling
//! (200,000 answers, all but a few thousand free), where storing an answer or a count
//! also touches memory the process has never used (page faults). The last line:
//! `miss_p50_us=… miss_p99_us=… hit_p99_us=… throughput_rps=… allocs_per_miss=… allocs_per_hit=…`,
//! where the latencies are the time added over the bare call, throughput is misses per
//! second through the pipeline with 64 concurrent callers on a two-thread runtime, and
//! the allocation counts are heap allocations per call through the pipeline, the
//! provider's own answer included (a bare call's count is printed above it; the request
//! itself is built before counting starts), measured by a counting allocator that is
//! switched on only for the sequential phases.
//!
//! `cargo run --release --example overhead -- profile miss` (or `hit`) runs only
//! 20,000 sequential misses (or hits; a third argument sets how many, up to 500,000)
//! through the pipeline after the misses that fill both caches, and prints their mean
//! time per call (for comparing two builds, run alternately), for a profiler:
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*Profiled*'
//! target/release/examples/overhead profile miss` counts just those calls, and
//! `callgrind_annotate` gives the instructions per call by function; for time rather
//! than instructions, `perf record -D 1000 target/release/examples/overhead profile hit
//! 500000` samples the calls (the delay skips most of the warm-up).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokenwise::budget::BudgetWindow;
use tokenwise::provider::{Provider, ProviderCall};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, ChatStream, Cost, FinishReason, Pipeline, ScopeKind, Usage,
};

/// The system allocator, counting allocations (and reallocations) while switched on.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter only
// observes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations counted while `COUNTING` was on, from zero.
fn allocs_counted() -> u64 {
    ALLOCS.load(Ordering::Relaxed)
}

/// Answers at once, with fixed usage: no tokenizer, no sleep.
#[derive(Debug)]
struct Instant0;

#[async_trait]
impl Provider for Instant0 {
    fn name(&self) -> &str {
        "openai"
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        Ok(ChatResponse::new(
            "A short answer of about twenty tokens, the kind a support bot gives.",
            &call.model.name,
            "openai",
            Usage::new(40, 20),
            FinishReason::Stop,
        ))
    }

    async fn stream(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        Err(tokenwise::Error::InvalidRequest("not used".into()))
    }
}

fn question(i: usize) -> ChatRequest {
    ChatRequest::user_text(format!(
        "Where is my order number {i}? It was due on Monday."
    ))
    .user(format!("user-{}", i % 1_000))
    .org("acme")
    .max_tokens(200)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    let idx = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

/// The exact cache's capacity: the default.
const CACHE: usize = 10_000;

/// Misses that fill the pipeline's cache of token counts (its default capacity is
/// 65,536 texts, one a question here) and the exact cache, with a margin.
const WARM: usize = 65_536 + 2_000;

fn pipeline() -> tokenwise::Result<Pipeline> {
    pipeline_with_cache(CACHE)
}

fn pipeline_with_cache(capacity: usize) -> tokenwise::Result<Pipeline> {
    Pipeline::builder()
        .provider(Instant0)
        .default_model("gpt-4o-mini")
        .rate_limit(ScopeKind::User, 1_000_000)
        .rate_limit(ScopeKind::Global, 1_000_000_000)
        .token_limit(ScopeKind::User, 1_000_000_000)
        .spend_cap(
            ScopeKind::User,
            Cost::from_dollars(1_000),
            BudgetWindow::Day,
        )
        .spend_cap(
            ScopeKind::Global,
            Cost::from_dollars(1_000_000),
            BudgetWindow::Month,
        )
        .exact_cache(capacity, Duration::from_secs(3_600))
        .build()
}

fn main() -> tokenwise::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| tokenwise::Error::Config(e.to_string()))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("profile") => rt.block_on(profile(
            args.get(1).map(String::as_str),
            args.get(2).map(String::as_str),
        )),
        _ => rt.block_on(run()),
    }
}

/// The most calls `profile` makes: its hits all come from one user, whose rate limit in
/// this pipeline is a million a minute.
const MAX_PROFILED: usize = 500_000;

/// `n` (default 20,000) sequential misses (`miss`) or hits (`hit`), with the heap
/// allocations and the mean time per call: for a profiler, or to compare two builds
/// (the mean of many calls in a row, run alternately).
async fn profile(mode: Option<&str>, n: Option<&str>) -> tokenwise::Result<()> {
    let n = match n.map(str::parse::<usize>) {
        None => 20_000,
        Some(Ok(n)) if (1..=MAX_PROFILED).contains(&n) => n,
        Some(_) => {
            return Err(tokenwise::Error::Config(format!(
                "usage: overhead profile miss|hit [calls, 1 to {MAX_PROFILED}]"
            )));
        }
    };
    let pipe = pipeline()?;
    let hits = match mode {
        Some("miss") => false,
        Some("hit") => true,
        _ => {
            return Err(tokenwise::Error::Config(
                "usage: overhead profile miss|hit [calls]".into(),
            ));
        }
    };
    for i in 0..WARM {
        pipe.chat(question(1_000_000 + i)).await?; // the caches filled, as in the timed run
    }
    let hot = question(7);
    pipe.chat(hot.clone()).await?;
    let a0 = allocs_counted();
    COUNTING.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    Profiled(Box::pin(profiled_calls(&pipe, &hot, hits, n))).await?;
    let took = t0.elapsed();
    COUNTING.store(false, Ordering::Relaxed);
    let per_call = (allocs_counted() - a0) as f64 / n as f64;
    println!(
        "{n} {} through the pipeline, {per_call:.1} heap allocations per call (the request built inside the loop included), {:.0} ns per call (the loop's own work and the allocation counter included)",
        if hits { "hits" } else { "misses" },
        took.as_nanos() as f64 / n as f64
    );
    Ok(())
}

/// A future polled through a function of its own, so that a profiler can count just
/// what it runs: `--collect-atstart=no --toggle-collect='*Profiled*'` makes callgrind
/// count the profiled calls alone, not the set-up.
struct Profiled<'a>(std::pin::Pin<Box<dyn Future<Output = tokenwise::Result<()>> + 'a>>);

impl Future for Profiled<'_> {
    type Output = tokenwise::Result<()>;

    #[inline(never)]
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// The profiled calls.
async fn profiled_calls(
    pipe: &Pipeline,
    hot: &ChatRequest,
    hits: bool,
    n: usize,
) -> tokenwise::Result<()> {
    for i in 0..n {
        let req = if hits {
            hot.clone()
        } else {
            question(2_000_000 + i)
        };
        let r = pipe.chat(req).await?;
        assert_eq!(r.served.is_cache_hit(), hits);
    }
    Ok(())
}

async fn run() -> tokenwise::Result<()> {
    const N: usize = 20_000;
    let catalog = Catalog::builtin();
    let model = catalog.require("gpt-4o-mini")?.clone();
    let provider = Instant0;
    let pipe = pipeline()?;

    // warm up: tokenizer tables, allocator, and both caches filled (a timed miss
    // evicts an answer and a count)
    for i in 0..WARM {
        let req = question(1_000_000 + i);
        provider.chat(ProviderCall::new(&req, &model)).await?;
        pipe.chat(req).await?;
    }

    // bare provider calls
    let mut bare = Vec::with_capacity(N);
    let mut bare_allocs = 0;
    for i in 0..N {
        let req = question(i);
        let a0 = allocs_counted();
        COUNTING.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = std::hint::black_box(provider.chat(ProviderCall::new(&req, &model)).await?);
        bare.push(t0.elapsed());
        COUNTING.store(false, Ordering::Relaxed);
        bare_allocs += allocs_counted() - a0;
        drop(r);
    }
    // misses through the pipeline (unique questions)
    let mut miss = Vec::with_capacity(N);
    let mut miss_allocs = 0;
    for i in 0..N {
        let req = question(2_000_000 + i);
        let a0 = allocs_counted();
        COUNTING.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = pipe.chat(req).await?;
        miss.push(t0.elapsed());
        COUNTING.store(false, Ordering::Relaxed);
        miss_allocs += allocs_counted() - a0;
        assert!(!r.served.is_cache_hit());
    }
    // hits (one repeated question)
    let hot = question(7);
    pipe.chat(hot.clone()).await?;
    let mut hit = Vec::with_capacity(N);
    let mut hit_allocs = 0;
    for _ in 0..N {
        let req = hot.clone();
        let a0 = allocs_counted();
        COUNTING.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = pipe.chat(req).await?;
        hit.push(t0.elapsed());
        COUNTING.store(false, Ordering::Relaxed);
        hit_allocs += allocs_counted() - a0;
        assert!(r.served.is_cache_hit());
    }
    // misses into a cache still filling: a fresh pipeline with room for 200,000
    // answers, warmed by 2,000 misses
    let filling_pipe = pipeline_with_cache(200_000)?;
    for i in 0..2_000 {
        filling_pipe.chat(question(3_000_000 + i)).await?;
    }
    let mut filling = Vec::with_capacity(N);
    for i in 0..N {
        let req = question(4_000_000 + i);
        let t0 = Instant::now();
        let r = filling_pipe.chat(req).await?;
        filling.push(t0.elapsed());
        assert!(!r.served.is_cache_hit());
    }
    drop(filling_pipe);
    let per_call = |n: u64| n as f64 / N as f64;
    let (allocs_per_miss, allocs_per_hit) = (per_call(miss_allocs), per_call(hit_allocs));
    let allocs_per_bare = per_call(bare_allocs);

    let bare_p50 = percentile(&mut bare, 0.50);
    let bare_p99 = percentile(&mut bare, 0.99);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let added = |d: Duration, base: Duration| (us(d) - us(base)).max(0.0);
    let miss_p50 = added(percentile(&mut miss, 0.50), bare_p50);
    let miss_p90 = added(percentile(&mut miss, 0.90), bare_p50);
    let miss_p99 = added(percentile(&mut miss, 0.99), bare_p99);
    let miss_p999 = added(percentile(&mut miss, 0.999), bare_p99);
    let filling_p50 = added(percentile(&mut filling, 0.50), bare_p50);
    let filling_p99 = added(percentile(&mut filling, 0.99), bare_p99);
    let hit_p90 = added(percentile(&mut hit, 0.90), bare_p50);
    let hit_p50 = added(percentile(&mut hit, 0.50), bare_p50);
    let hit_p99 = added(percentile(&mut hit, 0.99), bare_p99);

    // throughput: 64 concurrent callers sending misses for about a second
    let pipe = Arc::new(pipeline()?);
    let total = 200_000usize;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let pipe = Arc::clone(&pipe);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for i in (w..total).step_by(64) {
                if pipe.chat(question(10_000_000 + i)).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut served = 0;
    for t in tasks {
        served += t.await.unwrap_or(0);
    }
    let rps = served as f64 / t0.elapsed().as_secs_f64();

    println!(
        "bare provider call: p50 {:.2} µs, p99 {:.2} µs",
        us(bare_p50),
        us(bare_p99)
    );
    println!(
        "added by the pipeline, miss: p50 {miss_p50:.2} µs, p90 {miss_p90:.2} µs, p99 {miss_p99:.2} µs, p99.9 {miss_p999:.2} µs"
    );
    println!(
        "added by the pipeline, miss while the caches fill: p50 {filling_p50:.2} µs, p99 {filling_p99:.2} µs"
    );
    println!(
        "added by the pipeline, hit:  p50 {hit_p50:.2} µs, p90 {hit_p90:.2} µs, p99 {hit_p99:.2} µs"
    );
    println!(
        "throughput: {served} misses in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    println!(
        "heap allocations per call: bare {allocs_per_bare:.1}, miss {allocs_per_miss:.1}, hit {allocs_per_hit:.1}"
    );
    println!(
        "miss_p50_us={miss_p50:.2} miss_p99_us={miss_p99:.2} hit_p99_us={hit_p99:.2} throughput_rps={rps:.0} allocs_per_miss={allocs_per_miss:.1} allocs_per_hit={allocs_per_hit:.1}"
    );
    Ok(())
}
