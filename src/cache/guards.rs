//! Guards against lexical near-misses: pairs of questions that an embedding scores as
//! near-identical but that need different answers.
//!
//! Embeddings are built to find texts about the same thing, and "is the clinic open on
//! Sundays" is about the same thing as "is the clinic closed on Sundays". A semantic
//! match is therefore only served when the stored question and the asked one also agree
//! on the details that flip an answer:
//!
//! | guard | the two questions must agree on |
//! | --- | --- |
//! | [`Numbers`](GuardKind::Numbers) | every number (digits or words, ordinals included), date, month, weekday and relative day ("tomorrow", "next week"); their order when the question has a direction ("from … to", "than") |
//! | [`Entities`](GuardKind::Entities) | every capitalised name or acronym one of them mentions must appear in the other, in the same order when the question has a direction |
//! | [`Negation`](GuardKind::Negation) | how many negations they carry ("not", "never", "isn't", "without"…), and the side of every polar pair both mention (open/closed, enable/disable, safe/unsafe, un-/dis- prefixes…) |
//! | [`Scope`](GuardKind::Scope) | their quantifiers and scope words: all/every, only/just, most, both, either, total vs average, always/usually/sometimes/rarely, except, also/including |
//!
//! The checks are lexical and cheap (a few microseconds), English-only, and deliberately
//! conservative: a guard that refuses a true paraphrase costs one provider call, a match
//! it lets through serves a wrong answer.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Which guard refused a semantic match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GuardKind {
    /// Numbers, dates, times and relative days differ.
    Numbers,
    /// A named entity (a capitalised name or an acronym) is missing or swapped.
    Entities,
    /// Negation or polarity differs ("open" vs "closed", "is" vs "isn't").
    Negation,
    /// Quantifiers or scope words differ ("all" vs "only", "total" vs "average").
    Scope,
}

impl GuardKind {
    /// Every guard, in the order they are checked.
    pub const ALL: [GuardKind; 4] = [
        GuardKind::Numbers,
        GuardKind::Entities,
        GuardKind::Negation,
        GuardKind::Scope,
    ];

    /// The guard's name, as in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardKind::Numbers => "numbers",
            GuardKind::Entities => "entities",
            GuardKind::Negation => "negation",
            GuardKind::Scope => "scope",
        }
    }
}

impl fmt::Display for GuardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A semantic match that scored above the threshold but that a guard refused.
///
/// Reported in [`ChatResponse::guard_rejected`](crate::ChatResponse::guard_rejected)
/// (and on the final event of a stream) so that a caller can see why a question that
/// looks cached was sent to a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GuardRejection {
    /// The guard that refused.
    pub guard: GuardKind,
    /// The similarity of the refused candidate.
    pub similarity: f32,
    /// What differed, for example `numbers differ: [3] vs [4]`.
    pub detail: String,
}

impl GuardRejection {
    /// A rejection by `guard` of a candidate with `similarity`.
    pub fn new(guard: GuardKind, similarity: f32, detail: impl Into<String>) -> Self {
        GuardRejection {
            guard,
            similarity,
            detail: detail.into(),
        }
    }
}

/// Which guards run. All of them by default.
///
/// ```
/// use tokenwise::cache::{GuardKind, Guards};
///
/// let guards = Guards::default();
/// let (kind, _) = guards.check("Is the clinic open on Sundays?", "Is the clinic closed on Sundays?").unwrap();
/// assert_eq!(kind, GuardKind::Negation);
/// assert!(guards.check("How do I reset my password?", "how can i reset my password").is_none());
/// // Off, one by one or all at once:
/// assert!(Guards::none().check("3 apples", "4 apples").is_none());
/// assert!(guards.with(GuardKind::Numbers, false).check("3 apples", "4 apples").is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guards {
    on: [bool; 4],
}

impl Default for Guards {
    fn default() -> Self {
        Guards { on: [true; 4] }
    }
}

impl Guards {
    /// Every guard on (the default).
    pub fn all() -> Self {
        Guards::default()
    }

    /// Every guard off: semantic matches are served on similarity alone.
    pub fn none() -> Self {
        Guards { on: [false; 4] }
    }

    /// Turns one guard on or off.
    #[must_use]
    pub fn with(mut self, guard: GuardKind, on: bool) -> Self {
        self.on[guard as usize] = on;
        self
    }

    /// Whether `guard` is on.
    pub fn is_on(&self, guard: GuardKind) -> bool {
        self.on[guard as usize]
    }

    /// The first guard (in [`GuardKind::ALL`] order) that refuses to treat `stored` and
    /// `asked` as the same question, with what differed; `None` when every guard that is
    /// on lets the match through.
    pub fn check(&self, stored: &str, asked: &str) -> Option<(GuardKind, String)> {
        if !self.on.iter().any(|b| *b) {
            return None;
        }
        let a = Features::of(stored);
        let b = Features::of(asked);
        let directed = a.directed || b.directed;
        if self.is_on(GuardKind::Numbers) {
            let (mut x, mut y) = (a.numbers.clone(), b.numbers.clone());
            if !directed {
                x.sort_unstable();
                y.sort_unstable();
            }
            if x != y {
                return Some((
                    GuardKind::Numbers,
                    format!("numbers differ: {:?} vs {:?}", a.numbers, b.numbers),
                ));
            }
        }
        if self.is_on(GuardKind::Entities) {
            if let Some(d) = entity_difference(&a, &b, directed) {
                return Some((GuardKind::Entities, d));
            }
        }
        if self.is_on(GuardKind::Negation) {
            if a.negations != b.negations {
                return Some((
                    GuardKind::Negation,
                    format!(
                        "negations differ: {} vs {}",
                        a.negations.len(),
                        b.negations.len()
                    ),
                ));
            }
            if let Some(d) = polarity_difference(&a, &b) {
                return Some((GuardKind::Negation, d));
            }
        }
        if self.is_on(GuardKind::Scope) {
            let strong = |s: &Vec<&'static str>| -> Vec<&'static str> {
                s.iter()
                    .copied()
                    .filter(|c| !WEAK_SCOPE.contains(c))
                    .collect()
            };
            let differs = strong(&a.scope) != strong(&b.scope)
                || (!a.scope.is_empty() && !b.scope.is_empty() && a.scope != b.scope);
            if differs {
                return Some((
                    GuardKind::Scope,
                    format!("scope differs: {:?} vs {:?}", a.scope, b.scope),
                ));
            }
        }
        None
    }
}

/// One word of a text, as the guards see it.
#[derive(Debug)]
struct Token {
    /// As written.
    raw: String,
    /// Lowercased, with a trailing possessive `'s` removed.
    lower: String,
    /// First word of a sentence.
    initial: bool,
}

/// Splits `text` into words. Apostrophes inside words stay ("isn't"); `.,:/-` between
/// two digits stay ("3.5", "1,000", "10:30", "2026-05-01").
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut initial = true;
    let mut next_initial = true;
    for (i, &c) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
        let next = chars.get(i + 1).copied();
        let keep = c.is_alphanumeric()
            || ((c == '\'' || c == '\u{2019}')
                && prev.is_some_and(char::is_alphabetic)
                && next.is_some_and(char::is_alphabetic))
            || (matches!(c, '.' | ',' | ':' | '/' | '-')
                && prev.is_some_and(|p| p.is_ascii_digit())
                && next.is_some_and(|n| n.is_ascii_digit()));
        if keep {
            if cur.is_empty() {
                initial = next_initial;
            }
            cur.push(if c == '\u{2019}' { '\'' } else { c });
        } else {
            if !cur.is_empty() {
                out.push(token(std::mem::take(&mut cur), initial));
                next_initial = false;
            }
            if matches!(c, '.' | '?' | '!' | '\n' | ':' | ';' | '"' | '(') {
                next_initial = true;
            }
        }
    }
    if !cur.is_empty() {
        out.push(token(cur, initial));
    }
    out
}

fn token(raw: String, initial: bool) -> Token {
    let mut lower = raw.to_lowercase();
    if lower.len() > 2 && lower.ends_with("'s") {
        lower.truncate(lower.len() - 2);
    }
    Token {
        raw,
        lower,
        initial,
    }
}

/// What the guards compare, extracted once per text.
#[derive(Debug, Default)]
struct Features {
    words: HashSet<String>,
    /// Every word, lowercased, in order.
    seq: Vec<String>,
    numbers: Vec<String>,
    /// Capitalised names and acronyms, lowercased, in order of appearance.
    entities: Vec<String>,
    negations: Vec<&'static str>,
    /// (pair index, side) of every polar word.
    polar: Vec<(usize, u8)>,
    /// Scope classes, sorted and deduplicated.
    scope: Vec<&'static str>,
    /// Whether the text has a direction ("to", "from", "than", "vs"…).
    directed: bool,
}

impl Features {
    fn of(text: &str) -> Features {
        let toks = tokens(text);
        let mut f = Features::default();
        for (i, t) in toks.iter().enumerate() {
            let w = t.lower.as_str();
            let next = toks.get(i + 1).map(|t| t.lower.as_str());
            f.words.insert(t.lower.clone());
            f.seq.push(t.lower.clone());
            if DIRECTION.contains(&w) {
                f.directed = true;
            }
            if let Some(n) = number_of(w) {
                // "7pm" counts as "7 pm".
                match ["am", "pm"]
                    .iter()
                    .find(|s| n.len() > 2 && n.ends_with(**s))
                {
                    Some(s) => {
                        f.numbers.push(n[..n.len() - 2].to_owned());
                        f.numbers.push((*s).to_owned());
                    }
                    None => f.numbers.push(n),
                }
            } else if let Some(d) = date_of(w, next) {
                f.numbers.push(d.to_owned());
            } else if is_entity(t) {
                f.entities.push(w.to_owned());
            }
            if let Some(n) = negation_of(w) {
                f.negations.push(n);
            }
            for (p, (left, right)) in POLAR.iter().enumerate() {
                if left.contains(&w) {
                    f.polar.push((p, 0));
                } else if right.contains(&w) {
                    f.polar.push((p, 1));
                }
            }
            if let Some(class) = scope_of(w) {
                f.scope.push(class);
            }
        }
        f.negations.sort_unstable();
        f.scope.sort_unstable();
        f.scope.dedup();
        f
    }
}

/// Words that give a question a direction, so that the order of its numbers and names
/// matters ("from Paris to Rome", "is 7 more than 9").
const DIRECTION: &[&str] = &[
    "to", "from", "into", "than", "vs", "versus", "over", "under", "per", "onto", "toward",
    "towards", "after", "before",
];

const UNITS: &[(&str, u32)] = &[
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("dozen", 12),
    ("first", 1),
    ("second", 2),
    ("third", 3),
    ("fourth", 4),
    ("fifth", 5),
    ("sixth", 6),
    ("seventh", 7),
    ("eighth", 8),
    ("ninth", 9),
    ("tenth", 10),
    ("once", 1),
    ("twice", 2),
    ("single", 1),
    ("double", 2),
    ("triple", 3),
];

/// The canonical form of a number written in digits or as a word.
fn number_of(w: &str) -> Option<String> {
    if w == "half" {
        return Some("0.5".into());
    }
    if let Some((_, n)) = UNITS.iter().find(|(name, _)| *name == w) {
        return Some(n.to_string());
    }
    let first = w.chars().next()?;
    if !first.is_ascii_digit() {
        return None;
    }
    // Digits with an optional suffix: "1,000", "3.50", "1st", "3pm", "10k", "2026-05-01".
    let digits: String = w.chars().filter(|c| *c != ',').collect();
    let split = digits
        .find(|c: char| c.is_alphabetic())
        .unwrap_or(digits.len());
    let (num, suffix) = digits.split_at(split);
    let num = match num.strip_suffix(".0") {
        Some(n) => n,
        None => num,
    };
    let num = num.trim_end_matches('.');
    let suffix = match suffix {
        "st" | "nd" | "rd" | "th" | "s" => "",
        other => other,
    };
    let num = match num.parse::<f64>() {
        Ok(v) if v.is_finite() && !num.contains(['-', '/', ':']) => {
            let s = format!("{v}");
            s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
        }
        _ => num.to_owned(),
    };
    Some(format!("{num}{suffix}"))
}

const MONTHS: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];
const MONTHS_SHORT: &[&str] = &[
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: &[&str] = &[
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];
const RELATIVE_DAYS: &[&str] = &[
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
    "weekend",
    "weekends",
    "weekday",
    "weekdays",
    "morning",
    "afternoon",
    "evening",
    "night",
    "noon",
    "midnight",
    "am",
    "pm",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "annually",
    "hourly",
    "overnight",
    "christmas",
    "easter",
    "holidays",
    "holiday",
];
const PERIODS: &[&str] = &[
    "week", "month", "year", "day", "quarter", "weekend", "time", "season", "semester",
];

/// The canonical form of a date word: a month, a weekday, a relative day, or "next" /
/// "last" / "this" before a period.
fn date_of(w: &str, next: Option<&str>) -> Option<&'static str> {
    if let Some(i) = MONTHS.iter().position(|m| *m == w) {
        return MONTHS.get(i).copied();
    }
    // "may" is also a verb: only the full names count, and short forms other than it.
    if let Some(i) = MONTHS_SHORT
        .iter()
        .position(|m| *m == w && *m != "may" && *m != "mar")
    {
        return MONTHS.get(i).copied();
    }
    let day = w.strip_suffix('s').unwrap_or(w);
    if let Some(d) = DAYS.iter().find(|d| **d == day) {
        return Some(d);
    }
    if let Some(r) = RELATIVE_DAYS.iter().find(|r| **r == w) {
        return Some(r);
    }
    let period_follows = next.is_some_and(|n| {
        let n = n.strip_suffix('s').unwrap_or(n);
        PERIODS.contains(&n) || DAYS.contains(&n)
    });
    match w {
        "next" | "upcoming" | "coming" if period_follows => Some("next"),
        "last" | "previous" | "past" if period_follows => Some("last"),
        "this" | "current" if period_follows => Some("this"),
        _ => None,
    }
}

/// Capitalised words that are not names.
const NOT_NAMES: &[&str] = &[
    "i", "i'm", "i've", "i'll", "i'd", "ok", "okay", "hi", "hello", "hey", "please", "thanks",
    "mr", "mrs", "ms", "dr",
];

fn is_entity(t: &Token) -> bool {
    let mut chars = t.raw.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    if !first.is_alphabetic() || NOT_NAMES.contains(&t.lower.as_str()) {
        return false;
    }
    let letters = t.raw.chars().filter(|c| c.is_alphabetic()).count();
    let upper = t.raw.chars().filter(|c| c.is_uppercase()).count();
    let acronym = letters >= 2 && upper == letters;
    // "iPhone", "GitHub", "macOS": a capital after the first letter.
    let inner_capital = t.raw.chars().skip(1).any(char::is_uppercase);
    if acronym || inner_capital {
        return true;
    }
    first.is_uppercase() && !t.initial
}

fn entity_difference(a: &Features, b: &Features, directed: bool) -> Option<String> {
    if let Some(e) = a.entities.iter().find(|e| !b.words.contains(*e)) {
        return Some(format!("`{e}` is only in the stored question"));
    }
    if let Some(e) = b.entities.iter().find(|e| !a.words.contains(*e)) {
        return Some(format!("`{e}` is only in the asked question"));
    }
    if directed {
        // Every name is in both texts now: compare the order each text mentions them in.
        let mut names: Vec<&String> = a.entities.iter().chain(&b.entities).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() >= 2 {
            let order = |f: &Features| -> Vec<&String> {
                let mut v: Vec<(usize, &String)> = names
                    .iter()
                    .map(|n| (f.seq.iter().position(|w| w == *n).unwrap_or(usize::MAX), *n))
                    .collect();
                v.sort_unstable();
                v.into_iter().map(|(_, n)| n).collect()
            };
            let (oa, ob) = (order(a), order(b));
            if oa != ob {
                return Some(format!("names in another order: {oa:?} vs {ob:?}"));
            }
        }
    }
    None
}

/// Negation markers, and the canonical form each counts as.
fn negation_of(w: &str) -> Option<&'static str> {
    const WORDS: &[&str] = &[
        "not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without",
        "cannot", "cant", "dont", "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "wont",
        "wouldnt", "shouldnt", "couldnt", "havent", "hasnt", "hadnt", "aint",
    ];
    if WORDS.contains(&w) || w.ends_with("n't") {
        return Some("not");
    }
    None
}

/// Polar pairs: words on one side flip the answer for words on the other.
type Side = &'static [&'static str];
const POLAR: &[(Side, Side)] = &[
    (
        &["open", "opens", "opened", "opening"],
        &["closed", "close", "closes", "closing", "shut"],
    ),
    (
        &[
            "enable",
            "enabled",
            "enables",
            "enabling",
            "activate",
            "activated",
        ],
        &[
            "disable",
            "disabled",
            "disables",
            "disabling",
            "deactivate",
            "deactivated",
        ],
    ),
    (
        &["allow", "allowed", "allows", "permitted", "permit"],
        &[
            "block",
            "blocked",
            "deny",
            "denied",
            "forbid",
            "forbidden",
            "prohibited",
            "banned",
        ],
    ),
    (
        &["include", "included", "includes", "including", "inclusive"],
        &["exclude", "excluded", "excludes", "excluding", "exclusive"],
    ),
    (
        &[
            "increase",
            "increased",
            "increases",
            "raise",
            "raised",
            "grow",
            "rise",
            "rising",
        ],
        &[
            "decrease",
            "decreased",
            "decreases",
            "reduce",
            "reduced",
            "lower",
            "lowered",
            "shrink",
            "fall",
            "falling",
            "drop",
        ],
    ),
    (
        &["add", "added", "adding", "insert", "create", "created"],
        &[
            "remove", "removed", "removing", "delete", "deleted", "deleting", "drop",
        ],
    ),
    (
        &["start", "started", "starting", "begin", "begins"],
        &["stop", "stopped", "stopping", "end", "ends", "finish"],
    ),
    (
        &["accept", "accepted", "accepts", "approve", "approved"],
        &["reject", "rejected", "rejects", "decline", "declined"],
    ),
    (
        &["buy", "buying", "bought", "purchase"],
        &["sell", "selling", "sold"],
    ),
    (&["win", "won", "winning"], &["lose", "lost", "losing"]),
    (
        &["import", "imported", "importing"],
        &["export", "exported", "exporting"],
    ),
    (
        &["upload", "uploaded", "uploading"],
        &["download", "downloaded", "downloading"],
    ),
    (
        &["encrypt", "encrypted", "encryption"],
        &["decrypt", "decrypted", "decryption"],
    ),
    (&["lock", "locked"], &["unlock", "unlocked"]),
    (&["before", "earlier", "prior"], &["after", "later"]),
    (&["above"], &["below", "beneath"]),
    (
        &["more", "greater", "higher", "larger", "bigger", "longer"],
        &["less", "fewer", "lower", "smaller", "shorter"],
    ),
    (
        &["most", "highest", "largest", "biggest", "longest"],
        &["least", "lowest", "smallest", "shortest"],
    ),
    (&["max", "maximum"], &["min", "minimum"]),
    (&["best"], &["worst"]),
    (
        &["safe", "safely"],
        &["unsafe", "dangerous", "harmful", "risky"],
    ),
    (&["legal", "lawful"], &["illegal", "unlawful"]),
    (&["true"], &["false"]),
    (&["possible"], &["impossible"]),
    (&["valid"], &["invalid"]),
    (&["correct", "right"], &["incorrect", "wrong"]),
    (&["good"], &["bad"]),
    (&["positive"], &["negative"]),
    (&["hot", "warm"], &["cold", "cool"]),
    (
        &["cheap", "cheaper", "cheapest"],
        &["expensive", "pricier", "priciest"],
    ),
    (
        &["fast", "faster", "fastest", "quick", "quickly"],
        &["slow", "slower", "slowest", "slowly"],
    ),
    (&["early"], &["late"]),
    (&["public"], &["private"]),
    (&["input", "inputs"], &["output", "outputs"]),
    (&["push"], &["pull"]),
    (&["ascending", "asc"], &["descending", "desc"]),
    (&["online"], &["offline"]),
    (&["connect", "connected"], &["disconnect", "disconnected"]),
    (
        &["install", "installed", "installing"],
        &["uninstall", "uninstalled", "uninstalling"],
    ),
    (
        &["show", "visible", "display"],
        &["hide", "hidden", "invisible"],
    ),
    (&["join", "joining"], &["leave", "leaving", "quit"]),
    (
        &["arrive", "arrival", "arrivals"],
        &["depart", "departure", "departures"],
    ),
    (&["deposit"], &["withdraw", "withdrawal"]),
    (&["credit"], &["debit"]),
    (&["profit", "gain", "gains"], &["loss", "losses"]),
    (
        &["send", "sent", "sending"],
        &["receive", "received", "receiving"],
    ),
    (&["borrow"], &["lend"]),
    (&["upgrade"], &["downgrade"]),
    (
        &["inside", "internal", "indoor", "indoors"],
        &["outside", "external", "outdoor", "outdoors"],
    ),
    (&["north", "northern"], &["south", "southern"]),
    (&["east", "eastern"], &["west", "western"]),
    (&["left"], &["right"]),
    (&["odd"], &["even"]),
    (&["plus", "add"], &["minus", "subtract"]),
    (&["multiply"], &["divide"]),
    (&["encode", "encoding"], &["decode", "decoding"]),
    (&["compress"], &["decompress"]),
    (&["serialize"], &["deserialize"]),
    (&["subscribe"], &["unsubscribe"]),
    (&["follow"], &["unfollow"]),
    (&["mute"], &["unmute"]),
    (&["uppercase", "upper"], &["lowercase"]),
    (&["agree"], &["disagree"]),
    (&["like", "likes"], &["dislike", "dislikes", "hate"]),
    (&["pass", "passed"], &["fail", "failed"]),
    (&["on"], &["off"]),
    (&["login", "signin"], &["logout", "signout"]),
    (&["summer"], &["winter"]),
    (&["man", "men", "male"], &["woman", "women", "female"]),
    (&["adult", "adults"], &["child", "children", "kids"]),
];

/// Prefixes that flip a word ("safe" → "unsafe").
const FLIPS: &[&str] = &["un", "dis", "in", "im", "il", "ir", "non", "de", "anti"];

fn polarity_difference(a: &Features, b: &Features) -> Option<String> {
    for (p, (left, right)) in POLAR.iter().enumerate() {
        let sides = |f: &Features| (f.polar.contains(&(p, 0)), f.polar.contains(&(p, 1)));
        let (a0, a1) = sides(a);
        let (b0, b1) = sides(b);
        // Only when both mention the pair: "is it open?" and "opening hours?" agree,
        // "is it open?" and "is it closed?" do not.
        if (a0 || a1) && (b0 || b1) && (a0, a1) != (b0, b1) {
            let word = |only_right: bool| if only_right { right[0] } else { left[0] };
            return Some(format!(
                "polarity differs: `{}` vs `{}`",
                word(a1 && !a0),
                word(b1 && !b0)
            ));
        }
    }
    // A word in one text whose negated form is in the other.
    for (x, y) in [(a, b), (b, a)] {
        for w in x.words.iter().filter(|w| w.len() >= 3) {
            for pre in FLIPS {
                let flipped = format!("{pre}{w}");
                if y.words.contains(&flipped) && !x.words.contains(&flipped) {
                    return Some(format!("polarity differs: `{w}` vs `{flipped}`"));
                }
            }
        }
    }
    None
}

/// Scope classes that only count when the other question has a scope word too.
const WEAK_SCOPE: &[&str] = &["any", "some"];

fn scope_of(w: &str) -> Option<&'static str> {
    Some(match w {
        "all" | "every" | "each" | "entire" | "whole" | "everything" | "everyone" | "everybody"
        | "everywhere" => "all",
        "any" | "anything" | "anyone" | "anybody" | "anywhere" => "any",
        "some" | "few" | "several" | "certain" | "something" | "someone" => "some",
        "only" | "just" | "solely" | "exclusively" | "alone" => "only",
        "most" | "majority" | "mostly" => "most",
        "both" => "both",
        "either" => "either",
        "total" | "overall" | "combined" | "altogether" | "cumulative" | "sum" => "total",
        "average" | "mean" | "median" | "typical" | "typically" => "average",
        "always" => "always",
        "usually" | "often" | "generally" | "normally" | "frequently" => "usually",
        "sometimes" | "occasionally" => "sometimes",
        "rarely" | "seldom" => "rarely",
        "except" | "excluding" | "besides" => "except",
        "also" | "too" | "including" | "additionally" => "also",
        "specific" | "particular" | "individual" => "specific",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejects(a: &str, b: &str) -> Option<GuardKind> {
        Guards::default().check(a, b).map(|(k, _)| k)
    }

    #[test]
    fn near_misses_are_refused_by_the_right_guard() {
        use GuardKind::*;
        for (a, b, kind) in [
            (
                "Is the clinic open on Sundays?",
                "Is the clinic closed on Sundays?",
                Negation,
            ),
            (
                "Is ibuprofen safe during pregnancy?",
                "Is ibuprofen not safe during pregnancy?",
                Negation,
            ),
            (
                "Is it safe to run the script?",
                "Is it unsafe to run the script?",
                Negation,
            ),
            (
                "How do I enable two-factor login?",
                "How do I disable two-factor login?",
                Negation,
            ),
            ("Convert 5 miles to km", "Convert 50 miles to km", Numbers),
            ("What is 7 times 8?", "What is seven times nine?", Numbers),
            (
                "Book a table for 2 people at 7pm",
                "Book a table for 2 people at 8pm",
                Numbers,
            ),
            (
                "What's the weather tomorrow?",
                "What's the weather today?",
                Numbers,
            ),
            ("Flights on Monday", "Flights on Tuesday", Numbers),
            ("Events in March 2026", "Events in April 2026", Numbers),
            (
                "What is the capital of France?",
                "What is the capital of Spain?",
                Entities,
            ),
            ("Convert USD to EUR", "Convert EUR to USD", Entities),
            (
                "Flights from Paris to Rome",
                "Flights from Rome to Paris",
                Entities,
            ),
            (
                "How do I delete all my emails?",
                "How do I delete my emails?",
                Scope,
            ),
            ("List only the active users", "List the active users", Scope),
            (
                "What is the total cost?",
                "What is the average cost?",
                Scope,
            ),
        ] {
            assert_eq!(rejects(a, b), Some(kind), "{a} / {b}");
            assert_eq!(rejects(b, a), Some(kind), "{b} / {a}");
        }
    }

    #[test]
    fn paraphrases_pass() {
        for (a, b) in [
            ("How do I reset my password?", "how can i reset my password"),
            ("What are your opening hours?", "When are you open?"),
            ("Convert five miles to km", "Convert 5 miles to km"),
            (
                "What is the capital of France?",
                "what's the capital city of france",
            ),
            ("Why isn't my build working?", "Why doesn't my build work?"),
            (
                "Delete every email in my inbox",
                "delete all emails in my inbox",
            ),
            ("Book a table for 2 at 7pm", "book a table for two at 7 pm"),
            (
                "Is the 1,000th visitor free?",
                "Is the 1000th visitor free?",
            ),
            ("Do you sell gift cards?", "Do you sell any gift cards?"),
        ] {
            assert_eq!(rejects(a, b), None, "{a} / {b}");
        }
    }

    #[test]
    fn tokens_keep_numbers_and_contractions_whole() {
        let t: Vec<String> = tokens("It isn't 3.5, it's 1,000 at 10:30 on 2026-05-01.")
            .into_iter()
            .map(|t| t.raw)
            .collect();
        assert_eq!(
            t,
            [
                "It",
                "isn't",
                "3.5",
                "it's",
                "1,000",
                "at",
                "10:30",
                "on",
                "2026-05-01"
            ]
        );
        assert_eq!(number_of("1,000").as_deref(), Some("1000"));
        assert_eq!(number_of("3rd").as_deref(), Some("3"));
        assert_eq!(number_of("2.0").as_deref(), Some("2"));
        assert_eq!(number_of("7pm").as_deref(), Some("7pm"));
        assert_eq!(number_of("twelve").as_deref(), Some("12"));
        assert_eq!(number_of("word"), None);
    }

    #[test]
    fn guards_can_be_turned_off_one_by_one() {
        let g = Guards::default().with(GuardKind::Negation, false);
        assert!(!g.is_on(GuardKind::Negation));
        assert!(g.check("Is it open?", "Is it closed?").is_none());
        assert!(g.check("3 apples", "4 apples").is_some());
        assert!(Guards::none().check("Paris", "Rome").is_none());
        assert_eq!(GuardKind::Scope.to_string(), "scope");
    }
}
