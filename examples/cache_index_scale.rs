//! The semantic index at scale: lookup latency, recall@1 against an exact scan, insert
//! rate and memory per entry, for any number of 384-dimension vectors.
//!
//! ```text
//! cargo run --release --example cache_index_scale -- --entries 1000000
//! cargo run --release --example cache_index_scale -- --entries 100000 --ef 128 --int8
//! ```
//!
//! Options: `--entries N` (default 100,000), `--ef E[,E…]` (search breadth, default the
//! index's 64; several values are measured on the same index, the last line reports
//! the first), `--m M` (links per node, default 16), `--int8` (quantized vectors),
//! `--queries Q` (per kind, default 500), `--latent L` (see below, default 32),
//! `--seed S`.
//!
//! The vectors are synthetic, built like sentence embeddings: a random linear map of an
//! L-dimensional Gaussian latent into 384 dimensions, plus isotropic noise, normalised.
//! Two kinds of query are measured: *near* queries (a stored vector's latent, nudged:
//! the paraphrase a cache exists for) and *novel* ones (a fresh latent). Recall@1 is the
//! share of queries whose first result is the exact scan's first result. `--latent 384`
//! gives vectors with no low-dimensional structure, the hardest case for a graph.
//!
//! Then the whole index is rebuilt on another thread (as a semantic cache maintains
//! its index) while this one keeps searching through a read lock, with an insert
//! through the write lock every 100 searches: the lookup latency during a rebuild.
//!
//! Single inserts are timed with the maintenance they call for (linking each full delta
//! of 2,048 into the graph) run inline, so the rate is what the graph sustains, not
//! just the cost of an append; the rate is also given per second of the thread's CPU
//! time, which other processes on the machine change far less than the wall clock.
//!
//! The last line is `entries=… p50_us=… p99_us=… recall_at_1=… insert_per_s=…
//! insert_per_cpu_s=… bytes_per_entry=… rebuild_p99_us=…`.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokenwise::cache::{IndexConfig, Quantization, VectorIndex};

const DIMS: usize = 384;

struct Args {
    entries: usize,
    ef: Vec<usize>,
    m: usize,
    int8: bool,
    queries: usize,
    latent: usize,
    seed: u64,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        entries: 100_000,
        ef: vec![IndexConfig::default().ef_search],
        m: IndexConfig::default().max_connections,
        int8: false,
        queries: 500,
        latent: 32,
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .ok_or(format!("{name} needs a value"))?
                .replace('_', "")
                .parse()
                .map_err(|e| format!("{name}: {e}"))
        };
        match flag.as_str() {
            "--entries" => a.entries = num("--entries")?,
            "--ef" => {
                a.ef = it
                    .next()
                    .ok_or("--ef needs a value")?
                    .split(',')
                    .map(|x| x.parse().map_err(|e| format!("--ef: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--m" => a.m = num("--m")?,
            "--queries" => a.queries = num("--queries")?,
            "--latent" => a.latent = num("--latent")?,
            "--seed" => a.seed = num("--seed")? as u64,
            "--int8" => a.int8 = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.entries == 0 || a.latent == 0 {
        return Err("--entries and --latent must be positive".into());
    }
    Ok(a)
}

/// Synthetic embeddings: normalise(A·z + 0.05·noise).
struct Gen {
    map: Vec<f32>,
    latent: usize,
    rng: SmallRng,
}

impl Gen {
    fn new(latent: usize, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let map = (0..DIMS * latent).map(|_| gauss(&mut rng)).collect();
        Gen { map, latent, rng }
    }

    fn latent(&mut self) -> Vec<f32> {
        (0..self.latent).map(|_| gauss(&mut self.rng)).collect()
    }

    fn embed(&mut self, z: &[f32]) -> Vec<f32> {
        let scale = (self.latent as f32).sqrt();
        let mut v: Vec<f32> = (0..DIMS)
            .map(|i| {
                let row = &self.map[i * self.latent..(i + 1) * self.latent];
                let x: f32 = row.iter().zip(z).map(|(a, b)| a * b).sum();
                x / scale + 0.05 * gauss(&mut self.rng)
            })
            .collect();
        let n = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::EPSILON);
        v.iter_mut().for_each(|x| *x /= n);
        v
    }
}

fn gauss(rng: &mut SmallRng) -> f32 {
    // Box–Muller.
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// CPU time this thread has used, in seconds (user and system, from
/// `/proc/thread-self/stat`, in clock ticks of 10 ms): a rate over CPU time is what
/// the work costs however many other processes share the cores.
fn thread_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// The exact scan's dot product, in eight lanes so that it vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

fn read(index: &RwLock<VectorIndex>) -> RwLockReadGuard<'_, VectorIndex> {
    index.read().unwrap_or_else(|p| p.into_inner())
}

fn write(index: &RwLock<VectorIndex>) -> RwLockWriteGuard<'_, VectorIndex> {
    index.write().unwrap_or_else(|p| p.into_inner())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cache_index_scale: {e}");
            std::process::exit(2);
        }
    };
    let mut g = Gen::new(a.latent, a.seed);
    eprintln!("generating {} vectors…", a.entries);
    let mut latents = Vec::with_capacity(a.entries);
    let mut data: Vec<f32> = Vec::with_capacity(a.entries * DIMS);
    for _ in 0..a.entries {
        let z = g.latent();
        data.extend(g.embed(&z));
        latents.push(z);
    }
    let config = IndexConfig::default()
        .capacity(a.entries + 10_000)
        .max_connections(a.m)
        .quantization(if a.int8 {
            Quantization::Int8
        } else {
            Quantization::None
        });
    let mut index = match VectorIndex::new(DIMS, config) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("cache_index_scale: {e}");
            std::process::exit(2);
        }
    };
    let rss_before = rss_bytes();
    eprintln!("building…");
    let t0 = Instant::now();
    for (c, chunk) in data.chunks(DIMS * 50_000).enumerate() {
        let batch: Vec<(u64, &[f32])> = chunk
            .chunks_exact(DIMS)
            .enumerate()
            .map(|(i, v)| ((c * 50_000 + i) as u64, v))
            .collect();
        if let Err(e) = index.insert_batch(&batch) {
            eprintln!("cache_index_scale: {e}");
            std::process::exit(1);
        }
        eprintln!(
            "  {} in {:.0} s",
            (c + 1) * 50_000,
            t0.elapsed().as_secs_f64()
        );
    }
    let build_s = t0.elapsed().as_secs_f64();
    let bytes_per_entry = rss_bytes().saturating_sub(rss_before) / a.entries;

    // Queries: near (a stored latent, nudged) and novel (a fresh latent).
    let mut rng = SmallRng::seed_from_u64(a.seed ^ 0xABCD);
    let mut kinds: Vec<(&str, Vec<Vec<f32>>)> = vec![("near", Vec::new()), ("novel", Vec::new())];
    for _ in 0..a.queries {
        let i = rng.random_range(0..a.entries);
        let z: Vec<f32> = latents[i]
            .iter()
            .map(|x| x + 0.35 * gauss(&mut rng))
            .collect();
        kinds[0].1.push(g.embed(&z));
        let z = g.latent();
        kinds[1].1.push(g.embed(&z));
    }
    println!(
        "entries={} dims={DIMS} m={} quantization={} latent={} build_s={build_s:.1} bulk_insert_per_s={:.0} bytes_per_entry={bytes_per_entry}",
        a.entries,
        a.m,
        if a.int8 { "int8" } else { "none" },
        a.latent,
        a.entries as f64 / build_s
    );
    // The exact answers, once.
    let mut truth: Vec<Vec<(usize, f32)>> = Vec::new();
    let mut scans: Vec<f64> = Vec::new();
    for (_, queries) in &kinds {
        truth.push(
            queries
                .iter()
                .map(|q| {
                    let t = Instant::now();
                    let mut best = (0usize, f32::MIN);
                    for (i, v) in data.chunks_exact(DIMS).enumerate() {
                        let s = dot(q, v);
                        if s > best.1 {
                            best = (i, s);
                        }
                    }
                    scans.push(t.elapsed().as_secs_f64() * 1e6);
                    best
                })
                .collect(),
        );
    }
    scans.sort_by(f64::total_cmp);
    // One untimed pass first: the first queries after a build find its pages cold.
    for (_, queries) in &kinds {
        for q in queries {
            std::hint::black_box(index.search(q, 1));
        }
    }
    let mut first: Option<(f64, f64, f64)> = None;
    for &ef in &a.ef {
        index.set_ef_search(ef);
        let mut all_lat: Vec<f64> = Vec::new();
        let mut hits_total = 0usize;
        for ((name, queries), truth) in kinds.iter().zip(&truth) {
            let mut lat = Vec::with_capacity(queries.len());
            let mut hits = 0;
            for (q, best) in queries.iter().zip(truth) {
                let t = Instant::now();
                let got = index.search(q, 1);
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                hits += usize::from(got.first().is_some_and(|(id, _)| *id == best.0 as u64));
            }
            let above = truth.iter().filter(|b| b.1 >= 0.95).count();
            lat.sort_by(f64::total_cmp);
            println!(
                "  ef={ef:<4} {name:<5} queries={} p50_us={:.0} p99_us={:.0} max_us={:.0} recall_at_1={:.3} exact_top1_at_or_above_0.95={:.2}",
                queries.len(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat.last().copied().unwrap_or(0.0),
                hits as f64 / queries.len() as f64,
                above as f64 / queries.len() as f64,
            );
            hits_total += hits;
            all_lat.extend(lat);
        }
        all_lat.sort_by(f64::total_cmp);
        let recall = hits_total as f64 / all_lat.len().max(1) as f64;
        first.get_or_insert((
            percentile(&all_lat, 0.5),
            percentile(&all_lat, 0.99),
            recall,
        ));
    }
    let (p50, p99, recall) = first.unwrap_or_default();

    // Single inserts into the full index, with the maintenance they call for run
    // inline: two full deltas, so two snapshots are paid for.
    let n_single = 4_096;
    let mut ins = Vec::with_capacity(n_single);
    let mut cpu = 0.0;
    for k in 0..n_single {
        let z = g.latent();
        let v = g.embed(&z);
        let (t, c) = (Instant::now(), thread_cpu_s());
        let _ = index.insert((a.entries + k) as u64, &v);
        ins.push(t.elapsed().as_secs_f64());
        cpu += thread_cpu_s() - c;
    }
    let insert_per_s = n_single as f64 / ins.iter().sum::<f64>();
    let insert_per_cpu_s = if cpu > 0.0 {
        n_single as f64 / cpu
    } else {
        0.0
    };
    println!(
        "  exact scan p50_us={:.0}; single inserts into the full index: {:.0}/s ({:.0} per CPU second)",
        percentile(&scans, 0.5),
        insert_per_s,
        insert_per_cpu_s
    );

    // Lookups while the whole index is rebuilt on another thread, as a semantic cache
    // maintains its index: searches take the read lock, a few inserts the write lock.
    let n = index.len();
    index.defer_maintenance();
    let shared = Arc::new(RwLock::new(index));
    let job = write(&shared).rebuild_job();
    eprintln!("rebuilding {n} entries on another thread while searching…");
    let t0 = Instant::now();
    let worker = std::thread::spawn(move || job.run());
    let mut during = Vec::new();
    let mut write_lat = Vec::new();
    let mut k = 0usize;
    let mut next_id = (a.entries + n_single) as u64;
    while !worker.is_finished() && during.len() < 5_000_000 {
        let queries = &kinds[k % 2].1;
        let q = &queries[(k / 2) % queries.len()];
        let t = Instant::now();
        std::hint::black_box(read(&shared).search(q, 1));
        during.push(t.elapsed().as_secs_f64() * 1e6);
        k += 1;
        if k.is_multiple_of(100) {
            let z = g.latent();
            let v = g.embed(&z);
            let t = Instant::now();
            let _ = write(&shared).insert(next_id, &v);
            write_lat.push(t.elapsed().as_secs_f64() * 1e6);
            next_id += 1;
        }
    }
    let rebuild_s = t0.elapsed().as_secs_f64();
    let done = match worker.join() {
        Ok(d) => d,
        Err(_) => {
            eprintln!("cache_index_scale: the rebuild panicked");
            std::process::exit(1);
        }
    };
    let t = Instant::now();
    let (applied, retired) = {
        let mut index = write(&shared);
        let applied = index.apply(done);
        (applied, index.take_retired())
    };
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(retired); // freed outside the lock, as a semantic cache does
    during.sort_by(f64::total_cmp);
    write_lat.sort_by(f64::total_cmp);
    let rebuild_p99 = percentile(&during, 0.99);
    println!(
        "  during a rebuild ({rebuild_s:.1} s, applied={applied} in {apply_ms:.1} ms): lookups={} p50_us={:.0} p99_us={rebuild_p99:.0} max_us={:.0}; inserts={} p99_us={:.0}",
        during.len(),
        percentile(&during, 0.5),
        during.last().copied().unwrap_or(0.0),
        write_lat.len(),
        percentile(&write_lat, 0.99),
    );
    println!(
        "entries={} ef={} p50_us={p50:.0} p99_us={p99:.0} recall_at_1={recall:.3} insert_per_s={insert_per_s:.0} insert_per_cpu_s={insert_per_cpu_s:.0} bytes_per_entry={bytes_per_entry} rebuild_p99_us={rebuild_p99:.0}",
        a.entries,
        a.ef.first().copied().unwrap_or(0),
    );
}
