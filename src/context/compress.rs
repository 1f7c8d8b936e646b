//! Extractive document compression: keep the sentences most relevant to the question,
//! in their original order, to a token budget.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::TokenCounter;
use crate::cache::Embedder;
use crate::types::{Document, TokenizerKind};
use crate::{Error, Result};

/// BM25's term-frequency saturation.
const K1: f64 = 1.2;
/// BM25's length normalisation.
const B: f64 = 0.75;
/// Sentences scored per compression at most; later ones are dropped unread.
pub const MAX_SENTENCES: usize = 20_000;

/// Cuts documents down to the sentences most relevant to a question.
///
/// Each document is normalised (HTML tags, entities and Markdown markup removed,
/// whitespace collapsed) and split into sentences; every sentence of every document is
/// scored against the question — by BM25 over the documents' sentences, or, with an
/// [`Embedder`] and [`compress_with_embedder`](Self::compress_with_embedder), by cosine
/// similarity — and the best are kept, highest first, while they fit the budget: `keep`
/// of the documents' tokens (default 40 %), at most `max_tokens`. Kept sentences stay in
/// their original order; a document none of whose sentences is kept is left out.
///
/// ```
/// use tokenwise::context::{Compressor, TiktokenCounter};
/// use tokenwise::{Document, TokenizerKind};
///
/// let doc = Document::new(
///     "The museum opens at ten. Entry is free. The café closes at three. \
///      Guided tours leave every hour. Bags go to the cloakroom.",
///     1.0,
/// );
/// let out = Compressor::new().max_tokens(10).compress(
///     "When does the café close?",
///     &[doc],
///     &TiktokenCounter::new(),
///     TokenizerKind::O200k,
/// );
/// assert_eq!(out.documents[0].text, "The café closes at three.");
/// ```
#[derive(Clone)]
pub struct Compressor {
    keep: f64,
    max_tokens: Option<u64>,
    embedder: Option<Arc<dyn Embedder>>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("keep", &self.keep)
            .field("max_tokens", &self.max_tokens)
            .field("embedder", &self.embedder)
            .finish()
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of a compression.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Compressed {
    /// The documents, cut, in their original order (those with nothing kept left out).
    pub documents: Vec<Document>,
    /// The documents' tokens before (their text as given).
    pub tokens_before: u64,
    /// The documents' tokens after.
    pub tokens_after: u64,
    /// Documents whose text changed or that were left out.
    pub changed: usize,
}

impl Compressor {
    /// Keeps 40 % of the documents' tokens, scored by BM25.
    pub fn new() -> Self {
        Compressor {
            keep: 0.4,
            max_tokens: None,
            embedder: None,
        }
    }

    /// The share of the documents' tokens to keep, in (0, 1].
    pub fn keep(mut self, share: f64) -> Result<Self> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(Error::Config("compressor: keep must be in (0, 1]".into()));
        }
        self.keep = share;
        Ok(self)
    }

    /// At most `n` tokens of documents after compression.
    #[must_use]
    pub fn max_tokens(mut self, n: u64) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Scores sentences by cosine similarity with this embedder in
    /// [`compress_with_embedder`](Self::compress_with_embedder).
    #[must_use]
    pub fn embedder(mut self, embedder: Arc<dyn Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// Compresses `docs` for `question`, scoring by BM25.
    pub fn compress(
        &self,
        question: &str,
        docs: &[Document],
        counter: &dyn TokenCounter,
        kind: TokenizerKind,
    ) -> Compressed {
        let split = Split::new(docs);
        let scores = bm25(question, &split.sentences);
        self.select(docs, &split, &scores, counter, kind)
    }

    /// Compresses `docs` for `question`, scoring by the embedder's cosine similarity
    /// (BM25 without one). Fails only if the embedder does.
    pub async fn compress_with_embedder(
        &self,
        question: &str,
        docs: &[Document],
        counter: &dyn TokenCounter,
        kind: TokenizerKind,
    ) -> Result<Compressed> {
        let Some(e) = &self.embedder else {
            return Ok(self.compress(question, docs, counter, kind));
        };
        let split = Split::new(docs);
        let mut texts: Vec<&str> = Vec::with_capacity(split.sentences.len() + 1);
        texts.push(question);
        texts.extend(split.sentences.iter().map(|s| s.text.as_str()));
        let vectors = e.embed(&texts).await?;
        let Some((q, rest)) = vectors.split_first() else {
            return Err(Error::InvalidRequest(
                "the embedder returned no vectors".into(),
            ));
        };
        let scores: Vec<f64> = rest
            .iter()
            .map(|v| q.iter().zip(v).map(|(a, b)| f64::from(a * b)).sum())
            .collect();
        if scores.len() != split.sentences.len() {
            return Err(Error::InvalidRequest(format!(
                "the embedder returned {} vectors for {} texts",
                vectors.len(),
                texts.len()
            )));
        }
        Ok(self.select(docs, &split, &scores, counter, kind))
    }

    fn select(
        &self,
        docs: &[Document],
        split: &Split,
        scores: &[f64],
        counter: &dyn TokenCounter,
        kind: TokenizerKind,
    ) -> Compressed {
        let before: u64 = docs.iter().map(|d| counter.count_text(&d.text, kind)).sum();
        let mut budget = (before as f64 * self.keep).ceil() as u64;
        if let Some(max) = self.max_tokens {
            budget = budget.min(max);
        }
        let mut order: Vec<usize> = (0..split.sentences.len()).collect();
        order.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
        let mut kept = vec![false; split.sentences.len()];
        let mut used = 0;
        for i in order {
            let n = counter.count_text(&split.sentences[i].text, kind) + 1;
            if used + n <= budget {
                used += n;
                kept[i] = true;
            }
        }
        let mut texts: Vec<Vec<&str>> = vec![Vec::new(); docs.len()];
        for (s, k) in split.sentences.iter().zip(&kept) {
            if *k {
                texts[s.doc].push(&s.text);
            }
        }
        let mut out = Vec::with_capacity(docs.len());
        let mut after = 0;
        let mut changed = 0;
        for (d, t) in docs.iter().zip(texts) {
            if t.is_empty() {
                changed += 1;
                continue;
            }
            let text = t.join(" ");
            if text != d.text {
                changed += 1;
            }
            after += counter.count_text(&text, kind);
            out.push(Document {
                id: d.id.clone(),
                text,
                score: d.score,
            });
        }
        Compressed {
            documents: out,
            tokens_before: before,
            tokens_after: after,
            changed,
        }
    }
}

struct Sentence {
    doc: usize,
    text: String,
}

struct Split {
    sentences: Vec<Sentence>,
}

impl Split {
    fn new(docs: &[Document]) -> Self {
        let mut sentences = Vec::new();
        'docs: for (i, d) in docs.iter().enumerate() {
            for s in sentences_of(&normalize(&d.text)) {
                if sentences.len() >= MAX_SENTENCES {
                    break 'docs;
                }
                sentences.push(Sentence { doc: i, text: s });
            }
        }
        Split { sentences }
    }
}

/// Tags that end a block of text (their sentences never run on).
const BLOCK_TAGS: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "tr",
    "td",
    "th",
    "table",
    "section",
    "article",
    "header",
    "footer",
    "blockquote",
    "pre",
    "hr",
];

/// Text with HTML tags and common entities, Markdown markup (headings, list markers,
/// emphasis, code ticks) removed and whitespace collapsed; blocks stay on their own lines.
pub fn normalize(text: &str) -> String {
    // 1. tags: block tags become line breaks, inline ones vanish
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        plain.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let is_tag = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match (is_tag, after.find('>')) {
            (true, Some(end)) => {
                let name: String = after[..end]
                    .trim_start_matches(['/', '!'])
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_ascii_lowercase();
                plain.push_str(if BLOCK_TAGS.contains(&name.as_str()) {
                    "\n"
                } else {
                    " "
                });
                rest = &after[end + 1..];
            }
            _ => {
                plain.push('<');
                rest = after;
            }
        }
    }
    plain.push_str(rest);
    for (entity, c) in [
        ("&nbsp;", " "),
        ("&lt;", "<"),
        ("&gt;", ">"),
        ("&quot;", "\""),
        ("&#39;", "'"),
        ("&amp;", "&"),
    ] {
        if plain.contains(entity) {
            plain = plain.replace(entity, c);
        }
    }
    // 2. Markdown, line by line; 3. whitespace
    let mut out = String::with_capacity(plain.len());
    for line in plain.lines() {
        let mut l = line.trim();
        l = l.trim_start_matches('#').trim_start();
        l = l.trim_start_matches('>').trim_start();
        for marker in ["- ", "* ", "+ "] {
            if let Some(x) = l.strip_prefix(marker) {
                l = x;
            }
        }
        let digits = l.chars().take_while(char::is_ascii_digit).count();
        if digits > 0 && digits < 4 {
            if let Some(x) = l[digits..]
                .strip_prefix(". ")
                .or_else(|| l[digits..].strip_prefix(") "))
            {
                l = x;
            }
        }
        let cleaned = l.replace("**", "").replace("__", "").replace('`', "");
        let words: Vec<&str> = cleaned.split_whitespace().collect();
        if words.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&words.join(" "));
    }
    out
}

/// Sentences of normalised text: each line, split after `.`, `!` or `?` followed by a
/// space and a capital letter, digit or quote.
fn sentences_of(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let chars: Vec<(usize, char)> = line.char_indices().collect();
        let mut start = 0;
        for w in 0..chars.len() {
            let (i, c) = chars[w];
            if !matches!(c, '.' | '!' | '?') {
                continue;
            }
            let next = chars.get(w + 1).map(|x| x.1);
            let after = chars.get(w + 2).map(|x| x.1);
            if next == Some(' ')
                && after.is_some_and(|a| a.is_uppercase() || a.is_ascii_digit() || a == '"')
            {
                let s = line[start..=i].trim();
                if !s.is_empty() {
                    out.push(s.to_owned());
                }
                start = i + 2;
            }
        }
        let s = line[start.min(line.len())..].trim();
        if !s.is_empty() {
            out.push(s.to_owned());
        }
    }
    out
}

/// Words too common to say anything about relevance.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "for", "by", "with", "is", "are",
    "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "do", "does",
    "did", "i", "my", "me", "we", "our", "you", "your", "what", "which", "who", "when", "where",
    "how", "why", "can", "if", "as", "from", "there", "their", "they", "has", "have", "had",
    "will", "would", "should", "much", "many", "long", "after", "about", "up", "get",
];

/// Lowercased word stems, stopwords left out.
fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .map(|w| stem(&w))
        .collect()
}

/// A light suffix stripper: enough for "refunds" to meet "refund" and "closes" to meet
/// "close".
fn stem(w: &str) -> String {
    let n = w.chars().count();
    let mut out = w.to_owned();
    for (suffix, min) in [("ing", 6), ("ies", 5), ("ed", 5), ("es", 5), ("s", 4)] {
        if n >= min && w.ends_with(suffix) && !w.ends_with("ss") {
            let base = &w[..w.len() - suffix.len()];
            out = if suffix == "ies" {
                format!("{base}y")
            } else {
                base.to_owned()
            };
            break;
        }
    }
    if out.len() > 3 && out.ends_with('e') {
        out.pop();
    }
    out
}

/// BM25 scores of `sentences` for `question`, the sentences being the corpus.
fn bm25(question: &str, sentences: &[Sentence]) -> Vec<f64> {
    let docs: Vec<Vec<String>> = sentences.iter().map(|s| terms(&s.text)).collect();
    let n = docs.len() as f64;
    let avg = docs.iter().map(Vec::len).sum::<usize>() as f64 / n.max(1.0);
    let mut df: HashMap<&str, usize> = HashMap::new();
    for d in &docs {
        let mut seen: Vec<&str> = d.iter().map(String::as_str).collect();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            *df.entry(t).or_default() += 1;
        }
    }
    let mut q = terms(question);
    q.sort_unstable();
    q.dedup();
    docs.iter()
        .map(|d| {
            let len = d.len() as f64;
            q.iter()
                .map(|t| {
                    let f = d.iter().filter(|w| *w == t).count() as f64;
                    if f == 0.0 {
                        return 0.0;
                    }
                    let nt = df.get(t.as_str()).copied().unwrap_or(0) as f64;
                    let idf = (1.0 + (n - nt + 0.5) / (nt + 0.5)).ln();
                    idf * f * (K1 + 1.0) / (f + K1 * (1.0 - B + B * len / avg.max(1.0)))
                })
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TiktokenCounter;

    #[test]
    fn markup_and_whitespace_are_normalised() {
        let t = "<h2>Title</h2>\n<p>First   <b>bold</b> line.</p><p>Second &amp; last.</p>\n\n## Head\n- item **one**\n3. use `x`";
        assert_eq!(
            normalize(t),
            "Title\nFirst bold line.\nSecond & last.\nHead\nitem one\nuse x"
        );
        assert_eq!(normalize("a < b and c > d"), "a < b and c > d");
        assert_eq!(
            sentences_of("It is 5 p.m. now. Then 3 more! Why? ok"),
            ["It is 5 p.m. now.", "Then 3 more!", "Why? ok"]
        );
    }

    #[test]
    fn keeps_the_relevant_sentences_in_order_within_budget() {
        let docs = vec![
            Document::new(
                "Cats sleep a lot. The shop opens at nine. Dogs bark at night. The shop closes at six.",
                1.0,
            ),
            Document::new("Nothing about it here. Only weather talk today.", 0.5),
        ];
        let c = TiktokenCounter::new();
        let out = Compressor::new().keep(0.5).unwrap().compress(
            "When does the shop open and close?",
            &docs,
            &c,
            TokenizerKind::O200k,
        );
        assert_eq!(out.documents.len(), 1);
        assert_eq!(
            out.documents[0].text,
            "The shop opens at nine. The shop closes at six."
        );
        assert!(out.tokens_after * 2 <= out.tokens_before);
        assert_eq!(out.changed, 2);
        let capped = Compressor::new().max_tokens(8).compress(
            "When does the shop close?",
            &docs,
            &c,
            TokenizerKind::O200k,
        );
        assert_eq!(capped.documents[0].text, "The shop closes at six.");
        assert!(Compressor::new().keep(0.0).is_err());
        assert!(Compressor::new().keep(f64::NAN).is_err());
    }

    #[test]
    fn stems_meet() {
        assert_eq!(stem("refunds"), "refund");
        assert_eq!(stem("policies"), "policy");
        assert_eq!(stem("class"), "class");
        assert_eq!(stem("closes"), stem("close"));
        assert_eq!(stem("closed"), stem("close"));
        assert_eq!(terms("How are Refunds paid?"), ["refund", "paid"]);
    }
}
