//! A bounded cache of recent embeddings.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use lru::LruCache;

use super::Embedder;
use crate::{Error, Result};

type Digest = [u8; 32];

/// An [`Embedder`] that remembers the vectors of the most recent texts (an LRU keyed by
/// the text's BLAKE3 digest), so that a text asked about again, or read and then written
/// by the same request, is embedded once.
///
/// Every vector it hands out has unit length: the wrapped embedder's vectors are
/// normalised (see [`unit_vector`]), and a zero or non-finite vector is an error rather
/// than a silently distorted similarity.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tokenwise::Result<()> {
/// use std::sync::Arc;
/// use tokenwise::cache::{CachedEmbedder, Embedder, HashingEmbedder};
///
/// let e = CachedEmbedder::new(Arc::new(HashingEmbedder::default()), 1_000)?;
/// let a = e.embed_one("How do I reset my password?").await?;
/// let b = e.embed_one("How do I reset my password?").await?;
/// assert_eq!(a, b);
/// assert_eq!(e.computed(), 1); // the second came from the cache
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct CachedEmbedder {
    inner: Arc<dyn Embedder>,
    recent: Mutex<LruCache<Digest, Arc<[f32]>>>,
    computed: AtomicU64,
}

impl CachedEmbedder {
    /// Wraps `inner`, remembering up to `capacity` (at least 1) embeddings.
    pub fn new(inner: Arc<dyn Embedder>, capacity: usize) -> Result<Self> {
        let cap = NonZeroUsize::new(capacity)
            .ok_or_else(|| Error::Config("embedding cache: capacity must be at least 1".into()))?;
        Ok(CachedEmbedder {
            inner,
            recent: Mutex::new(LruCache::new(cap)),
            computed: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<Digest, Arc<[f32]>>> {
        // Every mutation is one LruCache call: a poisoned map is still consistent.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The wrapped embedder.
    pub fn inner(&self) -> &Arc<dyn Embedder> {
        &self.inner
    }

    /// How many texts the wrapped embedder was asked to embed so far.
    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Embeddings held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vector of one text, from the cache or the wrapped embedder.
    pub async fn embed_one(&self, text: &str) -> Result<Arc<[f32]>> {
        let key = *blake3::hash(text.as_bytes()).as_bytes();
        if let Some(v) = self.lock().get(&key) {
            return Ok(Arc::clone(v));
        }
        self.computed.fetch_add(1, Ordering::Relaxed);
        let mut out = self.inner.embed(&[text]).await?;
        let v: Arc<[f32]> = match out.pop() {
            Some(v) if out.is_empty() && v.len() == self.inner.dimensions() => {
                unit_vector(v)?.into()
            }
            _ => {
                return Err(Error::Config(format!(
                    "embedder returned a malformed answer (expected one vector of {} dimensions)",
                    self.inner.dimensions()
                )));
            }
        };
        self.lock().put(key, Arc::clone(&v));
        Ok(v)
    }
}

/// `v` scaled to unit length, so that a dot product is the cosine similarity whatever
/// scale the embedder works in. A vector with a non-finite component, or one too close
/// to zero to have a direction, is refused with [`Error::InvalidRequest`].
///
/// ```
/// use tokenwise::cache::unit_vector;
///
/// assert_eq!(unit_vector(vec![3.0, 4.0])?, vec![0.6, 0.8]);
/// assert!(unit_vector(vec![0.0, 0.0]).is_err());
/// assert!(unit_vector(vec![f32::NAN, 1.0]).is_err());
/// # Ok::<(), tokenwise::Error>(())
/// ```
pub fn unit_vector(mut v: Vec<f32>) -> Result<Vec<f32>> {
    if !v.iter().all(|x| x.is_finite()) {
        return Err(Error::InvalidRequest(
            "embedder returned a vector with a non-finite component".into(),
        ));
    }
    // In f64: the squares of large f32 components would overflow.
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm <= 1e-12 {
        return Err(Error::InvalidRequest(
            "embedder returned a zero vector (no direction to compare)".into(),
        ));
    }
    if (norm - 1.0).abs() > 1e-6 {
        v.iter_mut()
            .for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
    Ok(v)
}

#[async_trait]
impl Embedder for CachedEmbedder {
    fn dimensions(&self) -> usize {
        self.inner.dimensions()
    }

    fn calibrated_threshold(&self) -> Option<f32> {
        self.inner.calibrated_threshold()
    }

    fn calibrated_judge(&self) -> Option<crate::cache::PairJudge> {
        self.inner.calibrated_judge()
    }

    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            out.push(self.embed_one(t).await?.to_vec());
        }
        Ok(out)
    }
}
