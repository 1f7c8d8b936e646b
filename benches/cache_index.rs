//! The semantic index: lookup at 10k and 100k entries of 384 dimensions (graph), the
//! flat scan against the graph at small sizes (where `IndexConfig::graph_from` comes
//! from), single inserts, and the semantic cache's own lookup. Percentiles, recall@1,
//! memory per entry and the 1M run: `examples/cache_index_scale.rs`.
//!
//! ```text
//! cargo bench --bench cache_index
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokenwise::cache::{IndexConfig, Quantization, VectorIndex};

const DIMS: usize = 384;
const LATENT: usize = 32;

/// Synthetic embeddings as in `examples/cache_index_scale.rs`: a random linear map of a
/// 32-dimension Gaussian latent, plus noise, normalised.
struct Gen {
    map: Vec<f32>,
    rng: SmallRng,
}

impl Gen {
    fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let map = (0..DIMS * LATENT).map(|_| gauss(&mut rng)).collect();
        Gen { map, rng }
    }

    fn latent(&mut self) -> Vec<f32> {
        (0..LATENT).map(|_| gauss(&mut self.rng)).collect()
    }

    fn embed(&mut self, z: &[f32]) -> Vec<f32> {
        let mut v: Vec<f32> = (0..DIMS)
            .map(|i| {
                let row = &self.map[i * LATENT..(i + 1) * LATENT];
                let x: f32 = row.iter().zip(z).map(|(a, b)| a * b).sum();
                x / (LATENT as f32).sqrt() + 0.05 * gauss(&mut self.rng)
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
    let u: f32 = rng.random_range(f32::EPSILON..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `n` stored vectors and 256 near queries (a stored latent, nudged).
fn data(n: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut g = Gen::new(7);
    let latents: Vec<Vec<f32>> = (0..n).map(|_| g.latent()).collect();
    let stored = latents.iter().map(|z| g.embed(z)).collect();
    let mut rng = SmallRng::seed_from_u64(11);
    let queries = (0..256)
        .map(|_| {
            let z = &latents[rng.random_range(0..n)];
            let z: Vec<f32> = z.iter().map(|x| x + 0.35 * gauss(&mut rng)).collect();
            g.embed(&z)
        })
        .collect();
    (stored, queries)
}

fn build(stored: &[Vec<f32>], config: IndexConfig) -> VectorIndex {
    let mut index =
        VectorIndex::new(DIMS, config.capacity(stored.len() + 100_000)).expect("valid config");
    let batch: Vec<(u64, &[f32])> = stored
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.as_slice()))
        .collect();
    index.insert_batch(&batch).expect("valid vectors");
    index
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_index/lookup");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(5));
    for n in [10_000, 100_000] {
        let (stored, queries) = data(n);
        for (name, q) in [("f32", Quantization::None), ("int8", Quantization::Int8)] {
            let index = build(&stored, IndexConfig::default().quantization(q));
            let mut i = 0;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(index.search(&queries[i], 1))
                })
            });
        }
    }
    group.finish();
}

fn flat_vs_graph(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_index/flat_vs_graph");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(3));
    for n in [1_000, 2_000, 5_000] {
        let (stored, queries) = data(n);
        let flat = build(&stored, IndexConfig::default().graph_from(usize::MAX));
        let graph = build(&stored, IndexConfig::default().graph_from(1));
        assert!(graph.is_graph() && !flat.is_graph());
        for (name, index) in [("flat", &flat), ("graph", &graph)] {
            let mut i = 0;
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    i = (i + 1) % queries.len();
                    black_box(index.search(&queries[i], 1))
                })
            });
        }
    }
    group.finish();
}

fn insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_index/insert");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.throughput(Throughput::Elements(1));
    let (stored, _) = data(10_000);
    let mut index = build(&stored, IndexConfig::default());
    let mut g = Gen::new(99);
    let fresh: Vec<Vec<f32>> = (0..4_096)
        .map(|_| {
            let z = g.latent();
            g.embed(&z)
        })
        .collect();
    let mut id = 1_000_000u64;
    group.bench_function("single_into_10k_graph", |b| {
        b.iter(|| {
            id += 1;
            let v = &fresh[(id % 4_096) as usize];
            black_box(index.insert(id, v).expect("valid vector"))
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    lookup(&mut c);
    flat_vs_graph(&mut c);
    insert(&mut c);
    c.final_summary();
}
