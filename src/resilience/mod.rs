//! Resilience: retries with backoff inside a retry budget, circuit breakers, hedging,
//! and bounded, adaptive concurrency.
//!
//! The pipeline's dispatch stage uses them in this order, per target of the route:
//! breaker (open: skip to the next target at once) → per-model quota → call with its
//! deadline → on a retryable failure, wait (Retry-After or jittered backoff) and retry
//! while the attempt count, the retry budget and the request's deadline allow → else the
//! next target. With hedging, a slow first target is raced against the next one.

mod breaker;
mod concurrency;
mod hedge;
mod retry;

pub(crate) use breaker::Admit;
pub use breaker::{BreakerConfig, BreakerState, Breakers};
pub(crate) use concurrency::Slot;
pub use concurrency::{Concurrency, ConcurrencyConfig};
pub use hedge::Hedge;
pub(crate) use hedge::Latencies;
pub use retry::{RetryBudget, RetryPolicy};
