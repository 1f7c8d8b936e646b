//! Text embeddings for semantic matching: the [`Embedder`] trait and its
//! implementations.
//!
//! | embedder | where | needs |
//! | --- | --- | --- |
//! | [`HashingEmbedder`] | here, the offline default | nothing; catches rewording, not synonyms |
//! | [`OpenAiEmbedder`](crate::provider::OpenAiEmbedder) | `/v1/embeddings` of any OpenAI-compatible server | a server and a key |
//! | `MiniLmEmbedder` | a local sentence-transformers model run with candle | the `local-embeddings` feature and a model folder |
//!
//! [`CachedEmbedder`] wraps any of them with a bounded cache of recent embeddings, so a
//! question is embedded once per request even though the cache reads and then writes it.

mod cached;
#[cfg(feature = "local-embeddings")]
mod minilm;

use std::fmt;

use async_trait::async_trait;

use crate::{Error, Result};

pub use cached::{CachedEmbedder, unit_vector};
#[cfg(feature = "local-embeddings")]
pub use minilm::MiniLmEmbedder;

/// Turns texts into vectors whose cosine similarity tracks meaning.
///
/// # Implementing
///
/// ```
/// use async_trait::async_trait;
/// use tokenwise::cache::Embedder;
///
/// /// Two features: length and vowel share. Only an illustration.
/// #[derive(Debug)]
/// struct Toy;
///
/// #[async_trait]
/// impl Embedder for Toy {
///     fn dimensions(&self) -> usize {
///         2
///     }
///     async fn embed(&self, texts: &[&str]) -> tokenwise::Result<Vec<Vec<f32>>> {
///         Ok(texts.iter().map(|t| {
///             let vowels = t.chars().filter(|c| "aeiou".contains(*c)).count() as f32;
///             let len = t.len().max(1) as f32;
///             let v = [len.ln(), vowels / len];
///             let norm = (v[0] * v[0] + v[1] * v[1]).sqrt().max(f32::EPSILON);
///             vec![v[0] / norm, v[1] / norm]
///         }).collect())
///     }
/// }
/// ```
#[async_trait]
pub trait Embedder: Send + Sync + fmt::Debug {
    /// The length of every vector this embedder returns.
    fn dimensions(&self) -> usize;

    /// One vector per text, in order, ideally of unit length. A
    /// [`SemanticCache`](super::SemanticCache) normalises what it is given (through
    /// [`CachedEmbedder`]) and treats a zero or non-finite vector as an embedding
    /// failure: that text is then matched exactly only.
    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>>;

    /// The similarity from which this embedder's vectors mean "the same question", if
    /// it has been calibrated: each model spreads its similarities differently, so a
    /// cutoff is a property of the model. A [`SemanticCache`](super::SemanticCache)
    /// built without [`threshold`](super::SemanticCacheBuilder::threshold) uses it,
    /// else [`DEFAULT_THRESHOLD`](super::DEFAULT_THRESHOLD). Default: not calibrated.
    fn calibrated_threshold(&self) -> Option<f32> {
        None
    }

    /// The [pair judge](super::PairJudge) fitted for this embedder's vectors, if any: a
    /// [`SemanticCache`](super::SemanticCache) built without
    /// [`judge`](super::SemanticCacheBuilder::judge) uses it as its precision stage,
    /// and recalls candidates from the judge's looser threshold. Default: none.
    fn calibrated_judge(&self) -> Option<super::PairJudge> {
        None
    }
}

/// An offline embedder by feature hashing: lowercased word unigrams and bigrams plus
/// character trigrams, each hashed to a signed bucket, then L2-normalised.
///
/// It needs no model and no network, and catches reordering, casing, punctuation and
/// small edits; it does not know synonyms. Use a model-based embedder for paraphrases.
#[derive(Debug, Clone, Copy)]
pub struct HashingEmbedder {
    dims: usize,
}

impl HashingEmbedder {
    /// An embedder with `dims` dimensions (at least 16).
    pub fn new(dims: usize) -> Result<Self> {
        if dims < 16 {
            return Err(Error::Config(format!(
                "hashing embedder needs at least 16 dimensions, got {dims}"
            )));
        }
        Ok(HashingEmbedder { dims })
    }

    /// Embeds one text, synchronously.
    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dims];
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let mut add = |feature: &[u8], weight: f32| {
            let h = blake3::hash(feature);
            let b = h.as_bytes();
            let idx = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            let slot = (idx % self.dims as u64) as usize;
            let sign = if b[8] & 1 == 0 { 1.0 } else { -1.0 };
            v[slot] += sign * weight;
        };
        for w in &words {
            add(format!("w:{w}").as_bytes(), 1.0);
            let chars: Vec<char> = format!(" {w} ").chars().collect();
            for tri in chars.windows(3) {
                let s: String = tri.iter().collect();
                add(format!("c:{s}").as_bytes(), 0.3);
            }
        }
        for pair in words.windows(2) {
            add(format!("b:{} {}", pair[0], pair[1]).as_bytes(), 0.7);
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

impl Default for HashingEmbedder {
    fn default() -> Self {
        HashingEmbedder { dims: 384 }
    }
}

#[async_trait]
impl Embedder for HashingEmbedder {
    fn dimensions(&self) -> usize {
        self.dims
    }

    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn similar_texts_score_higher_than_unrelated() {
        let e = HashingEmbedder::default();
        let a = e.embed_one("How do I reset my password?");
        let b = e.embed_one("how do i reset my password");
        let c = e.embed_one("What is the weather in Paris tomorrow?");
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        assert!(cos(&a, &b) > 0.99);
        assert!(cos(&a, &c) < 0.5);
        assert!(e.embed_one("").iter().all(|x| *x == 0.0));
        assert!(HashingEmbedder::new(4).is_err());
    }
}
