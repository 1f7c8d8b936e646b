//! The default counter's counts against tiktoken-rs's own encoders, text by text, over a
//! varied corpus: this crate's sources and docs, code, CJK, emoji, long and mixed
//! whitespace, numbers, contractions, combining marks, and seeded random mixtures of all
//! of them.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tiktoken_rs::CoreBPE;
use tokenwise::context::TiktokenCounter;
use tokenwise::{TokenCounter, TokenizerKind};

/// Pieces chosen to stress pre-tokenisation: each on its own and mixed with the others.
const PIECES: &[&str] = &[
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n}\n",
    "def f(a, b=2):\n\treturn {'k': [a, b], \"s\": f\"{a!r}\"}\n",
    "{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"n\":1}",
    "SELECT id, SUM(cost) FROM usage WHERE org_id = 'acme' GROUP BY 1;\r\n",
    "東京の天気は晴れです。明日は雨が降るでしょう。",
    "我们今天讨论分布式系统中的一致性问题，以及如何在网络分区时保持可用。",
    "한국어 문장도 섞어 봅니다. 토큰 수가 정확해야 합니다.",
    "Привет, мир! Это проверка кириллицы.",
    "مرحبا بالعالم، هذا اختبار للنص العربي.",
    "हिन्दी में लिखा गया वाक्य, मात्राओं के साथ।",
    "e\u{301}te\u{301} cafe\u{301} nai\u{308}ve A\u{30a}ngstro\u{308}m",
    "👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 🏳️‍🌈 😀😃😄 ❤️‍🔥",
    "                                                                ",
    "\t\t\t\t  \t \n\n\n   \n\t\n",
    "trailing spaces   \n   leading spaces\n\n\n\n\n",
    "     \u{a0}\u{a0}\u{3000}\u{2003} mixed unicode spaces",
    "1234567890 3.14159 -42 1e-9 0x1F 1,000,000 12:30:59",
    "I'm sure you'll see they'd've DON'T WON'T It'S we'Re",
    "URL: https://example.com/a/b?c=d&e=f#g  email: a.b+c@example.org",
    "CamelCaseIdentifiers and snake_case_names and SCREAMING_CASE",
    "!!!??? ... --- *** ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "line one\r\nline two\rline three\n",
    "\u{200b}zero\u{200d}width\u{feff}marks",
    "Ünïcödé dïäcrïtïcs: ÀÉÎÕÜ àéîõü ß ø å æ",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ ０１２３",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉 ∑∫∂√∞≠≤≥",
];

fn encoders() -> [(TokenizerKind, CoreBPE); 2] {
    [
        (
            TokenizerKind::O200k,
            tiktoken_rs::o200k_base().expect("o200k_base loads"),
        ),
        (
            TokenizerKind::Cl100k,
            tiktoken_rs::cl100k_base().expect("cl100k_base loads"),
        ),
    ]
}

fn check(text: &str, counter: &TiktokenCounter, encoders: &[(TokenizerKind, CoreBPE)]) {
    for (kind, bpe) in encoders {
        let expected = bpe.encode_ordinary(text).len() as u64;
        assert_eq!(
            counter.count_text(text, *kind),
            expected,
            "{kind:?} count differs for {text:?}"
        );
    }
}

#[test]
fn every_piece_counts_as_tiktoken_does() {
    let counter = TiktokenCounter::new();
    let encoders = encoders();
    for piece in PIECES {
        check(piece, &counter, &encoders);
        // whitespace around a piece changes how it is split
        check(&format!(" {piece} "), &counter, &encoders);
        check(&format!("\n\n{piece}\n   "), &counter, &encoders);
    }
    // runs of whitespace of every length up to 300, alone and before a word
    for n in 0..300 {
        let spaces = " ".repeat(n);
        check(&spaces, &counter, &encoders);
        check(&format!("{spaces}word"), &counter, &encoders);
        check(&format!("a{}b", "\n ".repeat(n)), &counter, &encoders);
    }
}

#[test]
fn random_mixtures_count_as_tiktoken_does() {
    let counter = TiktokenCounter::new();
    let encoders = encoders();
    let mut rng = SmallRng::seed_from_u64(0x7e57);
    for _ in 0..600 {
        let mut text = String::new();
        for _ in 0..rng.random_range(1..8) {
            let piece = PIECES[rng.random_range(0..PIECES.len())];
            // a random slice of the piece, on character boundaries
            let chars: Vec<char> = piece.chars().collect();
            let a = rng.random_range(0..chars.len());
            let b = rng.random_range(a..=chars.len());
            text.extend(&chars[a..b]);
            if rng.random_bool(0.3) {
                text.push_str(&" ".repeat(rng.random_range(1..40)));
            }
        }
        check(&text, &counter, &encoders);
    }
}

#[test]
fn this_crates_sources_and_docs_count_as_tiktoken_does() {
    let counter = TiktokenCounter::new();
    let encoders = encoders();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "docs", "examples"] {
        collect(&root.join(dir), &mut files);
    }
    files.push(root.join("README.md"));
    let mut bytes = 0;
    for path in &files {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        bytes += text.len();
        check(&text, &counter, &encoders);
    }
    assert!(bytes > 200_000, "corpus too small: {bytes} bytes");
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "md" || e == "toml")
        {
            out.push(path);
        }
    }
}

#[test]
fn the_claude_approximation_errs_high() {
    let counter = TiktokenCounter::new();
    let cl100k = tiktoken_rs::cl100k_base().expect("cl100k_base loads");
    for piece in PIECES {
        let exact = cl100k.encode_ordinary(piece).len() as u64;
        let approx = counter.count_text(piece, TokenizerKind::ClaudeApprox);
        assert_eq!(approx, exact + exact.div_ceil(10), "{piece:?}");
    }
}
