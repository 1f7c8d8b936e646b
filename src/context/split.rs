//! Pre-tokenization of ASCII text for the `o200k_base` and `cl100k_base` encodings,
//! without a regular expression.
//!
//! Both encodings first split text into pieces with a regular expression and then
//! encode each piece on its own. Over ASCII text their patterns reduce to a handful of
//! byte classes (letters, upper and lower case, digits, white space, the rest), and
//! walking those classes by hand gives the same pieces as the patterns at a fraction of
//! the cost: most prompts are ASCII, and the split was most of the time a count took.
//! Text with any other byte is left to the encodings' own splitter. The tests check
//! the pieces against that splitter over generated and hand-picked text.

/// Which encoding's pattern to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// `o200k_base`: words keep their case runs and a trailing contraction.
    O200k,
    /// `cl100k_base`: contractions are pieces of their own.
    Cl100k,
}

/// The pattern's white space over ASCII: `\t \n \x0B \x0C \r` and the space.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

fn is_newline(b: u8) -> bool {
    matches!(b, b'\r' | b'\n')
}

/// Neither white space, a letter nor a digit.
fn is_other(b: u8) -> bool {
    !is_space(b) && !b.is_ascii_alphanumeric()
}

/// The length of the contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`, any
/// case) at the start of `s`, or 0.
fn contraction(s: &[u8]) -> usize {
    if s.first() != Some(&b'\'') {
        return 0;
    }
    let lower = |i: usize| s.get(i).map(u8::to_ascii_lowercase);
    match (lower(1), lower(2)) {
        (Some(b's' | b't' | b'm' | b'd'), _) => 2,
        (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => 3,
        _ => 0,
    }
}

/// The end of the run of bytes from `at` that satisfy `class`.
fn run(s: &[u8], at: usize, class: impl Fn(u8) -> bool) -> usize {
    s[at..]
        .iter()
        .position(|&b| !class(b))
        .map_or(s.len(), |n| at + n)
}

/// The end of the piece that starts at `at` (`at < s.len()`), for ASCII `s`.
fn piece_end(s: &[u8], at: usize, pattern: Pattern) -> usize {
    let c = s[at];
    if pattern == Pattern::Cl100k {
        let n = contraction(&s[at..]);
        if n > 0 {
            return at + n;
        }
    }
    // A word: one optional byte that is no newline, letter or digit, then letters.
    let word = if c.is_ascii_alphabetic() {
        Some(at)
    } else if !is_newline(c)
        && !c.is_ascii_digit()
        && s.get(at + 1).is_some_and(u8::is_ascii_alphabetic)
    {
        Some(at + 1)
    } else {
        None
    };
    if let Some(start) = word {
        return match pattern {
            // `\p{L}+`
            Pattern::Cl100k => run(s, start, |b| b.is_ascii_alphabetic()),
            // Upper case then lower case (either run may be empty, not both), then a
            // contraction if one follows.
            Pattern::O200k => {
                let upper = run(s, start, |b| b.is_ascii_uppercase());
                let end = run(s, upper, |b| b.is_ascii_lowercase());
                end + contraction(&s[end..])
            }
        };
    }
    // `\p{N}{1,3}`
    if c.is_ascii_digit() {
        return run(s, at, |b| b.is_ascii_digit()).min(at + 3);
    }
    // ` ?[^\s\p{L}\p{N}]+` then newlines (and slashes, in o200k)
    let other = if is_other(c) {
        Some(at)
    } else if c == b' ' && s.get(at + 1).is_some_and(|&b| is_other(b)) {
        Some(at + 1)
    } else {
        None
    };
    if let Some(start) = other {
        let end = run(s, start, is_other);
        return match pattern {
            Pattern::O200k => run(s, end, |b| is_newline(b) || b == b'/'),
            Pattern::Cl100k => run(s, end, is_newline),
        };
    }
    // White space: `\s*[\r\n]+` ends after the run's last newline; else `\s+(?!\S)`
    // leaves the run's last byte to the word after it, unless that is all the run.
    let end = run(s, at, is_space);
    if let Some(last) = s[at..end].iter().rposition(|&b| is_newline(b)) {
        return at + last + 1;
    }
    if end == s.len() || end - at == 1 {
        end
    } else {
        end - 1
    }
}

/// The pieces of `text` under `pattern`, or `None` when `text` is not ASCII.
pub(crate) fn ascii_pieces(text: &str, pattern: Pattern) -> Option<impl Iterator<Item = &[u8]>> {
    let s = text.as_bytes();
    if !s.is_ascii() {
        return None;
    }
    let mut at = 0;
    Some(std::iter::from_fn(move || {
        if at >= s.len() {
            return None;
        }
        let end = piece_end(s, at, pattern);
        let piece = &s[at..end];
        at = end;
        Some(piece)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoder(pattern: Pattern) -> &'static bpe_openai::Tokenizer {
        match pattern {
            Pattern::O200k => bpe_openai::o200k_base(),
            Pattern::Cl100k => bpe_openai::cl100k_base(),
        }
    }

    fn check(text: &str) {
        for pattern in [Pattern::O200k, Pattern::Cl100k] {
            let ours: Vec<&[u8]> = ascii_pieces(text, pattern)
                .map(Iterator::collect)
                .unwrap_or_default();
            let theirs: Vec<&[u8]> = encoder(pattern).split(text).map(str::as_bytes).collect();
            assert_eq!(ours, theirs, "{pattern:?}: {text:?}");
        }
    }

    #[test]
    fn hand_picked_text_splits_as_the_encoders_do() {
        for text in [
            "",
            "Where is my order number 12345? It was due on Monday.",
            "HELLO world, HelloWorld, helloWORLD, ABc dEF, I'M here, they'RE, we'Ve, it's, 'S'",
            "don't won't y'all you'll he'd I'd 'll'' ''s 's'''",
            "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
            "   leading, trailing   ",
            "a  b   c\t\td \t e\n\n  f\r\n\r\ng  \n  h\x0b\x0ci",
            "x\n\n\n",
            "  \n",
            "\n  ",
            "1234567 89 0 1234567890123",
            "a1b2c3 $100.00 50% #tag @user",
            "path/to//file.rs // comment\n//\n/\r\n",
            "!!!hello ?!World  ...\n\n(paren) [bracket] {brace}",
            " !x  !y\t!z\n!w",
            "\x00\x01\x1f\x7f control bytes\x1b[0m",
            "email@example.com https://example.com/a?b=c&d=e#f",
            "CamelCaseIdentifier snake_case_identifier SCREAMING_CASE kebab-case",
            "'s 'S 'Re 'vE 'LL 'D 'M 'T 'x",
            "a'sb A'SB aa'llbb",
        ] {
            check(text);
        }
    }

    #[test]
    fn text_with_other_bytes_is_left_to_the_encoder() {
        assert!(ascii_pieces("café", Pattern::O200k).is_none());
        assert!(ascii_pieces("naïve", Pattern::Cl100k).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Text drawn from the bytes the patterns tell apart, in runs of every kind.
        #[test]
        fn generated_text_splits_as_the_encoders_do(
            text in proptest::collection::vec(
                prop_oneof![
                    Just("a"), Just("Z"), Just("q"), Just("Q"), Just("s"), Just("S"),
                    Just("t"), Just("re"), Just("VE"), Just("ll"), Just("d"), Just("M"),
                    Just("'"), Just(" "), Just("  "), Just("\t"), Just("\n"), Just("\r"),
                    Just("\r\n"), Just("\x0b"), Just("\x0c"), Just("/"), Just("."),
                    Just("!"), Just("_"), Just("-"), Just("\x00"), Just("\x7f"),
                    Just("0"), Just("12"), Just("345"), Just("Hello"), Just("WORLD"),
                    Just("word"),
                ],
                0..40,
            )
        ) {
            check(&text.concat());
        }

        /// Any ASCII text.
        #[test]
        fn any_ascii_text_splits_as_the_encoders_do(text in "[\\x00-\\x7f]{0,64}") {
            check(&text);
        }
    }
}
