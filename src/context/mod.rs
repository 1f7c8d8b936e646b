//! Token counting and context-window budgeting.
//!
//! [`TokenCounter`] turns text into a token count for a model's tokenizer. The default,
//! [`TiktokenCounter`], counts exactly as tiktoken's `o200k_base` and `cl100k_base`
//! encodings do, with the `bpe-openai` byte-pair encoder (a linear-time count that needs
//! no token list), each encoding loaded once per process on first use.

mod claude_count;
mod compress;
mod fit;
mod split;
mod summarize;

use std::fmt;

pub use claude_count::ClaudeTokenCounter;
pub use compress::{Compressed, Compressor, MAX_SENTENCES, normalize};
pub(crate) use fit::current_turn_start;
pub use fit::{
    BREVITY_INSTRUCTION, ContextBudget, CountCache, Fitted, Preparing, RouteBudget, Summarizer,
};
pub use summarize::{ModelSummarizer, SUMMARY_INSTRUCTION};

use crate::types::{ChatRequest, Message, TokenizerKind};

/// Tokens every chat message costs beyond its content (role and separators), as in
/// OpenAI's published counting recipe.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Tokens that prime every reply.
pub const TOKENS_PER_REPLY: u64 = 3;

/// Counts tokens.
///
/// Only [`count_text`](Self::count_text) is required; the others are built on it.
///
/// # Implementing
///
/// ```
/// use tokenwise::{TokenCounter, TokenizerKind};
///
/// /// Four bytes a token: crude, but never zero for non-empty text.
/// #[derive(Debug)]
/// struct ByteQuarters;
///
/// impl TokenCounter for ByteQuarters {
///     fn count_text(&self, text: &str, _tokenizer: TokenizerKind) -> u64 {
///         (text.len() as u64).div_ceil(4)
///     }
/// }
/// assert_eq!(ByteQuarters.count_text("abcdefgh", TokenizerKind::O200k), 2);
/// ```
///
/// A counter whose exact figures need I/O (a provider's counting endpoint) fetches them
/// ahead of time in [`prepare`](Self::prepare): a pipeline awaits it before planning a
/// request that may go to a model whose tokenizer the counter
/// [`prepares_for`](Self::prepares_for), and the synchronous counts then use what it
/// fetched. [`ClaudeTokenCounter`] works this way.
#[async_trait::async_trait]
pub trait TokenCounter: Send + Sync + fmt::Debug {
    /// Tokens in `text` under `tokenizer`.
    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64;

    /// Whether [`prepare`](Self::prepare) has work to do for requests to models with
    /// `tokenizer` (default `false`). A pipeline asks before planning each request and
    /// awaits `prepare` only when some candidate model's tokenizer answers `true`, so a
    /// counter without it costs nothing more.
    fn prepares_for(&self, tokenizer: TokenizerKind) -> bool {
        let _ = tokenizer;
        false
    }

    /// Fetches, ahead of the counts, what this counter needs to count `request` exactly.
    /// Returns how many texts fell back to an estimate (default: does nothing, 0). It
    /// reports failures by that number, not an error: counting falls back to estimates.
    async fn prepare(&self, request: &ChatRequest) -> usize {
        let _ = request;
        0
    }

    /// Tokens of one chat message, overhead included.
    fn count_message(&self, message: &Message, tokenizer: TokenizerKind) -> u64 {
        let mut n = TOKENS_PER_MESSAGE + self.count_text(&message.content, tokenizer);
        for call in &message.tool_calls {
            n += self.count_text(&call.name, tokenizer)
                + self.count_text(&call.arguments, tokenizer);
        }
        n
    }

    /// Prompt tokens of a whole request: messages, documents and tool definitions.
    fn count_request(&self, request: &ChatRequest, tokenizer: TokenizerKind) -> u64 {
        let mut n = TOKENS_PER_REPLY;
        for m in &request.messages {
            n += self.count_message(m, tokenizer);
        }
        for d in &request.documents {
            n += TOKENS_PER_MESSAGE + self.count_text(&d.text, tokenizer);
        }
        for t in &request.params.tools {
            n += self.count_text(&t.name, tokenizer)
                + self.count_text(&t.description, tokenizer)
                + self.count_text(&t.parameters.to_string(), tokenizer);
        }
        n
    }
}

/// Exact token counts for OpenAI models, as tiktoken's encodings give them; the
/// documented approximation (`cl100k_base` + 10 %) for Anthropic models.
///
/// Counting uses `bpe-openai`: the same pre-tokenisation and merges as tiktoken, counted
/// without building the token list, and with no per-thread regex pool to contend on.
/// The encodings are built once per process, on first use (tens of milliseconds for
/// `o200k_base`), and shared by every counter; [`preload`](Self::preload) builds them
/// ahead of the first request.
#[derive(Debug, Clone, Copy, Default)]
pub struct TiktokenCounter;

impl TiktokenCounter {
    /// A counter. Cheap: the encodings are process-wide.
    pub fn new() -> Self {
        TiktokenCounter
    }

    /// Builds the encodings now rather than on the first count.
    ///
    /// The encodings ship inside the binary, so this cannot fail; it returns a `Result`
    /// so that a counter whose tables are loaded from elsewhere can report a failure.
    pub fn preload(&self) -> crate::Result<()> {
        for enc in [bpe_openai::o200k_base(), bpe_openai::cl100k_base()] {
            std::hint::black_box(enc.count(""));
        }
        Ok(())
    }
}

impl TokenCounter for TiktokenCounter {
    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64 {
        if text.is_empty() {
            return 0;
        }
        let n = pieces::count(text, tokenizer);
        match tokenizer {
            TokenizerKind::ClaudeApprox => n + n.div_ceil(10),
            _ => n,
        }
    }
}

/// Counting by pre-tokenised piece, each short piece's count remembered per thread.
///
/// tiktoken's encodings split a text into pieces (words with their leading space,
/// numbers, punctuation runs, whitespace) and encode each piece on its own, so a text's
/// count is the sum of its pieces' counts. Prompts repeat the same few thousand pieces,
/// and encoding one costs a backtracking pass with two allocations; a remembered count
/// costs a hash lookup. The counts are the encoder's own, so the total is exact.
mod pieces {
    use std::cell::RefCell;

    use super::split::{Pattern, ascii_pieces};
    use crate::types::TokenizerKind;

    /// One of two piece iterators.
    enum Either<A, B> {
        Ascii(A),
        Any(B),
    }

    impl<'a, A, B> Iterator for Either<A, B>
    where
        A: Iterator<Item = &'a [u8]>,
        B: Iterator<Item = &'a [u8]>,
    {
        type Item = &'a [u8];

        fn next(&mut self) -> Option<&'a [u8]> {
            match self {
                Either::Ascii(a) => a.next(),
                Either::Any(b) => b.next(),
            }
        }
    }

    /// Pieces longer than this are counted every time (they rarely repeat).
    const MAX_PIECE: usize = 24;
    /// Remembered pieces per encoding and thread; the memo starts over when full.
    const CAPACITY: usize = 8_192;

    type Memo = hashbrown::HashMap<Box<[u8]>, u32>;

    thread_local! {
        /// One memo per encoding: o200k_base, cl100k_base.
        static MEMO: RefCell<[Memo; 2]> = RefCell::new([Memo::default(), Memo::default()]);
    }

    /// The exact count of `text` in `tokenizer`'s encoding (the approximation's base
    /// encoding for `ClaudeApprox`).
    pub(super) fn count(text: &str, tokenizer: TokenizerKind) -> u64 {
        let (enc, slot, pattern) = match tokenizer {
            TokenizerKind::O200k => (bpe_openai::o200k_base(), 0, Pattern::O200k),
            TokenizerKind::Cl100k | TokenizerKind::ClaudeApprox => {
                (bpe_openai::cl100k_base(), 1, Pattern::Cl100k)
            }
        };
        let text = enc.normalize(text);
        let uncounted = |piece: &[u8]| enc.bpe.count(piece) as u64;
        let memo = MEMO.try_with(|m| {
            let Ok(mut memos) = m.try_borrow_mut() else {
                return None;
            };
            let memo = &mut memos[slot];
            let mut n = 0u64;
            // ASCII text is split by hand (the same pieces, see `split`), the rest by
            // the encoder's own pattern.
            let pieces = match ascii_pieces(text.as_str(), pattern) {
                Some(p) => Either::Ascii(p),
                None => Either::Any(enc.split(text.as_str()).map(str::as_bytes)),
            };
            for piece in pieces {
                if piece.len() > MAX_PIECE {
                    n += uncounted(piece);
                    continue;
                }
                if let Some(&c) = memo.get(piece) {
                    n += u64::from(c);
                    continue;
                }
                let c = uncounted(piece);
                if memo.len() >= CAPACITY {
                    memo.clear();
                }
                memo.insert(piece.into(), u32::try_from(c).unwrap_or(u32::MAX));
                n += c;
            }
            Some(n)
        });
        match memo {
            Ok(Some(n)) => n,
            // the thread is ending, or a count is already running on it
            _ => enc.count(text.as_str()) as u64,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn remembered_counts_are_the_encoders_own() {
            let texts = [
                "Where is my order 12345? It was due on Monday.",
                "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
                "東京の天気は？ 今日は晴れです。🌤️ 👍🏽",
                "lots      of     spaces\n\n\n\t\ttabs",
                "a-very-long-hyphenated-identifier_with_underscores_and_numbers_0123456789",
            ];
            for round in 0..3 {
                for t in texts {
                    for (kind, enc) in [
                        (TokenizerKind::O200k, bpe_openai::o200k_base()),
                        (TokenizerKind::Cl100k, bpe_openai::cl100k_base()),
                    ] {
                        assert_eq!(count(t, kind), enc.count(t) as u64, "round {round}: {t:?}");
                    }
                }
            }
        }

        #[test]
        fn the_memo_stays_bounded() {
            for i in 0..(CAPACITY + 100) {
                let t = format!(" w{i}");
                assert_eq!(
                    count(&t, TokenizerKind::O200k),
                    bpe_openai::o200k_base().count(t.as_str()) as u64
                );
            }
            MEMO.with(|m| assert!(m.borrow()[0].len() <= CAPACITY));
        }
    }
}

/// The token charge of `request` before it runs: prompt tokens with its model's tokenizer
/// plus its output allowance (`max_tokens`, else the model's maximum). For a request
/// naming no known model: `o200k_base` and `max_tokens` (or nothing).
pub fn token_estimate(
    counter: &dyn TokenCounter,
    catalog: &crate::types::Catalog,
    request: &ChatRequest,
) -> u64 {
    let model = request.model.as_deref().and_then(|m| catalog.get(m));
    let tokenizer = model.map_or(TokenizerKind::O200k, |m| m.tokenizer);
    let allowance = match model {
        Some(m) => m.output_allowance(request.params.max_tokens),
        None => request.params.max_tokens.map_or(0, u64::from),
    };
    counter.count_request(request, tokenizer) + allowance
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_strings() {
        let c = TiktokenCounter::new();
        c.preload().unwrap();
        assert_eq!(c.count_text("", TokenizerKind::O200k), 0);
        assert_eq!(c.count_text("hello world", TokenizerKind::O200k), 2);
        assert_eq!(c.count_text("hello world", TokenizerKind::Cl100k), 2);
        // Claude approximation errs high.
        assert_eq!(c.count_text("hello world", TokenizerKind::ClaudeApprox), 3);
        let req = ChatRequest::user_text("hello world");
        // 3 (reply priming) + 3 (message) + 2 (content)
        assert_eq!(c.count_request(&req, TokenizerKind::O200k), 8);
    }
}
