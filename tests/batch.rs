//! The batch path on the simulated batch API, on paused tokio time: cache first,
//! splitting, per-item failures, expiry and its one retry, spend, usage, resume,
//! cache warming and deferrable requests.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokenwise::batch::{
    BatchCall, BatchLimits, BatchProvider, BatchResults, BatchStatus, SimulatedBatch,
    SimulatedBatchBuilder,
};
use tokenwise::budget::BudgetWindow;
use tokenwise::context::{ContextBudget, ModelSummarizer, TiktokenCounter, TokenCounter};
use tokenwise::provider::SimulatedProvider;
use tokenwise::{
    BatchJournal, BatchOptions, BatchOutcome, Catalog, ChatRequest, Cost, Error, Message,
    ModelSpec, Pipeline, PipelineBuilder, Pricing, ProviderErrorKind, ScopeKind, TokenizerKind,
    WarmOptions,
};

const MODEL: &str = "gpt-4o-mini";

fn sim_batch() -> SimulatedBatchBuilder {
    SimulatedBatch::builder()
        .name("openai")
        .latency(Duration::from_secs(600))
}

fn options() -> BatchOptions {
    let mut o = BatchOptions::default();
    o.poll_interval = Duration::from_secs(30);
    o
}

fn pipeline(live: &SimulatedProvider, batch: &SimulatedBatch) -> Pipeline {
    batching_pipeline(live, batch, options())
        .spend_cap(ScopeKind::User, Cost::from_dollars(10), BudgetWindow::Day)
        .build()
        .unwrap()
}

fn questions(n: usize) -> Vec<ChatRequest> {
    (0..n)
        .map(|i| {
            ChatRequest::user_text(format!("Summarise ticket number {i}"))
                .user("nightly")
                .max_tokens(200)
        })
        .collect()
}

/// Every index exactly once.
fn check_once(outcomes: &[BatchOutcome], n: usize) {
    assert_eq!(outcomes.len(), n, "one outcome per item");
    let idx: HashSet<usize> = outcomes.iter().map(|o| o.index).collect();
    assert_eq!(idx.len(), n, "no item answered twice");
    let keys: HashSet<&str> = outcomes.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys.len(), n);
}

fn provider_kind(e: &Error) -> ProviderErrorKind {
    e.as_provider()
        .unwrap_or_else(|| panic!("not a provider error: {e:?}"))
        .kind
}

#[tokio::test(start_paused = true)]
async fn answers_every_item_at_half_the_live_cost_and_caches_them() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&live, &batch);
    let mut handle = p.batch(questions(6)).await.unwrap();
    assert_eq!(handle.progress().total, 6);
    let mut outcomes = Vec::new();
    while let Some(o) = handle.next().await {
        outcomes.push(o);
    }
    check_once(&outcomes, 6);
    assert_eq!(batch.batches_submitted(), 1);
    assert_eq!(batch.requests_submitted(), 6);
    assert_eq!(live.calls(), 0, "nothing went the live way");
    let progress = handle.progress();
    assert!(progress.is_done());
    assert_eq!(
        (progress.answered, progress.sent, progress.open_batches),
        (6, 6, 0)
    );

    // the same requests live cost twice as much (the simulated answers are the same)
    let mut batch_cost = Cost::ZERO;
    for o in &outcomes {
        let r = o.result.as_ref().unwrap();
        assert!(!r.served.is_cache_hit());
        batch_cost += r.cost;
    }
    assert_eq!(batch_cost, progress.cost);
    let live_p = Pipeline::builder()
        .provider(SimulatedProvider::new())
        .default_model(MODEL)
        .build()
        .unwrap();
    let mut live_cost = Cost::ZERO;
    for q in questions(6) {
        live_cost += live_p.chat(q).await.unwrap().cost;
    }
    let ratio = batch_cost.as_nanos() as f64 / live_cost.as_nanos() as f64;
    assert!((0.49..=0.51).contains(&ratio), "batch/live = {ratio}");

    // spend committed at batch prices, nothing left reserved; usage recorded per item
    let st = p
        .budget_status(&ChatRequest::user_text("").user("nightly").meta)
        .await
        .unwrap();
    assert_eq!((st[0].spent, st[0].reserved), (batch_cost, Cost::ZERO));
    assert_eq!(p.recent_usage().len(), 6);
    assert_eq!(p.usage().totals.cost, batch_cost);
    assert_eq!(p.usage().totals.requests, 6);

    // answers were stored: asked again, they come from the cache
    let again = p.chat(questions(6).remove(3)).await.unwrap();
    assert!(again.served.is_cache_hit());
    assert_eq!(live.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn cached_items_are_answered_at_once_and_never_sent() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&live, &batch);
    let qs = questions(4);
    p.chat(qs[1].clone()).await.unwrap();
    p.chat(qs[2].clone()).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut handle = p.batch(qs).await.unwrap();
    // the two hits come before any batch could end
    let first = handle.next().await.unwrap();
    let second = handle.next().await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let hits: HashSet<usize> = [first.index, second.index].into();
    assert_eq!(hits, [1, 2].into());
    assert!(first.result.unwrap().served.is_cache_hit());
    let rest = handle.collect().await;
    check_once(&rest, 2);
    assert_eq!(batch.requests_submitted(), 2, "cached items are never sent");
}

#[tokio::test(start_paused = true)]
async fn oversized_calls_are_split_by_count_and_by_bytes() {
    let live = SimulatedProvider::new();
    let batch = sim_batch()
        .limits(BatchLimits::new(3, 1_000_000))
        .build()
        .unwrap();
    let p = pipeline(&live, &batch);
    let out = p.batch(questions(10)).await.unwrap().collect().await;
    check_once(&out, 10);
    assert!(out.iter().all(|o| o.result.is_ok()));
    assert_eq!(batch.batches_submitted(), 4);
    assert_eq!(batch.requests_submitted(), 10);

    // by bytes: each encoded request is a few hundred bytes
    let batch = sim_batch()
        .limits(BatchLimits::new(1_000, 1_200))
        .build()
        .unwrap();
    let p = pipeline(&live, &batch);
    let out = p.batch(questions(10)).await.unwrap().collect().await;
    check_once(&out, 10);
    assert!(out.iter().all(|o| o.result.is_ok()));
    assert!(
        batch.batches_submitted() >= 3,
        "{}",
        batch.batches_submitted()
    );

    // one request larger than a whole batch is its own error, the others go on
    let mut qs = questions(3);
    qs[1] = ChatRequest::user_text("word ".repeat(400)).user("nightly");
    let out = p.batch(qs).await.unwrap().collect().await;
    check_once(&out, 3);
    assert!(matches!(out[1].result, Err(Error::InvalidRequest(_))));
    assert!(out[0].result.is_ok() && out[2].result.is_ok());
}

#[tokio::test(start_paused = true)]
async fn failed_and_malformed_lines_become_per_item_errors() {
    let live = SimulatedProvider::new();
    let batch = sim_batch()
        .fail_every(4)
        .malformed_every(5)
        .build()
        .unwrap();
    let p = pipeline(&live, &batch);
    let out = p.batch(questions(10)).await.unwrap().collect().await;
    check_once(&out, 10);
    for o in &out {
        let nth = o.index + 1;
        match &o.result {
            Ok(_) => assert!(nth % 4 != 0 && nth % 5 != 0, "item {nth}"),
            Err(e) if nth % 5 == 0 => {
                assert_eq!(provider_kind(e), ProviderErrorKind::InvalidResponse)
            }
            Err(e) => {
                assert_eq!(nth % 4, 0);
                assert_eq!(provider_kind(e), ProviderErrorKind::BadRequest);
            }
        }
    }
    // failures release their reservation and cost nothing
    let st = p
        .budget_status(&ChatRequest::user_text("").user("nightly").meta)
        .await
        .unwrap();
    assert_eq!(st[0].reserved, Cost::ZERO);
    assert_eq!(p.usage().totals.errors, 4);
}

#[tokio::test(start_paused = true)]
async fn an_expired_batch_sends_its_unfinished_items_once_more() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().expire_first(1).build().unwrap();
    let p = pipeline(&live, &batch);
    let out = p.batch(questions(6)).await.unwrap().collect().await;
    check_once(&out, 6);
    assert!(out.iter().all(|o| o.result.is_ok()), "{out:?}");
    assert_eq!(batch.batches_submitted(), 2);
    assert_eq!(batch.requests_submitted(), 9, "6, then the 3 that expired");
    // a retried item says it took two attempts
    let retried = out[1].result.as_ref().unwrap();
    assert!(matches!(
        retried.served,
        tokenwise::Served::Provider { attempts: 2, .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn items_that_expire_twice_are_reported_not_lost() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().expire_first(2).build().unwrap();
    let p = pipeline(&live, &batch);
    let out = p.batch(questions(6)).await.unwrap().collect().await;
    check_once(&out, 6);
    assert_eq!(batch.batches_submitted(), 2, "retried once only");
    // first batch: 0, 2, 4 answered; 1, 3, 5 resent as a batch of three, in which
    // positions 0 and 2 (items 1 and 5) are answered and item 3 expires again
    for o in &out {
        match o.index {
            3 => assert_eq!(
                provider_kind(o.result.as_ref().unwrap_err()),
                ProviderErrorKind::Timeout
            ),
            _ => assert!(o.result.is_ok(), "item {}", o.index),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_batch_quota_holds_later_batches_until_earlier_ones_end() {
    let live = SimulatedProvider::new();
    let batch = sim_batch()
        .limits(BatchLimits::new(2, 1_000_000))
        .build()
        .unwrap();
    let mut o = options();
    // two requests' worth of tokens (prompt + 200 output each)
    o.max_enqueued_tokens = Some(450);
    let p = batching_pipeline(&live, &batch, o).build().unwrap();
    let start = tokio::time::Instant::now();
    let mut handle = p.batch(questions(6)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(batch.batches_submitted(), 1, "the quota holds the rest");
    let out = std::mem::replace(&mut handle, p.batch(Vec::new()).await.unwrap())
        .collect()
        .await;
    check_once(&out, 6);
    assert_eq!(batch.batches_submitted(), 3);
    assert!(
        start.elapsed() >= Duration::from_secs(1800),
        "one after another"
    );
    assert!(handle.collect().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stopped_call_resumes_from_its_journal_without_resubmitting() {
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&SimulatedProvider::new(), &batch);
    let qs = questions(5);
    p.chat(qs[0].clone()).await.unwrap();
    let mut handle = p.batch(qs).await.unwrap();
    let hit = handle.next().await.unwrap();
    assert_eq!(hit.index, 0);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(batch.batches_submitted(), 1);
    let journal = handle.stop().await;
    // nothing stays reserved for the stopped items
    let st = p
        .budget_status(&ChatRequest::user_text("").user("nightly").meta)
        .await
        .unwrap();
    assert_eq!(st[0].reserved, Cost::ZERO);

    // persisted and read back, as after a restart, by a new process's pipeline
    let text = serde_json::to_string(&journal).unwrap();
    let journal: BatchJournal = serde_json::from_str(&text).unwrap();
    assert_eq!(journal.batches.len(), 1);
    assert!(journal.items[0].done && !journal.items[1].done);
    let p2 = pipeline(&SimulatedProvider::new(), &batch);
    let handle = p2.resume_batch(journal).await.unwrap();
    assert_eq!(handle.progress().total, 4);
    let out = handle.collect().await;
    assert_eq!(out.len(), 4);
    assert_eq!(
        out.iter().map(|o| o.index).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(out.iter().all(|o| o.result.is_ok()));
    assert_eq!(batch.batches_submitted(), 1, "nothing submitted again");
    assert_eq!(batch.requests_submitted(), 4);
    // and the resumed pipeline stored the answers
    assert!(
        p2.chat(questions(5).remove(2))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
}

#[tokio::test(start_paused = true)]
async fn bad_input_and_missing_setup_are_typed_errors() {
    let live = SimulatedProvider::new();
    let no_batch = Pipeline::builder()
        .provider(live.clone())
        .default_model(MODEL)
        .build()
        .unwrap();
    assert!(matches!(
        no_batch.batch(questions(1)).await,
        Err(Error::Config(_))
    ));
    // a model of a provider without a batch API fails alone
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&live, &batch);
    let mut qs = questions(2);
    qs[0] = qs[0].clone().model("claude-haiku-4-5");
    qs.push(ChatRequest::new().user("nightly")); // no messages
    qs.push(questions(4).remove(3).max_cost(Cost::from_nanos(1))); // cannot fit its limit
    let out = p.batch(qs).await.unwrap().collect().await;
    check_once(&out, 4);
    assert!(matches!(out[0].result, Err(Error::Config(_))));
    assert!(out[1].result.is_ok());
    assert!(matches!(out[2].result, Err(Error::InvalidRequest(_))));
    assert!(matches!(&out[3].result, Err(Error::InvalidRequest(m)) if m.contains("limit")));
    assert_eq!(batch.requests_submitted(), 1);
    let mut o = BatchOptions::default();
    o.poll_interval = Duration::ZERO;
    assert!(matches!(
        Pipeline::builder().provider(live).batch_options(o).build(),
        Err(Error::Config(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn warming_stores_answers_skips_cached_ones_and_reports_the_cost() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&live, &batch);
    let qs = questions(5);
    p.chat(qs[0].clone()).await.unwrap();
    let report = p
        .warm(qs.clone(), WarmOptions::default().concurrency(2))
        .await
        .unwrap();
    assert_eq!((report.stored, report.already_cached), (4, 1));
    assert!(report.failed.is_empty());
    assert_eq!(live.calls(), 5);
    assert!(!report.cost.is_zero());
    for q in qs.clone() {
        assert!(p.chat(q).await.unwrap().served.is_cache_hit());
    }
    // again: all cached, nothing called, nothing spent
    let report = p.warm(qs, WarmOptions::default()).await.unwrap();
    assert_eq!((report.stored, report.already_cached), (0, 5));
    assert!(report.cost.is_zero());

    // through the batch path, at half the live cost
    let more = questions(8).split_off(5);
    let live_cost = {
        let lp = Pipeline::builder()
            .provider(SimulatedProvider::new())
            .default_model(MODEL)
            .build()
            .unwrap();
        lp.warm(more.clone(), WarmOptions::default())
            .await
            .unwrap()
            .cost
    };
    let report = p
        .warm(more, WarmOptions::default().via_batch(true))
        .await
        .unwrap();
    assert_eq!(report.stored, 3);
    assert_eq!(batch.requests_submitted(), 3);
    assert_eq!(live.calls(), 5);
    let ratio = report.cost.as_nanos() as f64 / live_cost.as_nanos() as f64;
    assert!((0.49..=0.51).contains(&ratio), "{ratio}");
    let no_cache = Pipeline::builder()
        .provider(live)
        .default_model(MODEL)
        .no_cache()
        .build()
        .unwrap();
    assert!(matches!(
        no_cache.warm(questions(1), WarmOptions::default()).await,
        Err(Error::Config(_))
    ));
}

fn defer_options() -> BatchOptions {
    let mut o = options();
    o.defer_window = Duration::from_secs(60);
    o.defer_batch_size = 3;
    o.defer_turnaround = Duration::from_secs(900);
    o.defer_live_margin = Duration::from_secs(120);
    o.defer_queue = 4;
    o
}

fn defer_pipeline(live: &SimulatedProvider, batch: &SimulatedBatch) -> Pipeline {
    batching_pipeline(live, batch, defer_options())
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn deferrable_requests_are_gathered_into_one_batch() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = defer_pipeline(&live, &batch);
    let wait = Duration::from_secs(4 * 3600);
    let calls = questions(2).into_iter().map(|q| p.chat(q.deferrable(wait)));
    let start = tokio::time::Instant::now();
    let answers = futures_util::future::join_all(calls).await;
    for a in &answers {
        let a = a.as_ref().unwrap();
        assert!(!a.served.is_cache_hit());
    }
    assert_eq!(live.calls(), 0);
    assert_eq!(batch.batches_submitted(), 1, "gathered by the window");
    assert_eq!(batch.requests_submitted(), 2);
    // the window, then the batch's latency and a poll
    assert!(start.elapsed() >= Duration::from_secs(660));
    assert!(start.elapsed() < Duration::from_secs(3600));

    // a full gathering is sent at once, without waiting for the window
    let calls = questions(6)
        .split_off(3)
        .into_iter()
        .map(|q| p.chat(q.deferrable(wait)));
    let start = tokio::time::Instant::now();
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(Result::is_ok));
    assert_eq!(batch.batches_submitted(), 2);
    assert!(start.elapsed() < Duration::from_secs(660));
}

#[tokio::test(start_paused = true)]
async fn deferrable_requests_fall_back_to_a_live_call_when_a_batch_would_be_late() {
    let live = SimulatedProvider::new();
    // batches that take far longer than the caller can wait
    let batch = sim_batch()
        .latency(Duration::from_secs(5 * 3600))
        .build()
        .unwrap();
    let p = defer_pipeline(&live, &batch);
    // too short to wait for any batch: called at once
    let r = p
        .chat(questions(1).remove(0).deferrable(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(!r.served.is_cache_hit());
    assert_eq!((live.calls(), batch.requests_submitted()), (1, 0));
    // long enough to be batched, but the batch is late: the live call answers before
    // the deadline
    let wait = Duration::from_secs(3600);
    let start = tokio::time::Instant::now();
    let r = p
        .chat(questions(2).remove(1).deferrable(wait))
        .await
        .unwrap();
    assert!(start.elapsed() < wait);
    assert_eq!(r.cost, p.catalog().require(MODEL).unwrap().cost(&r.usage));
    assert_eq!((live.calls(), batch.requests_submitted()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_full_deferral_queue_refuses_with_overloaded() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let mut o = defer_options();
    o.defer_batch_size = 100;
    o.defer_queue = 2;
    let p = Pipeline::builder()
        .provider(live)
        .default_model(MODEL)
        .batch_provider(batch)
        .batch_options(o)
        .build()
        .unwrap();
    let wait = Duration::from_secs(4 * 3600);
    let qs = questions(3);
    let a = tokio::spawn({
        let p = p.clone();
        let q = qs[0].clone().deferrable(wait);
        async move { p.chat(q).await }
    });
    let b = tokio::spawn({
        let p = p.clone();
        let q = qs[1].clone().deferrable(wait);
        async move { p.chat(q).await }
    });
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let refused = p.chat(qs[2].clone().deferrable(wait)).await;
    assert!(
        matches!(refused, Err(Error::Overloaded { .. })),
        "{refused:?}"
    );
    assert!(a.await.unwrap().is_ok());
    assert!(b.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_handle_leaves_the_call_running_to_its_end() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = pipeline(&live, &batch);
    drop(p.batch(questions(3)).await.unwrap());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    // polled every 30 s until it ended after 600 s, then left alone
    let reads = batch.status_reads();
    assert!((20..=22).contains(&reads), "{reads} status reads");
    assert_eq!(batch.result_reads(), 1);
    assert_eq!(p.recent_usage().len(), 3, "recorded");
    for q in questions(3) {
        assert!(p.chat(q).await.unwrap().served.is_cache_hit(), "stored");
    }
    assert_eq!(live.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn near_a_cap_deferrable_requests_are_batched_instead_of_refused() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let build = |defer_near_cap: bool| {
        let mut o = defer_options();
        o.defer_near_cap = defer_near_cap;
        Pipeline::builder()
            .provider(live.clone())
            .default_model(MODEL)
            .batch_provider(batch.clone())
            .batch_options(o)
            .spend_cap(ScopeKind::User, Cost::from_micros(500), BudgetWindow::Day)
            .degrade_at(1, tokenwise::budget::Degrade::Refuse)
            .build()
            .unwrap()
    };
    for defer_near_cap in [false, true] {
        let p = build(defer_near_cap);
        // one small live call passes the threshold of 1 %
        p.chat(
            ChatRequest::user_text("warm up")
                .user("nightly")
                .max_tokens(50),
        )
        .await
        .unwrap();
        // a short deadline: normally a live call, which the degrade mode refuses
        let q = questions(1)
            .remove(0)
            .max_tokens(50)
            .deferrable(Duration::from_secs(3600));
        let r = p.chat(q).await;
        if defer_near_cap {
            let r = r.unwrap();
            assert!(!r.served.is_cache_hit());
            assert_eq!(batch.requests_submitted(), 1, "sent in a batch");
        } else {
            assert!(matches!(r, Err(Error::BudgetExceeded { .. })), "{r:?}");
            assert_eq!(batch.requests_submitted(), 0);
        }
    }
    assert_eq!(live.calls(), 2, "only the warm-up calls went live");
}

#[tokio::test(start_paused = true)]
async fn a_deferrable_request_for_a_provider_without_a_batch_api_is_called_live() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let p = defer_pipeline(&live, &batch);
    let q = ChatRequest::user_text("hello")
        .model("claude-haiku-4-5")
        .deferrable(Duration::from_secs(10 * 3600));
    let start = tokio::time::Instant::now();
    p.chat(q).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(60));
    assert_eq!((live.calls(), batch.requests_submitted()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn with_live_limits_batch_items_pass_the_rate_limits() {
    let live = SimulatedProvider::new();
    let batch = sim_batch().build().unwrap();
    let build = |live_limits: bool| {
        let mut o = options();
        o.live_limits = live_limits;
        Pipeline::builder()
            .provider(live.clone())
            .default_model(MODEL)
            .batch_provider(batch.clone())
            .batch_options(o)
            .rate_limit(ScopeKind::User, 2)
            .build()
            .unwrap()
    };
    let out = build(true)
        .batch(questions(4))
        .await
        .unwrap()
        .collect()
        .await;
    check_once(&out, 4);
    let refused = out
        .iter()
        .filter(|o| matches!(o.result, Err(Error::RateLimited { .. })))
        .count();
    assert_eq!(refused, 2);
    assert_eq!(batch.requests_submitted(), 2);
    // by default the batch quota applies instead, and live traffic keeps its quota
    let p = build(false);
    let out = p.batch(questions(8)).await.unwrap().collect().await;
    assert!(out.iter().all(|o| o.result.is_ok()));
    assert!(
        p.chat(ChatRequest::user_text("live").user("nightly"))
            .await
            .is_ok()
    );
}

#[tokio::test(start_paused = true)]
async fn identical_items_are_sent_once_and_share_the_answer() {
    let live = SimulatedProvider::new();
    // every second line of a batch is unreadable
    let batch = sim_batch().malformed_every(2).build().unwrap();
    let p = pipeline(&live, &batch);
    let qs = questions(3);
    let call = vec![
        qs[0].clone(),
        qs[1].clone(),
        qs[2].clone(),
        qs[0].clone(),
        qs[1].clone(),
    ];
    let out = p.batch(call).await.unwrap().collect().await;
    check_once(&out, 5);
    let first = out[0].result.as_ref().unwrap();
    let copy = out[3].result.as_ref().unwrap();
    assert_eq!(copy.content, first.content);
    assert!(copy.served.is_cache_hit() && copy.cost.is_zero());
    // item 1's line was unreadable: its twin was then sent on its own, and answered
    assert_eq!(
        provider_kind(out[1].result.as_ref().unwrap_err()),
        ProviderErrorKind::InvalidResponse
    );
    let twin = out[4].result.as_ref().unwrap();
    assert!(!twin.served.is_cache_hit());
    assert_eq!(
        (batch.batches_submitted(), batch.requests_submitted()),
        (2, 4)
    );
    let st = p
        .budget_status(&ChatRequest::user_text("").user("nightly").meta)
        .await
        .unwrap();
    assert_eq!(st[0].reserved, Cost::ZERO);
}

/// A batch API whose batches take five hours: far longer than the callers can wait.
fn slow_batch() -> Kept {
    Kept::new(
        sim_batch()
            .latency(Duration::from_secs(5 * 3600))
            .build()
            .unwrap(),
    )
}

/// A pipeline calling `live` and sending batches to `batch` with `o`, to finish building.
fn batching_pipeline<B>(live: &SimulatedProvider, batch: &B, o: BatchOptions) -> PipelineBuilder
where
    B: tokenwise::batch::BatchProvider + Clone + 'static,
{
    Pipeline::builder()
        .provider(live.clone())
        .default_model(MODEL)
        .batch_provider(batch.clone())
        .batch_options(o)
}

/// The batch API of `SimulatedBatch`, keeping every request submitted.
#[derive(Debug, Clone)]
struct Kept {
    inner: SimulatedBatch,
    sent: Arc<std::sync::Mutex<Vec<ChatRequest>>>,
    cancelled: Arc<AtomicUsize>,
}

impl Kept {
    fn new(inner: SimulatedBatch) -> Self {
        Kept {
            inner,
            sent: Default::default(),
            cancelled: Default::default(),
        }
    }

    fn sent(&self) -> Vec<ChatRequest> {
        self.sent.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BatchProvider for Kept {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn limits(&self) -> BatchLimits {
        self.inner.limits()
    }

    fn encode(&self, call: &BatchCall<'_>) -> tokenwise::Result<Vec<u8>> {
        self.inner.encode(call)
    }

    async fn submit(&self, calls: &[BatchCall<'_>]) -> tokenwise::Result<String> {
        self.sent
            .lock()
            .unwrap()
            .extend(calls.iter().map(|c| c.request.clone()));
        self.inner.submit(calls).await
    }

    async fn status(&self, id: &str) -> tokenwise::Result<BatchStatus> {
        self.inner.status(id).await
    }

    async fn results(&self, id: &str, calls: &[BatchCall<'_>]) -> tokenwise::Result<BatchResults> {
        self.inner.results(id, calls).await
    }

    async fn cancel(&self, id: &str) -> tokenwise::Result<()> {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        self.inner.cancel(id).await
    }
}

/// tiktoken's counts, with a prepare stage that only counts the requests it sees.
#[derive(Debug, Default)]
struct CountsAhead {
    prepared: AtomicUsize,
}

#[async_trait::async_trait]
impl TokenCounter for CountsAhead {
    fn count_text(&self, text: &str, tokenizer: TokenizerKind) -> u64 {
        TiktokenCounter::new().count_text(text, tokenizer)
    }

    fn prepares_for(&self, _tokenizer: TokenizerKind) -> bool {
        true
    }

    async fn prepare(&self, _request: &ChatRequest) -> usize {
        self.prepared.fetch_add(1, Ordering::Relaxed);
        0
    }
}

/// A conversation of `turns` long turns on `small`, with no `max_tokens`.
fn conversation(turns: usize) -> ChatRequest {
    let mut req = ChatRequest::new()
        .model("small")
        .message(Message::system("You help with orders."))
        .user("nightly");
    for i in 0..turns {
        req = req
            .message(Message::user(format!("Question {i}: ").repeat(20)))
            .message(Message::assistant(format!("Answer {i}: ").repeat(20)));
    }
    req.message(Message::user("And now?"))
}

#[tokio::test(start_paused = true)]
async fn batched_and_deferred_requests_are_prepared_and_fitted_like_live_ones() {
    let price = Pricing::per_mtok(1.0, 1.0, 0.1).unwrap();
    let catalog = Catalog::empty()
        .with_model(ModelSpec::new("small", "p", 1_200, 500, price, 2))
        .unwrap()
        .with_model(ModelSpec::new("cheap", "p", 100_000, 1_000, price, 1))
        .unwrap();
    let live = SimulatedProvider::builder().name("p").build().unwrap();
    let batch = Kept::new(sim_batch().name("p").build().unwrap());
    let counter = Arc::new(CountsAhead::default());
    let budget = ContextBudget::default()
        .summarizer(Arc::new(ModelSummarizer::new("cheap")))
        .default_max_tokens(100);
    let p = Pipeline::builder()
        .catalog(catalog)
        .provider(live.clone())
        .token_counter(counter.clone())
        .context_budget(budget)
        .batch_provider(batch.clone())
        .batch_options(defer_options())
        .build()
        .unwrap();
    let whole = conversation(10);
    assert!(
        TiktokenCounter::new().count_request(&whole, TokenizerKind::O200k) > 1_200,
        "the conversation does not fit the window whole"
    );

    // a batch call: each item prepared (exact counts, the summary written live), then
    // sent as the live call would send it
    let out = p.batch(vec![whole.clone()]).await.unwrap().collect().await;
    assert!(out[0].result.is_ok(), "{:?}", out[0].result);
    assert_eq!(
        counter.prepared.load(Ordering::Relaxed),
        2,
        "the item and its summary"
    );
    assert_eq!(live.calls(), 1, "the summary, asked live");
    let sent = batch.sent();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].messages[1]
            .content
            .starts_with("Summary of the earlier conversation: "),
        "{:?}",
        sent[0].messages[1]
    );
    assert!(sent[0].messages.len() < whole.messages.len());
    assert_eq!(
        sent[0].params.max_tokens,
        Some(100),
        "the default answer ceiling"
    );
    let fits = TiktokenCounter::new().count_request(&sent[0], TokenizerKind::O200k);
    assert!(fits + 100 <= 1_200, "{fits}");

    // a deferred request takes the same way
    let longer = conversation(12);
    let r = p
        .chat(longer.clone().deferrable(Duration::from_secs(4 * 3600)))
        .await
        .unwrap();
    assert!(!r.served.is_cache_hit());
    assert_eq!(live.calls(), 2, "one more summary, and no live answer");
    let sent = batch.sent();
    assert_eq!(sent.len(), 2);
    assert!(
        sent[1].messages[1]
            .content
            .starts_with("Summary of the earlier conversation: ")
    );
    assert!(sent[1].messages.len() < longer.messages.len());
    assert_eq!(sent[1].params.max_tokens, Some(100));
    assert!(counter.prepared.load(Ordering::Relaxed) >= 3);
}

#[tokio::test(start_paused = true)]
async fn a_deferred_request_answered_live_is_not_billed_again_by_its_batch() {
    let live = SimulatedProvider::new();
    let batch = slow_batch();
    let mut o = defer_options();
    o.defer_batch_size = 2;
    // room for one request in open batches: the second waits for the first batch
    o.max_enqueued_tokens = Some(400);
    let p = batching_pipeline(&live, &batch, o)
        .spend_cap(ScopeKind::User, Cost::from_dollars(10), BudgetWindow::Day)
        .build()
        .unwrap();
    let wait = Duration::from_secs(3600);
    let calls = questions(2).into_iter().map(|q| p.chat(q.deferrable(wait)));
    let start = tokio::time::Instant::now();
    let answers = futures_util::future::join_all(calls).await;
    assert!(start.elapsed() < wait);
    let live_cost: Cost = answers.iter().map(|a| a.as_ref().unwrap().cost).sum();
    assert_eq!(live.calls(), 2, "both late: answered live");
    assert_eq!(batch.sent().len(), 1, "one sent, one held by the quota");

    // the request held back is never sent, and the batch of the one sent, which nobody
    // waits for any more, is cancelled: only the live calls are billed
    tokio::time::sleep(Duration::from_secs(6 * 3600)).await;
    assert_eq!(
        batch.sent().len(),
        1,
        "sent later, it would be billed twice"
    );
    assert_eq!(batch.cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(p.usage().totals.cost, live_cost);
    let records = p.recent_usage();
    assert_eq!(
        records.len(),
        2,
        "the live calls' records, no error for the batch"
    );
    assert!(
        records
            .iter()
            .all(|r| r.outcome == tokenwise::observe::Outcome::Provider),
        "{records:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_some_caller_still_waits_for_runs_to_its_end() {
    let live = SimulatedProvider::new();
    let batch = slow_batch();
    let mut o = defer_options();
    o.defer_batch_size = 2;
    let p = batching_pipeline(&live, &batch, o).build().unwrap();
    let mut qs = questions(2);
    let patient = qs.remove(1).deferrable(Duration::from_secs(10 * 3600));
    let hurried = qs.remove(0).deferrable(Duration::from_secs(3600));
    let (hurried, patient) = tokio::join!(p.chat(hurried), p.chat(patient));
    let (hurried, patient) = (hurried.unwrap(), patient.unwrap());
    assert_eq!(live.calls(), 1, "the hurried one went live");
    assert_eq!(batch.sent().len(), 2, "both were in the batch");
    assert_eq!(batch.cancelled.load(Ordering::Relaxed), 0);
    let mini = p.catalog().require(MODEL).unwrap().clone();
    assert_eq!(patient.cost, mini.batch_cost(&patient.usage));
    // the hurried one's batch answer ran, so it is billed and recorded too
    assert_eq!(p.recent_usage().len(), 3);
    assert_eq!(
        p.usage().totals.cost,
        hurried.cost + patient.cost + mini.batch_cost(&hurried.usage)
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_not_cancelled_while_a_twin_of_its_item_waits() {
    let live = SimulatedProvider::new();
    let batch = slow_batch();
    let mut o = defer_options();
    o.defer_batch_size = 2;
    let p = batching_pipeline(&live, &batch, o).build().unwrap();
    // the same question twice: sent once, by the hurried caller's item
    let q = questions(1).remove(0);
    let hurried = q.clone().deferrable(Duration::from_secs(3600));
    let patient = q.deferrable(Duration::from_secs(10 * 3600));
    let (hurried, patient) = tokio::join!(p.chat(hurried), p.chat(patient));
    assert!(!hurried.unwrap().served.is_cache_hit(), "answered live");
    assert_eq!(batch.sent().len(), 1, "the twins were sent once");
    assert_eq!(
        batch.cancelled.load(Ordering::Relaxed),
        0,
        "the patient twin still waited for it"
    );
    let patient = patient.unwrap();
    assert!(patient.served.is_cache_hit(), "the batch answer, shared");
    assert_eq!(live.calls(), 1);
}
