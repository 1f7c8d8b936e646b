//! Admission and spend on the hot path: the in-memory GCRA check over three scopes
//! (with governor's keyed limiter measured alongside), and a budget reserve + commit.
//!
//! ```text
//! cargo bench --bench admission
//! ```

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{Criterion, criterion_group, criterion_main};
use governor::{Quota as GQuota, RateLimiter};
use tokenwise::budget::{BudgetWindow, MemoryBudget};
use tokenwise::limiter::GcraLimiter;
use tokenwise::{Cost, RequestMeta, ScopeKind};

fn meta() -> RequestMeta {
    let mut m = RequestMeta::default();
    m.user = Some("user-4821".into());
    m.org = Some("org-17".into());
    m
}

fn bench(c: &mut Criterion) {
    let meta = meta();
    // Quotas far above the benchmark's rate, so every check admits and consumes.
    let limiter = GcraLimiter::builder()
        .requests_per_minute(ScopeKind::User, 1_000_000_000)
        .requests_per_minute(ScopeKind::Org, 1_000_000_000)
        .requests_per_minute(ScopeKind::Global, 1_000_000_000)
        .build()
        .expect("valid limiter");
    c.bench_function("tokenwise_gcra_check_three_scopes", |b| {
        b.iter(|| limiter.check(black_box(&meta), 0).expect("admitted"))
    });
    let per_second = NonZeroU32::new(1_000_000_000).expect("non-zero");
    let users = RateLimiter::keyed(GQuota::per_second(per_second));
    let orgs = RateLimiter::keyed(GQuota::per_second(per_second));
    let global = RateLimiter::direct(GQuota::per_second(per_second));
    let (user, org) = ("user-4821".to_owned(), "org-17".to_owned());
    c.bench_function("governor_keyed_check_three_scopes", |b| {
        b.iter(|| {
            // governor checks each limiter on its own: no all-or-nothing across scopes
            let a = users.check_key(black_box(&user)).is_ok();
            let o = orgs.check_key(black_box(&org)).is_ok();
            let g = global.check().is_ok();
            assert!(a && o && g);
        })
    });

    let budget = MemoryBudget::builder()
        .cap(ScopeKind::User, Cost::MAX, BudgetWindow::Day)
        .cap(ScopeKind::Org, Cost::MAX, BudgetWindow::Month)
        .cap(ScopeKind::Global, Cost::MAX, BudgetWindow::Month)
        .build()
        .expect("valid budget");
    c.bench_function("tokenwise_budget_reserve_commit_three_caps", |b| {
        b.iter(|| {
            let r = budget
                .reserve_now(black_box(&meta), Cost::from_micros(3))
                .expect("reserved");
            budget.commit_now(&r, Cost::from_micros(2));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
