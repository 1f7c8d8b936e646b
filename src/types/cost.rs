//! Money as integers: [`Cost`] in nano-dollars and [`Price`] per million tokens.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Usage;

const NANOS_PER_DOLLAR: u64 = 1_000_000_000;

/// An amount of money in nano-dollars (10⁻⁹ USD). Integer arithmetic only, so budget
/// sums are exact and never drift. `Cost::MAX` is about 18 billion dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Cost(u64);

impl Cost {
    /// Nothing.
    pub const ZERO: Cost = Cost(0);
    /// The largest representable amount.
    pub const MAX: Cost = Cost(u64::MAX);

    /// From nano-dollars.
    pub const fn from_nanos(nanos: u64) -> Self {
        Cost(nanos)
    }

    /// From micro-dollars (10⁻⁶ USD).
    pub const fn from_micros(micros: u64) -> Self {
        Cost(micros.saturating_mul(1_000))
    }

    /// From cents.
    pub const fn from_cents(cents: u64) -> Self {
        Cost(cents.saturating_mul(10_000_000))
    }

    /// From whole dollars.
    pub const fn from_dollars(dollars: u64) -> Self {
        Cost(dollars.saturating_mul(NANOS_PER_DOLLAR))
    }

    /// From a decimal dollar amount such as `2.5`, rounded to the nearest nano-dollar.
    /// Returns `None` for negative, infinite or NaN amounts.
    pub fn try_from_dollars_f64(dollars: f64) -> Option<Self> {
        if !dollars.is_finite() || dollars < 0.0 {
            return None;
        }
        let nanos = (dollars * NANOS_PER_DOLLAR as f64).round();
        if nanos >= u64::MAX as f64 {
            return None;
        }
        Some(Cost(nanos as u64))
    }

    /// Nano-dollars.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Dollars as a float, for display and reports only.
    pub fn as_dollars_f64(self) -> f64 {
        self.0 as f64 / NANOS_PER_DOLLAR as f64
    }

    /// `self + other`, saturating at [`Cost::MAX`].
    pub const fn saturating_add(self, other: Cost) -> Cost {
        Cost(self.0.saturating_add(other.0))
    }

    /// `self - other`, saturating at zero.
    pub const fn saturating_sub(self, other: Cost) -> Cost {
        Cost(self.0.saturating_sub(other.0))
    }

    /// Whether this is zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, rhs: Cost) -> Cost {
        self.saturating_add(rhs)
    }
}

impl AddAssign for Cost {
    fn add_assign(&mut self, rhs: Cost) {
        *self = self.saturating_add(rhs);
    }
}

impl Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::ZERO, Add::add)
    }
}

impl fmt::Display for Cost {
    /// Dollars with six decimals (micro-dollar precision), e.g. `$0.000150`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dollars = self.0 / NANOS_PER_DOLLAR;
        let micros = (self.0 % NANOS_PER_DOLLAR) / 1_000;
        write!(f, "${dollars}.{micros:06}")
    }
}

impl Serialize for Cost {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Cost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(Cost)
    }
}

/// A price per million tokens, held as nano-dollars per million tokens.
///
/// In configuration files a price is written in dollars per million tokens
/// (`input_per_mtok = 2.5`); it is converted once, at load time, to an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Price(u64);

impl Price {
    /// Free.
    pub const ZERO: Price = Price(0);

    /// From dollars per million tokens (`2.5` for $2.50 / 1M). `None` if negative or
    /// not finite.
    pub fn per_mtok(dollars: f64) -> Option<Self> {
        Cost::try_from_dollars_f64(dollars).map(|c| Price(c.0))
    }

    /// From nano-dollars per million tokens.
    pub const fn from_nanos_per_mtok(nanos: u64) -> Self {
        Price(nanos)
    }

    /// Nano-dollars per million tokens.
    pub const fn nanos_per_mtok(self) -> u64 {
        self.0
    }

    /// Dollars per million tokens, for display.
    pub fn dollars_per_mtok(self) -> f64 {
        Cost(self.0).as_dollars_f64()
    }

    /// The cost of `tokens` tokens at this price, rounded up to the next nano-dollar
    /// so that sums never under-count.
    pub fn cost_of(self, tokens: u64) -> Cost {
        // In 64 bits whenever the product fits (any real count at any real price), where
        // dividing by a constant is a multiplication; a 128-bit division is a call to a
        // routine that divides in hardware, tens of cycles, on every request.
        if let Some(n) = tokens.checked_mul(self.0) {
            return Cost(n.div_ceil(1_000_000));
        }
        let c = (u128::from(tokens) * u128::from(self.0)).div_ceil(1_000_000);
        Cost(u64::try_from(c).unwrap_or(u64::MAX))
    }
}

impl Serialize for Price {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.dollars_per_mtok())
    }
}

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Price::per_mtok(v).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "price must be a finite, non-negative number of dollars per million tokens, got {v}"
            ))
        })
    }
}

/// The prices of a model.
///
/// Prompt-cache writes are priced from `cache_write_per_mtok` (five-minute lifetime) and
/// `cache_write_1h_per_mtok` (one hour); unset, they are 1.25× and 2× the input price,
/// Anthropic's published multipliers. Reads are `cached_input_per_mtok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Pricing {
    /// Per million input tokens not read from the provider's prompt cache.
    #[serde(rename = "input_per_mtok")]
    pub input: Price,
    /// Per million output tokens.
    #[serde(rename = "output_per_mtok")]
    pub output: Price,
    /// Per million input tokens read from the provider's prompt cache.
    #[serde(rename = "cached_input_per_mtok")]
    pub cached_input: Price,
    /// Per million input tokens written to the provider's prompt cache with a
    /// five-minute lifetime (unset: 1.25× `input`).
    #[serde(
        rename = "cache_write_per_mtok",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_write: Option<Price>,
    /// Per million input tokens written with a one-hour lifetime (unset: 2× `input`).
    #[serde(
        rename = "cache_write_1h_per_mtok",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_write_1h: Option<Price>,
}

impl Pricing {
    /// Prices in dollars per million tokens. `None` if any is negative or not finite.
    pub fn per_mtok(input: f64, output: f64, cached_input: f64) -> Option<Self> {
        Some(Pricing {
            input: Price::per_mtok(input)?,
            output: Price::per_mtok(output)?,
            cached_input: Price::per_mtok(cached_input)?,
            cache_write: None,
            cache_write_1h: None,
        })
    }

    /// Sets the prompt-cache write prices, in dollars per million tokens (five-minute
    /// and one-hour lifetimes). `None` if either is negative or not finite.
    pub fn with_cache_writes(mut self, five_minutes: f64, one_hour: f64) -> Option<Self> {
        self.cache_write = Some(Price::per_mtok(five_minutes)?);
        self.cache_write_1h = Some(Price::per_mtok(one_hour)?);
        Some(self)
    }

    /// The price of a five-minute prompt-cache write: the one set, else 1.25× input.
    pub fn cache_write_price(&self) -> Price {
        self.cache_write
            .unwrap_or(Price(self.input.0.saturating_mul(5) / 4))
    }

    /// The price of a one-hour prompt-cache write: the one set, else 2× input.
    pub fn cache_write_1h_price(&self) -> Price {
        self.cache_write_1h
            .unwrap_or(Price(self.input.0.saturating_mul(2)))
    }

    /// The cost of `usage`. `usage.input_tokens` includes the prompt-cache reads, priced
    /// at the cached-input price, and the prompt-cache writes, priced at the write
    /// prices; the rest at the input price.
    pub fn cost(&self, usage: &Usage) -> Cost {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let writes = usage.cache_write_tokens.min(usage.input_tokens - cached);
        let writes_1h = usage.cache_write_1h_tokens.min(writes);
        self.input.cost_of(usage.input_tokens - cached - writes)
            + self.cached_input.cost_of(cached)
            + self.cache_write_price().cost_of(writes - writes_1h)
            + self.cache_write_1h_price().cost_of(writes_1h)
            + self.output.cost_of(usage.output_tokens)
    }

    /// What `usage` would have cost with no provider prompt cache: every input token at
    /// the input price.
    pub fn cost_without_prompt_cache(&self, usage: &Usage) -> Cost {
        self.input.cost_of(usage.input_tokens) + self.output.cost_of(usage.output_tokens)
    }

    /// What the provider's prompt cache saved on `usage`, in nano-dollars: reads' discount
    /// less writes' premium. Negative when a call wrote more than it read.
    pub fn prompt_cache_saving(&self, usage: &Usage) -> i128 {
        i128::from(self.cost_without_prompt_cache(usage).as_nanos())
            - i128::from(self.cost(usage).as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_exact_integers() {
        let p = Pricing::per_mtok(2.5, 10.0, 1.25).unwrap();
        assert_eq!(p.input.nanos_per_mtok(), 2_500_000_000);
        let u = Usage {
            input_tokens: 1_000,
            output_tokens: 500,
            cached_input_tokens: 200,
            cache_write_tokens: 0,
            cache_write_1h_tokens: 0,
            estimated: false,
        };
        // 800 * 2.5/1M + 200 * 1.25/1M + 500 * 10/1M = 0.002 + 0.00025 + 0.005
        assert_eq!(p.cost(&u), Cost::from_nanos(7_250_000));
        assert_eq!(p.cost(&u).to_string(), "$0.007250");
        // rounding is up, never down
        assert_eq!(
            Price::per_mtok(0.15).unwrap().cost_of(1),
            Cost::from_nanos(150)
        );
        assert_eq!(
            Price::from_nanos_per_mtok(1).cost_of(1),
            Cost::from_nanos(1)
        );
        assert!(Price::per_mtok(-1.0).is_none());
        assert!(Price::per_mtok(f64::NAN).is_none());
    }

    proptest::proptest! {
        /// The 64-bit path and the 128-bit one agree wherever the product fits, and a
        /// product past 64 bits still rounds up (or saturates) exactly.
        #[test]
        fn cost_of_is_the_exact_product_rounded_up(
            tokens in proptest::prop_oneof![0..10_000_000u64, proptest::num::u64::ANY],
            nanos in proptest::prop_oneof![0..100_000_000_000u64, proptest::num::u64::ANY],
        ) {
            let exact = (u128::from(tokens) * u128::from(nanos)).div_ceil(1_000_000);
            let want = Cost::from_nanos(u64::try_from(exact).unwrap_or(u64::MAX));
            proptest::prop_assert_eq!(Price::from_nanos_per_mtok(nanos).cost_of(tokens), want);
        }
    }

    #[test]
    fn cost_of_at_the_edges_of_64_bits() {
        let p = Price::from_nanos_per_mtok(u64::MAX);
        assert_eq!(p.cost_of(0), Cost::ZERO);
        assert_eq!(p.cost_of(1), Cost::from_nanos(u64::MAX.div_ceil(1_000_000)));
        assert_eq!(p.cost_of(1_000_000), Cost::from_nanos(u64::MAX));
        assert_eq!(p.cost_of(u64::MAX), Cost::from_nanos(u64::MAX), "saturates");
        // the largest product that fits, and the first that does not
        let fits = Price::from_nanos_per_mtok(u64::MAX / 3);
        assert_eq!(
            fits.cost_of(3),
            Cost::from_nanos((u64::MAX / 3 * 3).div_ceil(1_000_000))
        );
        let over = u128::from(u64::MAX / 3) * 4;
        assert_eq!(
            fits.cost_of(4),
            Cost::from_nanos(u64::try_from(over.div_ceil(1_000_000)).unwrap())
        );
    }

    #[test]
    fn prompt_cache_writes_and_reads_are_priced_apart() {
        // $3 in, $15 out, $0.30 cached: writes default to $3.75 (5 min) and $6 (1 h)
        let p = Pricing::per_mtok(3.0, 15.0, 0.30).unwrap();
        assert_eq!(p.cache_write_price(), Price::per_mtok(3.75).unwrap());
        assert_eq!(p.cache_write_1h_price(), Price::per_mtok(6.0).unwrap());
        // 10,000 prompt tokens: 6,000 read, 3,000 written (1,000 of them for an hour)
        let u = Usage::new(10_000, 100)
            .with_cached_input(6_000)
            .with_cache_writes(2_000, 1_000);
        // 1,000 * 3 + 6,000 * 0.3 + 2,000 * 3.75 + 1,000 * 6 + 100 * 15, per million
        let nanos = 3_000_000 + 1_800_000 + 7_500_000 + 6_000_000 + 1_500_000;
        assert_eq!(p.cost(&u), Cost::from_nanos(nanos));
        assert_eq!(
            p.cost_without_prompt_cache(&u),
            Cost::from_nanos(30_000_000 + 1_500_000)
        );
        assert_eq!(p.prompt_cache_saving(&u), 31_500_000 - i128::from(nanos));
        // a pure write costs more than no cache
        let w = Usage::new(4_000, 0).with_cache_writes(4_000, 0);
        assert_eq!(p.prompt_cache_saving(&w), -3_000_000);
        // explicit catalogue prices win
        let q = p.with_cache_writes(4.0, 7.0).unwrap();
        assert_eq!(q.cost(&w), Cost::from_nanos(16_000_000));
        assert!(p.with_cache_writes(-1.0, 1.0).is_none());
        // counts beyond the prompt are clamped, never underflow
        let odd = Usage::new(10, 0)
            .with_cached_input(8)
            .with_cache_writes(50, 50);
        assert_eq!(p.cost(&odd), Cost::from_nanos(8 * 300 + 2 * 6_000));
    }
}
