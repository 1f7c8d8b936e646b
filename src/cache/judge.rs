//! The pair judge: the precision stage of a semantic match.
//!
//! The embedding index recalls stored questions that are about the same thing; the
//! judge decides whether a recalled one asks the same thing. It reads features that do
//! not depend on how a question is worded: the similarity of the two questions, how well
//! each content word of one is matched by a word of the other (by spelling first, then
//! by the embedder's vectors of the single words), how many words are left without a
//! counterpart, and what the lexical [guards](super::Guards) say. A logistic model turns
//! them into a probability; a candidate is served from [`PairJudge::cutoff`].
//!
//! The model is small (one weight per feature) and is fitted by
//! `cargo run --release --features local-embeddings --example cache_eval -- --train`
//! on the calibration split of the repository's corpus; its cutoff is chosen on the
//! validation split. The file it writes, `src/cache/judge_minilm_l6.txt`, is the judge
//! that [`MiniLmEmbedder`](super::MiniLmEmbedder) models of all-MiniLM-L6-v2's shape
//! come with.

use std::fmt::Write as _;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::embed::{Embedder, unit_vector};
use super::guards::{Guards, PairSignals};
use crate::types::GuardKind;
use crate::{Error, Result};

/// How many features a [`PairJudge`] reads.
pub const JUDGE_FEATURES: usize = 10;

/// The names of the features, in the order of [`PairFeatures::values`].
pub const JUDGE_FEATURE_NAMES: [&str; JUDGE_FEATURES] = [
    "similarity",
    "worst_word_match",
    "mean_word_match",
    "unmatched_words_below_0.5",
    "unmatched_words",
    "unmatched_share",
    "negation_guard",
    "scope_guard",
    "terms_guard",
    "negation_count_difference",
];

/// Word vectors remembered by a judge's cache (the vocabulary of questions is small).
const WORD_CACHE: usize = 20_000;

/// Longest word embedded; longer ones are compared by spelling only.
const MAX_WORD_BYTES: usize = 40;

/// Most content words per question whose vectors are looked up.
const MAX_WORDS: usize = 24;

/// The features of one pair of questions (see [`JUDGE_FEATURE_NAMES`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairFeatures {
    values: [f32; JUDGE_FEATURES],
    /// A guard that refuses whatever the judge says (numbers or entities), if any.
    hard: Option<GuardKind>,
}

impl PairFeatures {
    /// The feature values, in the order of [`JUDGE_FEATURE_NAMES`].
    pub fn values(&self) -> &[f32; JUDGE_FEATURES] {
        &self.values
    }

    /// The numbers or entities guard, when it refuses the pair: those are never
    /// outweighed.
    pub fn hard_refusal(&self) -> Option<GuardKind> {
        self.hard
    }
}

/// A logistic model over [`PairFeatures`] with the similarity its candidates need and
/// the probability it serves from.
///
/// ```
/// use tokenwise::cache::PairJudge;
///
/// let judge = PairJudge::minilm_l6()?;
/// assert!(judge.recall_threshold() < 0.9);
/// let again = PairJudge::parse(&judge.to_text())?;
/// assert_eq!(judge, again);
/// # Ok::<(), tokenwise::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PairJudge {
    mean: [f32; JUDGE_FEATURES],
    scale: [f32; JUDGE_FEATURES],
    weights: [f32; JUDGE_FEATURES],
    bias: f32,
    cutoff: f32,
    recall: f32,
    context: f32,
}

impl PairJudge {
    /// The judge fitted for all-MiniLM-L6-v2 (`src/cache/judge_minilm_l6.txt`).
    pub fn minilm_l6() -> Result<PairJudge> {
        PairJudge::parse(include_str!("judge_minilm_l6.txt"))
    }

    /// Reads a judge written by [`to_text`](Self::to_text). Lines are `name value…`;
    /// `#` starts a comment. A missing, extra or non-finite value is a
    /// [`Error::Config`].
    pub fn parse(text: &str) -> Result<PairJudge> {
        let bad = |what: &str| Error::Config(format!("pair judge: {what}"));
        let mut j = PairJudge {
            mean: [0.0; JUDGE_FEATURES],
            scale: [1.0; JUDGE_FEATURES],
            weights: [0.0; JUDGE_FEATURES],
            bias: 0.0,
            cutoff: f32::NAN,
            recall: f32::NAN,
            context: 0.0,
        };
        let mut seen = [false; 6];
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap_or("");
            let values: Vec<f32> = parts
                .map(|v| v.parse::<f32>().map_err(|e| bad(&format!("`{name}`: {e}"))))
                .collect::<Result<_>>()?;
            if !values.iter().all(|v| v.is_finite()) {
                return Err(bad(&format!("`{name}` has a non-finite value")));
            }
            let row = |values: &[f32]| -> Result<[f32; JUDGE_FEATURES]> {
                values.try_into().map_err(|_| {
                    bad(&format!(
                        "`{name}` needs {JUDGE_FEATURES} values, has {}",
                        values.len()
                    ))
                })
            };
            let one = |values: &[f32]| -> Result<f32> {
                match values {
                    [v] => Ok(*v),
                    _ => Err(bad(&format!("`{name}` needs one value"))),
                }
            };
            let slot = match name {
                "mean" => {
                    j.mean = row(&values)?;
                    0
                }
                "scale" => {
                    j.scale = row(&values)?;
                    1
                }
                "weights" => {
                    j.weights = row(&values)?;
                    2
                }
                "bias" => {
                    j.bias = one(&values)?;
                    3
                }
                "cutoff" => {
                    j.cutoff = one(&values)?;
                    4
                }
                "recall" => {
                    j.recall = one(&values)?;
                    5
                }
                "context" => {
                    j.context = one(&values)?;
                    continue;
                }
                other => return Err(bad(&format!("unknown line `{other}`"))),
            };
            seen[slot] = true;
        }
        if !seen.iter().all(|s| *s) {
            return Err(bad(
                "needs the lines mean, scale, weights, bias, cutoff and recall",
            ));
        }
        if j.scale.iter().any(|s| *s <= 0.0) {
            return Err(bad("every scale must be positive"));
        }
        j.check()?;
        Ok(j)
    }

    fn check(&self) -> Result<()> {
        if !(self.cutoff > 0.0 && self.cutoff < 1.0) {
            return Err(Error::Config(
                "pair judge: the cutoff must be in (0, 1)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.context) {
            return Err(Error::Config(
                "pair judge: the context similarity must be in [0, 1]".into(),
            ));
        }
        if !(self.recall > 0.0 && self.recall <= 1.0) {
            return Err(Error::Config(
                "pair judge: the recall threshold must be in (0, 1]".into(),
            ));
        }
        Ok(())
    }

    /// The judge as text, for [`parse`](Self::parse).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let row = |s: &mut String, name: &str, v: &[f32]| {
            let _ = write!(s, "{name}");
            for x in v {
                let _ = write!(s, " {x}");
            }
            s.push('\n');
        };
        let _ = writeln!(s, "# features: {}", JUDGE_FEATURE_NAMES.join(" "));
        row(&mut s, "mean", &self.mean);
        row(&mut s, "scale", &self.scale);
        row(&mut s, "weights", &self.weights);
        let _ = writeln!(s, "bias {}", self.bias);
        let _ = writeln!(s, "cutoff {}", self.cutoff);
        let _ = writeln!(s, "recall {}", self.recall);
        let _ = writeln!(s, "context {}", self.context);
        s
    }

    /// Fits a logistic model on `samples` (features, same answer), standardising each
    /// feature, by gradient descent with an L2 penalty `l2`, deterministically.
    /// `cutoff` and `recall` are set as given.
    #[allow(clippy::needless_range_loop)] // one index over several arrays of features
    pub fn fit(
        samples: &[(PairFeatures, bool)],
        l2: f32,
        cutoff: f32,
        recall: f32,
    ) -> Result<PairJudge> {
        if samples.is_empty() {
            return Err(Error::InvalidRequest(
                "pair judge: nothing to fit on".into(),
            ));
        }
        let n = samples.len() as f64;
        let mut mean = [0.0f64; JUDGE_FEATURES];
        let mut var = [0.0f64; JUDGE_FEATURES];
        for (f, _) in samples {
            for k in 0..JUDGE_FEATURES {
                mean[k] += f64::from(f.values[k]) / n;
            }
        }
        for (f, _) in samples {
            for k in 0..JUDGE_FEATURES {
                var[k] += (f64::from(f.values[k]) - mean[k]).powi(2) / n;
            }
        }
        let scale = var.map(|v| v.sqrt().max(1e-3));
        let x: Vec<[f64; JUDGE_FEATURES]> = samples
            .iter()
            .map(|(f, _)| std::array::from_fn(|k| (f64::from(f.values[k]) - mean[k]) / scale[k]))
            .collect();
        let y: Vec<f64> = samples
            .iter()
            .map(|(_, s)| f64::from(u8::from(*s)))
            .collect();
        // Balance the classes: each counts as much in the loss.
        let positives = y.iter().sum::<f64>().max(1.0);
        let negatives = (n - positives).max(1.0);
        let weight = |yi: f64| {
            if yi > 0.5 {
                n / (2.0 * positives)
            } else {
                n / (2.0 * negatives)
            }
        };
        let (mut w, mut b) = ([0.0f64; JUDGE_FEATURES], 0.0f64);
        let rate = 0.5;
        for _ in 0..3_000 {
            let mut gw = [0.0f64; JUDGE_FEATURES];
            let mut gb = 0.0;
            for (xi, yi) in x.iter().zip(&y) {
                let z = b + xi.iter().zip(&w).map(|(a, c)| a * c).sum::<f64>();
                let p = 1.0 / (1.0 + (-z).exp());
                let g = (p - yi) * weight(*yi) / n;
                for k in 0..JUDGE_FEATURES {
                    gw[k] += g * xi[k];
                }
                gb += g;
            }
            for k in 0..JUDGE_FEATURES {
                w[k] -= rate * (gw[k] + f64::from(l2) * w[k]);
            }
            b -= rate * gb;
        }
        let j = PairJudge {
            mean: mean.map(|v| v as f32),
            scale: scale.map(|v| v as f32),
            weights: w.map(|v| v as f32),
            bias: b as f32,
            cutoff,
            recall,
            context: 0.0,
        };
        j.check()?;
        Ok(j)
    }

    /// The probability that the pair needs the same answer (ignoring hard refusals).
    pub fn probability(&self, f: &PairFeatures) -> f32 {
        let z = self.bias
            + (0..JUDGE_FEATURES)
                .map(|k| (f.values[k] - self.mean[k]) / self.scale[k] * self.weights[k])
                .sum::<f32>();
        1.0 / (1.0 + (-z).exp())
    }

    /// Whether the pair of questions is served: no hard refusal and a probability
    /// from the cutoff.
    pub fn accepts(&self, f: &PairFeatures) -> bool {
        f.hard.is_none() && self.probability(f) >= self.cutoff
    }

    /// Whether two turns of context a follow-up depends on agree: as for
    /// [`accepts`](Self::accepts), and their own similarity is at least
    /// [`context_similarity`](Self::context_similarity). Who did what ("I cancelled my
    /// flight" / "the airline cancelled my flight") is in no word of either, so a context
    /// reworded much is not taken for the same.
    pub fn accepts_context(&self, f: &PairFeatures) -> bool {
        self.accepts(f) && f.values[0] >= self.context
    }

    /// The similarity two turns of context need of their own (see
    /// [`accepts_context`](Self::accepts_context)).
    pub fn context_similarity(&self) -> f32 {
        self.context
    }

    /// The same judge asking `similarity`, in [0, 1], of two turns of context.
    pub fn with_context_similarity(mut self, similarity: f32) -> Result<Self> {
        self.context = similarity;
        self.check()?;
        Ok(self)
    }

    /// The probability from which a pair is served.
    pub fn cutoff(&self) -> f32 {
        self.cutoff
    }

    /// The similarity a candidate needs to be judged at all: the recall stage's
    /// threshold, looser than a cache without a judge would use.
    pub fn recall_threshold(&self) -> f32 {
        self.recall
    }

    /// The same judge serving from probability `cutoff`, in (0, 1).
    pub fn with_cutoff(mut self, cutoff: f32) -> Result<Self> {
        self.cutoff = cutoff;
        self.check()?;
        Ok(self)
    }

    /// The same judge with candidates recalled from similarity `recall`, in (0, 1].
    pub fn with_recall_threshold(mut self, recall: f32) -> Result<Self> {
        self.recall = recall;
        self.check()?;
        Ok(self)
    }
}

/// The embedder's vectors of single words, remembered.
#[derive(Debug)]
pub(crate) struct WordVectors {
    cache: Mutex<LruCache<String, Arc<[f32]>>>,
}

impl Default for WordVectors {
    fn default() -> Self {
        WordVectors {
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(WORD_CACHE).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl WordVectors {
    /// The vectors of `words` (`None` for a word too long to embed), embedding the ones
    /// not remembered in one call.
    async fn get(
        &self,
        embedder: &dyn Embedder,
        words: &[&str],
    ) -> Result<Vec<Option<Arc<[f32]>>>> {
        let mut out: Vec<Option<Arc<[f32]>>> = Vec::with_capacity(words.len());
        let mut missing: Vec<&str> = Vec::new();
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for w in words {
                let v = c.get(*w).cloned();
                if v.is_none() && w.len() <= MAX_WORD_BYTES && !missing.contains(w) {
                    missing.push(w);
                }
                out.push(v);
            }
        }
        if !missing.is_empty() {
            let vs = embedder.embed(&missing).await?;
            if vs.len() != missing.len() {
                return Err(Error::Config(
                    "embedder returned a malformed answer (one vector per word expected)".into(),
                ));
            }
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for (w, v) in missing.iter().zip(vs) {
                let v: Arc<[f32]> = unit_vector(v)?.into();
                c.put((*w).to_owned(), v);
            }
            for (slot, w) in out.iter_mut().zip(words) {
                if slot.is_none() {
                    *slot = c.get(*w).cloned();
                }
            }
        }
        Ok(out)
    }
}

impl WordVectors {
    /// Embeds, in one call, those of `words` not remembered yet, so that the features of
    /// several pairs read them without a call of their own (each call of a local model
    /// costs a forward pass, however few its words).
    pub(crate) async fn prefetch(&self, embedder: &dyn Embedder, words: &[&str]) -> Result<()> {
        self.get(embedder, words).await.map(drop)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The hard guard (numbers or entities, as `guards` has them on) that refuses the pair.
fn hard_refusal(guards: &Guards, s: &PairSignals) -> Option<GuardKind> {
    [GuardKind::Numbers, GuardKind::Entities]
        .into_iter()
        .find(|k| guards.is_on(*k) && s.refused[*k as usize])
}

/// The words whose vectors the features of a pair compare, sorted and without
/// repeats: each unmatched word of one question and every content word of the other.
fn compared_words<'s>(
    only_a: &'s [String],
    only_b: &'s [String],
    all_a: &'s [String],
    all_b: &'s [String],
) -> Vec<&'s str> {
    let mut need: Vec<&str> = Vec::new();
    if !only_a.is_empty() {
        need.extend(only_a.iter().map(String::as_str));
        need.extend(all_b.iter().map(String::as_str));
    }
    if !only_b.is_empty() {
        need.extend(only_b.iter().map(String::as_str));
        need.extend(all_a.iter().map(String::as_str));
    }
    need.sort_unstable();
    need.dedup();
    need
}

fn trimmed(v: &[String]) -> Vec<String> {
    v.iter().take(MAX_WORDS).cloned().collect()
}

/// The words [`pair_features`] would look up for (`stored`, `asked`), or `None` when a
/// hard guard refuses the pair (a lookup then needs none of them).
pub(crate) fn words_for(guards: &Guards, stored: &str, asked: &str) -> Option<Vec<String>> {
    let s = Guards::signals(stored, asked);
    if hard_refusal(guards, &s).is_some() {
        return None;
    }
    let (only_a, only_b) = (trimmed(&s.only_stored), trimmed(&s.only_asked));
    let (all_a, all_b) = (trimmed(&s.stored_words), trimmed(&s.asked_words));
    Some(
        compared_words(&only_a, &only_b, &all_a, &all_b)
            .into_iter()
            .map(str::to_owned)
            .collect(),
    )
}

/// The features of (`stored`, `asked`) whose embeddings are `similarity` apart, using
/// `embedder` for the vectors of the words without a counterpart. `guards` says which
/// hard guards (numbers, entities) may refuse. With `stop_at_hard`, a pair a hard guard
/// refuses is returned at once, its word features left at their values for a pair
/// without unmatched words (nothing is embedded): a lookup refuses it whatever they
/// are. Without it every value is computed (for fitting a judge).
pub(crate) async fn pair_features(
    embedder: &dyn Embedder,
    words: &WordVectors,
    guards: &Guards,
    stored: &str,
    asked: &str,
    similarity: f32,
    stop_at_hard: bool,
) -> Result<PairFeatures> {
    let s: PairSignals = Guards::signals(stored, asked);
    let hard = hard_refusal(guards, &s);
    // Each unmatched word against every content word of the other question.
    let (only_a, only_b) = if hard.is_some() && stop_at_hard {
        (Vec::new(), Vec::new())
    } else {
        (trimmed(&s.only_stored), trimmed(&s.only_asked))
    };
    let (all_a, all_b) = (trimmed(&s.stored_words), trimmed(&s.asked_words));
    let mut scores: Vec<f32> = Vec::new();
    if !only_a.is_empty() || !only_b.is_empty() {
        let need = compared_words(&only_a, &only_b, &all_a, &all_b);
        let vs = words.get(embedder, &need).await?;
        let vec_of = |w: &str| -> Option<&Arc<[f32]>> {
            need.binary_search(&w)
                .ok()
                .and_then(|i| vs.get(i))
                .and_then(Option::as_ref)
        };
        let best = |w: &str, others: &[String]| -> f32 {
            let Some(v) = vec_of(w) else {
                return 0.0;
            };
            others
                .iter()
                .filter_map(|o| vec_of(o))
                .map(|o| dot(v, o))
                .fold(0.0f32, f32::max)
        };
        scores.extend(only_a.iter().map(|w| best(w, &all_b)));
        scores.extend(only_b.iter().map(|w| best(w, &all_a)));
    }
    let unmatched = scores.len() as f32;
    let content = (s.stored_words.len() + s.asked_words.len()).max(1) as f32;
    let worst = scores.iter().copied().fold(1.0f32, f32::min);
    let mean = if scores.is_empty() {
        1.0
    } else {
        scores.iter().sum::<f32>() / unmatched
    };
    let low = scores.iter().filter(|x| **x < 0.5).count() as f32;
    let flag = |k: GuardKind| f32::from(u8::from(s.refused[k as usize]));
    Ok(PairFeatures {
        values: [
            similarity,
            worst,
            mean,
            low,
            unmatched,
            unmatched / content,
            flag(GuardKind::Negation),
            flag(GuardKind::Scope),
            flag(GuardKind::Terms),
            s.stored_negations.abs_diff(s.asked_negations) as f32,
        ],
        hard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_judge_reads_and_round_trips() {
        let j = PairJudge::minilm_l6().unwrap();
        assert_eq!(PairJudge::parse(&j.to_text()).unwrap(), j);
    }

    #[test]
    fn malformed_judges_are_refused() {
        let good = PairJudge::minilm_l6().unwrap().to_text();
        assert!(PairJudge::parse("").is_err());
        assert!(PairJudge::parse(&good.replace("bias", "bogus")).is_err());
        assert!(PairJudge::parse(&format!("{good}cutoff 1.5\n")).is_err());
        assert!(PairJudge::parse(&format!("{good}weights 1 2\n")).is_err());
        assert!(PairJudge::parse(&format!("{good}bias NaN\n")).is_err());
    }

    #[test]
    fn fitting_separates_what_it_is_shown() {
        let f = |sim: f32, worst: f32| PairFeatures {
            values: [sim, worst, worst, 0.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0],
            hard: None,
        };
        let samples: Vec<(PairFeatures, bool)> = (0..40)
            .map(|i| {
                let same = i % 2 == 0;
                let x = (i as f32) / 400.0;
                (
                    if same {
                        f(0.9 + x, 0.9)
                    } else {
                        f(0.85 + x, 0.2)
                    },
                    same,
                )
            })
            .collect();
        let j = PairJudge::fit(&samples, 0.001, 0.5, 0.8).unwrap();
        assert!(j.accepts(&f(0.9, 0.95)));
        assert!(!j.accepts(&f(0.9, 0.1)));
        let hard = PairFeatures {
            hard: Some(GuardKind::Numbers),
            ..f(0.99, 1.0)
        };
        assert!(!j.accepts(&hard));
    }
}
