//! Limits and caps hold under random interleavings of 1,000 concurrent requests.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokenwise::budget::{BudgetWindow, MemoryBudget};
use tokenwise::limiter::{GcraLimiter, Quota};
use tokenwise::provider::SimulatedProvider;
use tokenwise::{
    ChatRequest, Clock, Cost, Error, ManualClock, Pipeline, RequestMeta, ScopeKind, Timestamp,
};

fn meta(user: usize, org: usize) -> RequestMeta {
    let mut m = RequestMeta::default();
    m.user = Some(format!("u{user}"));
    m.org = Some(format!("o{org}"));
    m
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// 1,000 concurrent reserve → (yield) → commit cycles on four threads: committed
    /// spend never passes a cap (actual cost never exceeds the reservation, as worst-case
    /// estimates guarantee), nothing stays reserved, and every admitted cost is counted.
    #[test]
    fn spend_never_exceeds_a_cap(
        requests in prop::collection::vec((0usize..8, 1u64..2_000, 0u64..=100, 0u32..3), 1_000),
        user_cap in 2_000u64..20_000,
        org_cap in 10_000u64..60_000,
        global_cap in 50_000u64..200_000,
    ) {
        let budget = MemoryBudget::builder()
            .cap(ScopeKind::User, Cost::from_nanos(user_cap), BudgetWindow::Day)
            .cap(ScopeKind::Org, Cost::from_nanos(org_cap), BudgetWindow::Day)
            .cap(ScopeKind::Global, Cost::from_nanos(global_cap), BudgetWindow::Day)
            .build()
            .unwrap();
        let admitted: u64 = runtime().block_on(async {
            let mut tasks = Vec::new();
            for (user, worst, pct, yields) in requests.clone() {
                let budget = budget.clone();
                tasks.push(tokio::spawn(async move {
                    let m = meta(user, user % 3);
                    match budget.reserve_now(&m, Cost::from_nanos(worst)) {
                        Ok(r) => {
                            for _ in 0..yields {
                                tokio::task::yield_now().await;
                            }
                            let actual = worst * pct / 100;
                            budget.commit_now(&r, Cost::from_nanos(actual));
                            actual
                        }
                        Err(Error::BudgetExceeded { .. }) => 0,
                        Err(e) => panic!("unexpected {e}"),
                    }
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        });
        let global = &budget.status_now(&meta(0, 0))[2];
        prop_assert_eq!(global.reserved, Cost::ZERO);
        prop_assert_eq!(global.spent, Cost::from_nanos(admitted));
        prop_assert!(global.spent <= Cost::from_nanos(global_cap));
        for user in 0..8 {
            let st = budget.status_now(&meta(user, user % 3));
            prop_assert!(st[0].spent <= st[0].limit, "user {} {:?}", user, st[0]);
            prop_assert!(st[1].spent <= st[1].limit, "org {:?}", st[1]);
            prop_assert_eq!(st[0].reserved, Cost::ZERO);
        }
    }

    /// A random interleaving of 1,000 requests from several users at random times:
    /// in every window of one period, no key is admitted more than its burst plus one
    /// period's amount, and global never more than its own.
    #[test]
    fn the_limiter_never_admits_more_than_quota_plus_burst(
        arrivals in prop::collection::vec((0usize..5, 0u64..120_000), 1_000),
        per_minute in 5u64..60,
        burst in 1u64..20,
    ) {
        let clock = ManualClock::new(Timestamp::from_secs(1_000_000));
        let nz = |n: u64| std::num::NonZeroU64::new(n).unwrap();
        let limiter = GcraLimiter::builder()
            .requests(ScopeKind::User, Quota::per_minute(nz(per_minute)).allow_burst(nz(burst)))
            .requests(ScopeKind::Global, Quota::per_minute(nz(per_minute * 3)).allow_burst(nz(burst * 2)))
            .clock(Arc::new(clock.clone()))
            .build()
            .unwrap();
        let mut arrivals = arrivals;
        arrivals.sort_by_key(|(_, at)| *at);
        let start = clock.now();
        let mut admitted: Vec<(usize, u64)> = Vec::new();
        for (user, at_ms) in arrivals {
            clock.set(start.saturating_add(Duration::from_millis(at_ms)));
            if limiter.check(&meta(user, 0), 0).is_ok() {
                admitted.push((user, at_ms));
            }
        }
        let period = 60_000u64;
        for &(_, t0) in &admitted {
            let in_window = |u: Option<usize>| admitted.iter()
                .filter(|(w, t)| *t >= t0 && *t < t0 + period && u.is_none_or(|u| u == *w))
                .count() as u64;
            prop_assert!(in_window(None) <= per_minute * 3 + burst * 2);
            for user in 0..5 {
                prop_assert!(in_window(Some(user)) <= per_minute + burst, "user {}", user);
            }
        }
    }
}

/// Four threads hammer one key with a frozen clock: exactly the burst is admitted.
#[test]
fn concurrent_checks_admit_exactly_the_burst() {
    let clock = ManualClock::new(Timestamp::from_secs(1_000_000));
    let limiter = GcraLimiter::builder()
        .requests_per_minute(ScopeKind::User, 100)
        .requests_per_minute(ScopeKind::Global, 1_000)
        .clock(Arc::new(clock))
        .build()
        .unwrap();
    let admitted = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..250 {
                    if limiter.check(&meta(1, 1), 0).is_ok() {
                        admitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.into_inner(), 100);
}

/// 1,000 concurrent requests through a pipeline, interleaved by simulated latency:
/// the user's cap holds and nothing stays reserved.
#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_pipeline_requests_respect_the_cap() {
    let pipe = Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model("gpt-4o")
        .spend_cap(
            ScopeKind::User,
            Cost::from_micros(20_000),
            BudgetWindow::Day,
        )
        .no_cache()
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let pipe = pipe.clone();
        tasks.push(tokio::spawn(async move {
            pipe.chat(
                ChatRequest::user_text(format!("question {i}"))
                    .user("ann")
                    .max_tokens(100),
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::BudgetExceeded { .. }) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(ok > 0 && refused > 0, "{ok} served, {refused} refused");
    let st = &pipe
        .budget_status(&ChatRequest::new().user("ann").meta)
        .await
        .unwrap()[0];
    assert!(st.spent <= st.limit, "{st:?}");
    assert_eq!(st.reserved, Cost::ZERO);
    assert_eq!(pipe.usage().totals.cost, st.spent);
}
