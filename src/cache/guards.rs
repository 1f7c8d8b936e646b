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
//! | [`Numbers`](GuardKind::Numbers) | every quantity: a number (digits or words, ordinals included) with its unit ("30 kg" = "30 kilograms", not "30 lb"; "$50", "20 °C", "5 km/h", "3 days", "10 GB", "5 %"), date, month, weekday and relative day ("tomorrow", "next week"); their order when the question has a direction ("from … to", "than") |
//! | [`Entities`](GuardKind::Entities) | every capitalised name or acronym one of them mentions must appear in the other, in the same order when the question has a direction |
//! | [`Negation`](GuardKind::Negation) | how many negations they carry ("not", "never", "isn't", "without"…), and the side of every polar pair both mention (open/closed, enable/disable, safe/unsafe, un-/dis- prefixes…) |
//! | [`Scope`](GuardKind::Scope) | their quantifiers and scope words: all/every, only/just, most, both, either, total vs average, always/usually/sometimes/rarely, except, also/including, past vs present ("previously", "ago"); whose question it is: the person of their pronouns when both have one ("my" vs "your"), and any other party named ("my kids", "our team", "contractors") |
//! | [`Terms`](GuardKind::Terms) | their content words, up to a small rewording: a content word replaced by another in the same place ("return a blender" / "return a laptop", "sort by key" / "sort by value") refuses, as does a qualifier only one of them has ("…in descending order"); typos, plurals and a small synonym list are forgiven |
//!
//! The checks are lexical and cheap (a few microseconds), English-only, and deliberately
//! conservative: a guard that refuses a true paraphrase costs one provider call, a match
//! it lets through serves a wrong answer.

use std::collections::HashSet;

pub use crate::types::{GuardKind, GuardRejection};

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
    on: [bool; 5],
}

impl Default for Guards {
    fn default() -> Self {
        Guards { on: [true; 5] }
    }
}

impl Guards {
    /// Every guard on (the default).
    pub fn all() -> Self {
        Guards::default()
    }

    /// Every guard off: semantic matches are served on similarity alone.
    pub fn none() -> Self {
        Guards { on: [false; 5] }
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
        self.check_with(stored, asked)
    }

    /// Like [`check`](Self::check), for two turns of context a follow-up depends on
    /// ("I bought a blender last week"), as strictly: a swapped detail in the context
    /// changes the answer to the follow-up as much as one in the question.
    pub fn check_context(&self, stored: &str, asked: &str) -> Option<(GuardKind, String)> {
        self.check_with(stored, asked)
    }

    fn check_with(&self, stored: &str, asked: &str) -> Option<(GuardKind, String)> {
        if !self.on.iter().any(|b| *b) {
            return None;
        }
        let a = Features::of(stored);
        let b = Features::of(asked);
        GuardKind::ALL
            .into_iter()
            .filter(|k| self.is_on(*k))
            .find_map(|k| verdict(k, &a, &b).map(|d| (k, d)))
    }

    /// What every guard (on or off) says of a pair, and the content words of each
    /// question that have no counterpart in the other: what a [pair
    /// judge](super::PairJudge) reads.
    pub(crate) fn signals(stored: &str, asked: &str) -> PairSignals {
        let a = Features::of(stored);
        let b = Features::of(asked);
        let refused = GuardKind::ALL.map(|k| verdict(k, &a, &b).is_some());
        let (only_a, only_b) = unmatched_terms(&a.content, &b.content);
        let raw = |f: &Features| f.content.iter().map(|t| t.raw.clone()).collect::<Vec<_>>();
        PairSignals {
            refused,
            only_stored: only_a
                .into_iter()
                .map(|i| a.content[i].raw.clone())
                .collect(),
            only_asked: only_b
                .into_iter()
                .map(|j| b.content[j].raw.clone())
                .collect(),
            stored_words: raw(&a),
            asked_words: raw(&b),
            stored_negations: a.negations.len(),
            asked_negations: b.negations.len(),
        }
    }
}

/// What the guards see in a pair of questions (see [`Guards::signals`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct PairSignals {
    /// Whether each guard, in [`GuardKind::ALL`] order, refuses the pair.
    pub refused: [bool; 5],
    /// Content words of the stored question without a counterpart in the asked one.
    pub only_stored: Vec<String>,
    /// Content words of the asked question without a counterpart in the stored one.
    pub only_asked: Vec<String>,
    /// Every content word of the stored question, as written (lowercased).
    pub stored_words: Vec<String>,
    /// Every content word of the asked question, as written (lowercased).
    pub asked_words: Vec<String>,
    /// Negations in the stored question.
    pub stored_negations: usize,
    /// Negations in the asked question.
    pub asked_negations: usize,
}

/// Whether guard `kind` refuses to treat `a` and `b` as the same question, and why.
fn verdict(kind: GuardKind, a: &Features, b: &Features) -> Option<String> {
    let directed = a.directed || b.directed;
    match kind {
        GuardKind::Numbers => {
            let (mut x, mut y) = (a.numbers.clone(), b.numbers.clone());
            if !directed {
                x.sort_unstable();
                y.sort_unstable();
            }
            (x != y).then(|| format!("numbers differ: {:?} vs {:?}", a.numbers, b.numbers))
        }
        GuardKind::Entities => entity_difference(a, b, directed),
        GuardKind::Negation => {
            if a.negations != b.negations {
                return Some(format!(
                    "negations differ: {} vs {}",
                    a.negations.len(),
                    b.negations.len()
                ));
            }
            polarity_difference(a, b)
        }
        GuardKind::Scope => {
            let strong = |s: &Vec<&'static str>| -> Vec<&'static str> {
                s.iter()
                    .copied()
                    .filter(|c| !WEAK_SCOPE.contains(c))
                    .collect()
            };
            let differs = strong(&a.scope) != strong(&b.scope)
                || (!a.scope.is_empty() && !b.scope.is_empty() && a.scope != b.scope);
            if differs {
                return Some(format!("scope differs: {:?} vs {:?}", a.scope, b.scope));
            }
            if !a.persons.is_empty() && !b.persons.is_empty() && a.persons != b.persons {
                return Some(format!(
                    "person differs: {:?} vs {:?}",
                    a.persons, b.persons
                ));
            }
            (a.parties != b.parties)
                .then(|| format!("parties differ: {:?} vs {:?}", a.parties, b.parties))
        }
        GuardKind::Terms => terms_difference(&a.content, &b.content),
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
    /// The characters between the previous word and this one ("$" in "$50").
    pre: String,
    /// The characters between this word and the next one ("%" in "50%").
    post: String,
}

/// Splits `text` into words. Apostrophes inside words stay ("isn't"); `.,:/-` between
/// two digits stay ("3.5", "1,000", "10:30", "2026-05-01").
fn tokens(text: &str) -> Vec<Token> {
    let chars: Vec<char> = text.chars().collect();
    let mut out: Vec<Token> = Vec::new();
    let mut cur = String::new();
    let mut initial = true;
    let mut next_initial = true;
    let mut gap = String::new();
    let mut pre = String::new();
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
                if let Some(last) = out.last_mut() {
                    last.post.clone_from(&gap);
                }
                pre = std::mem::take(&mut gap);
            }
            cur.push(if c == '\u{2019}' { '\'' } else { c });
        } else {
            if !cur.is_empty() {
                out.push(token(
                    std::mem::take(&mut cur),
                    initial,
                    std::mem::take(&mut pre),
                ));
                next_initial = false;
            }
            gap.push(c);
            if matches!(c, '.' | '?' | '!' | '\n' | ':' | ';' | '"' | '(') {
                next_initial = true;
            }
        }
    }
    if !cur.is_empty() {
        out.push(token(cur, initial, pre));
    } else if let Some(last) = out.last_mut() {
        last.post = gap;
    }
    out
}

fn token(raw: String, initial: bool, pre: String) -> Token {
    let mut lower = raw.to_lowercase();
    if lower.len() > 2 && lower.ends_with("'s") {
        lower.truncate(lower.len() - 2);
    }
    Token {
        raw,
        lower,
        initial,
        pre,
        post: String::new(),
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
    /// Grammatical persons of its pronouns ("1s", "1p", "2", "3"), sorted, deduplicated.
    persons: Vec<&'static str>,
    /// Other parties the question is about ("kids", "team"), sorted, deduplicated.
    parties: Vec<&'static str>,
    /// Content words, normalised (see [`content_word`]), in order.
    content: Vec<Term>,
}

impl Features {
    fn of(text: &str) -> Features {
        let toks = tokens(text);
        // A text in capitals is shouted, not a row of acronyms.
        let letters = text.chars().filter(|c| c.is_alphabetic()).count();
        let upper = text.chars().filter(|c| c.is_uppercase()).count();
        let shouted = letters >= 8 && upper * 10 >= letters * 6;
        let mut f = Features::default();
        // Words up to this index are the unit of a number before them.
        let mut unit_until = 0;
        for (i, t) in toks.iter().enumerate() {
            let w = t.lower.as_str();
            let next = toks.get(i + 1).map(|t| t.lower.as_str());
            let prev = i
                .checked_sub(1)
                .and_then(|j| toks.get(j))
                .map(|t| t.lower.as_str());
            f.words.insert(t.lower.clone());
            f.seq.push(t.lower.clone());
            // "to" gives a direction before a number or a name ("5 to 10", "USD to
            // EUR"), not as an infinitive ("how much does it cost to charge").
            let weak = matches!(w, "to" | "into" | "onto" | "toward" | "towards");
            let names_follow = toks.get(i + 1).is_some_and(|n| {
                n.raw
                    .starts_with(|c: char| c.is_ascii_digit() || c.is_uppercase())
            });
            if DIRECTION.contains(&w) && (!weak || names_follow) {
                f.directed = true;
            }
            let per_period = matches!(w, "one" | "1" | "a" | "an" | "per")
                .then(|| next.and_then(period_adverb))
                .flatten();
            // A unit read with the number before it ("30 kg", "5 km/h"), or a currency
            // code read with the number after it ("USD 50"), is part of that quantity.
            let unit_word = i < unit_until
                || (CURRENCY_CODES.contains(&w)
                    && toks
                        .get(i + 1)
                        .is_some_and(|n| number_of(&n.lower).is_some()));
            if unit_word {
            } else if let Some(adverb) = per_period {
                f.numbers.push(adverb.to_owned());
            } else if matches!(w, "am" | "pm") {
                // a time after a number ("7 am"), else a verb ("am I eligible")
                if prev.is_some_and(|p| number_of(p).is_some()) {
                    f.numbers.push(w.to_owned());
                }
            } else if let Some(n) = number_of(w) {
                // "7pm" counts as "7 pm".
                match ["am", "pm"]
                    .iter()
                    .find(|s| n.len() > 2 && n.ends_with(**s))
                {
                    Some(s) => {
                        f.numbers.push(n[..n.len() - 2].to_owned());
                        f.numbers.push((*s).to_owned());
                    }
                    None => {
                        let (quantity, used) = quantity(&toks, i, n);
                        unit_until = unit_until.max(i + 1 + used);
                        f.numbers.push(quantity);
                    }
                }
            } else if let Some(d) = date_of(w, next) {
                f.numbers.push(d.to_owned());
            } else if !shouted && is_entity(t) {
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
            // "all the time" is "often"; "just started" is "recently".
            let idiom = (w == "all"
                && next == Some("the")
                && toks.get(i + 2).is_some_and(|t| t.lower == "time"))
                || (w == "just" && next.is_some_and(|n| n.ends_with("ing") || n.ends_with("ed")));
            if let Some(class) = scope_of(w).filter(|_| !idiom) {
                f.scope.push(class);
            }
            if let Some(p) = person_of(w) {
                f.persons.push(p);
            }
            if let Some(p) = party_of(w) {
                f.parties.push(p);
            }
            // A unit stays a content word, in its canonical spelling ("kilometres" is
            // "km"): the numbers guard compares it, with its number.
            let unit_canon = unit_word.then(|| unit_of(w)).flatten();
            if let Some(canon) = content_word(w).map(|c| unit_canon.map_or(c, str::to_owned)) {
                f.content.push(Term {
                    canon,
                    raw: w.to_owned(),
                });
            }
        }
        f.negations.sort_unstable();
        f.scope.sort_unstable();
        f.scope.dedup();
        f.persons.sort_unstable();
        f.persons.dedup();
        f.parties.sort_unstable();
        f.parties.dedup();
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

/// Currency codes, read as the unit of a number before or after them ("USD 50", "50 EUR").
const CURRENCY_CODES: &[&str] = &[
    "usd", "eur", "gbp", "jpy", "cny", "rmb", "inr", "chf", "cad", "aud", "nzd", "sek", "nok",
    "dkk", "pln", "mxn", "brl", "zar", "krw", "sgd", "hkd", "rub", "btc", "eth",
];

/// The canonical unit of a word written after a number: "kg", "kilo" and "kilograms" are
/// all "kg". Single letters that are also something else ("b", "t", "k", "c", "f", "in",
/// "p") are left out; "°C" and "°F" are read from their degree sign (see [`quantity`]).
fn unit_of(w: &str) -> Option<&'static str> {
    Some(match w {
        // mass
        "mg" | "milligram" | "milligrams" | "milligramme" | "milligrammes" => "mg",
        "g" | "gram" | "grams" | "gramme" | "grammes" => "g",
        "kg" | "kgs" | "kilo" | "kilos" | "kilogram" | "kilograms" | "kilogramme"
        | "kilogrammes" => "kg",
        "tonne" | "tonnes" => "tonne",
        "ton" | "tons" => "ton",
        "lb" | "lbs" | "pound" | "pounds" => "lb",
        "oz" | "ounce" | "ounces" => "oz",
        "stone" | "stones" => "stone",
        // length
        "nm" | "nanometre" | "nanometres" | "nanometer" | "nanometers" => "nm",
        "mm" | "millimetre" | "millimetres" | "millimeter" | "millimeters" => "mm",
        "cm" | "centimetre" | "centimetres" | "centimeter" | "centimeters" => "cm",
        "m" | "metre" | "metres" | "meter" | "meters" => "m",
        "km" | "kms" | "kilometre" | "kilometres" | "kilometer" | "kilometers" | "klick"
        | "klicks" => "km",
        "inch" | "inches" => "in",
        "ft" | "foot" | "feet" => "ft",
        "yd" | "yds" | "yard" | "yards" => "yd",
        "mi" | "mile" | "miles" => "mi",
        "nmi" => "nmi",
        // area
        "acre" | "acres" => "acre",
        "hectare" | "hectares" | "ha" => "ha",
        "sqft" => "ft2",
        "sqm" => "m2",
        // volume
        "ml" | "millilitre" | "millilitres" | "milliliter" | "milliliters" | "cc" => "ml",
        "cl" | "centilitre" | "centilitres" | "centiliter" | "centiliters" => "cl",
        "dl" | "decilitre" | "decilitres" | "deciliter" | "deciliters" => "dl",
        "l" | "ltr" | "ltrs" | "litre" | "litres" | "liter" | "liters" => "l",
        "gal" | "gals" | "gallon" | "gallons" => "gal",
        "qt" | "quart" | "quarts" => "qt",
        "pint" | "pints" => "pint",
        "cup" | "cups" => "cup",
        "tbsp" | "tbs" | "tablespoon" | "tablespoons" => "tbsp",
        "tsp" | "teaspoon" | "teaspoons" => "tsp",
        // temperature
        "celsius" | "centigrade" => "°c",
        "fahrenheit" => "°f",
        "kelvin" | "kelvins" => "kelvin",
        "degree" | "degrees" | "deg" => "°",
        // time spans
        "ns" | "nanosecond" | "nanoseconds" => "ns",
        "ms" | "millisecond" | "milliseconds" | "msec" | "msecs" => "ms",
        "s" | "sec" | "secs" | "second" | "seconds" => "s",
        "min" | "mins" | "minute" | "minutes" => "min",
        "h" | "hr" | "hrs" | "hour" | "hours" => "h",
        "day" | "days" => "day",
        "wk" | "wks" | "week" | "weeks" => "week",
        "fortnight" | "fortnights" => "fortnight",
        "mo" | "mos" | "month" | "months" => "month",
        "yr" | "yrs" | "year" | "years" => "year",
        "decade" | "decades" => "decade",
        "century" | "centuries" => "century",
        // data sizes and rates
        "byte" | "bytes" => "byte",
        "bit" | "bits" => "bit",
        "kb" | "kib" | "kilobyte" | "kilobytes" => "kb",
        "mb" | "mib" | "megabyte" | "megabytes" | "meg" | "megs" => "mb",
        "gb" | "gib" | "gigabyte" | "gigabytes" | "gig" | "gigs" => "gb",
        "tb" | "tib" | "terabyte" | "terabytes" => "tb",
        "pb" | "pib" | "petabyte" | "petabytes" => "pb",
        "kbps" => "kbit/s",
        "mbps" => "mbit/s",
        "gbps" => "gbit/s",
        // currencies
        "usd" | "dollar" | "dollars" | "buck" | "bucks" => "usd",
        "eur" | "euro" | "euros" => "eur",
        "gbp" | "sterling" | "quid" => "gbp",
        "pence" | "penny" | "pennies" => "pence",
        "cent" | "cents" => "cent",
        "jpy" | "yen" => "jpy",
        "cny" | "rmb" | "yuan" | "renminbi" => "cny",
        "inr" | "rupee" | "rupees" => "inr",
        "chf" | "franc" | "francs" => "chf",
        "cad" => "cad",
        "aud" => "aud",
        "nzd" => "nzd",
        "sek" | "nok" | "dkk" | "krona" | "kronor" | "krone" | "kroner" => "krona",
        "pln" | "zloty" | "zlotys" => "pln",
        "mxn" | "peso" | "pesos" => "peso",
        "brl" | "reais" => "brl",
        "zar" | "rand" => "zar",
        "krw" => "krw",
        "sgd" => "sgd",
        "hkd" => "hkd",
        "lira" | "liras" => "try",
        "rub" | "rouble" | "roubles" | "ruble" | "rubles" => "rub",
        "btc" | "bitcoin" | "bitcoins" => "btc",
        "eth" | "ether" => "eth",
        // shares
        "percent" | "pct" | "percentage" => "%",
        "permille" => "‰",
        "bp" | "bps" | "basis" => "bp",
        // speeds, energy and power
        "mph" => "mi/h",
        "kph" | "kmh" | "kmph" => "km/h",
        "knot" | "knots" | "kts" => "knot",
        "cal" | "calorie" | "calories" => "cal",
        "kcal" | "kilocalorie" | "kilocalories" => "kcal",
        "kj" | "kilojoule" | "kilojoules" => "kj",
        "w" | "watt" | "watts" => "w",
        "kw" | "kilowatt" | "kilowatts" => "kw",
        "kwh" => "kwh",
        "volt" | "volts" => "v",
        "mah" => "mah",
        "hz" | "hertz" => "hz",
        "khz" => "khz",
        "mhz" => "mhz",
        "ghz" => "ghz",
        _ => return None,
    })
}

/// The unit of a currency symbol.
fn currency_symbol(c: char) -> Option<&'static str> {
    Some(match c {
        '$' => "usd",
        '€' => "eur",
        '£' => "gbp",
        '¥' => "jpy",
        '₹' => "inr",
        '¢' => "cent",
        '₩' => "krw",
        '₽' => "rub",
        '₺' => "try",
        '₿' => "btc",
        _ => return None,
    })
}

/// Whether a canonical unit is a time span (what a speed or a rate is per).
fn is_time_unit(u: &str) -> bool {
    matches!(
        u,
        "ns" | "ms" | "s" | "min" | "h" | "day" | "week" | "fortnight" | "month" | "year"
    )
}

/// The quantity of the number `n` read at word `i`: the number with its unit ("30 kg",
/// "50 usd", "20 °c", "5 km/h"), or the number alone when no unit goes with it; and how
/// many words after `i` the unit took.
fn quantity(toks: &[Token], i: usize, n: String) -> (String, usize) {
    let Some(t) = toks.get(i) else {
        return (n, 0);
    };
    let word = |j: usize| toks.get(j).map(|t| t.lower.as_str());
    let first = |s: &str| s.chars().find(|c| !c.is_whitespace());
    let last = |s: &str| s.chars().rev().find(|c| !c.is_whitespace());
    // A currency before the number: "$50", "€ 3.50", "USD 50".
    let before = last(&t.pre).and_then(currency_symbol).or_else(|| {
        i.checked_sub(1)
            .and_then(word)
            .filter(|w| CURRENCY_CODES.contains(w) && first(&t.pre).is_none())
            .and_then(unit_of)
    });
    // A unit written into the number: "30kg", "5km", "10GB" (not "10k" or "5m", which
    // are as often thousands and millions).
    let split = n.find(|c: char| c.is_alphabetic()).unwrap_or(n.len());
    let glued = (split > 0 && split < n.len() && n[..split].parse::<f64>().is_ok())
        .then(|| &n[split..])
        .filter(|s| !matches!(*s, "k" | "m" | "b" | "bn" | "mn" | "s"))
        .and_then(unit_of);
    let (num, mut unit) = match glued {
        Some(u) => (n[..split].to_owned(), Some(u)),
        None => (n, None),
    };
    let mut used = 0;
    if let Some(c) = before {
        // "$50", also "$50 dollars"
        if word(i + 1).and_then(unit_of) == Some(c) && unit.is_none() {
            used = 1;
        }
        return (format!("{num} {c}"), used);
    }
    // The last word the unit is written in ("km" of "5 km/h"): `i` when glued.
    let mut end = i;
    if unit.is_none() {
        match first(&t.post) {
            Some('%') => unit = Some("%"),
            Some('‰') => unit = Some("‰"),
            Some('℃') => unit = Some("°c"),
            Some('℉') => unit = Some("°f"),
            Some(c) if currency_symbol(c).is_some() => unit = currency_symbol(c),
            Some('°' | 'º') => {
                unit = Some("°");
            }
            // "5 minutes", "a 5-minute walk"
            Some('-') | None if t.post.trim() == "-" || first(&t.post).is_none() => {
                if let Some(u) = word(i + 1).and_then(unit_of) {
                    unit = Some(u);
                    end = i + 1;
                }
            }
            _ => {}
        }
    }
    // "20 °C", "20 degrees Fahrenheit", "20 deg C"
    if unit == Some("°") {
        let scale = match word(end + 1) {
            Some("c" | "celsius" | "centigrade") => Some("°c"),
            Some("f" | "fahrenheit") => Some("°f"),
            _ => None,
        };
        if let Some(s) = scale {
            unit = Some(s);
            end += 1;
        }
    }
    // "percentage points", "basis points", "per cent"
    if matches!(word(end), Some("percentage" | "basis")) && word(end + 1) == Some("points") {
        unit = unit.map(|u| if u == "%" { "pp" } else { u });
        end += 1;
    } else if unit.is_none() && word(i + 1) == Some("per") && word(i + 2) == Some("cent") {
        unit = Some("%");
        end = i + 2;
    }
    let Some(u) = unit else {
        return (num, 0);
    };
    // A rate: "5 km/h", "5 km per hour", "3 GB a month".
    let mut unit = u.to_owned();
    if !is_time_unit(u) && u != "%" && !is_currency(u) {
        let slash = toks.get(end).is_some_and(|t| first(&t.post) == Some('/'));
        let per = match word(end + 1) {
            Some("per" | "a" | "an") => Some(end + 2),
            _ if slash => Some(end + 1),
            _ => None,
        };
        if let Some(j) = per {
            let time = word(j).and_then(unit_of).filter(|t| is_time_unit(t));
            if let Some(time) = time {
                unit = match (u, time) {
                    ("mi", "h") => "mi/h".to_owned(),
                    _ => format!("{u}/{time}"),
                };
                end = j;
            }
        }
    }
    used = end - i;
    (format!("{num} {unit}"), used)
}

/// Whether a canonical unit is a currency.
fn is_currency(u: &str) -> bool {
    matches!(u, "cent" | "pence" | "try" | "krona" | "peso") || CURRENCY_CODES.contains(&u)
}

/// "daily" for "day" (so "one day", "a day" and "per day" read as "daily").
fn period_adverb(period: &str) -> Option<&'static str> {
    Some(match period {
        "hour" => "hourly",
        "day" => "daily",
        "week" => "weekly",
        "month" => "monthly",
        "year" => "yearly",
        _ => return None,
    })
}

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
    // A typo of a long date word ("wekly", "daaily", "tommorow") is that word.
    if w.len() >= 5 && w.chars().all(char::is_alphabetic) {
        let long = |d: &&&str| {
            d.len() >= 5 && w.len().max(d.len()) >= 6 && edit_distance_at_most_one(w, d)
        };
        if let Some(d) = MONTHS.iter().chain(DAYS).chain(RELATIVE_DAYS).find(long) {
            return Some(d);
        }
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
        "wouldnt", "shouldnt", "couldnt", "havent", "hasnt", "hadnt", "aint", "unable", "avoid",
        "avoided", "avoiding", "prevent", "prevents", "refuse", "refused", "refuses", "lack",
        "lacks", "lacking",
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
    (
        &["before", "earlier", "prior", "within"],
        &["after", "later", "beyond"],
    ),
    (
        &["keep", "keeps", "continue", "continues"],
        &["stop", "stops", "stopped", "quit"],
    ),
    (
        &[
            "rent", "rented", "renting", "renter", "tenant", "lease", "leased",
        ],
        &["own", "owned", "owner", "mortgage"],
    ),
    (
        &[
            "order",
            "ordered",
            "book",
            "booked",
            "reserve",
            "reserved",
            "renew",
            "reactivate",
        ],
        &[
            "cancel",
            "cancelled",
            "canceled",
            "cancellation",
            "cancelling",
        ],
    ),
    (&["read", "reading"], &["write", "writing", "written"]),
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
        "previously" | "formerly" | "originally" | "ago" | "past" => "past",
        _ => return None,
    })
}

/// The grammatical person of a pronoun. A "you" that asks the assistant to do
/// something ("can you tell me…") is not a person the question is about.
fn person_of(w: &str) -> Option<&'static str> {
    // Subject pronouns are often generic ("will you still take it back?" asks what
    // anyone can do); possessives say whose thing it is.
    Some(match w {
        "my" | "mine" | "myself" => "1s",
        "our" | "ours" | "ourselves" => "1p",
        "your" | "yours" | "yourself" => "2",
        "his" | "her" | "hers" | "their" | "theirs" | "himself" | "herself" | "themselves" => "3",
        _ => return None,
    })
}

/// Other parties a question can be about: whose answer it is changes with them.
fn party_of(w: &str) -> Option<&'static str> {
    const PARTIES: &[(&str, &[&str])] = &[
        (
            "child",
            &[
                "child",
                "children",
                "kid",
                "kids",
                "son",
                "daughter",
                "toddler",
                "baby",
                "babies",
                "teen",
                "teens",
                "teenager",
                "teenagers",
                "minor",
                "minors",
            ],
        ),
        (
            "parent",
            &["parent", "parents", "father", "mother", "dad", "mom", "mum"],
        ),
        ("partner", &["partner", "spouse", "husband", "wife"]),
        (
            "elder",
            &[
                "elderly", "older", "senior", "seniors", "retiree", "retirees",
            ],
        ),
        (
            "colleague",
            &[
                "colleague",
                "colleagues",
                "coworker",
                "coworkers",
                "manager",
                "boss",
                "employer",
                "roommate",
                "neighbour",
                "neighbor",
            ],
        ),
        (
            "group",
            &[
                "team",
                "teams",
                "group",
                "family",
                "household",
                "households",
                "everyone",
                "company",
                "business",
                "businesses",
                "fleet",
                "class",
            ],
        ),
        (
            "worker",
            &[
                "contractor",
                "contractors",
                "intern",
                "interns",
                "freelancer",
                "freelancers",
            ],
        ),
        ("student", &["student", "students"]),
        ("animal", &["dog", "dogs", "cat", "cats", "pet", "pets"]),
    ];
    PARTIES
        .iter()
        .find(|(_, words)| words.contains(&w))
        .map(|(class, _)| *class)
}

/// Words that carry no content of their own for [`GuardKind::Terms`]: function words,
/// question frames ("what's the way to"), courtesies, and words the other guards read.
const STOP: &[&str] = &[
    "take",
    "takes",
    "taking",
    "took",
    "repeatedly",
    "constantly",
    "continually",
    "a",
    "an",
    "the",
    "is",
    "are",
    "am",
    "was",
    "were",
    "be",
    "been",
    "being",
    "do",
    "does",
    "did",
    "doing",
    "done",
    "have",
    "has",
    "had",
    "having",
    "i",
    "me",
    "my",
    "mine",
    "myself",
    "we",
    "us",
    "our",
    "you",
    "your",
    "he",
    "she",
    "it",
    "its",
    "it's",
    "they",
    "them",
    "their",
    "this",
    "that",
    "these",
    "those",
    "what",
    "what's",
    "whats",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "can",
    "could",
    "would",
    "should",
    "will",
    "shall",
    "may",
    "might",
    "must",
    "to",
    "of",
    "in",
    "on",
    "at",
    "by",
    "for",
    "with",
    "from",
    "into",
    "about",
    "as",
    "and",
    "or",
    "but",
    "if",
    "so",
    "than",
    "then",
    "there",
    "here",
    "up",
    "just",
    "very",
    "really",
    "any",
    "some",
    "please",
    "pls",
    "thanks",
    "thank",
    "there's",
    "i'm",
    "i've",
    "i'd",
    "get",
    "getting",
    "got",
    "way",
    "ways",
    "step",
    "steps",
    "process",
    "possible",
    "able",
    "okay",
    "ok",
    "hi",
    "hey",
    "hello",
    "quick",
    "question",
    "um",
    "hmm",
    "also",
    "let",
    "know",
    "want",
    "need",
    "needed",
    "needs",
    "require",
    "required",
    "requires",
    "necessary",
    "allowed",
    "permitted",
    "happen",
    "happens",
    "going",
    "one",
    "time",
    "go",
    "make",
    "makes",
    "made",
    "keep",
    "keeps",
    "still",
    "now",
    "right",
    "currently",
    "asap",
    "excuse",
    "simplest",
    "easiest",
    "best",
    "ideal",
    "good",
    "okay",
    "safe",
    "fine",
    "sure",
    "use",
    "using",
    "using",
    "give",
    "tell",
    "show",
    "explain",
    "recommended",
    "recommend",
    "there",
    "am",
    "ever",
    "exactly",
    "actually",
    "much",
    "many",
    "long",
    "often",
    "who",
    "while",
    "once",
    "after",
    "before",
    "within",
    "during",
    "per",
    "each",
    "all",
    "every",
    "not",
    "no",
    "never",
    "without",
    "don't",
    "doesn't",
    "can't",
    "won't",
    "isn't",
    "aren't",
    "didn't",
    "i'll",
    "we're",
    "you're",
    "yes",
    "like",
    "such",
    "see",
    "giving",
    "gave",
    "given",
    "come",
    "comes",
    "coming",
    "came",
];

/// Words of small talk: a turn made only of them ("ok thanks!", "great, got it") is
/// chatter, which a follow-up does not depend on.
const CHATTER: &[&str] = &[
    "ok",
    "okay",
    "k",
    "thanks",
    "thank",
    "thx",
    "ty",
    "you",
    "great",
    "cool",
    "got",
    "it",
    "perfect",
    "alright",
    "all",
    "right",
    "sounds",
    "good",
    "nice",
    "awesome",
    "sure",
    "yes",
    "yeah",
    "yep",
    "a",
    "lot",
    "so",
    "much",
    "and",
    "also",
    "hmm",
    "um",
    "well",
    "fine",
    "understood",
    "noted",
    "one",
    "more",
    "thing",
    "then",
    "oh",
    "i",
    "see",
    "wow",
    "excellent",
    "super",
    "brilliant",
    "hi",
    "hello",
    "hey",
    "please",
    "just",
    "that",
    "helps",
];

/// Whether `text` names a detail an answer can hinge on: a number, date or name.
pub(crate) fn has_details(text: &str) -> bool {
    let f = Features::of(text);
    !f.numbers.is_empty() || !f.entities.is_empty()
}

/// Whether `text` is small talk only (or empty).
pub(crate) fn is_chatter(text: &str) -> bool {
    tokens(text)
        .iter()
        .all(|t| CHATTER.contains(&t.lower.as_str()))
}

/// Openers of a turn that carry nothing: stripped from a follow-up before it is
/// compared.
const OPENERS: &[&str] = &[
    "one more thing",
    "quick question",
    "thank you",
    "excuse me",
    "got it",
    "ok",
    "okay",
    "thanks",
    "thx",
    "great",
    "cool",
    "alright",
    "hmm",
    "um",
    "so",
    "and",
    "also",
    "oh",
    "well",
    "perfect",
    "awesome",
    "nice",
    "sure",
    "hi",
    "hello",
    "hey",
];

/// `text` without the small talk it opens with ("ok and how long…", "great. one more
/// thing: …"), when a question remains.
pub(crate) fn strip_lead_chatter(text: &str) -> &str {
    let mut rest = text.trim_start();
    'outer: loop {
        let lower = rest.to_lowercase();
        for o in OPENERS {
            let whole = lower.starts_with(o)
                && lower[o.len()..]
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_alphanumeric() && c != '\'');
            // Lowercasing keeps these ASCII openers' byte lengths.
            if whole && rest.is_char_boundary(o.len()) {
                let after = rest[o.len()..].trim_start_matches(|c: char| {
                    c.is_whitespace() || matches!(c, ',' | '.' | '!' | ':' | ';' | '-')
                });
                if after.len() >= 3 {
                    rest = after;
                    continue 'outer;
                }
            }
        }
        break;
    }
    rest
}

/// Content words whose addition does not qualify a question (compared forms).
const GENERIC: &[&str] = &[
    "legal",
    "lawful",
    "account",
    "hour",
    "city",
    "item",
    "detail",
    "information",
    "info",
    "thing",
    "kind",
    "type",
    "option",
    "procedure",
    "someone",
    "anyone",
    "exact",
    "precise",
    "actual",
    "current",
    "general",
    "overall",
    "specific",
    "common",
    "usual",
    "normal",
    "typical",
];

/// Words that mean the same for [`GuardKind::Terms`], by their shared form.
const SYNONYMS: &[(&str, &[&str])] = &[
    ("kg", &["kilogram", "kilo", "kilos"]),
    ("lb", &["pound", "lbs"]),
    ("mg", &["milligram"]),
    ("period", &["season", "month"]),
    ("available", &["stock", "availability"]),
    (
        "buy",
        &["purchase", "purchased", "bought", "order", "ordered"],
    ),
    (
        "max",
        &["maximum", "highest", "most", "top", "largest", "biggest"],
    ),
    ("min", &["minimum", "lowest", "least", "smallest"]),
    (
        "apply",
        &["sign", "signup", "request", "register", "enroll", "enrol"],
    ),
    (
        "cost",
        &[
            "price", "priced", "costs", "fee", "fees", "charge", "pay", "paid",
        ],
    ),
    ("start", &["begin", "launch", "boot", "startup"]),
    ("fix", &["repair", "resolve", "troubleshoot"]),
    ("help", &["assist", "support"]),
    ("choose", &["pick", "select"]),
    ("big", &["large", "huge"]),
    ("small", &["little", "tiny"]),
    ("car", &["vehicle", "auto"]),
    ("shop", &["store"]),
    ("cancel", &["terminate", "end"]),
    ("remove", &["delete", "drop", "dedupe"]),
    ("bag", &["baggage", "luggage", "suitcase"]),
    ("tire", &["tyre"]),
    ("enable", &["turn", "switch", "activate"]),
    (
        "trip",
        &[
            "travel",
            "travelling",
            "traveling",
            "visit",
            "journey",
            "holiday",
            "vacation",
        ],
    ),
    ("return", &["back", "refund"]),
    ("work", &["job", "employment"]),
    ("quit", &["resign", "resigning", "leave"]),
    ("doctor", &["physician", "gp"]),
    ("phone", &["mobile", "cellphone"]),
    ("money", &["funds", "cash"]),
    ("exam", &["test", "final", "midterm"]),
    ("study", &["revise", "prepare", "learn"]),
    ("dose", &["dosage", "amount"]),
    ("drink", &["alcohol", "beer", "wine"]),
];

/// The form a content word is compared in, or `None` for a word without content of
/// its own. Plurals and possessives fold to the singular; listed synonyms to one form.
fn content_word(w: &str) -> Option<String> {
    if w.len() < 2 || STOP.contains(&w) || w.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // A typo of a function word ("wiithin", "atfer") is that word.
    if w.len() >= 5
        && STOP
            .iter()
            .any(|s| s.len() >= 5 && edit_distance_at_most_one(w, s))
    {
        return None;
    }
    if number_of(w).is_some() || date_of(w, None).is_some() {
        return None; // the numbers guard reads them
    }
    let singular = if w.len() > 4 && w.ends_with("ies") {
        format!("{}y", &w[..w.len() - 3])
    } else if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") && !w.ends_with("us") {
        w[..w.len() - 1].to_owned()
    } else {
        w.to_owned()
    };
    let stemmed = stem(&singular);
    for (canon, words) in SYNONYMS {
        if *canon == singular
            || words.contains(&singular.as_str())
            || words.contains(&w)
            || words.iter().any(|x| stem(x) == stemmed)
        {
            return Some((*canon).to_owned());
        }
    }
    Some(stem(&singular).to_owned())
}

/// A light stem: "charging", "charged" and "charge" are one word.
fn stem(w: &str) -> &str {
    for suffix in ["ing", "ed", "e"] {
        if let Some(s) = w.strip_suffix(suffix) {
            if s.len() >= 3 {
                return s;
            }
        }
    }
    w
}

/// Whether two content words are the same up to a typo, an inflection or one being a
/// stem of the other ("bag" / "baggage", "authentication" / "authnetication").
fn same_word(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if short.len() >= 3 && long.starts_with(short) && long.len() - short.len() <= 4 {
        return true;
    }
    long.len() >= 5 && short.len() >= 4 && edit_distance_at_most_one(a, b)
}

/// A content word: its compared form and the word as written.
#[derive(Debug)]
struct Term {
    canon: String,
    raw: String,
}

impl Term {
    fn same(&self, other: &Term) -> bool {
        same_word(&self.canon, &other.canon)
            || same_word(&self.raw, &other.raw)
            || stem(&self.raw) == stem(&other.raw)
    }
}

/// Damerau–Levenshtein distance ≤ 1 (one insertion, deletion, substitution or swap of
/// neighbours).
fn edit_distance_at_most_one(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let mut i = 0;
    while i < a.len() && i < b.len() && a[i] == b[i] {
        i += 1;
    }
    if i == a.len() && i == b.len() {
        return true;
    }
    let rest = |x: &[char], y: &[char]| x == y;
    if a.len() == b.len() {
        rest(&a[i + 1..], &b[i + 1..])
            || (i + 1 < a.len()
                && a[i] == b[i + 1]
                && a[i + 1] == b[i]
                && rest(&a[i + 2..], &b[i + 2..]))
    } else if a.len() > b.len() {
        rest(&a[i + 1..], &b[i..])
    } else {
        rest(&a[i..], &b[i + 1..])
    }
}

/// Content words at most this many apart on either side are compared word by word;
/// more is a rewording that the similarity judges.
const MAX_TERM_DIFFERENCE: usize = 2;

/// The content words of each of two questions without a counterpart in the other
/// (typos forgiven), by position.
fn unmatched_terms(a: &[Term], b: &[Term]) -> (Vec<usize>, Vec<usize>) {
    let mut only_a: Vec<usize> = Vec::new();
    let mut used = vec![false; b.len()];
    for (i, w) in a.iter().enumerate() {
        match (0..b.len()).find(|&j| !used[j] && w.same(&b[j])) {
            Some(j) => used[j] = true,
            None => only_a.push(i),
        }
    }
    // A word said twice in one question is matched by one mention in the other.
    only_a.retain(|&i| !b.iter().any(|t| a[i].same(t)));
    let only_b: Vec<usize> = (0..b.len())
        .filter(|&j| !used[j] && !a.iter().any(|t| b[j].same(t)))
        .collect();
    (only_a, only_b)
}

/// A substituted or added content word between two questions, if any.
fn terms_difference(a: &[Term], b: &[Term]) -> Option<String> {
    let (only_a, only_b) = unmatched_terms(a, b);
    if only_a.len() > MAX_TERM_DIFFERENCE || only_b.len() > MAX_TERM_DIFFERENCE {
        return None;
    }
    // A substitution: words in the same place, with a neighbour in common.
    for &i in &only_a {
        for &j in &only_b {
            let before = i > 0 && j > 0 && a[i - 1].same(&b[j - 1]);
            let after = i + 1 < a.len() && j + 1 < b.len() && a[i + 1].same(&b[j + 1]);
            // or the same place in two questions of as many content words
            let same_place = a.len() == b.len() && i == j;
            if before || after || same_place {
                return Some(format!("`{}` replaced by `{}`", a[i].raw, b[j].raw));
            }
        }
    }
    // A qualifier only one of them has (words that name the question's own subject
    // more fully, such as "hours" in "opening hours", are no qualifier).
    let qualifier = |t: &Term| !GENERIC.contains(&t.canon.as_str());
    match (only_a.as_slice(), only_b.as_slice()) {
        ([], added) if !a.is_empty() => added
            .iter()
            .find(|j| qualifier(&b[**j]))
            .map(|j| format!("`{}` only in the asked question", b[*j].raw)),
        (added, []) if !b.is_empty() => added
            .iter()
            .find(|i| qualifier(&a[**i]))
            .map(|i| format!("`{}` only in the stored question", a[*i].raw)),
        _ => None,
    }
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
    fn quantities_in_other_units_are_refused() {
        for (a, b) in [
            (
                "How much to ship 30 kg to Canada?",
                "How much to ship 30 lb to Canada?",
            ),
            (
                "How long does it take to walk 5 km?",
                "How long does it take to walk 5 miles?",
            ),
            (
                "Is 20 °C warm enough to swim?",
                "Is 20 °F warm enough to swim?",
            ),
            (
                "Is 20°C warm enough to swim?",
                "Is 20 degrees Fahrenheit warm enough to swim?",
            ),
            (
                "Can I return it within 3 days?",
                "Can I return it within 3 weeks?",
            ),
            ("Is $50 a fair tip?", "Is €50 a fair tip?"),
            ("Is USD 50 a fair tip?", "Is 50 euros a fair tip?"),
            (
                "Is a 10 GB attachment allowed?",
                "Is a 10 MB attachment allowed?",
            ),
            (
                "Is a 10GB attachment allowed?",
                "Is a 10 kb attachment allowed?",
            ),
            ("Can I park for 2 hours?", "Can I park for 2 minutes?"),
            ("Can I park for 30 second?", "Can I park for 30 min?"),
            ("Is a 5% fee normal?", "Is a 5 dollar fee normal?"),
            (
                "Is 60 km/h safe in the rain?",
                "Is 60 mph safe in the rain?",
            ),
            ("Is 60 km per hour safe here?", "Is 60 km safe here?"),
            ("Add 2 cups of flour", "Add 2 tbsp of flour"),
            ("Drink 2 litres of water", "Drink 2 gallons of water"),
        ] {
            assert_eq!(rejects(a, b), Some(GuardKind::Numbers), "{a} / {b}");
            assert_eq!(rejects(b, a), Some(GuardKind::Numbers), "{b} / {a}");
        }
    }

    #[test]
    fn a_unit_is_read_in_any_of_its_spellings() {
        let numbers = |t: &str| Features::of(t).numbers;
        for (a, b) in [
            ("ship 30 kg", "ship 30 kilograms"),
            ("ship 30kg", "ship 30 kilos"),
            ("walk 5 km", "walk 5 kilometers"),
            ("walk 5 miles", "walk five mi"),
            ("tip $50", "tip 50 dollars"),
            ("tip $50", "tip USD 50"),
            ("tip €50", "tip 50 EUR"),
            ("a 5% fee", "a 5 percent fee"),
            ("a 5% fee", "a 5 per cent fee"),
            ("at 20 °C", "at 20 degrees celsius"),
            ("at 20°C", "at 20 deg C"),
            ("60 km/h", "60 kph"),
            ("60 km/h", "60 kilometres per hour"),
            ("60 mph", "60 miles an hour"),
            ("10 GB", "10 gigabytes"),
            ("for 2 hrs", "for 2 hours"),
            ("for 30 secs", "for 30 seconds"),
            ("a 5-minute walk", "a 5 minute walk"),
            ("a 30-kg bag", "a 30 kilo bag"),
        ] {
            assert_eq!(numbers(a), numbers(b), "{a} / {b}");
            assert!(!numbers(a).is_empty(), "{a}");
        }
        assert_eq!(numbers("ship 30kg"), ["30 kg"]);
        assert_eq!(numbers("$3.50 or 20%"), ["3.5 usd", "20 %"]);
        assert_eq!(numbers("a 30 second ad"), ["30 s"]);
        // Not units: thousands, a number on its own, words that only look like one.
        assert_eq!(numbers("a 10k run"), ["10k"]);
        assert_eq!(numbers("try 5 times"), ["5"]);
        assert_eq!(numbers("win 3 v 3"), ["3", "3"]);
    }

    #[test]
    fn a_unit_on_one_side_only_is_refused_like_a_number() {
        assert_eq!(
            rejects("Can I carry 30 kg on board?", "Can I carry 30 on board?"),
            Some(GuardKind::Numbers)
        );
        assert_eq!(
            rejects("How far is 5 km?", "How far is 5 kilometres?"),
            None
        );
        assert_eq!(
            rejects("Is 50 USD a fair tip?", "Is 50 dollars a fair tip?"),
            None
        );
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
    fn terms_persons_parties_and_antonyms_are_refused() {
        use GuardKind::*;
        for (a, b, kind) in [
            (
                "Can I return a blender after 30 days?",
                "Can I return a laptop after 30 days?",
                Terms,
            ),
            (
                "How do I sort a map by key in Go?",
                "How do I sort a map by value in Go?",
                Terms,
            ),
            (
                "How do I remove duplicates from a list in Rust?",
                "How do I remove duplicates from a list in Rust asynchronously?",
                Terms,
            ),
            (
                "How do I reset my password?",
                "How do I reset your password?",
                Scope,
            ),
            (
                "Can I take ibuprofen with alcohol?",
                "Can my kids take ibuprofen with alcohol?",
                Scope,
            ),
            (
                "Is it safe to eat before surgery?",
                "Should I avoid eating before surgery?",
                Negation,
            ),
            (
                "Can I get a refund within 30 days?",
                "Can I get a refund after 30 days?",
                Negation,
            ),
            (
                "Why does Slack keep crashing?",
                "Why did Slack stop crashing?",
                Negation,
            ),
            (
                "How do I read a file in Go?",
                "How do I write a file in Go?",
                Negation,
            ),
            (
                "What did this cost previously?",
                "What does this cost?",
                Scope,
            ),
        ] {
            assert_eq!(rejects(a, b), Some(kind), "{a} / {b}");
            assert_eq!(rejects(b, a), Some(kind), "{b} / {a}");
        }
    }

    #[test]
    fn typos_plurals_synonyms_and_shouting_are_forgiven() {
        for (a, b) in [
            (
                "How do I turn on two-factor authentication?",
                "how do i turn on two-factor authnetication",
            ),
            (
                "What is the weekly study time?",
                "what is the wekly study time",
            ),
            (
                "Can I bring a suitcase on Delta?",
                "Can I bring a sutcase on Delta?",
            ),
            (
                "Where do I replace my payment card for Figma?",
                "HI, WHERE DO I REPLACE MY PAYMNT CARD FOR FIGMA?",
            ),
            (
                "What is the maximum daily dose?",
                "What's the highest daily dose?",
            ),
            (
                "How much does it cost to charge a Leaf at home?",
                "Charging a Leaf at home: how much does it cost?",
            ),
            (
                "Can I transfer my credits to Oakridge College thank you?",
                "Can I transfer my credits to Oakridge College?",
            ),
            (
                "Why does Zoom crash all the time?",
                "Why does Zoom keep crashing?",
            ),
        ] {
            assert_eq!(rejects(a, b), None, "{a} / {b}");
            assert_eq!(rejects(b, a), None, "{b} / {a}");
        }
        assert!(edit_distance_at_most_one(
            "authentication",
            "authnetication"
        ));
        assert!(edit_distance_at_most_one("within", "wiithin"));
        assert!(!edit_distance_at_most_one("blender", "laptop"));
        assert!(!edit_distance_at_most_one("read", "write"));
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
        // the terms guard sees the replaced word too
        assert_eq!(
            g.check("Is it open?", "Is it closed?").map(|(k, _)| k),
            Some(GuardKind::Terms)
        );
        let g = g.with(GuardKind::Terms, false);
        assert!(g.check("Is it open?", "Is it closed?").is_none());
        assert!(g.check("3 apples", "4 apples").is_some());
        assert!(Guards::none().check("Paris", "Rome").is_none());
        assert_eq!(GuardKind::Scope.to_string(), "scope");
    }
}
