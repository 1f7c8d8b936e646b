//! Nearest-neighbour search over unit vectors: a flat scan while a set is small, an HNSW
//! graph ([hnsw_rs]) once it is large; removal by tombstones, compaction by rebuild.

use std::collections::HashMap;
use std::fmt;

use anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;

use crate::{Error, Result};

/// How vectors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Quantization {
    /// 32-bit floats (4 bytes a dimension), exact similarities.
    #[default]
    None,
    /// 8-bit integers (1 byte a dimension): each component of a unit vector scaled by
    /// 127 and rounded. Similarities are off by about 0.002; a quarter of the memory.
    Int8,
}

/// Settings of a [`VectorIndex`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct IndexConfig {
    /// Below this many vectors a search is a flat scan; at it, the set moves to an HNSW
    /// graph (default 2,048, where a graph search starts to beat a scan of 384
    /// dimensions; see `benches/cache_index.rs`).
    pub graph_from: usize,
    /// The most vectors held; inserting past it evicts the oldest (default 1,000,000).
    pub capacity: usize,
    /// Links per node of the graph (HNSW `M`, default 16, at most 64).
    pub max_connections: usize,
    /// Candidates considered while linking a new node (default 100).
    pub ef_construction: usize,
    /// Candidates considered by a search (default 64); higher is slower and more exact.
    pub ef_search: usize,
    /// Vector storage (default 32-bit floats).
    pub quantization: Quantization,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            graph_from: 2_048,
            capacity: 1_000_000,
            max_connections: 16,
            ef_construction: 100,
            ef_search: 64,
            quantization: Quantization::None,
        }
    }
}

impl IndexConfig {
    /// Sets [`graph_from`](Self::graph_from).
    #[must_use]
    pub fn graph_from(mut self, n: usize) -> Self {
        self.graph_from = n;
        self
    }

    /// Sets [`capacity`](Self::capacity).
    #[must_use]
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    #[must_use]
    pub fn max_connections(mut self, m: usize) -> Self {
        self.max_connections = m;
        self
    }

    /// Sets [`ef_construction`](Self::ef_construction).
    #[must_use]
    pub fn ef_construction(mut self, ef: usize) -> Self {
        self.ef_construction = ef;
        self
    }

    /// Sets [`ef_search`](Self::ef_search).
    #[must_use]
    pub fn ef_search(mut self, ef: usize) -> Self {
        self.ef_search = ef;
        self
    }

    /// Sets [`quantization`](Self::quantization).
    #[must_use]
    pub fn quantization(mut self, q: Quantization) -> Self {
        self.quantization = q;
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("vector index: {m}")));
        if self.capacity == 0 {
            return bad("capacity must be at least 1");
        }
        if !(2..=64).contains(&self.max_connections) {
            return bad("max_connections must be between 2 and 64");
        }
        if self.ef_construction == 0 || self.ef_search == 0 {
            return bad("ef_construction and ef_search must be at least 1");
        }
        Ok(())
    }
}

/// `1 - a·b`, never negative (the graph requires distances ≥ 0).
#[derive(Debug, Clone, Copy, Default)]
struct DotF32;

impl Distance<f32> for DotF32 {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct DotI8;

const I8_SCALE: f32 = 127.0;

impl Distance<i8> for DotI8 {
    fn eval(&self, a: &[i8], b: &[i8]) -> f32 {
        (1.0 - dot_i8(a, b)).max(0.0)
    }
}

/// The dot product, in eight lanes so that the compiler vectorises it.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

fn dot_i8(a: &[i8], b: &[i8]) -> f32 {
    let mut acc = [0i32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    let tail: i32 = ra
        .iter()
        .zip(rb)
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum();
    (acc.iter().sum::<i32>() + tail) as f32 / (I8_SCALE * I8_SCALE)
}

fn quantize(v: &[f32]) -> Vec<i8> {
    v.iter()
        .map(|x| (x * I8_SCALE).round().clamp(-I8_SCALE, I8_SCALE) as i8)
        .collect()
}

/// Vectors by slot, in flat mode.
enum Store {
    F32(Vec<f32>),
    I8(Vec<i8>),
}

enum Graph {
    F32(Hnsw<'static, f32, DotF32>),
    I8(Hnsw<'static, i8, DotI8>),
}

/// Layers of the graph (hnsw_rs's maximum).
const GRAPH_LAYERS: usize = 16;

/// A set of unit vectors under caller-chosen `u64` ids, searched by cosine similarity.
///
/// Below [`IndexConfig::graph_from`] vectors a search scans them all (exact); from there
/// on they live in an HNSW graph (approximate: recall@1 is measured by
/// `benches/cache_index.rs` and `examples/cache_index_scale.rs`). The graph cannot
/// delete, so removal marks a tombstone that searches skip; once tombstones outnumber
/// live vectors the index is rebuilt from the live ones. Past
/// [`capacity`](IndexConfig::capacity) an insert evicts the oldest vector.
///
/// ```
/// use tokenwise::cache::{IndexConfig, VectorIndex};
///
/// let mut index = VectorIndex::new(3, IndexConfig::default())?;
/// index.insert(7, &[1.0, 0.0, 0.0])?;
/// index.insert(8, &[0.0, 1.0, 0.0])?;
/// let best = index.search(&[0.9, 0.1, 0.0], 1);
/// assert_eq!(best[0].0, 7);
/// assert!(index.remove(7));
/// assert_eq!(index.search(&[0.9, 0.1, 0.0], 1)[0].0, 8);
/// # Ok::<(), tokenwise::Error>(())
/// ```
pub struct VectorIndex {
    dims: usize,
    config: IndexConfig,
    /// Caller id by slot.
    ids: Vec<u64>,
    dead: Vec<bool>,
    by_id: HashMap<u64, usize>,
    live: usize,
    /// Slots below this are all dead (the eviction cursor).
    oldest: usize,
    store: Store,
    graph: Option<Graph>,
}

impl fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dims", &self.dims)
            .field("live", &self.live)
            .field("tombstones", &self.tombstones())
            .field("graph", &self.graph.is_some())
            .field("config", &self.config)
            .finish()
    }
}

impl VectorIndex {
    /// An empty index of `dims`-dimensional vectors.
    pub fn new(dims: usize, config: IndexConfig) -> Result<Self> {
        config.validate()?;
        if dims == 0 {
            return Err(Error::Config(
                "vector index: dims must be at least 1".into(),
            ));
        }
        Ok(VectorIndex {
            dims,
            config,
            ids: Vec::new(),
            dead: Vec::new(),
            by_id: HashMap::new(),
            live: 0,
            oldest: 0,
            store: Self::empty_store(config.quantization),
            graph: None,
        })
    }

    fn empty_store(q: Quantization) -> Store {
        match q {
            Quantization::None => Store::F32(Vec::new()),
            Quantization::Int8 => Store::I8(Vec::new()),
        }
    }

    /// The dimension of every vector.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// The settings.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Live vectors.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no vector is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Removed vectors still taking space until the next rebuild.
    pub fn tombstones(&self) -> usize {
        self.ids.len() - self.live
    }

    /// Whether searches use the graph (rather than a flat scan).
    pub fn is_graph(&self) -> bool {
        self.graph.is_some()
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    fn check(&self, v: &[f32]) -> Result<()> {
        if v.len() != self.dims {
            return Err(Error::InvalidRequest(format!(
                "vector has {} dimensions, the index {}",
                v.len(),
                self.dims
            )));
        }
        if !v.iter().all(|x| x.is_finite()) {
            return Err(Error::InvalidRequest(
                "vector has a non-finite component".into(),
            ));
        }
        Ok(())
    }

    /// Adds (or replaces) the vector of `id`. Returns the id evicted to make room, if the
    /// index was at capacity.
    pub fn insert(&mut self, id: u64, v: &[f32]) -> Result<Option<u64>> {
        self.check(v)?;
        self.remove(id);
        let mut evicted = None;
        if self.live >= self.config.capacity {
            evicted = self.evict_oldest();
        }
        let slot = self.ids.len();
        self.ids.push(id);
        self.dead.push(false);
        self.by_id.insert(id, slot);
        self.live += 1;
        match &self.graph {
            Some(Graph::F32(g)) => g.insert_slice((v, slot)),
            Some(Graph::I8(g)) => g.insert_slice((&quantize(v), slot)),
            None => {
                match &mut self.store {
                    Store::F32(s) => s.extend_from_slice(v),
                    Store::I8(s) => s.extend(quantize(v)),
                }
                if self.ids.len() >= self.config.graph_from {
                    self.rebuild();
                }
            }
        }
        Ok(evicted)
    }

    fn evict_oldest(&mut self) -> Option<u64> {
        while self.oldest < self.ids.len() {
            let slot = self.oldest;
            self.oldest += 1;
            if !self.dead[slot] {
                let id = self.ids[slot];
                self.remove(id);
                return Some(id);
            }
        }
        None
    }

    /// Removes `id`; returns whether it was there. Rebuilds the index once tombstones
    /// outnumber live vectors (and number at least 64).
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(slot) = self.by_id.remove(&id) else {
            return false;
        };
        if let Some(d) = self.dead.get_mut(slot) {
            *d = true;
        }
        self.live -= 1;
        let dead = self.tombstones();
        if dead >= 64 && dead > self.live {
            self.rebuild();
        }
        true
    }

    /// Removes every vector.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.dead.clear();
        self.by_id.clear();
        self.live = 0;
        self.oldest = 0;
        self.store = Self::empty_store(self.config.quantization);
        self.graph = None;
    }

    /// Live vectors by id, in the stored precision (dequantized).
    fn live_vectors(&self) -> Vec<(u64, Vec<f32>)> {
        let mut out = Vec::with_capacity(self.live);
        let live = |slot: usize| !self.dead.get(slot).copied().unwrap_or(true);
        match (&self.graph, &self.store) {
            (Some(Graph::F32(g)), _) => {
                for p in g.get_point_indexation() {
                    let slot = p.get_origin_id();
                    if live(slot) {
                        out.push((self.ids[slot], p.get_v().to_vec()));
                    }
                }
            }
            (Some(Graph::I8(g)), _) => {
                for p in g.get_point_indexation() {
                    let slot = p.get_origin_id();
                    if live(slot) {
                        let v = p.get_v().iter().map(|x| f32::from(*x) / I8_SCALE);
                        out.push((self.ids[slot], v.collect()));
                    }
                }
            }
            (None, Store::F32(s)) => {
                for (slot, v) in s.chunks_exact(self.dims).enumerate() {
                    if live(slot) {
                        out.push((self.ids[slot], v.to_vec()));
                    }
                }
            }
            (None, Store::I8(s)) => {
                for (slot, v) in s.chunks_exact(self.dims).enumerate() {
                    if live(slot) {
                        let v = v.iter().map(|x| f32::from(*x) / I8_SCALE);
                        out.push((self.ids[slot], v.collect()));
                    }
                }
            }
        }
        // The graph yields its points layer by layer: restore insertion order, so that
        // eviction stays oldest-first.
        let pos: HashMap<u64, usize> = self.by_id.clone();
        out.sort_by_key(|(id, _)| pos.get(id).copied().unwrap_or(usize::MAX));
        out
    }

    /// Rebuilds from the live vectors: drops tombstones, and moves to (or from) the
    /// graph as the size calls for. Runs on the calling thread; a graph of n vectors
    /// costs about n inserts (spread over rayon's threads).
    pub fn rebuild(&mut self) {
        let live = self.live_vectors();
        self.clear();
        let n = live.len();
        for (slot, (id, _)) in live.iter().enumerate() {
            self.ids.push(*id);
            self.dead.push(false);
            self.by_id.insert(*id, slot);
        }
        self.live = n;
        if n < self.config.graph_from {
            for (_, v) in &live {
                match &mut self.store {
                    Store::F32(s) => s.extend_from_slice(v),
                    Store::I8(s) => s.extend(quantize(v)),
                }
            }
            return;
        }
        let c = &self.config;
        let hint = n.saturating_mul(2).max(c.graph_from).min(c.capacity.max(1));
        self.graph = Some(match c.quantization {
            Quantization::None => {
                let g = Hnsw::new(
                    c.max_connections,
                    hint,
                    GRAPH_LAYERS,
                    c.ef_construction,
                    DotF32,
                );
                let data: Vec<(&[f32], usize)> = live
                    .iter()
                    .enumerate()
                    .map(|(slot, (_, v))| (v.as_slice(), slot))
                    .collect();
                g.parallel_insert_slice(&data);
                Graph::F32(g)
            }
            Quantization::Int8 => {
                let g = Hnsw::new(
                    c.max_connections,
                    hint,
                    GRAPH_LAYERS,
                    c.ef_construction,
                    DotI8,
                );
                let q: Vec<Vec<i8>> = live.iter().map(|(_, v)| quantize(v)).collect();
                let data: Vec<(&[i8], usize)> = q
                    .iter()
                    .enumerate()
                    .map(|(slot, v)| (v.as_slice(), slot))
                    .collect();
                g.parallel_insert_slice(&data);
                Graph::I8(g)
            }
        });
    }

    /// Up to `k` live vectors most similar to `query`, best first, as (id, cosine
    /// similarity). Approximate once the index uses its graph. A query of the wrong
    /// dimension finds nothing.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        if k == 0 || self.live == 0 || self.check(query).is_err() {
            return Vec::new();
        }
        let ef = self.config.ef_search.max(k);
        let dead = &self.dead;
        let skip_dead = |id: &usize| !dead.get(*id).copied().unwrap_or(true);
        let filter: Option<&dyn hnsw_rs::filter::FilterT> = if self.live < self.ids.len() {
            Some(&skip_dead)
        } else {
            None
        };
        let found = match &self.graph {
            Some(Graph::F32(g)) => g.search_filter(query, k, ef, filter),
            Some(Graph::I8(g)) => g.search_filter(&quantize(query), k, ef, filter),
            None => return self.scan(query, k),
        };
        found
            .into_iter()
            .filter_map(|n| {
                let slot = n.get_origin_id();
                let live = !self.dead.get(slot).copied().unwrap_or(true);
                live.then(|| (self.ids[slot], 1.0 - n.get_distance()))
            })
            .collect()
    }

    /// Like [`search`](Self::search), by scanning every live vector: exact, and the
    /// reference that recall is measured against.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        if k == 0 || self.live == 0 || self.check(query).is_err() {
            return Vec::new();
        }
        if self.graph.is_none() {
            return self.scan(query, k);
        }
        let mut top = TopK::new(k);
        for (id, v) in self.live_vectors() {
            top.offer(id, dot(query, &v));
        }
        top.into_vec()
    }

    fn scan(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        let mut top = TopK::new(k);
        match &self.store {
            Store::F32(s) => {
                for (slot, v) in s.chunks_exact(self.dims).enumerate() {
                    if !self.dead[slot] {
                        top.offer(self.ids[slot], dot(query, v));
                    }
                }
            }
            Store::I8(s) => {
                let q = quantize(query);
                for (slot, v) in s.chunks_exact(self.dims).enumerate() {
                    if !self.dead[slot] {
                        top.offer(self.ids[slot], dot_i8(&q, v));
                    }
                }
            }
        }
        top.into_vec()
    }
}

/// The k best (id, similarity) pairs seen, best first.
struct TopK {
    k: usize,
    best: Vec<(u64, f32)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            best: Vec::with_capacity(k + 1),
        }
    }

    fn offer(&mut self, id: u64, sim: f32) {
        if self.best.len() == self.k && self.best.last().is_some_and(|(_, s)| *s >= sim) {
            return;
        }
        let at = self.best.partition_point(|(_, s)| *s >= sim);
        self.best.insert(at, (id, sim));
        self.best.truncate(self.k);
    }

    fn into_vec(self) -> Vec<(u64, f32)> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u64, dims: usize) -> Vec<f32> {
        // A small xorshift: deterministic vectors without a dependency.
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..dims)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let n = dot(&v, &v).sqrt();
        v.iter_mut().for_each(|c| *c /= n);
        v
    }

    #[test]
    fn flat_and_graph_find_the_same_nearest_vector() {
        for q in [Quantization::None, Quantization::Int8] {
            let config = IndexConfig::default().graph_from(200).quantization(q);
            let mut index = VectorIndex::new(32, config).unwrap();
            for i in 0..150 {
                index.insert(i, &unit(i, 32)).unwrap();
            }
            assert!(!index.is_graph());
            for i in 150..400 {
                index.insert(i, &unit(i, 32)).unwrap();
            }
            assert!(index.is_graph());
            assert_eq!(index.len(), 400);
            let mut hits = 0;
            for i in (0..400).step_by(7) {
                let got = index.search(&unit(i, 32), 1);
                let want = index.exact_search(&unit(i, 32), 1);
                assert_eq!(want[0].0, i, "{q:?}");
                assert!(want[0].1 > 0.99);
                hits += usize::from(got[0].0 == i);
            }
            assert!(hits >= 56, "{q:?}: recall {hits}/58");
        }
    }

    #[test]
    fn tombstones_hide_removed_vectors_and_rebuild_drops_them() {
        let mut index = VectorIndex::new(16, IndexConfig::default().graph_from(100)).unwrap();
        for i in 0..300 {
            index.insert(i, &unit(i, 16)).unwrap();
        }
        assert!(index.remove(5));
        assert!(!index.remove(5));
        assert!(!index.search(&unit(5, 16), 3).iter().any(|(id, _)| *id == 5));
        assert_eq!(index.tombstones(), 1);
        for i in 0..160 {
            index.remove(i);
        }
        // 160 removed out of 300: tombstones outnumbered live vectors, so it rebuilt.
        assert_eq!(index.len(), 140);
        assert!(index.tombstones() < 64);
        assert!(index.is_graph());
        assert_eq!(index.search(&unit(200, 16), 1)[0].0, 200);
        for i in 160..300 {
            index.remove(i);
        }
        assert!(index.is_empty());
        assert!(!index.is_graph(), "small again: back to a flat scan");
        assert!(index.search(&unit(1, 16), 1).is_empty());
    }

    #[test]
    fn capacity_evicts_the_oldest_and_bad_input_is_refused() {
        let mut index = VectorIndex::new(8, IndexConfig::default().capacity(3)).unwrap();
        for i in 0..3 {
            assert_eq!(index.insert(i, &unit(i, 8)).unwrap(), None);
        }
        assert_eq!(index.insert(3, &unit(3, 8)).unwrap(), Some(0));
        // replacing an id keeps one copy
        assert_eq!(index.insert(3, &unit(4, 8)).unwrap(), None);
        assert_eq!(index.len(), 3);
        assert!(!index.contains(0));
        assert!(index.insert(9, &[1.0; 7]).is_err());
        assert!(index.insert(9, &[f32::NAN; 8]).is_err());
        assert!(index.search(&[1.0; 7], 1).is_empty());
        assert!(VectorIndex::new(8, IndexConfig::default().capacity(0)).is_err());
        assert!(VectorIndex::new(8, IndexConfig::default().max_connections(300)).is_err());
        assert!(VectorIndex::new(0, IndexConfig::default()).is_err());
    }
}
