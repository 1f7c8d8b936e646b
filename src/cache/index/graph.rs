//! The HNSW graph the index owns, in one compact layout.
//!
//! Nodes are numbered densely from 0 and stored in fixed-size *chunks* of
//! [`CHUNK`] nodes: a chunk holds its nodes' vectors contiguously (the only copy
//! of each vector) and their links as fixed-degree arrays of `u32` (layer 0: a count
//! and `2·M` slots a node; the few nodes that reach layers 1 and up: a count and `M`
//! slots a layer). A graph value is a list of shared pointers to chunks, so copying
//! it copies pointers, not vectors.
//!
//! Linking a new node adds links to nodes already in the graph. Those links are
//! atomic `u32`s, so a graph can be extended by one thread while others search an
//! earlier value of it: a searcher sees each link list either before or after an
//! update (or, between the two, a mixture of valid node numbers), and ignores links to
//! nodes past its own node count. New nodes go into new chunks, or into a copy of a
//! partly filled last chunk, which searchers of the earlier value never see.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

use super::Elem;
use super::pages::{Fetch, Pages};

/// log2 of the nodes in a chunk.
const CHUNK_BITS: u32 = 12;
/// Nodes in a full chunk (4,096: 6 MB of 384-dimension `f32` vectors, large enough
/// for huge pages).
pub(super) const CHUNK: usize = 1 << CHUNK_BITS;
const MASK: usize = CHUNK - 1;
/// The highest layer a node can reach.
const MAX_LEVEL: u8 = 15;

/// The fixed sizes of a graph.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    /// Components of each vector.
    pub(super) dims: usize,
    /// Links a node keeps on layers 1 and up (HNSW `M`); layer 0 keeps twice as many.
    pub(super) m: usize,
    /// Candidates considered while linking a node.
    pub(super) ef_construction: usize,
}

impl Shape {
    fn m0(&self) -> usize {
        self.m * 2
    }

    /// Links per node on `level` (the cap of its list).
    fn cap(&self, level: usize) -> usize {
        if level == 0 { self.m0() } else { self.m }
    }
}

/// `f32` ordered by `total_cmp`, for the search heaps.
#[derive(Clone, Copy, PartialEq, Debug)]
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

/// Up to [`CHUNK`] consecutive nodes.
struct Chunk<T> {
    /// Their vectors, `dims` components each.
    vectors: Pages<T>,
    /// Layer-0 links: per node a count, then `m0` slots.
    links: Box<[AtomicU32]>,
    /// Where each node's upper-layer lists start in `upper` (and, one past the last
    /// node, where they end): a node of level `l` has `l` lists of a count and `m`
    /// slots.
    upper_at: Box<[u32]>,
    upper: Box<[AtomicU32]>,
}

impl<T: Elem> Chunk<T> {
    fn len(&self) -> usize {
        self.upper_at.len().saturating_sub(1)
    }

    /// A chunk of `vectors` whose nodes have `levels`, with no links yet; or a
    /// copy of `old`'s nodes and links followed by those.
    fn new(shape: &Shape, old: Option<&Chunk<T>>, vectors: &[T], levels: &[u8]) -> Option<Self> {
        let dims = shape.dims;
        let old_len = old.map_or(0, Chunk::len);
        let n = old_len + levels.len();
        if n > CHUNK || vectors.len() != levels.len() * dims {
            return None;
        }
        let mut store = Pages::zeroed(n * dims);
        let slice = store.as_mut_slice();
        let (head, tail) = slice.split_at_mut(old_len * dims);
        if let Some(old) = old {
            head.copy_from_slice(old.vectors.as_slice().get(..old_len * dims)?);
        }
        tail.copy_from_slice(vectors);
        let row0 = shape.m0() + 1;
        let load = |a: &AtomicU32| AtomicU32::new(a.load(AtomicOrdering::Relaxed));
        let mut links: Vec<AtomicU32> = Vec::with_capacity(n * row0);
        let mut upper_at: Vec<u32> = Vec::with_capacity(n + 1);
        let mut upper: Vec<AtomicU32> = Vec::new();
        if let Some(old) = old {
            links.extend(old.links.iter().map(load));
            upper_at.extend_from_slice(old.upper_at.get(..old_len)?);
            upper.extend(old.upper.iter().map(load));
        }
        links.resize_with(n * row0, || AtomicU32::new(0));
        let row = shape.m + 1;
        for &level in levels {
            upper_at.push(u32::try_from(upper.len()).ok()?);
            upper.resize_with(upper.len() + usize::from(level) * row, || AtomicU32::new(0));
        }
        upper_at.push(u32::try_from(upper.len()).ok()?);
        Some(Chunk {
            vectors: store,
            links: links.into_boxed_slice(),
            upper_at: upper_at.into_boxed_slice(),
            upper: upper.into_boxed_slice(),
        })
    }
}

/// An HNSW graph over unit vectors, scored by a similarity (higher is nearer).
pub(super) struct Graph<T> {
    shape: Shape,
    chunks: Vec<Arc<Chunk<T>>>,
    /// Nodes: 0..n.
    n: usize,
    entry: u32,
    top: usize,
}

impl<T> Clone for Graph<T> {
    fn clone(&self) -> Self {
        Graph {
            shape: self.shape,
            chunks: self.chunks.clone(),
            n: self.n,
            entry: self.entry,
            top: self.top,
        }
    }
}

/// A node's level: `-ln(u) / ln(M)` for a `u` drawn from the node's number, so that a
/// graph is the same from one build to the next.
fn level_of(node: usize, m: usize) -> u8 {
    let mut x = (node as u64) ^ 0x5DEE_CE66_D1CE_4E5B;
    // splitmix64
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    // (0, 1]
    let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let level = -u.ln() / (m.max(2) as f64).ln();
    level.min(f64::from(MAX_LEVEL)) as u8
}

/// A bitset of visited nodes.
struct Visited(Vec<u64>);

impl Visited {
    fn new(n: usize) -> Self {
        Visited(vec![0; n.div_ceil(64)])
    }

    fn reset(&mut self, n: usize) {
        self.0.clear();
        self.0.resize(n.div_ceil(64), 0);
    }

    /// Marks `i`; returns whether it was marked already (or is out of range).
    fn mark(&mut self, i: u32) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        match self.0.get_mut(w) {
            Some(word) => {
                let was = *word >> b & 1 == 1;
                *word |= 1 << b;
                was
            }
            None => true,
        }
    }
}

impl<T: Elem> Graph<T> {
    /// An empty graph.
    pub(super) fn new(shape: Shape) -> Self {
        Graph {
            shape,
            chunks: Vec::new(),
            n: 0,
            entry: 0,
            top: 0,
        }
    }

    /// Nodes in the graph.
    pub(super) fn len(&self) -> usize {
        self.n
    }

    /// The vector of node `i` (empty past the end).
    pub(super) fn vector(&self, i: u32) -> &[T] {
        let i = i as usize;
        let dims = self.shape.dims;
        let at = (i & MASK) * dims;
        self.chunks
            .get(i >> CHUNK_BITS)
            .and_then(|c| c.vectors.as_slice().get(at..at + dims))
            .unwrap_or(&[])
    }

    /// The list of node `i` on `level`: a count, then the slots.
    fn list(&self, i: u32, level: usize) -> &[AtomicU32] {
        let i = i as usize;
        let Some(c) = self.chunks.get(i >> CHUNK_BITS) else {
            return &[];
        };
        let o = i & MASK;
        if level == 0 {
            let row = self.shape.m0() + 1;
            return c.links.get(o * row..(o + 1) * row).unwrap_or(&[]);
        }
        let row = self.shape.m + 1;
        let (Some(&a), Some(&b)) = (c.upper_at.get(o), c.upper_at.get(o + 1)) else {
            return &[];
        };
        let at = a as usize + (level - 1) * row;
        if at + row > b as usize {
            return &[];
        }
        c.upper.get(at..at + row).unwrap_or(&[])
    }

    /// The level of node `i`.
    fn level(&self, i: u32) -> usize {
        let i = i as usize;
        self.chunks
            .get(i >> CHUNK_BITS)
            .and_then(|c| {
                let o = i & MASK;
                let (a, b) = (c.upper_at.get(o)?, c.upper_at.get(o + 1)?);
                Some(b.saturating_sub(*a) as usize / (self.shape.m + 1))
            })
            .unwrap_or(0)
    }

    /// Calls `f` with each neighbour of `i` on `level` that is in this graph.
    #[inline]
    fn neighbours(&self, i: u32, level: usize, mut f: impl FnMut(u32)) {
        let list = self.list(i, level);
        let Some((count, slots)) = list.split_first() else {
            return;
        };
        let count = (count.load(AtomicOrdering::Acquire) as usize).min(slots.len());
        for s in &slots[..count] {
            let n = s.load(AtomicOrdering::Relaxed);
            if (n as usize) < self.n {
                f(n);
            }
        }
    }

    /// Greedy descent from the entry point to `level + 1`'s best node: (node, score).
    fn descend(&self, sim: &impl Fn(u32) -> f32, down_to: usize) -> (u32, f32) {
        let mut cur = self.entry;
        let mut cur_sim = sim(cur);
        for layer in (down_to.max(1)..=self.top).rev() {
            loop {
                let mut moved = false;
                self.neighbours(cur, layer, |n| {
                    let s = sim(n);
                    if s > cur_sim {
                        (cur, cur_sim, moved) = (n, s, true);
                    }
                });
                if !moved {
                    break;
                }
            }
        }
        (cur, cur_sim)
    }

    /// The beam search of width `ef` on `level` from `start`: returns (node, score),
    /// best first, of nodes `keep` accepts (others are walked through).
    #[allow(clippy::too_many_arguments)]
    fn beam(
        &self,
        start: (u32, f32),
        ef: usize,
        level: usize,
        sim: &impl Fn(u32) -> f32,
        keep: &impl Fn(u32) -> bool,
        visited: &mut Visited,
        fetch: Fetch,
    ) -> Vec<(u32, f32)> {
        let ef = ef.max(1);
        visited.mark(start.0);
        let mut fresh: Vec<u32> = Vec::with_capacity(self.shape.m0());
        let mut candidates: BinaryHeap<(Sim, u32)> = BinaryHeap::with_capacity(ef * 4);
        let mut best: BinaryHeap<Reverse<(Sim, u32)>> = BinaryHeap::with_capacity(ef + 1);
        candidates.push((Sim(start.1), start.0));
        if keep(start.0) {
            best.push(Reverse((Sim(start.1), start.0)));
        }
        while let Some((Sim(s), c)) = candidates.pop() {
            let worst = best.peek().map_or(f32::MIN, |Reverse((Sim(w), _))| *w);
            if best.len() >= ef && s < worst {
                break;
            }
            // Gather the unvisited neighbours and ask for every cache line of each
            // vector before scoring any: independent loads that the processor
            // overlaps, where scoring one after another would wait for memory each
            // time.
            fresh.clear();
            self.neighbours(c, level, |n| {
                if !visited.mark(n) {
                    fresh.push(n);
                }
            });
            let mut fetched = 0u32;
            for &n in &fresh {
                fetched ^= fetch.lines(self.vector(n));
            }
            if let Some((_, next)) = candidates.peek() {
                fetched ^= fetch.head(self.list(*next, level));
            }
            std::hint::black_box(fetched);
            for &n in &fresh {
                let sn = sim(n);
                let worst = best.peek().map_or(f32::MIN, |Reverse((Sim(w), _))| *w);
                if best.len() < ef || sn > worst {
                    candidates.push((Sim(sn), n));
                    if keep(n) {
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

    /// The `ef`-wide search for `q`'s nearest nodes that `keep` accepts: (node,
    /// similarity), best first.
    pub(super) fn search(&self, q: &[T], ef: usize, keep: impl Fn(u32) -> bool) -> Vec<(u32, f32)> {
        if self.n == 0 {
            return Vec::new();
        }
        let score = T::sim_to(q);
        let sim = |i: u32| score(self.vector(i));
        let start = self.descend(&sim, 1);
        let mut visited = Visited::new(self.n);
        self.beam(start, ef, 0, &sim, &keep, &mut visited, Fetch::new())
    }

    /// Picks up to `m` of `candidates` (best first, scored against the node being
    /// linked) by HNSW's heuristic: a candidate is taken unless one taken already is
    /// nearer to it than the node is, so that links spread in every direction; then,
    /// if fewer than `m` were taken, the nearest of the others fill the list.
    fn select(&self, candidates: &[(u32, f32)], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        let mut pruned: Vec<u32> = Vec::new();
        for &(c, s) in candidates {
            if kept.len() >= m {
                break;
            }
            let vc = self.vector(c);
            if kept.iter().all(|&k| T::sim(vc, self.vector(k)) <= s) {
                kept.push(c);
            } else {
                pruned.push(c);
            }
        }
        let room = m.saturating_sub(kept.len());
        kept.extend(pruned.into_iter().take(room));
        kept
    }

    /// Writes `to` as the list of `i` on `level`.
    fn set_list(&self, i: u32, level: usize, to: &[u32]) {
        let list = self.list(i, level);
        let Some((count, slots)) = list.split_first() else {
            return;
        };
        let n = to.len().min(slots.len());
        for (slot, v) in slots.iter().zip(&to[..n]) {
            slot.store(*v, AtomicOrdering::Relaxed);
        }
        count.store(n as u32, AtomicOrdering::Release);
    }

    /// Adds a link from `e` to `new` (scored `s` against `e`) on `level`. A full
    /// list keeps its nearest: `new` replaces the farthest link if it is nearer (one
    /// similarity per link, where re-running the heuristic would cost one per pair).
    fn add_link(&self, e: u32, new: u32, s: f32, level: usize) {
        let list = self.list(e, level);
        let Some((count, slots)) = list.split_first() else {
            return;
        };
        let c = (count.load(AtomicOrdering::Relaxed) as usize).min(slots.len());
        if c < slots.len() {
            slots[c].store(new, AtomicOrdering::Relaxed);
            count.store(c as u32 + 1, AtomicOrdering::Release);
            return;
        }
        let ve = self.vector(e);
        let mut worst: Option<(usize, f32)> = None;
        for (at, slot) in slots[..c].iter().enumerate() {
            let n = slot.load(AtomicOrdering::Relaxed);
            let sn = T::sim(ve, self.vector(n));
            if worst.is_none_or(|(_, w)| sn < w) {
                worst = Some((at, sn));
            }
        }
        if let Some((at, w)) = worst {
            if s > w {
                slots[at].store(new, AtomicOrdering::Relaxed);
            }
        }
    }

    /// Links node `i` (already stored, `i == self.n`) into the graph.
    fn link(&mut self, i: u32, visited: &mut Visited, fetch: Fetch) {
        let level = self.level(i);
        self.n = i as usize + 1;
        if i == 0 {
            self.entry = 0;
            self.top = level;
            return;
        }
        self.link_layers(i, level, visited, fetch);
        if level > self.top {
            self.top = level;
            self.entry = i;
        }
    }

    /// Links node `i` of `level` on each layer up to `level` that the graph has.
    fn link_layers(&self, i: u32, level: usize, visited: &mut Visited, fetch: Fetch) {
        let q = self.vector(i);
        let score = T::sim_to(q);
        let sim = |j: u32| score(self.vector(j));
        let mut cur = self.descend(&sim, level + 1);
        for l in (0..=level.min(self.top)).rev() {
            visited.reset(self.n);
            visited.mark(i);
            let found = self.beam(
                cur,
                self.shape.ef_construction,
                l,
                &sim,
                &|_| true,
                visited,
                fetch,
            );
            let kept = self.select(&found, self.shape.cap(l));
            self.set_list(i, l, &kept);
            for (&n, s) in kept
                .iter()
                .zip(kept.iter().map(|k| found.iter().find(|f| f.0 == *k)))
            {
                self.add_link(n, i, s.map_or(0.0, |f| f.1), l);
            }
            if let Some(&best) = found.first() {
                cur = best;
            }
        }
    }

    /// This graph with `added` more nodes, the vectors `vectors` yields (`dims`
    /// components each), linked in. Shares every full chunk with `self`; links of
    /// nodes already in the graph change in place (searches of `self` go on
    /// meanwhile). `None` if `vectors` yields fewer vectors or ones of another length,
    /// or if the node count would reach `u32::MAX`.
    pub(super) fn extended<'a>(
        &self,
        added: usize,
        mut vectors: impl Iterator<Item = &'a [T]>,
    ) -> Option<Graph<T>> {
        let dims = self.shape.dims;
        let total = self.n.checked_add(added)?;
        if total >= u32::MAX as usize {
            return None;
        }
        let mut g = self.clone();
        // Chunks: the partly filled last one is copied and filled, then new ones.
        let mut next = self.n;
        let mut buf: Vec<T> = Vec::new();
        while next < total {
            let in_chunk = next & MASK;
            let take = (CHUNK - in_chunk).min(total - next);
            let levels: Vec<u8> = (next..next + take)
                .map(|j| level_of(j, self.shape.m))
                .collect();
            buf.clear();
            for _ in 0..take {
                let v = vectors.next()?;
                if v.len() != dims {
                    return None;
                }
                buf.extend_from_slice(v);
            }
            let chunk = if in_chunk == 0 {
                Chunk::new(&self.shape, None, &buf, &levels)?
            } else {
                let old = g.chunks.pop()?;
                Chunk::new(&self.shape, Some(&old), &buf, &levels)?
            };
            g.chunks.push(Arc::new(chunk));
            next += take;
        }
        drop(buf);
        let fetch = Fetch::new();
        let mut visited = Visited::new(total);
        for i in self.n..total {
            g.link(u32::try_from(i).ok()?, &mut visited, fetch);
        }
        Some(g)
    }

    /// Every node's vector, in order (for a scan).
    pub(super) fn vectors(&self) -> impl Iterator<Item = &[T]> + '_ {
        let dims = self.shape.dims.max(1);
        self.chunks
            .iter()
            .flat_map(move |c| c.vectors.as_slice().chunks_exact(dims))
    }

    /// Bytes held (vectors, links), for the record.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| {
                size_of_val(c.vectors.as_slice())
                    + (c.links.len() + c.upper.len() + c.upper_at.len()) * 4
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::index::tests::unit;

    #[test]
    fn levels_fall_off_geometrically() {
        let m = 16;
        let n = 100_000;
        let upper = (0..n).filter(|i| level_of(*i, m) > 0).count();
        // P(level > 0) = 1/M
        assert!((5_500..7_000).contains(&upper), "{upper}");
        let high = (0..n).filter(|i| level_of(*i, m) > 1).count();
        assert!((250..550).contains(&high), "{high}");
        assert!((0..n).all(|i| level_of(i, m) <= MAX_LEVEL));
    }

    #[test]
    fn an_extended_graph_shares_full_chunks_and_finds_every_node() {
        let dims = 16;
        let shape = Shape {
            dims,
            m: 8,
            ef_construction: 64,
        };
        let data: Vec<f32> = (0..(CHUNK as u64 + 700))
            .flat_map(|i| unit(i, dims))
            .collect();
        let (a, b) = data.split_at((CHUNK + 300) * dims);
        let g1 = Graph::new(shape)
            .extended(CHUNK + 300, a.chunks_exact(dims))
            .unwrap();
        assert_eq!(g1.len(), CHUNK + 300);
        let g2 = g1.extended(400, b.chunks_exact(dims)).unwrap();
        assert!(g1.extended(10, b[..dims * 9].chunks_exact(dims)).is_none());
        assert_eq!(g2.len(), CHUNK + 700);
        assert!(
            Arc::ptr_eq(&g1.chunks[0], &g2.chunks[0]),
            "full chunk shared"
        );
        assert!(
            !Arc::ptr_eq(&g1.chunks[1], &g2.chunks[1]),
            "partial one copied"
        );
        // every layer-0 list is within its cap and names nodes of the graph
        for i in 0..g2.len() as u32 {
            let mut n = 0;
            g2.neighbours(i, 0, |j| {
                assert!((j as usize) < g2.len() && j != i);
                n += 1;
            });
            assert!((1..=16).contains(&n), "{i}: {n}");
        }
        let mut hits = 0;
        for i in (0..g2.len() as u64).step_by(11) {
            let got = g2.search(&unit(i, dims), 32, |_| true);
            hits += usize::from(got[0].0 as u64 == i);
        }
        let asked = g2.len().div_ceil(11);
        assert!(hits * 100 >= asked * 97, "{hits}/{asked}");
        // the earlier value still searches its own nodes only
        let got = g1.search(&unit(CHUNK as u64 + 500, dims), 10, |_| true);
        assert!(got.iter().all(|(i, _)| (*i as usize) < g1.len()));
        assert!(g2.bytes() > 0);
    }
}
