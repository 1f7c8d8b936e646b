//! Each layer's overhead and the whole pipeline's, against an instant provider.
//!
//! ```text
//! cargo bench --bench pipeline
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use criterion::{Criterion, criterion_group, criterion_main};
use tokenwise::budget::{BudgetLayer, BudgetWindow, MemoryBudget};
use tokenwise::cache::{CacheLayer, CacheScope, ExactCache};
use tokenwise::limiter::{GcraLimiter, RateLimitLayer};
use tokenwise::observe::{MemoryUsage, ObserveLayer};
use tokenwise::provider::{Provider, ProviderCall, ProviderService};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, ChatStream, Cost, FinishReason, Pipeline, ScopeKind, Usage,
};
use tower::{Service, ServiceExt};

#[derive(Debug, Clone, Copy)]
struct Instant0;

#[async_trait]
impl Provider for Instant0 {
    fn name(&self) -> &str {
        "openai"
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        Ok(ChatResponse::new(
            "A short answer.",
            &call.model.name,
            "openai",
            Usage::new(40, 20),
            FinishReason::Stop,
        ))
    }

    async fn stream(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        Err(tokenwise::Error::InvalidRequest("not used".into()))
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique() -> ChatRequest {
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    ChatRequest::user_text(format!("Where is my order number {i}?"))
        .model("gpt-4o-mini")
        .user("ann")
        .org("acme")
        .max_tokens(200)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let catalog = Catalog::builtin();
    let model = catalog.require("gpt-4o-mini").expect("model").clone();
    let mut g = c.benchmark_group("layers");

    g.bench_function("bare_provider_call", |b| {
        b.iter(|| {
            let req = unique();
            rt.block_on(async { black_box(Instant0.chat(ProviderCall::new(&req, &model)).await) })
        })
    });
    let svc = ProviderService::new(Instant0, catalog.clone());
    g.bench_function("provider_service", |b| {
        b.iter(|| rt.block_on(svc.clone().oneshot(unique())))
    });
    let limiter = Arc::new(
        GcraLimiter::builder()
            .requests_per_minute(ScopeKind::User, 1_000_000_000)
            .build()
            .expect("limiter"),
    );
    let limited = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(limiter, catalog.clone()))
        .service(ProviderService::new(Instant0, catalog.clone()));
    g.bench_function("rate_limit_layer", |b| {
        b.iter(|| rt.block_on(limited.clone().oneshot(unique())))
    });
    let cached = tower::ServiceBuilder::new()
        .layer(CacheLayer::new(
            Arc::new(
                ExactCache::builder()
                    .max_entries(1_000_000)
                    .build()
                    .expect("cache"),
            ),
            CacheScope::Org,
        ))
        .service(ProviderService::new(Instant0, catalog.clone()));
    g.bench_function("cache_layer_miss", |b| {
        b.iter(|| rt.block_on(cached.clone().oneshot(unique())))
    });
    let budget = Arc::new(
        MemoryBudget::builder()
            .cap(
                ScopeKind::User,
                Cost::from_dollars(1_000_000),
                BudgetWindow::Day,
            )
            .build()
            .expect("budget"),
    );
    let budgeted = tower::ServiceBuilder::new()
        .layer(BudgetLayer::new(budget, catalog.clone()))
        .service(ProviderService::new(Instant0, catalog.clone()));
    g.bench_function("budget_layer", |b| {
        b.iter(|| rt.block_on(budgeted.clone().oneshot(unique())))
    });
    let observed = tower::ServiceBuilder::new()
        .layer(ObserveLayer::new(Arc::new(MemoryUsage::default())))
        .service(ProviderService::new(Instant0, catalog.clone()));
    g.bench_function("observe_layer", |b| {
        b.iter(|| rt.block_on(observed.clone().oneshot(unique())))
    });
    g.finish();

    let pipe = Pipeline::builder()
        .provider(Instant0)
        .default_model("gpt-4o-mini")
        .rate_limit(ScopeKind::User, 1_000_000_000)
        .token_limit(ScopeKind::Global, 1_000_000_000)
        .spend_cap(
            ScopeKind::User,
            Cost::from_dollars(1_000_000),
            BudgetWindow::Day,
        )
        .exact_cache(1_000_000, Duration::from_secs(3_600))
        .build()
        .expect("pipeline");
    let mut g = c.benchmark_group("pipeline");
    g.bench_function("miss", |b| b.iter(|| rt.block_on(pipe.chat(unique()))));
    let hot = unique();
    rt.block_on(pipe.chat(hot.clone())).expect("warm");
    g.bench_function("hit", |b| {
        b.iter(|| {
            let r = rt.block_on(pipe.chat(hot.clone())).expect("hit");
            assert!(r.served.is_cache_hit());
        })
    });
    let mut tower_pipe = pipe.clone();
    g.bench_function("miss_as_tower_service", |b| {
        b.iter(|| rt.block_on(async { tower_pipe.ready().await?.call(unique()).await }))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
