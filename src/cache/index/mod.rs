//! Nearest-neighbour search over unit vectors: a flat scan while a set is small, an HNSW
//! graph ([hnsw_rs]) once it is large; removal by tombstones, compaction by rebuild.

mod pages;
mod simd;

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use anndists::dist::Distance;
use bytemuck::Pod;
use hnsw_rs::hnsw::{Hnsw, Point};

use self::pages::{Fetch, Pages};

use crate::{Error, Result};

/// How vectors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Quantization {
    /// 32-bit floats (4 bytes a dimension), exact similarities.
    #[default]
    None,
    /// 8-bit integers (1 byte a dimension): each vector scaled so that its largest
    /// component is 127 and rounded, compared by the cosine of the codes.
    /// Similarities are off by about 0.001; a quarter of the memory.
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
        if self.capacity == 0 || self.capacity >= u32::MAX as usize {
            return bad("capacity must be at least 1 and below 2^32");
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

pub(crate) use self::simd::dot;
use self::simd::{dot_codes, dot_codes_and_norm};

/// The cosine of two byte codes (each a unit vector scaled by its own factor, which
/// the cosine cancels).
fn dot_i8(a: &[i8], b: &[i8]) -> f32 {
    i8::sim_to(a)(b)
}

/// The stored form of a vector under [`Quantization::Int8`]: its byte code.
fn quantize(v: &[f32]) -> Vec<i8> {
    code_of(v).0
}

/// Vectors by slot: every vector in flat mode, the delta (slots from the snapshot's
/// end on) in graph mode.
enum Store {
    F32(Vec<f32>),
    I8(Vec<i8>),
}

/// The graph of one element type: hnsw_rs's graph, extended and rebuilt by maintenance
/// only, and the read-only copy that searches walk. Both are shared with a maintenance
/// job in flight, so that searches go on while it runs.
struct GraphState<T: Elem> {
    hnsw: Arc<Hnsw<'static, T, T::Dist>>,
    frozen: Arc<Frozen<T>>,
}

enum Graph {
    F32(GraphState<f32>),
    I8(GraphState<i8>),
}

/// Vectors inserted since the graph's snapshot that start maintenance: they are
/// scanned exactly on every search until a snapshot takes them in.
const MAX_DELTA: usize = 2_048;

/// A vector component the index can store.
trait Elem: Pod + Send + Sync + 'static {
    /// The graph's distance on this type.
    type Dist: Distance<Self> + Default + Send + Sync + 'static;
    /// The flat store of this type, if `store` holds it.
    fn store(store: &Store) -> Option<&[Self]>;
    /// Wraps a graph of this type.
    fn graph(g: GraphState<Self>) -> Graph;
    /// Wraps a flat store of this type.
    fn wrap_store(v: Vec<Self>) -> Store;
    fn sim(a: &[Self], b: &[Self]) -> f32;
    /// [`sim`](Self::sim) to one query, with what depends on the query alone worked
    /// out once.
    fn sim_to(q: &[Self]) -> impl Fn(&[Self]) -> f32 + '_;
    /// A byte code of `v` for the graph walk (see [`Frozen::codes`]), if this type
    /// takes one.
    fn code(v: &[Self]) -> Option<Vec<i8>>;
}

impl Elem for f32 {
    type Dist = DotF32;
    fn store(store: &Store) -> Option<&[f32]> {
        match store {
            Store::F32(s) => Some(s),
            Store::I8(_) => None,
        }
    }
    fn graph(g: GraphState<f32>) -> Graph {
        Graph::F32(g)
    }
    fn wrap_store(v: Vec<f32>) -> Store {
        Store::F32(v)
    }
    fn sim(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    fn sim_to(q: &[f32]) -> impl Fn(&[f32]) -> f32 + '_ {
        move |v| dot(q, v)
    }
    fn code(v: &[f32]) -> Option<Vec<i8>> {
        Some(code_of(v).0)
    }
}

impl Elem for i8 {
    type Dist = DotI8;
    fn store(store: &Store) -> Option<&[i8]> {
        match store {
            Store::I8(s) => Some(s),
            Store::F32(_) => None,
        }
    }
    fn graph(g: GraphState<i8>) -> Graph {
        Graph::I8(g)
    }
    fn wrap_store(v: Vec<i8>) -> Store {
        Store::I8(v)
    }
    fn sim(a: &[i8], b: &[i8]) -> f32 {
        dot_i8(a, b)
    }
    fn sim_to(q: &[i8]) -> impl Fn(&[i8]) -> f32 + '_ {
        let qn = (dot_codes(q, q) as f32).sqrt();
        move |v| {
            let (d, vn) = dot_codes_and_norm(q, v);
            if vn == 0 || qn == 0.0 {
                0.0
            } else {
                d as f32 / (qn * (vn as f32).sqrt())
            }
        }
    }
    fn code(_: &[i8]) -> Option<Vec<i8>> {
        None // already bytes
    }
}

/// `v` as bytes scaled to its own largest component: `v ≈ code · scale`. A unit
/// vector's components are small (about 0.05 at 384 dimensions), so a scale per vector
/// keeps about seven bits of each where a fixed scale would keep three.
fn code_of(v: &[f32]) -> (Vec<i8>, f32) {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max <= f32::EPSILON {
        return (vec![0; v.len()], 0.0);
    }
    let scale = max / I8_SCALE;
    let code = v
        .iter()
        .map(|x| (x / scale).round().clamp(-I8_SCALE, I8_SCALE) as i8)
        .collect();
    (code, scale)
}

/// Candidates re-scored on full vectors after a walk on codes (at least `k`).
const RESCORE: usize = 32;

/// `f32` ordered by `total_cmp`, for the search heaps.
#[derive(Clone, Copy, PartialEq)]
struct Sim(f32);

impl Eq for Sim {}

impl PartialOrd for Sim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Sim {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A compact, read-only copy of the graph's links: hnsw_rs builds and extends the
/// graph; searches walk this copy (flat arrays, a bitset of visited nodes, no locks or
/// per-node allocations), which is several times faster than hnsw_rs's own search.
/// Points inserted after the copy was taken are scanned exactly until the next copy.
struct Frozen<T: Elem> {
    dims: usize,
    /// Vectors by dense index, contiguous (a copy: pointer-chasing into the graph's
    /// own points costs a cache miss or two per visited node).
    vectors: Pages<T>,
    /// Slot by dense index.
    slots: Vec<u32>,
    /// Layer-0 links of dense index `i`: `links[offsets[i]..offsets[i + 1]]`.
    offsets: Pages<u32>,
    links: Pages<u32>,
    /// Links on layers 1.. of the few points that reach them.
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: u32,
    top: usize,
    /// Slots below this are in the copy; slots from it on are the delta.
    upto: usize,
    /// Byte codes of the vectors, walked instead of the vectors themselves (for
    /// full-precision vectors): a quarter of the memory read per visited node, which
    /// is what a search at scale waits on. A node is scored by the cosine of its code
    /// and the query's, so no scale is read per node. The walk's best candidates are
    /// then re-scored on the full vectors, so results and their similarities are
    /// exact for what the walk found.
    codes: Option<Pages<i8>>,
    /// Dense index by slot (`u32::MAX`: not in the copy).
    dense_of: Vec<u32>,
    /// Tombstones by dense index, one bit each: checked for every candidate, so kept
    /// next to the walk rather than behind a slot lookup. Atomic, so that a removal
    /// marks the copy while a maintenance job shares it.
    dead: Box<[AtomicU64]>,
}

impl<T: Elem> Frozen<T> {
    fn take<D: Distance<T> + Send + Sync>(
        g: &Hnsw<'static, T, D>,
        slots: usize,
        tombstones: &[bool],
    ) -> Option<Self> {
        let points: Vec<Arc<Point<'static, T>>> = g.get_point_indexation().into_iter().collect();
        let dims = points.first().map_or(0, |p| p.get_v().len());
        let mut vectors = Pages::zeroed(points.len() * dims);
        let mut slot_of = Vec::with_capacity(points.len());
        for (p, to) in points
            .iter()
            .zip(vectors.as_mut_slice().chunks_exact_mut(dims.max(1)))
        {
            if p.get_v().len() != dims {
                return None;
            }
            to.copy_from_slice(p.get_v());
            slot_of.push(u32::try_from(p.get_origin_id()).ok()?);
        }
        let mut dense = vec![u32::MAX; slots];
        for (i, p) in points.iter().enumerate() {
            let d = dense.get_mut(p.get_origin_id())?;
            *d = u32::try_from(i).ok()?;
        }
        let id = |slot: usize| dense.get(slot).copied().filter(|d| *d != u32::MAX);
        let mut offsets = Vec::with_capacity(points.len() + 1);
        let mut links = Vec::new();
        let mut upper = HashMap::new();
        let (mut entry, mut top) = (0u32, 0usize);
        for (i, p) in points.iter().enumerate() {
            offsets.push(u32::try_from(links.len()).ok()?);
            let hood = p.get_neighborhood_id();
            if let Some(l0) = hood.first() {
                links.extend(l0.iter().filter_map(|n| id(n.d_id)));
            }
            let level = usize::from(p.get_point_id().0);
            if level > 0 {
                let layers: Vec<Vec<u32>> = (1..=level)
                    .map(|l| {
                        hood.get(l)
                            .map(|ns| ns.iter().filter_map(|n| id(n.d_id)).collect())
                            .unwrap_or_default()
                    })
                    .collect();
                upper.insert(u32::try_from(i).ok()?, layers);
            }
            if level > top || i == 0 {
                top = level;
                entry = u32::try_from(i).ok()?;
            }
        }
        offsets.push(u32::try_from(links.len()).ok()?);
        let all = vectors.as_slice();
        // None for a type that takes no codes (its first vector has none).
        let codes = (|| {
            let mut codes = Pages::zeroed(all.len());
            for (v, to) in all
                .chunks_exact(dims.max(1))
                .zip(codes.as_mut_slice().chunks_exact_mut(dims.max(1)))
            {
                to.copy_from_slice(&T::code(v)?);
            }
            Some(codes)
        })();
        let mut dead = vec![0u64; points.len().div_ceil(64)];
        for (i, slot) in slot_of.iter().enumerate() {
            if tombstones.get(*slot as usize).copied().unwrap_or(false) {
                dead[i / 64] |= 1 << (i % 64);
            }
        }
        let dead: Box<[AtomicU64]> = dead.into_iter().map(AtomicU64::new).collect();
        Some(Frozen {
            dense_of: dense,
            dead,
            codes,
            dims,
            vectors,
            slots: slot_of,
            offsets: Pages::from_slice(&offsets),
            links: Pages::from_slice(&links),
            upper,
            entry,
            top,
            upto: slots,
        })
    }

    fn vector(&self, i: u32) -> &[T] {
        let at = i as usize * self.dims;
        self.vectors
            .as_slice()
            .get(at..at + self.dims)
            .unwrap_or(&[])
    }

    fn slot(&self, i: u32) -> usize {
        self.slots[i as usize] as usize
    }

    /// Marks `slot` dead in the copy (if it is in it).
    fn kill(&self, slot: usize) {
        if let Some(&d) = self.dense_of.get(slot) {
            if let Some(w) = self.dead.get(d as usize / 64) {
                w.fetch_or(1 << (d % 64), AtomicOrdering::Relaxed);
            }
        }
    }

    fn is_dead(&self, i: u32) -> bool {
        self.dead
            .get(i as usize / 64)
            .is_none_or(|w| w.load(AtomicOrdering::Relaxed) >> (i % 64) & 1 == 1)
    }

    /// Points in the copy (dead ones included).
    fn points(&self) -> usize {
        self.slots.len()
    }

    fn layer0(&self, i: u32) -> &[u32] {
        let offsets = self.offsets.as_slice();
        let (Some(&a), Some(&b)) = (offsets.get(i as usize), offsets.get(i as usize + 1)) else {
            return &[];
        };
        self.links
            .as_slice()
            .get(a as usize..b as usize)
            .unwrap_or(&[])
    }

    /// The `ef`-wide HNSW search for the `k` best; dead slots are walked through but
    /// never returned. Returns (slot, similarity), best first.
    fn search(&self, q: &[T], ef: usize, k: usize) -> Vec<(usize, f32)> {
        let fetch = Fetch::new();
        let coded = self.codes.as_ref().zip(T::code(q));
        let Some((codes, qc)) = coded else {
            let found = self.walk(
                ef,
                fetch,
                {
                    let sim = T::sim_to(q);
                    move |i| sim(self.vector(i))
                },
                |i| fetch.lines(self.vector(i)),
            );
            return found.into_iter().map(|(i, s)| (self.slot(i), s)).collect();
        };
        let dims = self.dims;
        let all = codes.as_slice();
        let code = |i: u32| {
            let at = i as usize * dims;
            all.get(at..at + dims).unwrap_or(&[])
        };
        let found = self.walk(
            ef,
            fetch,
            {
                // The cosine of the codes: a unit vector's code has norm 1 / its scale,
                // so no scale is read per node.
                let sim = i8::sim_to(&qc);
                move |i| sim(code(i))
            },
            |i| fetch.lines(code(i)),
        );
        // Re-score the walk's best on the full vectors (fetched first, so that their
        // loads overlap).
        let best = &found[..found.len().min(RESCORE.max(k))];
        let fetched = best
            .iter()
            .fold(0u32, |a, (i, _)| a ^ fetch.lines(self.vector(*i)));
        std::hint::black_box(fetched);
        let mut out: Vec<(usize, f32)> = best
            .iter()
            .map(|(i, _)| (self.slot(*i), T::sim(q, self.vector(*i))))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// The walk: greedy descent through the upper layers, then a beam of width `ef` on
    /// layer 0, scoring nodes with `sim`. Returns (dense index, score), best first.
    fn walk(
        &self,
        ef: usize,
        fetch: Fetch,
        sim: impl Fn(u32) -> f32,
        prefetch: impl Fn(u32) -> u32,
    ) -> Vec<(u32, f32)> {
        if self.slots.is_empty() {
            return Vec::new();
        }
        let is_dead = |i: u32| self.is_dead(i);
        // Greedy descent through the upper layers.
        let mut cur = self.entry;
        let mut cur_sim = sim(cur);
        for layer in (1..=self.top).rev() {
            loop {
                let mut moved = false;
                let next = self
                    .upper
                    .get(&cur)
                    .and_then(|ls| ls.get(layer - 1))
                    .map_or(&[][..], Vec::as_slice);
                for &n in next {
                    let s = sim(n);
                    if s > cur_sim {
                        (cur, cur_sim, moved) = (n, s, true);
                    }
                }
                if !moved {
                    break;
                }
            }
        }
        // Beam search on layer 0.
        let mut visited = vec![0u64; self.slots.len().div_ceil(64)];
        let mut seen = |i: u32| {
            let (w, b) = ((i / 64) as usize, i % 64);
            let was = visited[w] >> b & 1 == 1;
            visited[w] |= 1 << b;
            was
        };
        seen(cur);
        let mut fresh: Vec<u32> = Vec::with_capacity(64);
        let mut candidates: BinaryHeap<(Sim, u32)> = BinaryHeap::with_capacity(ef * 4);
        let mut best: BinaryHeap<Reverse<(Sim, u32)>> = BinaryHeap::with_capacity(ef + 1);
        candidates.push((Sim(cur_sim), cur));
        if !is_dead(cur) {
            best.push(Reverse((Sim(cur_sim), cur)));
        }
        while let Some((Sim(s), c)) = candidates.pop() {
            let worst = best.peek().map_or(f32::MIN, |Reverse((Sim(w), _))| *w);
            if best.len() >= ef && s < worst {
                break;
            }
            // Gather the unvisited neighbours and ask for every cache line of each
            // first: independent loads that the processor overlaps, where the
            // similarities one after another would wait for memory each time. The
            // links of the next candidate are asked for too.
            fresh.clear();
            fresh.extend(self.layer0(c).iter().copied().filter(|n| !seen(*n)));
            let mut fetched = 0u32;
            for &n in &fresh {
                fetched ^= prefetch(n);
            }
            if let Some((_, next)) = candidates.peek() {
                fetched ^= fetch.lines(self.layer0(*next));
            }
            std::hint::black_box(fetched);
            for &n in &fresh {
                let sn = sim(n);
                let worst = best.peek().map_or(f32::MIN, |Reverse((Sim(w), _))| *w);
                if best.len() < ef || sn > worst {
                    candidates.push((Sim(sn), n));
                    if !is_dead(n) {
                        best.push(Reverse((Sim(sn), n)));
                        if best.len() > ef {
                            best.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<(u32, f32)> = best
            .into_iter()
            .map(|Reverse((Sim(s), i))| (i, s))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }
}

/// Layers of the graph (hnsw_rs's maximum).
const GRAPH_LAYERS: usize = 16;

/// Ids of maintenance jobs, unique in the process: a job's result is applied only to
/// the index that started it, and only if nothing has superseded it since.
static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

/// A set of unit vectors under caller-chosen `u64` ids, searched by cosine similarity.
///
/// Below [`IndexConfig::graph_from`] vectors a search scans them all (exact); from there
/// on they live in an HNSW graph (approximate: recall@1 is measured by
/// `benches/cache_index.rs` and `examples/cache_index_scale.rs`). The graph cannot
/// delete, so removal marks a tombstone that searches skip; once tombstones outnumber
/// live vectors the index is rebuilt from the live ones. Past
/// [`capacity`](IndexConfig::capacity) an insert evicts the oldest vector.
///
/// # Maintenance
///
/// An insert only appends to a *delta* that searches scan exactly. The heavy work, all
/// of it [maintenance](Maintenance), comes in three kinds: building the graph once the
/// set reaches `graph_from`, linking a full delta (2,048 vectors) into the graph and
/// taking a new snapshot of it, and rebuilding without tombstones. By default it runs
/// inside the `insert` or `remove` that calls for it. After
/// [`defer_maintenance`](Self::defer_maintenance) it never does: the owner takes the
/// job with [`maintenance`](Self::maintenance), [runs](Maintenance::run) it anywhere
/// (it holds no borrow of the index, so searches and inserts go on meanwhile) and
/// [applies](Self::apply) the result, a swap of shared pointers plus work linear in
/// the slots (no vector copied). A [`SemanticCache`](super::SemanticCache) does so on a
/// blocking thread. One job is in flight at a time, so memory stays bounded: at most
/// one extra snapshot while a job runs.
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
    /// Flat mode: every vector by slot. Graph mode: the delta, vectors of slots from
    /// the snapshot's `upto` on.
    store: Store,
    graph: Option<Graph>,
    /// Maintenance runs only when asked for (see [`Maintenance`]).
    deferred: bool,
    /// The job in flight, if any.
    job: Option<u64>,
    /// The graph may hold points its snapshot does not (a job failed part way): the
    /// next job rebuilds.
    dirty: bool,
    /// What the last applied job replaced, for the owner to drop outside its lock.
    retired: Retired,
}

/// What an applied [`Maintenance`] job replaced (an old graph or snapshot), taken with
/// [`VectorIndex::take_retired`] so that it is freed outside any lock: freeing a large
/// graph takes a while. Dropping it frees it.
#[derive(Default)]
pub struct Retired(Vec<Box<dyn std::any::Any + Send + Sync>>);

impl fmt::Debug for Retired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retired")
            .field("items", &self.0.len())
            .finish()
    }
}

impl fmt::Debug for VectorIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VectorIndex")
            .field("dims", &self.dims)
            .field("live", &self.live)
            .field("tombstones", &self.tombstones())
            .field("graph", &self.graph.is_some())
            .field("delta", &self.delta())
            .field("config", &self.config)
            .finish()
    }
}

/// Heavy work on a [`VectorIndex`], taken from it by
/// [`VectorIndex::maintenance`]: it owns what it needs (shared pointers to the graph
/// and its snapshot, a copy of the delta and of the slot table), so it can run on
/// another thread while the index is searched and written.
#[must_use = "a maintenance job does nothing until it is run and applied"]
pub struct Maintenance {
    job: u64,
    work: Work,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.work {
            Work::F32(w) => w.kind(),
            Work::I8(w) => w.kind(),
        };
        f.debug_struct("Maintenance")
            .field("job", &self.job)
            .field("kind", &kind)
            .finish()
    }
}

/// The result of a [`Maintenance`] job, for [`VectorIndex::apply`].
#[must_use = "a finished job changes nothing until applied"]
pub struct MaintenanceDone {
    job: u64,
    done: Done,
}

impl fmt::Debug for MaintenanceDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MaintenanceDone")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

enum Work {
    F32(WorkOf<f32>),
    I8(WorkOf<i8>),
}

enum Done {
    F32(DoneOf<f32>),
    I8(DoneOf<i8>),
}

/// What a job needs.
enum WorkOf<T: Elem> {
    /// Link the delta (slots `from..end`) into the graph, then snapshot it.
    Extend {
        hnsw: Arc<Hnsw<'static, T, T::Dist>>,
        from: usize,
        end: usize,
        delta: Vec<T>,
    },
    /// Rebuild from the live vectors of slots `..end`: the snapshot's and the delta's
    /// (slots `delta_from..end`).
    Rebuild {
        frozen: Option<Arc<Frozen<T>>>,
        delta_from: usize,
        delta: Vec<T>,
        ids: Vec<u64>,
        dead: Vec<bool>,
        end: usize,
        dims: usize,
        config: IndexConfig,
    },
}

enum DoneOf<T: Elem> {
    Extend {
        frozen: Option<Frozen<T>>,
        end: usize,
    },
    Rebuild {
        /// The new graph, or `None` for a flat store of `flat`.
        graph: Option<GraphState<T>>,
        flat: Vec<T>,
        /// Old slot by new slot.
        old_slot: Vec<usize>,
        ids: Vec<u64>,
        by_id: HashMap<u64, usize>,
        end: usize,
    },
}

impl<T: Elem> WorkOf<T> {
    fn kind(&self) -> &'static str {
        match self {
            WorkOf::Extend { .. } => "extend",
            WorkOf::Rebuild { .. } => "rebuild",
        }
    }

    fn run(self) -> DoneOf<T> {
        match self {
            WorkOf::Extend {
                hnsw,
                from,
                end,
                delta,
            } => {
                let dims = delta.len() / (end - from).max(1);
                let data: Vec<(&[T], usize)> = delta
                    .chunks_exact(dims.max(1))
                    .enumerate()
                    .map(|(i, v)| (v, from + i))
                    .collect();
                hnsw.parallel_insert_slice(&data);
                // Tombstones are applied when the result is: they may change meanwhile.
                DoneOf::Extend {
                    frozen: Frozen::take(&hnsw, end, &[]),
                    end,
                }
            }
            WorkOf::Rebuild {
                frozen,
                delta_from,
                delta,
                ids,
                dead,
                end,
                dims,
                config,
            } => {
                let live = |slot: usize| slot < end && !dead.get(slot).copied().unwrap_or(true);
                let mut kept: Vec<(usize, &[T])> = Vec::new();
                if let Some(f) = &frozen {
                    for i in 0..f.points() {
                        let i = i as u32;
                        let slot = f.slot(i);
                        if slot < delta_from && live(slot) {
                            kept.push((slot, f.vector(i)));
                        }
                    }
                }
                for (i, v) in delta.chunks_exact(dims).enumerate() {
                    if live(delta_from + i) {
                        kept.push((delta_from + i, v));
                    }
                }
                // Oldest first, so that eviction stays oldest-first.
                kept.sort_unstable_by_key(|(slot, _)| *slot);
                let n = kept.len();
                let old_slot: Vec<usize> = kept.iter().map(|(s, _)| *s).collect();
                let new_ids: Vec<u64> = old_slot.iter().map(|s| ids[*s]).collect();
                let by_id = new_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
                let flat = |kept: &[(usize, &[T])]| {
                    let mut flat = Vec::with_capacity(kept.len() * dims);
                    for (_, v) in kept {
                        flat.extend_from_slice(v);
                    }
                    flat
                };
                let graph = if n >= config.graph_from {
                    let hint = n
                        .saturating_mul(2)
                        .max(config.graph_from)
                        .min(config.capacity.max(1));
                    let hnsw = Hnsw::new(
                        config.max_connections,
                        hint,
                        GRAPH_LAYERS,
                        config.ef_construction,
                        T::Dist::default(),
                    );
                    let data: Vec<(&[T], usize)> = kept
                        .iter()
                        .enumerate()
                        .map(|(slot, (_, v))| (*v, slot))
                        .collect();
                    hnsw.parallel_insert_slice(&data);
                    Frozen::take(&hnsw, n, &[]).map(|f| GraphState {
                        hnsw: Arc::new(hnsw),
                        frozen: Arc::new(f),
                    })
                } else {
                    None
                };
                // No snapshot could be taken (more points than u32 counts): stay flat.
                let flat = if graph.is_none() {
                    flat(&kept)
                } else {
                    Vec::new()
                };
                DoneOf::Rebuild {
                    graph,
                    flat,
                    old_slot,
                    ids: new_ids,
                    by_id,
                    end,
                }
            }
        }
    }
}

impl Maintenance {
    /// Does the work: links vectors into the graph or rebuilds it, and takes a
    /// snapshot. Takes time (a graph of n vectors costs about n inserts, spread over
    /// rayon's threads); holds no lock.
    pub fn run(self) -> MaintenanceDone {
        let done = match self.work {
            Work::F32(w) => Done::F32(w.run()),
            Work::I8(w) => Done::I8(w.run()),
        };
        MaintenanceDone {
            job: self.job,
            done,
        }
    }

    /// Whether the job rebuilds the whole index (rather than linking a delta into it).
    pub fn is_rebuild(&self) -> bool {
        matches!(
            &self.work,
            Work::F32(WorkOf::Rebuild { .. }) | Work::I8(WorkOf::Rebuild { .. })
        )
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
            deferred: false,
            job: None,
            dirty: false,
            retired: Retired::default(),
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

    /// Changes how many candidates a search considers (at least 1): higher is slower
    /// and finds the true nearest vector more often.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.config.ef_search = ef.max(1);
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

    /// Vectors (live or not) that searches scan exactly: every one in flat mode, those
    /// inserted since the graph's snapshot in graph mode.
    pub fn delta(&self) -> usize {
        self.ids.len() - self.store_from()
    }

    /// Whether `id` is live.
    pub fn contains(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    /// Stops running maintenance inside `insert` and `remove`: the owner takes it with
    /// [`maintenance`](Self::maintenance) instead (see [the type's
    /// docs](Self#maintenance)).
    pub fn defer_maintenance(&mut self) {
        self.deferred = true;
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
        self.remove_only(id);
        let mut evicted = None;
        if self.live >= self.config.capacity {
            evicted = self.evict_oldest();
        }
        let slot = self.ids.len();
        self.ids.push(id);
        self.dead.push(false);
        self.by_id.insert(id, slot);
        self.live += 1;
        self.push_store(v);
        self.maintain_inline();
        Ok(evicted)
    }

    fn push_store(&mut self, v: &[f32]) {
        match &mut self.store {
            Store::F32(s) => s.extend_from_slice(v),
            Store::I8(s) => s.extend(quantize(v)),
        }
    }

    /// Runs due maintenance here, unless it is deferred.
    fn maintain_inline(&mut self) {
        if self.deferred {
            return;
        }
        // A rebuild may leave a delta due for a snapshot: at most two jobs.
        for _ in 0..2 {
            let Some(job) = self.maintenance() else {
                return;
            };
            let done = job.run();
            self.apply(done);
            drop(self.take_retired());
        }
    }

    /// What maintenance is due, if any and none is in flight: building the graph, a
    /// snapshot of a full delta, or a rebuild once tombstones outnumber live vectors
    /// (and number at least 64). The index is usable meanwhile; a job taken and never
    /// applied blocks later ones until [`abandon_maintenance`](Self::abandon_maintenance).
    pub fn maintenance(&mut self) -> Option<Maintenance> {
        if self.job.is_some() {
            return None;
        }
        let slots = self.ids.len();
        let dead = self.tombstones();
        let rebuild = self.dirty
            || (dead >= 64 && dead > self.live)
            || (self.graph.is_none() && slots >= self.config.graph_from);
        let extend = self.graph.is_some() && self.delta() >= MAX_DELTA;
        if !rebuild && !extend {
            return None;
        }
        Some(self.start(rebuild))
    }

    fn start(&mut self, rebuild: bool) -> Maintenance {
        let job = NEXT_JOB.fetch_add(1, AtomicOrdering::Relaxed);
        self.job = Some(job);
        self.dirty = false;
        let work = match &self.graph {
            Some(Graph::F32(g)) => Work::F32(self.work_of(Some(g), rebuild)),
            Some(Graph::I8(g)) => Work::I8(self.work_of(Some(g), rebuild)),
            None => match self.config.quantization {
                Quantization::None => Work::F32(self.work_of::<f32>(None, true)),
                Quantization::Int8 => Work::I8(self.work_of::<i8>(None, true)),
            },
        };
        Maintenance { job, work }
    }

    fn work_of<T: Elem>(&self, g: Option<&GraphState<T>>, rebuild: bool) -> WorkOf<T> {
        let from = self.store_from();
        let end = self.ids.len();
        let delta = T::store(&self.store).unwrap_or(&[]).to_vec();
        match g {
            Some(g) if !rebuild => WorkOf::Extend {
                hnsw: Arc::clone(&g.hnsw),
                from,
                end,
                delta,
            },
            _ => WorkOf::Rebuild {
                frozen: g.map(|g| Arc::clone(&g.frozen)),
                delta_from: from,
                delta,
                ids: self.ids.clone(),
                dead: self.dead.clone(),
                end,
                dims: self.dims,
                config: self.config,
            },
        }
    }

    /// Applies a finished job: the new snapshot or graph replaces the old one, with
    /// every insert and removal made while the job ran. Returns false (and changes
    /// nothing) for a job this index did not start or that was superseded by
    /// [`clear`](Self::clear), [`rebuild`](Self::rebuild) or
    /// [`abandon_maintenance`](Self::abandon_maintenance).
    pub fn apply(&mut self, done: MaintenanceDone) -> bool {
        if self.job != Some(done.job) {
            return false;
        }
        self.job = None;
        // At most one job's leftovers are kept (the owner may never take them).
        self.retired = Retired::default();
        // A job's element type is the index's: its quantization never changes.
        match (done.done, self.graph.take()) {
            (Done::F32(d), Some(Graph::F32(g))) => self.apply_of(d, Some(g)),
            (Done::F32(d), None) => self.apply_of::<f32>(d, None),
            (Done::I8(d), Some(Graph::I8(g))) => self.apply_of(d, Some(g)),
            (Done::I8(d), None) => self.apply_of::<i8>(d, None),
            (_, other) => {
                self.graph = other;
                false
            }
        }
    }

    fn apply_of<T: Elem>(&mut self, done: DoneOf<T>, graph: Option<GraphState<T>>) -> bool {
        let from = self.store_from_of(graph.as_ref());
        match done {
            DoneOf::Extend { frozen, end } => {
                let Some(mut g) = graph else {
                    return false;
                };
                let Some(frozen) = frozen else {
                    // No snapshot could be taken: the graph holds points no snapshot
                    // does; start over next time.
                    self.dirty = true;
                    self.graph = Some(T::graph(g));
                    return false;
                };
                for (slot, dead) in self.dead[..end].iter().enumerate() {
                    if *dead {
                        frozen.kill(slot);
                    }
                }
                let old = std::mem::replace(&mut g.frozen, Arc::new(frozen));
                self.retired.0.push(Box::new(old));
                self.drop_store_before(end, from);
                self.graph = Some(T::graph(g));
                true
            }
            DoneOf::Rebuild {
                graph: new_graph,
                flat,
                old_slot,
                mut ids,
                mut by_id,
                end,
            } => {
                let n = ids.len();
                let mut dead: Vec<bool> = old_slot.iter().map(|s| self.dead[*s]).collect();
                for (i, d) in dead.iter().enumerate() {
                    if *d && by_id.get(&ids[i]) == Some(&i) {
                        by_id.remove(&ids[i]);
                    }
                }
                // Slots added while the job ran follow, in the same order.
                for (j, slot) in (end..self.ids.len()).enumerate() {
                    ids.push(self.ids[slot]);
                    dead.push(self.dead[slot]);
                    if !self.dead[slot] {
                        by_id.insert(self.ids[slot], n + j);
                    }
                }
                if let Some(g) = &new_graph {
                    for (i, d) in dead[..n].iter().enumerate() {
                        if *d {
                            g.frozen.kill(i);
                        }
                    }
                }
                self.drop_store_before(end, from);
                if new_graph.is_none() {
                    let mut store = flat;
                    store.extend_from_slice(T::store(&self.store).unwrap_or(&[]));
                    self.store = T::wrap_store(store);
                }
                self.live = by_id.len();
                self.ids = ids;
                self.dead = dead;
                self.by_id = by_id;
                self.oldest = 0;
                self.graph = new_graph.map(T::graph);
                if let Some(old) = graph {
                    self.retired.0.push(Box::new(T::graph(old)));
                }
                true
            }
        }
    }

    /// Drops the stored vectors of slots below `end` (the store starts at `from`).
    fn drop_store_before(&mut self, end: usize, from: usize) {
        let n = end.saturating_sub(from) * self.dims;
        match &mut self.store {
            Store::F32(s) => {
                s.drain(..n.min(s.len()));
            }
            Store::I8(s) => {
                s.drain(..n.min(s.len()));
            }
        }
    }

    /// What the last [`apply`](Self::apply) replaced, to be dropped outside any lock
    /// the index is kept under.
    pub fn take_retired(&mut self) -> Retired {
        std::mem::take(&mut self.retired)
    }

    /// Forgets the job in flight (it failed, or will not be applied): the next
    /// [`maintenance`](Self::maintenance) starts afresh, with a rebuild, since the
    /// failed job may have changed the graph.
    pub fn abandon_maintenance(&mut self) {
        if self.job.take().is_some() {
            self.dirty = true;
        }
    }

    /// Adds many vectors at once (ids already present are replaced); a graph is
    /// extended on rayon's threads. Returns the ids evicted to make room.
    pub fn insert_batch(&mut self, items: &[(u64, &[f32])]) -> Result<Vec<u64>> {
        for (_, v) in items {
            self.check(v)?;
        }
        let mut evicted = Vec::new();
        let cap = self.config.capacity;
        let items = match items.len().checked_sub(cap) {
            Some(skip) if skip > 0 => {
                // More than fit: the oldest of the batch go first.
                evicted.extend(items[..skip].iter().map(|(id, _)| *id));
                &items[skip..]
            }
            _ => items,
        };
        for (id, _) in items {
            self.remove_only(*id);
        }
        while self.live + items.len() > cap {
            match self.evict_oldest() {
                Some(id) => evicted.push(id),
                None => break,
            }
        }
        for (id, v) in items {
            let slot = self.ids.len();
            self.ids.push(*id);
            self.dead.push(false);
            self.live += 1;
            if let Some(old) = self.by_id.insert(*id, slot) {
                // The same id twice in the batch: the later one wins.
                self.kill(old);
                self.live -= 1;
            }
            self.push_store(v);
        }
        self.maintain_inline();
        Ok(evicted)
    }

    fn evict_oldest(&mut self) -> Option<u64> {
        while self.oldest < self.ids.len() {
            let slot = self.oldest;
            self.oldest += 1;
            if !self.dead[slot] {
                let id = self.ids[slot];
                self.remove_only(id);
                return Some(id);
            }
        }
        None
    }

    /// Removes `id`; returns whether it was there. Once tombstones outnumber live
    /// vectors (and number at least 64) a rebuild is due.
    pub fn remove(&mut self, id: u64) -> bool {
        let removed = self.remove_only(id);
        if removed {
            self.maintain_inline();
        }
        removed
    }

    fn remove_only(&mut self, id: u64) -> bool {
        let Some(slot) = self.by_id.remove(&id) else {
            return false;
        };
        self.kill(slot);
        self.live -= 1;
        true
    }

    /// Marks `slot` dead, here and in the graph's copy.
    fn kill(&mut self, slot: usize) {
        if let Some(d) = self.dead.get_mut(slot) {
            *d = true;
        }
        match &self.graph {
            Some(Graph::F32(g)) => g.frozen.kill(slot),
            Some(Graph::I8(g)) => g.frozen.kill(slot),
            None => {}
        }
    }

    /// Removes every vector (a job in flight is superseded).
    pub fn clear(&mut self) {
        self.ids.clear();
        self.dead.clear();
        self.by_id.clear();
        self.live = 0;
        self.oldest = 0;
        self.store = Self::empty_store(self.config.quantization);
        self.graph = None;
        self.job = None;
        self.dirty = false;
    }

    /// The first slot held in `store` (0 in flat mode; the snapshot's end in graph mode).
    fn store_from(&self) -> usize {
        match &self.graph {
            None => 0,
            Some(Graph::F32(g)) => g.frozen.upto,
            Some(Graph::I8(g)) => g.frozen.upto,
        }
    }

    fn store_from_of<T: Elem>(&self, g: Option<&GraphState<T>>) -> usize {
        g.map_or(0, |g| g.frozen.upto)
    }

    /// A job rebuilding the index from its live vectors, due or not (a job in flight
    /// is superseded): drops tombstones, and moves to (or from) the graph as the size
    /// calls for.
    pub fn rebuild_job(&mut self) -> Maintenance {
        self.job = None;
        self.start(true)
    }

    /// Runs [`rebuild_job`](Self::rebuild_job) here and now.
    pub fn rebuild(&mut self) {
        let done = self.rebuild_job().run();
        self.apply(done);
        drop(self.take_retired());
    }

    /// Up to `k` live vectors most similar to `query`, best first, as (id, cosine
    /// similarity). Approximate once the index uses its graph. A query of the wrong
    /// dimension finds nothing.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        if k == 0 || self.live == 0 || self.check(query).is_err() {
            return Vec::new();
        }
        let ef = self.config.ef_search.max(k);
        let found = match &self.graph {
            None => return self.scan(query, k),
            Some(Graph::F32(g)) => g.frozen.search(query, ef, k),
            Some(Graph::I8(g)) => g.frozen.search(&quantize(query), ef, k),
        };
        let mut top = TopK::new(k);
        for (slot, sim) in found {
            top.offer(self.ids[slot], sim);
        }
        // The delta: inserted since the snapshot, scanned exactly.
        for (id, sim) in self.scan(query, k) {
            top.offer(id, sim);
        }
        top.into_vec()
    }

    /// Like [`search`](Self::search), by scanning every live vector: exact (in the
    /// stored precision), and the reference that recall is measured against.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        if k == 0 || self.live == 0 || self.check(query).is_err() {
            return Vec::new();
        }
        let mut top = self.scan_top(query, k);
        match &self.graph {
            None => {}
            Some(Graph::F32(g)) => self.scan_frozen(&g.frozen, query, &mut top),
            Some(Graph::I8(g)) => self.scan_frozen(&g.frozen, &quantize(query), &mut top),
        }
        top.into_vec()
    }

    fn scan_frozen<T: Elem>(&self, f: &Frozen<T>, q: &[T], top: &mut TopK) {
        let sim = T::sim_to(q);
        for i in 0..f.points() as u32 {
            if !f.is_dead(i) {
                top.offer(self.ids[f.slot(i)], sim(f.vector(i)));
            }
        }
    }

    /// Scans `store` (every vector in flat mode, the delta in graph mode).
    fn scan(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        self.scan_top(query, k).into_vec()
    }

    fn scan_top(&self, query: &[f32], k: usize) -> TopK {
        let from = self.store_from();
        let live = |i: usize| !self.dead.get(from + i).copied().unwrap_or(true);
        let mut top = TopK::new(k);
        match &self.store {
            Store::F32(s) => {
                for (i, v) in s.chunks_exact(self.dims).enumerate() {
                    if live(i) {
                        top.offer(self.ids[from + i], dot(query, v));
                    }
                }
            }
            Store::I8(s) => {
                let q = quantize(query);
                let sim = i8::sim_to(&q);
                for (i, v) in s.chunks_exact(self.dims).enumerate() {
                    if live(i) {
                        top.offer(self.ids[from + i], sim(v));
                    }
                }
            }
        }
        top
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
    fn int8_similarities_are_within_a_thousandth_and_survive_a_rebuild() {
        let config = IndexConfig::default().quantization(Quantization::Int8);
        let mut index = VectorIndex::new(384, config).unwrap();
        for i in 0..100 {
            index.insert(i, &unit(i, 384)).unwrap();
        }
        let mut worst = 0f32;
        for j in 1_000..1_050 {
            let q = unit(j, 384);
            for (id, sim) in index.exact_search(&q, 5) {
                worst = worst.max((sim - dot(&q, &unit(id, 384))).abs());
            }
        }
        assert!(worst < 0.001, "int8 error {worst}");
        for i in 0..60 {
            index.remove(i);
        }
        index.rebuild();
        assert_eq!(index.len(), 40);
        let got = index.search(&unit(70, 384), 1);
        assert_eq!(got[0].0, 70);
        assert!((got[0].1 - 1.0).abs() < 0.001, "{}", got[0].1);
    }

    #[test]
    fn byte_codes_keep_the_dot_product_and_graph_results_are_rescored_exactly() {
        for dims in [32, 384] {
            let (a, b) = (unit(1, dims), unit(2, dims));
            let ((ca, sa), (cb, sb)) = (code_of(&a), code_of(&b));
            let approx = dot_codes(&ca, &cb) as f32 * sa * sb;
            assert!((approx - dot(&a, &b)).abs() < 0.002, "{dims}: {approx}");
            // the walk's score: the code's norm stands for its scale
            let (d, norm) = dot_codes_and_norm(&ca, &cb);
            let cosine = d as f32 * sa / (norm as f32).sqrt();
            assert!((cosine - dot(&a, &b)).abs() < 0.002, "{dims}: {cosine}");
            assert!((1.0 / (norm as f32).sqrt() - sb).abs() < 0.01 * sb);
            let self_sim = dot_codes(&ca, &ca) as f32 * sa * sa;
            assert!((self_sim - 1.0).abs() < 0.002, "{dims}: {self_sim}");
        }
        assert_eq!(
            code_of(&[0.0; 4]),
            (vec![0; 4], 0.0),
            "a zero vector codes to zero"
        );
        let mut index = VectorIndex::new(32, IndexConfig::default().graph_from(100)).unwrap();
        for i in 0..600 {
            index.insert(i, &unit(i, 32)).unwrap();
        }
        assert!(index.is_graph());
        // a query near vector 5: every result's similarity is the exact one
        let mut q = unit(5, 32);
        q.iter_mut()
            .zip(unit(9_999, 32))
            .for_each(|(x, n)| *x += 0.2 * n);
        let n = dot(&q, &q).sqrt();
        q.iter_mut().for_each(|x| *x /= n);
        let got = index.search(&q, 40);
        assert_eq!(
            got.len(),
            40,
            "k past the re-scored 32 still gets k results"
        );
        assert_eq!(got[0].0, 5);
        for (id, sim) in &got {
            let exact = dot(&q, &unit(*id, 32));
            assert!((sim - exact).abs() < 1e-5, "{id}: {sim} vs {exact}");
        }
        assert!(got.windows(2).all(|w| w[0].1 >= w[1].1), "best first");
    }

    #[test]
    fn inserts_after_the_snapshot_are_found_until_the_next_one() {
        let mut index = VectorIndex::new(8, IndexConfig::default().graph_from(64)).unwrap();
        for i in 0..64 {
            index.insert(i, &unit(i, 8)).unwrap();
        }
        assert!(index.is_graph());
        assert_eq!(index.store_from(), 64, "snapshot taken with the graph");
        // single inserts land in the delta, searched exactly, until it is full
        for i in 64..(64 + MAX_DELTA as u64 - 1) {
            index.insert(i, &unit(i, 8)).unwrap();
        }
        assert_eq!(index.store_from(), 64);
        assert_eq!(index.search(&unit(100, 8), 1)[0].0, 100);
        index.remove(100);
        assert_ne!(
            index.search(&unit(100, 8), 1)[0].0,
            100,
            "dead in the delta"
        );
        index.insert(5_000, &unit(5_000, 8)).unwrap();
        assert_eq!(index.store_from(), 64 + MAX_DELTA, "a new snapshot");
        assert_eq!(index.search(&unit(5_000, 8), 1)[0].0, 5_000);
        assert_eq!(index.search(&unit(7, 8), 1)[0].0, 7);
        assert_eq!(index.exact_search(&unit(9, 8), 1)[0].0, 9);
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
    fn a_tombstone_survives_a_new_snapshot() {
        let mut index = VectorIndex::new(16, IndexConfig::default().graph_from(100)).unwrap();
        for i in 0..200 {
            index.insert(i, &unit(i, 16)).unwrap();
        }
        // 150 is in the delta when removed; the next snapshot takes it in as dead
        assert!(index.remove(150));
        for i in 200..(200 + MAX_DELTA as u64 + 10) {
            index.insert(i, &unit(i, 16)).unwrap();
        }
        assert!(index.store_from() > 200, "a new snapshot was taken");
        for q in [5, 150] {
            let got = index.search(&unit(q, 16), 5);
            assert!(!got.iter().any(|(id, _)| *id == 150), "{q}: {got:?}");
        }
        assert_eq!(index.search(&unit(5, 16), 1)[0].0, 5);
        // and a removal after the snapshot is seen by it at once
        assert!(index.remove(5));
        assert!(!index.search(&unit(5, 16), 5).iter().any(|(id, _)| *id == 5));
    }

    #[test]
    fn batches_build_the_graph_and_evict_past_capacity() {
        let config = IndexConfig::default().graph_from(100).capacity(500);
        let mut index = VectorIndex::new(16, config).unwrap();
        let data: Vec<(u64, Vec<f32>)> = (0..600).map(|i| (i, unit(i, 16))).collect();
        let batch: Vec<(u64, &[f32])> = data.iter().map(|(i, v)| (*i, v.as_slice())).collect();
        let evicted = index.insert_batch(&batch[..50]).unwrap();
        assert!(evicted.is_empty() && !index.is_graph());
        index.insert_batch(&batch[50..300]).unwrap();
        assert!(index.is_graph());
        let evicted = index.insert_batch(&batch[300..]).unwrap();
        assert_eq!(evicted, (0..100).collect::<Vec<u64>>());
        assert_eq!(index.len(), 500);
        assert_eq!(index.search(&unit(599, 16), 1)[0].0, 599);
        assert!(index.insert_batch(&[(1, &[0.0; 3][..])]).is_err());
    }

    #[test]
    fn deferred_maintenance_runs_aside_and_keeps_what_changed_meanwhile() {
        for q in [Quantization::None, Quantization::Int8] {
            let config = IndexConfig::default().graph_from(100).quantization(q);
            let mut index = VectorIndex::new(16, config).unwrap();
            index.defer_maintenance();
            for i in 0..150 {
                index.insert(i, &unit(i, 16)).unwrap();
            }
            assert!(!index.is_graph(), "{q:?}: nothing heavy ran inline");
            let job = index.maintenance().expect("the graph is due");
            assert!(job.is_rebuild());
            assert!(index.maintenance().is_none(), "one job at a time");
            // the job runs elsewhere; the index is searched and written meanwhile
            let done = std::thread::spawn(move || job.run());
            for i in 150..180 {
                index.insert(i, &unit(i, 16)).unwrap();
            }
            assert!(index.remove(3));
            assert!(index.remove(160));
            index.insert(7, &unit(7_000, 16)).unwrap(); // replaced meanwhile
            assert_eq!(index.search(&unit(42, 16), 1)[0].0, 42);
            assert!(index.apply(done.join().unwrap()));
            assert!(index.is_graph(), "{q:?}");
            assert_eq!(index.len(), 178);
            assert_eq!(index.delta(), 31, "inserted during the job");
            for (id, seed) in [(0, 0), (42, 42), (175, 175), (7, 7_000), (149, 149)] {
                let got = index.search(&unit(seed, 16), 1);
                assert_eq!(got[0].0, id, "{q:?} {id}");
                assert!(got[0].1 > 0.99);
            }
            for gone in [3, 160] {
                assert!(!index.contains(gone));
                let got = index.search(&unit(gone, 16), 5);
                assert!(!got.iter().any(|(id, _)| *id == gone), "{q:?} {gone}");
            }
            // vector 7's old value is gone with its slot
            let old7 = index.exact_search(&unit(7, 16), 1);
            assert!(old7[0].0 != 7 || old7[0].1 < 0.99, "{old7:?}");

            // a full delta is linked in by an extend job, inserts meanwhile kept
            for i in 1_000..(1_000 + MAX_DELTA as u64) {
                index.insert(i, &unit(i, 16)).unwrap();
            }
            let job = index.maintenance().expect("a snapshot is due");
            assert!(!job.is_rebuild());
            let done = job.run();
            index.insert(9_999, &unit(9_999, 16)).unwrap();
            assert!(index.remove(1_500));
            assert!(index.apply(done));
            assert_eq!(index.delta(), 1);
            assert_eq!(index.search(&unit(1_200, 16), 1)[0].0, 1_200);
            assert_eq!(index.search(&unit(9_999, 16), 1)[0].0, 9_999);
            assert!(
                !index
                    .search(&unit(1_500, 16), 3)
                    .iter()
                    .any(|(id, _)| *id == 1_500)
            );
            assert_eq!(index.len(), 178 + MAX_DELTA);
        }
    }

    #[test]
    fn a_superseded_or_abandoned_job_changes_nothing() {
        let mut index = VectorIndex::new(8, IndexConfig::default().graph_from(64)).unwrap();
        index.defer_maintenance();
        for i in 0..64 {
            index.insert(i, &unit(i, 8)).unwrap();
        }
        let job = index.maintenance().unwrap();
        index.clear();
        assert!(!index.apply(job.run()), "cleared meanwhile");
        assert!(index.is_empty() && !index.is_graph());
        for i in 0..64 {
            index.insert(i, &unit(i, 8)).unwrap();
        }
        let job = index.maintenance().unwrap();
        let mut other = VectorIndex::new(8, IndexConfig::default()).unwrap();
        let done = job.run();
        assert!(!other.apply(done), "not its job");
        // the job is still in flight as far as `index` knows, until abandoned
        assert!(index.maintenance().is_none());
        index.abandon_maintenance();
        let job = index.maintenance().expect("started afresh");
        assert!(job.is_rebuild());
        assert!(index.apply(job.run()));
        assert!(index.is_graph());
        assert_eq!(index.search(&unit(10, 8), 1)[0].0, 10);
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
