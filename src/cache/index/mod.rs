//! Nearest-neighbour search over unit vectors: a flat scan while a set is small, an HNSW
//! graph the index owns ([`graph`]) once it is large; removal by tombstones,
//! compaction by rebuild.

mod graph;
mod pages;
mod simd;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use bytemuck::Pod;

use self::graph::{Graph, Shape};
use self::pages::Pages;

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
    /// Links per node of the graph (HNSW `M`, default 16, at most 64); layer 0 keeps
    /// twice as many.
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

    fn shape(&self, dims: usize) -> Shape {
        Shape {
            dims,
            m: self.max_connections,
            ef_construction: self.ef_construction,
        }
    }
}

const I8_SCALE: f32 = 127.0;

pub(crate) use self::simd::dot;
use self::simd::{dot_codes, dot_codes_and_norm};

/// The stored form of a vector under [`Quantization::Int8`]: its byte code.
fn quantize(v: &[f32]) -> Vec<i8> {
    code_of(v).0
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

/// A vector component the index can store.
trait Elem: Pod + Send + Sync + 'static {
    /// The similarity of two stored vectors.
    fn sim(a: &[Self], b: &[Self]) -> f32;
    /// [`sim`](Self::sim) to one query, with what depends on the query alone worked
    /// out once.
    fn sim_to(q: &[Self]) -> impl Fn(&[Self]) -> f32 + '_;
    /// Wraps a core of this type.
    fn wrap(core: Core<Self>) -> Cores;
}

impl Elem for f32 {
    fn sim(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
    fn sim_to(q: &[f32]) -> impl Fn(&[f32]) -> f32 + '_ {
        move |v| dot(q, v)
    }
    fn wrap(core: Core<f32>) -> Cores {
        Cores::F32(core)
    }
}

impl Elem for i8 {
    /// The cosine of two byte codes (each a unit vector scaled by its own factor,
    /// which the cosine cancels).
    fn sim(a: &[i8], b: &[i8]) -> f32 {
        i8::sim_to(a)(b)
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
    fn wrap(core: Core<i8>) -> Cores {
        Cores::I8(core)
    }
}

/// The vectors of one element type: the graph (slots `..graph.len()`, a slot's node
/// number is the slot) and the delta, the vectors of later slots, which searches scan
/// exactly. In flat mode there is no graph and the delta holds every vector.
struct Core<T> {
    graph: Option<Graph<T>>,
    delta: Vec<T>,
}

impl<T: Elem> Core<T> {
    fn empty() -> Self {
        Core {
            graph: None,
            delta: Vec::new(),
        }
    }

    /// The first slot held in `delta`.
    fn delta_from(&self) -> usize {
        self.graph.as_ref().map_or(0, Graph::len)
    }
}

enum Cores {
    F32(Core<f32>),
    I8(Core<i8>),
}

/// Runs `$body` with `$c` bound to the index's core, whatever its element type.
macro_rules! with_core {
    ($cores:expr, $c:ident => $body:expr) => {
        match $cores {
            Cores::F32($c) => $body,
            Cores::I8($c) => $body,
        }
    };
}

/// Vectors inserted since the graph was last extended that start maintenance: they
/// are scanned exactly on every search until linked into the graph.
const MAX_DELTA: usize = 2_048;

/// Ids of maintenance jobs, unique in the process: a job's result is applied only to
/// the index that started it, and only if nothing has superseded it since.
static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

/// A set of unit vectors under caller-chosen `u64` ids, searched by cosine similarity.
///
/// Below [`IndexConfig::graph_from`] vectors a search scans them all (exact); from there
/// on they live in an HNSW graph (approximate: recall@1 is measured by
/// `benches/cache_index.rs` and `examples/cache_index_scale.rs`). The index keeps one
/// copy of each vector and of each link list: vectors in contiguous chunks of 4,096,
/// links as fixed-size `u32` arrays beside them. Removal marks a tombstone that
/// searches walk through but never return; once tombstones outnumber live vectors the
/// index is rebuilt from the live ones. Past [`capacity`](IndexConfig::capacity) an
/// insert evicts the oldest vector.
///
/// # Maintenance
///
/// An insert only appends to a *delta* that searches scan exactly. The heavy work, all
/// of it [maintenance](Maintenance), comes in three kinds: building the graph once the
/// set reaches `graph_from`, linking a full delta (2,048 vectors) into the graph, and
/// rebuilding without tombstones. By default it runs inside the `insert` or `remove`
/// that calls for it. After [`defer_maintenance`](Self::defer_maintenance) it never
/// does: the owner takes the job with [`maintenance`](Self::maintenance),
/// [runs](Maintenance::run) it anywhere (it holds no borrow of the index, so searches
/// and inserts go on meanwhile) and [applies](Self::apply) the result, a swap of
/// shared pointers plus work linear in the slots (no vector copied). Linking a delta
/// shares the graph's chunks with the index and copies at most one partly filled
/// chunk; a rebuild makes a new graph, so while it runs the old one and the new one
/// both exist. A [`SemanticCache`](super::SemanticCache) runs jobs on a blocking
/// thread. One job is in flight at a time, so memory stays bounded.
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
    /// Tombstones by slot.
    dead: Vec<bool>,
    by_id: HashMap<u64, usize>,
    live: usize,
    /// Slots below this are all dead (the eviction cursor).
    oldest: usize,
    core: Cores,
    /// Maintenance runs only when asked for (see [`Maintenance`]).
    deferred: bool,
    /// The job in flight, if any.
    job: Option<u64>,
    /// A job failed or was abandoned part way, and may have linked nodes into the
    /// graph's shared chunks: the next job rebuilds.
    dirty: bool,
    /// What the last applied job replaced, for the owner to drop outside its lock.
    retired: Retired,
}

/// What an applied [`Maintenance`] job replaced (an old graph), taken with
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
            .field("graph", &self.is_graph())
            .field("delta", &self.delta())
            .field("config", &self.config)
            .finish()
    }
}

/// Heavy work on a [`VectorIndex`], taken from it by
/// [`VectorIndex::maintenance`]: it owns what it needs (shared pointers to the graph's
/// chunks, a copy of the delta and, for a rebuild, of the slot table), so it can run on
/// another thread while the index is searched and written.
#[must_use = "a maintenance job does nothing until it is run and applied"]
pub struct Maintenance {
    job: u64,
    work: Work,
}

impl fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_rebuild() {
            "rebuild"
        } else {
            "extend"
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
enum WorkOf<T> {
    /// Link the delta (slots `graph.len()..end`) into the graph.
    Extend {
        graph: Graph<T>,
        end: usize,
        delta: Pages<T>,
    },
    /// Rebuild from the live vectors of slots `..end`: the graph's and the delta's
    /// (slots `delta_from..end`).
    Rebuild {
        graph: Option<Graph<T>>,
        delta_from: usize,
        delta: Pages<T>,
        ids: Vec<u64>,
        dead: Vec<bool>,
        end: usize,
        dims: usize,
        config: IndexConfig,
    },
}

enum DoneOf<T> {
    Extend {
        /// `None` if the graph could not take the delta.
        graph: Option<Graph<T>>,
        end: usize,
    },
    Rebuild {
        /// The new graph, or `None` for a flat store of `flat`.
        graph: Option<Graph<T>>,
        flat: Vec<T>,
        /// Old slot by new slot.
        old_slot: Vec<usize>,
        ids: Vec<u64>,
        by_id: HashMap<u64, usize>,
        end: usize,
    },
}

impl<T: Elem> WorkOf<T> {
    fn run(self) -> DoneOf<T> {
        match self {
            WorkOf::Extend { graph, end, delta } => {
                let dims = delta.as_slice().len() / end.saturating_sub(graph.len()).max(1);
                let added = end.saturating_sub(graph.len());
                let graph = if dims == 0 {
                    None
                } else {
                    graph.extended(added, delta.as_slice().chunks_exact(dims))
                };
                // Tombstones are the index's, by slot: nothing to carry over.
                DoneOf::Extend { graph, end }
            }
            WorkOf::Rebuild {
                graph,
                delta_from,
                delta,
                ids,
                dead,
                end,
                dims,
                config,
            } => {
                let live = |slot: usize| slot < end && !dead.get(slot).copied().unwrap_or(true);
                // Oldest first, so that eviction stays oldest-first.
                let mut kept: Vec<(usize, &[T])> = Vec::new();
                if let Some(g) = &graph {
                    for (slot, v) in g.vectors().enumerate().take(delta_from) {
                        if live(slot) {
                            kept.push((slot, v));
                        }
                    }
                }
                for (i, v) in delta.as_slice().chunks_exact(dims.max(1)).enumerate() {
                    if live(delta_from + i) {
                        kept.push((delta_from + i, v));
                    }
                }
                let n = kept.len();
                let old_slot: Vec<usize> = kept.iter().map(|(s, _)| *s).collect();
                let new_ids: Vec<u64> = old_slot
                    .iter()
                    .map(|s| ids.get(*s).copied().unwrap_or(u64::MAX))
                    .collect();
                let by_id = new_ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
                let new_graph = if n >= config.graph_from {
                    Graph::new(config.shape(dims)).extended(n, kept.iter().map(|(_, v)| *v))
                } else {
                    None
                };
                // Small, or no graph could be made (more points than u32 counts): flat.
                let flat = if new_graph.is_none() {
                    let mut flat = Vec::with_capacity(n * dims);
                    for (_, v) in &kept {
                        flat.extend_from_slice(v);
                    }
                    flat
                } else {
                    Vec::new()
                };
                DoneOf::Rebuild {
                    graph: new_graph,
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
    /// Does the work: links vectors into the graph or rebuilds it. Takes time (a graph
    /// of n vectors costs n links, each about one search); holds no lock.
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
            core: Self::empty_core(config.quantization),
            deferred: false,
            job: None,
            dirty: false,
            retired: Retired::default(),
        })
    }

    fn empty_core(q: Quantization) -> Cores {
        match q {
            Quantization::None => Cores::F32(Core::empty()),
            Quantization::Int8 => Cores::I8(Core::empty()),
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
        with_core!(&self.core, c => c.graph.is_some())
    }

    /// Vectors (live or not) that searches scan exactly: every one in flat mode, those
    /// inserted since the graph was last extended in graph mode.
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
        match &mut self.core {
            Cores::F32(c) => c.delta.extend_from_slice(v),
            Cores::I8(c) => c.delta.extend(quantize(v)),
        }
    }

    /// Runs due maintenance here, unless it is deferred.
    fn maintain_inline(&mut self) {
        if self.deferred {
            return;
        }
        // A rebuild may leave a delta due for linking: at most two jobs.
        for _ in 0..2 {
            let Some(job) = self.maintenance() else {
                return;
            };
            let done = job.run();
            self.apply(done);
            drop(self.take_retired());
        }
    }

    /// What maintenance is due, if any and none is in flight: building the graph,
    /// linking a full delta into it, or a rebuild once tombstones outnumber live
    /// vectors (and number at least 64). The index is usable meanwhile; a job taken
    /// and never applied blocks later ones until
    /// [`abandon_maintenance`](Self::abandon_maintenance).
    pub fn maintenance(&mut self) -> Option<Maintenance> {
        if self.job.is_some() {
            return None;
        }
        let slots = self.ids.len();
        let dead = self.tombstones();
        let rebuild = self.dirty
            || (dead >= 64 && dead > self.live)
            || (!self.is_graph() && slots >= self.config.graph_from);
        let extend = self.is_graph() && self.delta() >= MAX_DELTA;
        if !rebuild && !extend {
            return None;
        }
        Some(self.start(rebuild))
    }

    fn start(&mut self, rebuild: bool) -> Maintenance {
        let job = NEXT_JOB.fetch_add(1, AtomicOrdering::Relaxed);
        self.job = Some(job);
        self.dirty = false;
        let work = match &self.core {
            Cores::F32(c) => Work::F32(self.work_of(c, rebuild)),
            Cores::I8(c) => Work::I8(self.work_of(c, rebuild)),
        };
        Maintenance { job, work }
    }

    fn work_of<T: Elem>(&self, core: &Core<T>, rebuild: bool) -> WorkOf<T> {
        let end = self.ids.len();
        // A copy of the delta in its own mapping, returned to the system when the job
        // ends (a heap copy of a large batch would stay in the process's memory).
        let delta = Pages::from_slice(&core.delta);
        match &core.graph {
            Some(g) if !rebuild => WorkOf::Extend {
                graph: g.clone(),
                end,
                delta,
            },
            g => WorkOf::Rebuild {
                graph: g.clone(),
                delta_from: core.delta_from(),
                delta,
                ids: self.ids.clone(),
                dead: self.dead.clone(),
                end,
                dims: self.dims,
                config: self.config,
            },
        }
    }

    /// Applies a finished job: the new graph replaces the old one, with every insert
    /// and removal made while the job ran. Returns false (and changes nothing) for a
    /// job this index did not start or that was superseded by
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
        let core = std::mem::replace(&mut self.core, Cores::F32(Core::empty()));
        match (done.done, core) {
            (Done::F32(d), Cores::F32(c)) => self.apply_of(d, c),
            (Done::I8(d), Cores::I8(c)) => self.apply_of(d, c),
            (_, other) => {
                self.core = other;
                false
            }
        }
    }

    fn apply_of<T: Elem>(&mut self, done: DoneOf<T>, mut core: Core<T>) -> bool {
        let from = core.delta_from();
        match done {
            DoneOf::Extend { graph, end } => {
                let Some(graph) = graph else {
                    // The graph could not take the delta, and its shared chunks may
                    // hold links to nodes it never got: start over next time.
                    self.dirty = true;
                    self.core = T::wrap(core);
                    return false;
                };
                drop_before(&mut core.delta, end, from, self.dims);
                if let Some(old) = core.graph.replace(graph) {
                    self.retired.0.push(Box::new(T::wrap(Core {
                        graph: Some(old),
                        delta: Vec::new(),
                    })));
                }
                self.core = T::wrap(core);
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
                let mut dead: Vec<bool> = old_slot
                    .iter()
                    .map(|s| self.dead.get(*s).copied().unwrap_or(true))
                    .collect();
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
                drop_before(&mut core.delta, end, from, self.dims);
                let mut delta = std::mem::take(&mut core.delta);
                if new_graph.is_none() {
                    let mut store = flat;
                    store.append(&mut delta);
                    delta = store;
                }
                self.live = by_id.len();
                self.ids = ids;
                self.dead = dead;
                self.by_id = by_id;
                self.oldest = 0;
                if core.graph.is_some() {
                    self.retired.0.push(Box::new(T::wrap(core)));
                }
                self.core = T::wrap(Core {
                    graph: new_graph,
                    delta,
                });
                true
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
    /// failed job may have changed the graph's links.
    pub fn abandon_maintenance(&mut self) {
        if self.job.take().is_some() {
            self.dirty = true;
        }
    }

    /// Adds many vectors at once (ids already present are replaced). Returns the ids
    /// evicted to make room.
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

    /// Marks `slot` dead.
    fn kill(&mut self, slot: usize) {
        if let Some(d) = self.dead.get_mut(slot) {
            *d = true;
        }
    }

    /// Removes every vector (a job in flight is superseded).
    pub fn clear(&mut self) {
        self.ids.clear();
        self.dead.clear();
        self.by_id.clear();
        self.live = 0;
        self.oldest = 0;
        let old = std::mem::replace(&mut self.core, Self::empty_core(self.config.quantization));
        self.retired.0.push(Box::new(old));
        self.job = None;
        self.dirty = false;
    }

    /// The first slot held in the delta (0 in flat mode; the graph's size in graph
    /// mode).
    fn store_from(&self) -> usize {
        with_core!(&self.core, c => c.delta_from())
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
        match &self.core {
            Cores::F32(c) => self.search_core(c, query, ef, k),
            Cores::I8(c) => self.search_core(c, &quantize(query), ef, k),
        }
    }

    fn search_core<T: Elem>(
        &self,
        core: &Core<T>,
        q: &[T],
        ef: usize,
        k: usize,
    ) -> Vec<(u64, f32)> {
        let mut top = TopK::new(k);
        if let Some(g) = &core.graph {
            let live = |i: u32| !self.dead.get(i as usize).copied().unwrap_or(true);
            for (slot, sim) in g.search(q, ef, live).into_iter().take(k) {
                if let Some(id) = self.ids.get(slot as usize) {
                    top.offer(*id, sim);
                }
            }
        }
        // The delta: inserted since the graph was extended, scanned exactly.
        self.scan_delta(core, q, &mut top);
        top.into_vec()
    }

    /// Like [`search`](Self::search), by scanning every live vector: exact (in the
    /// stored precision), and the reference that recall is measured against.
    pub fn exact_search(&self, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        if k == 0 || self.live == 0 || self.check(query).is_err() {
            return Vec::new();
        }
        match &self.core {
            Cores::F32(c) => self.exact_core(c, query, k),
            Cores::I8(c) => self.exact_core(c, &quantize(query), k),
        }
    }

    fn exact_core<T: Elem>(&self, core: &Core<T>, q: &[T], k: usize) -> Vec<(u64, f32)> {
        let mut top = TopK::new(k);
        if let Some(g) = &core.graph {
            let sim = T::sim_to(q);
            for (slot, v) in g.vectors().enumerate() {
                if !self.dead.get(slot).copied().unwrap_or(true) {
                    top.offer(self.ids[slot], sim(v));
                }
            }
        }
        self.scan_delta(core, q, &mut top);
        top.into_vec()
    }

    /// Scans the delta (every vector in flat mode).
    fn scan_delta<T: Elem>(&self, core: &Core<T>, q: &[T], top: &mut TopK) {
        let from = core.delta_from();
        let sim = T::sim_to(q);
        for (i, v) in core.delta.chunks_exact(self.dims).enumerate() {
            let slot = from + i;
            if !self.dead.get(slot).copied().unwrap_or(true) {
                if let Some(id) = self.ids.get(slot) {
                    top.offer(*id, sim(v));
                }
            }
        }
    }
}

/// Drops the vectors of slots below `end` from `delta` (which starts at slot `from`).
/// A delta that was large (a batch) gives its memory back.
fn drop_before<T: Copy>(delta: &mut Vec<T>, end: usize, from: usize, dims: usize) {
    let n = end
        .saturating_sub(from)
        .saturating_mul(dims)
        .min(delta.len());
    delta.drain(..n);
    if delta.capacity() > 2 * (MAX_DELTA * dims).max(delta.len()) {
        *delta = delta.as_slice().to_vec();
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

    pub(super) fn unit(seed: u64, dims: usize) -> Vec<f32> {
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
