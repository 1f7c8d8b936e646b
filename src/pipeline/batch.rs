//! The batch path: [`Pipeline::batch`], [`Pipeline::resume_batch`], [`Pipeline::warm`]
//! and deferrable requests.
//!
//! Each item runs the funnel's stages up to dispatch (plan → limits → cache → budget),
//! then waits in a provider batch instead of being called; its result settles it like
//! any call (commit, reconcile, store, record). Stages used from the funnel:
//! `Inner::plan`, `Inner::check_max_cost`, `Inner::admit` (only with
//! [`BatchOptions::live_limits`]) or else `Inner::refuse_gate`, `Inner::cache_get`,
//! `Inner::spend` (which reserves through `Inner::reserve`), `Inner::commit`,
//! `Inner::refund`, `Inner::cache_put` and `Inner::record`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::admit::Admitted;
use super::plan::Plan;
use super::{Inner, Pipeline};
use crate::batch::{BatchCall, BatchProvider, BatchState, ItemResult};
use crate::budget::Reservation;
use crate::cache::is_cacheable;
use crate::error::{ProviderError, ProviderErrorKind};
use crate::observe::{self, Outcome, UsageRecord};
use crate::types::{ChatRequest, ChatResponse, Cost, ModelSpec, Served, Usage};
use crate::{Error, Result};

/// How the batch path runs. Every field has a default; set what you need.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BatchOptions {
    /// How often open batches are polled (default 30 s).
    pub poll_interval: Duration,
    /// The most requests one [`Pipeline::batch`] call takes (default 100,000).
    pub max_items: usize,
    /// The batch quota: the most tokens (prompt plus output allowance) in open batches
    /// at once, over every batch of one call (default none). Items beyond it wait for
    /// earlier batches to end before they are submitted.
    pub max_enqueued_tokens: Option<u64>,
    /// Whether each item also passes the pipeline's rate limits and concurrency limit,
    /// like a live call (default off: batch items are held to the batch quota only, so
    /// a nightly job does not starve live traffic of its quota).
    pub live_limits: bool,
    /// Status or result reads of one batch that may fail in a row before its items are
    /// reported failed (default 20).
    pub max_poll_failures: u32,
    /// The most deferrable requests waiting to be batched; past it they are refused
    /// with [`Error::Overloaded`] (default 10,000).
    pub defer_queue: usize,
    /// Deferrable requests are sent as a batch once this many wait (default 1,000)...
    pub defer_batch_size: usize,
    /// ... or once the first of them has waited this long (default 60 s).
    pub defer_window: Duration,
    /// How long a batch is expected to take. A deferrable request that cannot wait the
    /// window plus this is called at once (default 1 hour).
    pub defer_turnaround: Duration,
    /// Time kept for a live call: a deferred request whose batch has not answered this
    /// long before its deadline is called at once instead (default 2 minutes). Its batch
    /// result, when it comes, is still stored in the cache.
    pub defer_live_margin: Duration,
    /// With a `Refuse` degrade mode (see
    /// [`PipelineBuilder::degrade_at`](crate::PipelineBuilder::degrade_at)), a deferrable
    /// request that mode would refuse goes through the batch path instead, at the batch
    /// discount and still within the caps' hard limits, whatever its deadline; it never
    /// falls back to a live call, and past its deadline its caller gets the refusal
    /// (default off).
    pub defer_near_cap: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            poll_interval: Duration::from_secs(30),
            max_items: 100_000,
            max_enqueued_tokens: None,
            live_limits: false,
            max_poll_failures: 20,
            defer_queue: 10_000,
            defer_batch_size: 1_000,
            defer_window: Duration::from_secs(60),
            defer_turnaround: Duration::from_secs(3_600),
            defer_live_margin: Duration::from_secs(120),
            defer_near_cap: false,
        }
    }
}

impl BatchOptions {
    pub(super) fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Config(format!("batch options: {m}")));
        if self.poll_interval.is_zero() {
            return bad("poll_interval must be positive");
        }
        if self.max_items == 0 || self.defer_queue == 0 || self.defer_batch_size == 0 {
            return bad("max_items, defer_queue and defer_batch_size must be positive");
        }
        if self.max_enqueued_tokens == Some(0) || self.max_poll_failures == 0 {
            return bad("max_enqueued_tokens and max_poll_failures must be positive");
        }
        Ok(())
    }
}

/// The batch providers and options of a pipeline, and its queue of deferred requests.
#[derive(Debug, Default)]
pub(crate) struct BatchSetup {
    providers: HashMap<String, Arc<dyn BatchProvider>>,
    options: BatchOptions,
    deferred: Mutex<Deferred>,
}

impl BatchSetup {
    pub(super) fn add(&mut self, p: Arc<dyn BatchProvider>) {
        self.providers.insert(p.name().to_owned(), p);
    }

    pub(super) fn set_options(&mut self, o: BatchOptions) {
        self.options = o;
    }

    fn provider_for(&self, model: &ModelSpec) -> Result<&Arc<dyn BatchProvider>> {
        self.providers.get(&model.provider).ok_or_else(|| {
            Error::Config(format!(
                "no batch provider for `{}` (model {})",
                model.provider, model.name
            ))
        })
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Deferred> {
        match self.deferred.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Where a [`Pipeline::batch`] call stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchProgress {
    /// Items in the call.
    pub total: usize,
    /// Answered from the cache, or by an identical item of the same call; never sent.
    pub cached: usize,
    /// Sent in a batch (an item retried after an expiry counts once).
    pub sent: usize,
    /// Answered by a batch.
    pub answered: usize,
    /// Failed, with a typed error.
    pub failed: usize,
    /// Batches submitted.
    pub batches: usize,
    /// Batches still open.
    pub open_batches: usize,
    /// What the answers cost, at batch prices.
    pub cost: Cost,
}

impl BatchProgress {
    /// Items with an outcome.
    pub fn finished(&self) -> usize {
        self.cached + self.answered + self.failed
    }

    /// Whether every item has its outcome.
    pub fn is_done(&self) -> bool {
        self.finished() >= self.total
    }
}

/// One item's outcome.
#[derive(Debug)]
#[non_exhaustive]
pub struct BatchOutcome {
    /// The item's position in the call's (or the journal's) list.
    pub index: usize,
    /// The item's key, as in the [`BatchJournal`].
    pub key: String,
    /// The answer, or why there is none.
    pub result: Result<ChatResponse>,
}

/// What a batch call needs to be picked up after a restart: every item, and every batch
/// submitted. Serialise it (serde) while the call runs; give it to
/// [`Pipeline::resume_batch`] to carry on without submitting anything again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatchJournal {
    /// The items, in the call's order.
    pub items: Vec<JournalItem>,
    /// The batches submitted, in order.
    pub batches: Vec<JournalBatch>,
}

/// One item of a [`BatchJournal`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JournalItem {
    /// Its key: its `custom_id` in the batches it is sent in.
    pub key: String,
    /// The request.
    pub request: ChatRequest,
    /// The model it was sent to, once sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Whether it has had its outcome.
    pub done: bool,
}

/// One batch of a [`BatchJournal`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct JournalBatch {
    /// The batch provider's name.
    pub provider: String,
    /// The provider's id for the batch.
    pub id: String,
    /// The keys of its items.
    pub keys: Vec<String>,
    /// Whether it carries items sent again after an expiry.
    pub retry: bool,
    /// Whether its results have been read.
    pub done: bool,
}

/// A running [`Pipeline::batch`] call: progress, and each item's outcome as it
/// arrives. Dropping it leaves the call running to its end in the background (answers
/// are still cached and recorded); [`stop`](Self::stop) ends it for a later
/// [`resume`](Pipeline::resume_batch).
#[derive(Debug)]
pub struct BatchHandle {
    outcomes: mpsc::UnboundedReceiver<BatchOutcome>,
    progress: watch::Receiver<BatchProgress>,
    journal: Arc<Mutex<BatchJournal>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl BatchHandle {
    /// The next item's outcome, in the order they arrive; `None` once every item had
    /// its outcome.
    pub async fn next(&mut self) -> Option<BatchOutcome> {
        self.outcomes.recv().await
    }

    /// Where the call stands now.
    pub fn progress(&self) -> BatchProgress {
        *self.progress.borrow()
    }

    /// Waits until the progress changes; returns it, or `None` once the call is over.
    pub async fn progress_changed(&mut self) -> Option<BatchProgress> {
        self.progress.changed().await.ok()?;
        Some(*self.progress.borrow_and_update())
    }

    /// A snapshot of the journal, to persist.
    pub fn journal(&self) -> BatchJournal {
        lock(&self.journal).clone()
    }

    /// Every outcome, in item order.
    pub async fn collect(mut self) -> Vec<BatchOutcome> {
        let mut out = Vec::new();
        while let Some(o) = self.next().await {
            out.push(o);
        }
        out.sort_by_key(|o| o.index);
        out
    }

    /// Stops following the batches (they keep running at the provider), releases the
    /// budget held for unfinished items and returns the journal for
    /// [`Pipeline::resume_batch`].
    pub async fn stop(mut self) -> BatchJournal {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.journal()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// How many items of one call go through the prepare stage at once.
const PREPARE_CONCURRENCY: usize = 8;

/// One item while the driver follows it.
struct Item {
    index: usize,
    key: String,
    req: ChatRequest,
    /// The request as sent: fitted to the model by the context budget, if any.
    wire: ChatRequest,
    plan: Plan,
    model: Arc<ModelSpec>,
    charged: u64,
    reservation: Option<Reservation>,
    rec: UsageRecord,
    tokens: u64,
    retried: bool,
    done: bool,
}

/// A batch waiting to be submitted, or open.
struct Group {
    provider: Arc<dyn BatchProvider>,
    items: Vec<usize>,
    tokens: u64,
    retry: bool,
}

struct Open {
    group: Group,
    id: String,
    journal: usize,
    failures: u32,
    /// Whether it was cancelled because every caller it served went live.
    cancelled: bool,
}

/// Follows one call's items to their outcomes.
struct Driver {
    pipeline: Pipeline,
    items: Vec<Item>,
    queue: VecDeque<Group>,
    open: Vec<Open>,
    enqueued: u64,
    progress: BatchProgress,
    progress_tx: watch::Sender<BatchProgress>,
    out: mpsc::UnboundedSender<BatchOutcome>,
    journal: Arc<Mutex<BatchJournal>>,
    /// Deferred requests sent here instead of being refused near a cap.
    past_refuse_gate: bool,
    /// Items identical to an earlier one of the call (same cache key and model), by the
    /// position of that earlier one: they share its answer instead of being sent.
    followers: HashMap<usize, Vec<usize>>,
    /// Followers whose leader failed: sent themselves at the next submission.
    promoted: Vec<usize>,
    /// For deferred requests, each item's caller (by item index): outcomes go to it
    /// instead of the handle, an item whose caller has stopped waiting (it went live)
    /// is withdrawn before it is sent, and a batch whose callers all went live is
    /// cancelled.
    callers: Vec<Option<Caller>>,
}

/// Where a deferred request's answer goes.
type Caller = oneshot::Sender<Result<ChatResponse>>;

impl Pipeline {
    /// Sends `requests` through the provider batch APIs (at their batch discount), and
    /// returns a handle that reports progress and yields each item's outcome as it
    /// arrives. Needs a batch provider for each model's provider (see
    /// [`PipelineBuilder::batch_provider`](crate::PipelineBuilder::batch_provider)).
    ///
    /// Each item is planned, held to the batch quota (or the live limits, see
    /// [`BatchOptions::live_limits`]), looked up in the cache (a hit is answered at once
    /// and never sent), and has its worst-case cost reserved on the spend caps; the rest
    /// are split into batches within the provider's request and byte limits, and
    /// settled from the results: cost at batch prices committed, the answer stored in the
    /// cache, a usage record written. Every item gets exactly one outcome. Items of an
    /// expired batch are sent once more, then reported as timeouts; a result line that
    /// cannot be read is that item's `InvalidResponse` error.
    pub async fn batch(&self, requests: Vec<ChatRequest>) -> Result<BatchHandle> {
        self.batch_with(requests, false, Vec::new())
    }

    /// A batch call; with `callers` (deferred requests, one each), outcomes go to them
    /// instead of the handle.
    fn batch_with(
        &self,
        requests: Vec<ChatRequest>,
        past_refuse_gate: bool,
        callers: Vec<Option<Caller>>,
    ) -> Result<BatchHandle> {
        let setup = &self.inner.batch;
        let refused = if setup.providers.is_empty() {
            Some(Error::Config("no batch provider is configured".into()))
        } else if requests.len() > setup.options.max_items {
            Some(Error::InvalidRequest(format!(
                "a batch call takes at most {} requests, not {}",
                setup.options.max_items,
                requests.len()
            )))
        } else {
            None
        };
        if let Some(e) = refused {
            for caller in callers.into_iter().flatten() {
                let _ = caller.send(Err(clone_error(&e)));
            }
            return Err(e);
        }
        let journal = BatchJournal {
            items: requests
                .into_iter()
                .enumerate()
                .map(|(i, request)| JournalItem {
                    key: format!("tw-{i:06}"),
                    request,
                    model: None,
                    done: false,
                })
                .collect(),
            batches: Vec::new(),
        };
        Ok(self.start(journal, past_refuse_gate, callers))
    }

    /// Picks up a call from its `journal` (see [`BatchHandle::journal`]): batches already
    /// submitted are followed, not submitted again; items never sent go through the
    /// batch path as new. Outcomes come only for items without one in the journal; the
    /// budget is reserved again for them.
    pub async fn resume_batch(&self, journal: BatchJournal) -> Result<BatchHandle> {
        if self.inner.batch.providers.is_empty() {
            return Err(Error::Config("no batch provider is configured".into()));
        }
        if journal.items.len() > self.inner.batch.options.max_items {
            return Err(Error::InvalidRequest(format!(
                "the journal holds {} items, more than max_items",
                journal.items.len()
            )));
        }
        Ok(self.start(journal, false, Vec::new()))
    }

    fn start(
        &self,
        journal: BatchJournal,
        past_refuse_gate: bool,
        callers: Vec<Option<Caller>>,
    ) -> BatchHandle {
        let (out, outcomes) = mpsc::unbounded_channel();
        let total = journal.items.iter().filter(|i| !i.done).count();
        let progress = BatchProgress {
            total,
            ..BatchProgress::default()
        };
        let (progress_tx, progress_rx) = watch::channel(progress);
        let (stop_tx, stop_rx) = oneshot::channel();
        let journal = Arc::new(Mutex::new(journal));
        let driver = Driver {
            pipeline: self.clone(),
            items: Vec::new(),
            queue: VecDeque::new(),
            open: Vec::new(),
            enqueued: 0,
            progress,
            progress_tx,
            out,
            journal: Arc::clone(&journal),
            past_refuse_gate,
            followers: HashMap::new(),
            promoted: Vec::new(),
            callers,
        };
        let task = tokio::spawn(driver.run(stop_rx));
        BatchHandle {
            outcomes,
            progress: progress_rx,
            journal,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

impl Driver {
    fn inner(&self) -> &Arc<Inner> {
        &self.pipeline.inner
    }

    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut detached = false;
        self.prepare().await;
        let poll = self.inner().batch.options.poll_interval;
        loop {
            self.submit_ready().await;
            if self.open.is_empty() && self.queue.is_empty() && self.promoted.is_empty() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => {}
                r = &mut stop, if !detached => {
                    if r.is_ok() {
                        self.release().await;
                        return;
                    }
                    // the handle was dropped: carry on in the background
                    detached = true;
                    continue;
                }
            }
            self.poll().await;
        }
        // Anything left without an outcome (nothing should be) fails rather than hangs.
        let left: Vec<usize> = (0..self.items.len())
            .filter(|&i| !self.items[i].done)
            .collect();
        for i in left {
            let e = Error::InvalidRequest("the batch call ended without a result".into());
            self.fail(i, e).await;
        }
    }

    /// Plans every unfinished item of the journal; answers cache hits and refusals, and
    /// queues the rest (or attaches them to the open batch they were sent in).
    async fn prepare(&mut self) {
        let journal = lock(&self.journal).clone();
        let mut in_batch: HashMap<&str, usize> = HashMap::new();
        for (b, batch) in journal.batches.iter().enumerate() {
            if !batch.done {
                for k in &batch.keys {
                    in_batch.insert(k.as_str(), b);
                }
            }
        }
        // The prepare stage, as for a live call (exact counts, summaries), for the items
        // not yet sent; a few at a time.
        if self.pipeline.prepares() {
            let pipeline = &self.pipeline;
            futures_util::stream::iter(
                journal
                    .items
                    .iter()
                    .filter(|ji| !ji.done && !in_batch.contains_key(ji.key.as_str())),
            )
            .for_each_concurrent(PREPARE_CONCURRENCY, |ji| pipeline.prepare(&ji.request))
            .await;
        }
        let mut attach: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut fresh: Vec<usize> = Vec::new();
        for (index, ji) in journal.items.iter().enumerate() {
            if ji.done {
                continue;
            }
            let sent_in = in_batch.get(ji.key.as_str()).copied();
            match self.admit_item(index, ji, sent_in.is_some()).await {
                Ok(Some(pos)) => match sent_in {
                    Some(b) => attach.entry(b).or_default().push(pos),
                    None => fresh.push(pos),
                },
                Ok(None) => {} // answered from the cache
                Err((item, e)) => self.emit_error(index, &ji.key, &ji.request, item, e),
            }
        }
        // Batches already submitted: follow them.
        for (b, positions) in attach {
            let jb = &journal.batches[b];
            let Some(provider) = self.inner().batch.providers.get(&jb.provider).cloned() else {
                for pos in positions {
                    let e = Error::Config(format!("no batch provider `{}`", jb.provider));
                    self.fail(pos, e).await;
                }
                continue;
            };
            let tokens = positions.iter().map(|&p| self.items[p].tokens).sum();
            for &p in &positions {
                self.items[p].retried = jb.retry;
            }
            self.enqueued += tokens;
            self.progress.open_batches += 1;
            self.progress.sent += positions.len();
            self.open.push(Open {
                group: Group {
                    provider,
                    items: positions,
                    tokens,
                    retry: jb.retry,
                },
                id: jb.id.clone(),
                journal: b,
                failures: 0,
                cancelled: false,
            });
        }
        let fresh = self.dedupe(fresh);
        self.group(fresh, false).await;
        self.publish();
    }

    /// The stages before dispatch for one item. `Ok(None)`: a cache hit, answered.
    async fn admit_item(
        &mut self,
        index: usize,
        ji: &JournalItem,
        sent: bool,
    ) -> std::result::Result<Option<usize>, (Option<UsageRecord>, Error)> {
        let inner = Arc::clone(self.inner());
        let req = &ji.request;
        let mut rec = UsageRecord::new(inner.clock.now(), &req.meta, false);
        let mut plan = inner.plan(req).map_err(|e| (Some(rec.clone()), e))?;
        rec.set_route(&plan.route);
        // a batch answer cannot be cut short either: its worst case must fit its limit
        inner
            .check_max_cost(req, &plan)
            .map_err(|e| (Some(rec.clone()), e))?;
        let live = inner.batch.options.live_limits && !sent;
        let mut admitted = if live {
            let mut a = inner
                .admit(&req.meta, &plan)
                .await
                .map_err(|e| (Some(rec.clone()), e))?;
            // a batch item holds no live slot while it waits
            Admitted::carrying(&inner, &req.meta, a.release_charge())
        } else {
            if !self.past_refuse_gate {
                inner
                    .refuse_gate(&req.meta)
                    .await
                    .map_err(|e| (Some(rec.clone()), e))?;
            }
            Admitted::carrying(&inner, &req.meta, 0)
        };
        if !sent {
            if let Some(mut hit) = inner.cache_get(req, &mut plan).await {
                admitted.settle(0).await;
                rec.set_answer(&hit);
                let finish = hit.finish_reason.to_string();
                hit.guard_rejected = plan.guard_rejected.take();
                inner.record(rec, &observe::request_span(req, false), Some(&finish));
                self.progress.cached += 1;
                self.mark_done(index);
                self.deliver(BatchOutcome {
                    index,
                    key: ji.key.clone(),
                    result: Ok(hit),
                });
                return Ok(None);
            }
        }
        // A resumed item settles on the model it was sent to.
        let model = match ji.model.as_deref().filter(|_| sent) {
            Some(name) => inner.catalog.resolve(name),
            None => plan
                .route
                .targets
                .first()
                .cloned()
                .ok_or_else(|| Error::InvalidRequest("the router returned no target".into())),
        };
        // The request as a live call would send it: fitted by the context budget (with
        // the summary and counts the prepare stage wrote), its default `max_tokens` set.
        let wire = model.and_then(|m| {
            let wire = inner.fit(req, &plan, &m)?.into_owned();
            Ok((m, wire))
        });
        let (model, wire) = match wire {
            Ok(w) => w,
            Err(e) => {
                admitted.settle(0).await;
                return Err((Some(rec), e));
            }
        };
        let mut degraded = None;
        let spent = inner
            .spend(req, &mut plan, &mut admitted, &mut degraded)
            .await;
        rec.set_degrade(degraded.as_ref());
        let mut held = spent.map_err(|e| (Some(rec.clone()), e))?;
        let reservation = held.take();
        let tokens = plan.token_estimate;
        self.items.push(Item {
            index,
            key: ji.key.clone(),
            req: req.clone(),
            wire,
            plan,
            model,
            charged: admitted.release_charge(),
            reservation,
            rec,
            tokens,
            retried: false,
            done: false,
        });
        let pos = self.items.len() - 1;
        Ok(Some(pos))
    }

    /// Keeps the first of identical cacheable items; the others follow it.
    fn dedupe(&mut self, positions: Vec<usize>) -> Vec<usize> {
        type Same = (crate::cache::CacheKey, String, String, String);
        let mut leaders: HashMap<Same, usize> = HashMap::new();
        let mut send = Vec::with_capacity(positions.len());
        for p in positions {
            let it = &self.items[p];
            let same = it
                .plan
                .cache
                .as_ref()
                .filter(|_| it.plan.cache_read)
                .map(|q| {
                    (
                        q.key,
                        q.partition.clone(),
                        q.namespace.clone(),
                        it.model.name.clone(),
                    )
                });
            match same {
                Some(k) => match leaders.get(&k) {
                    Some(&leader) => self.followers.entry(leader).or_default().push(p),
                    None => {
                        leaders.insert(k, p);
                        send.push(p);
                    }
                },
                None => send.push(p),
            }
        }
        send
    }

    /// Splits `positions` into batches within each provider's limits and the quota.
    async fn group(&mut self, positions: Vec<usize>, retry: bool) {
        let quota = self.inner().batch.options.max_enqueued_tokens;
        let mut current: HashMap<String, (Group, usize)> = HashMap::new();
        for pos in positions {
            let provider = match self.inner().batch.provider_for(&self.items[pos].model) {
                Ok(p) => Arc::clone(p),
                Err(e) => {
                    self.fail(pos, e).await;
                    continue;
                }
            };
            let item = &self.items[pos];
            let line = provider.encode(&BatchCall::new(&item.key, &item.wire, &item.model));
            let limits = provider.limits();
            let bytes = match line {
                Ok(l) if l.len() < limits.max_bytes => l.len() + 1,
                Ok(l) => {
                    let e = Error::InvalidRequest(format!(
                        "the request takes {} bytes, more than a whole batch may hold ({})",
                        l.len(),
                        limits.max_bytes
                    ));
                    self.fail(pos, e).await;
                    continue;
                }
                Err(e) => {
                    self.fail(pos, e).await;
                    continue;
                }
            };
            let tokens = item.tokens;
            if quota.is_some_and(|q| tokens > q) {
                let e = Error::InvalidRequest(format!(
                    "the request may use {tokens} tokens, more than the batch quota allows"
                ));
                self.fail(pos, e).await;
                continue;
            }
            let name = provider.name().to_owned();
            let full = current.get(&name).is_some_and(|(g, b)| {
                g.items.len() + 1 > limits.max_requests
                    || b + bytes > limits.max_bytes
                    || quota.is_some_and(|q| g.tokens + tokens > q)
            });
            if full {
                if let Some((g, _)) = current.remove(&name) {
                    self.queue.push_back(g);
                }
            }
            let (g, b) = current.entry(name).or_insert_with(|| {
                (
                    Group {
                        provider,
                        items: Vec::new(),
                        tokens: 0,
                        retry,
                    },
                    0,
                )
            });
            g.items.push(pos);
            g.tokens += tokens;
            *b += bytes;
        }
        let mut rest: Vec<Group> = current.into_values().map(|(g, _)| g).collect();
        rest.sort_by_key(|g| g.items.first().copied());
        self.queue.extend(rest);
    }

    /// Submits queued batches while the quota allows (one at least when none is open).
    async fn submit_ready(&mut self) {
        if !self.promoted.is_empty() {
            let promoted = std::mem::take(&mut self.promoted);
            self.group(promoted, false).await;
        }
        let quota = self.inner().batch.options.max_enqueued_tokens;
        while let Some(mut g) = self.queue.pop_front() {
            // Deferred requests whose callers went live meanwhile are not sent.
            let (gone, keep): (Vec<usize>, Vec<usize>) =
                g.items.iter().partition(|&&p| self.abandoned(p));
            if !gone.is_empty() {
                for &p in &gone {
                    g.tokens = g.tokens.saturating_sub(self.items[p].tokens);
                    self.withdraw(p).await;
                }
                tracing::debug!(
                    items = gone.len(),
                    "deferred requests answered live; not sent"
                );
                g.items = keep;
                if g.items.is_empty() {
                    continue;
                }
            }
            if quota.is_some_and(|q| self.enqueued + g.tokens > q) && !self.open.is_empty() {
                self.queue.push_front(g);
                break;
            }
            let submitted = {
                let calls: Vec<BatchCall<'_>> = g
                    .items
                    .iter()
                    .map(|&p| {
                        let it = &self.items[p];
                        BatchCall::new(&it.key, &it.wire, &it.model)
                    })
                    .collect();
                g.provider.submit(&calls).await
            };
            match submitted {
                Ok(id) => {
                    let journal = {
                        let mut j = lock(&self.journal);
                        for &p in &g.items {
                            let it = &self.items[p];
                            if let Some(ji) = j.items.get_mut(it.index) {
                                ji.model = Some(it.model.name.clone());
                            }
                        }
                        j.batches.push(JournalBatch {
                            provider: g.provider.name().to_owned(),
                            id: id.clone(),
                            keys: g.items.iter().map(|&p| self.items[p].key.clone()).collect(),
                            retry: g.retry,
                            done: false,
                        });
                        j.batches.len() - 1
                    };
                    tracing::info!(batch = %id, provider = g.provider.name(), items = g.items.len(), "batch submitted");
                    self.enqueued += g.tokens;
                    if !g.retry {
                        self.progress.sent += g.items.len();
                    }
                    self.progress.batches += 1;
                    self.progress.open_batches += 1;
                    self.open.push(Open {
                        group: g,
                        id,
                        journal,
                        failures: 0,
                        cancelled: false,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, items = g.items.len(), "batch submission failed");
                    for &p in &g.items {
                        self.fail(p, clone_error(&e)).await;
                    }
                }
            }
            self.publish();
        }
    }

    /// Polls every open batch once; settles those that ended.
    async fn poll(&mut self) {
        let max_failures = self.inner().batch.options.max_poll_failures;
        let mut i = 0;
        while i < self.open.len() {
            self.cancel_if_abandoned(i).await;
            let status = {
                let o = &self.open[i];
                o.group.provider.status(&o.id).await
            };
            let outcome = match status {
                Ok(s) if !s.state.is_final() => {
                    self.open[i].failures = 0;
                    i += 1;
                    continue;
                }
                Ok(s) => self.settle(i, s.state).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => self.close(i),
                Err(e) => {
                    let o = &mut self.open[i];
                    o.failures += 1;
                    tracing::warn!(batch = %o.id, error = %e, failures = o.failures, "batch poll failed");
                    if o.failures >= max_failures {
                        let items = o.group.items.clone();
                        for p in items {
                            self.fail(p, clone_error(&e)).await;
                        }
                        self.close(i);
                    } else {
                        i += 1;
                    }
                }
            }
        }
        self.publish();
    }

    /// Cancels open batch `i` once every deferred caller it still serves has gone live:
    /// nobody waits for it any more, and what has not run yet is then not billed. What
    /// has run is still read, billed and cached when the batch ends.
    async fn cancel_if_abandoned(&mut self, i: usize) {
        let o = &self.open[i];
        // the items sent in it, and the identical items that share their answers
        let waiting: Vec<usize> = o
            .group
            .items
            .iter()
            .flat_map(|p| {
                std::iter::once(*p).chain(self.followers.get(p).into_iter().flatten().copied())
            })
            .filter(|&p| !self.items[p].done)
            .collect();
        if o.cancelled || waiting.is_empty() || !waiting.iter().all(|&p| self.abandoned(p)) {
            return;
        }
        let (provider, id) = (Arc::clone(&o.group.provider), o.id.clone());
        match provider.cancel(&id).await {
            Ok(()) => {
                tracing::info!(batch = %id, "every caller of this batch went live: cancelled");
                self.open[i].cancelled = true;
            }
            Err(e) => tracing::warn!(batch = %id, error = %e, "batch cancel failed"),
        }
    }

    /// Removes open batch `i`, marking it done in the journal.
    fn close(&mut self, i: usize) {
        let o = self.open.remove(i);
        self.enqueued = self.enqueued.saturating_sub(o.group.tokens);
        self.progress.open_batches = self.progress.open_batches.saturating_sub(1);
        if let Some(b) = lock(&self.journal).batches.get_mut(o.journal) {
            b.done = true;
        }
    }

    /// Reads the results of open batch `i`, which reached final `state`.
    async fn settle(&mut self, i: usize, state: BatchState) -> Result<()> {
        let (provider, id, positions, retry) = {
            let o = &self.open[i];
            (
                Arc::clone(&o.group.provider),
                o.id.clone(),
                o.group.items.clone(),
                o.group.retry,
            )
        };
        if let BatchState::Failed(reason) = &state {
            let e: Error = ProviderError::new(
                ProviderErrorKind::BadRequest,
                provider.name(),
                format!("the batch failed: {reason}"),
            )
            .into();
            for p in positions {
                self.fail(p, clone_error(&e)).await;
            }
            return Ok(());
        }
        let results = {
            let calls: Vec<BatchCall<'_>> = positions
                .iter()
                .map(|&p| {
                    let it = &self.items[p];
                    BatchCall::new(&it.key, &it.wire, &it.model)
                })
                .collect();
            provider.results(&id, &calls).await?
        };
        if results.malformed > 0 {
            tracing::warn!(batch = %id, lines = results.malformed, "malformed batch result lines");
        }
        let by_key: HashMap<&str, usize> = positions
            .iter()
            .map(|&p| (self.items[p].key.as_str(), p))
            .collect();
        let mut answered: HashMap<usize, ItemResult> = HashMap::new();
        for line in results.lines {
            if let Some(&p) = by_key.get(line.custom_id.as_str()) {
                answered.entry(p).or_insert(line.result);
            }
        }
        let expired_batch = state == BatchState::Expired;
        let mut again = Vec::new();
        for p in positions {
            if self.items[p].done {
                continue;
            }
            match answered.remove(&p) {
                Some(ItemResult::Answer(r)) => self.answer(p, r, &provider).await,
                Some(ItemResult::Failed(e)) => self.fail(p, e).await,
                Some(ItemResult::Expired) => again.push(p),
                None if expired_batch => again.push(p),
                None => {
                    let e = ProviderError::new(
                        ProviderErrorKind::InvalidResponse,
                        provider.name(),
                        format!("batch {id} returned no readable result for this request"),
                    )
                    .into();
                    self.fail(p, e).await;
                }
            }
        }
        let (retry_now, give_up): (Vec<usize>, Vec<usize>) = again
            .into_iter()
            .partition(|&p| !retry && !self.items[p].retried);
        for p in give_up {
            let e = ProviderError::new(
                ProviderErrorKind::Timeout,
                provider.name(),
                "the batch expired before this request ran, and again when it was sent once more",
            )
            .into();
            self.fail(p, e).await;
        }
        if !retry_now.is_empty() {
            tracing::info!(batch = %id, items = retry_now.len(), "batch expired; sending its unfinished items once more");
            for &p in &retry_now {
                self.items[p].retried = true;
            }
            self.group(retry_now, true).await;
        }
        Ok(())
    }

    /// Settles item `p` with its answer.
    async fn answer(&mut self, p: usize, mut r: ChatResponse, provider: &Arc<dyn BatchProvider>) {
        let inner = Arc::clone(self.inner());
        let it = &mut self.items[p];
        it.done = true;
        let cost = it.model.batch_cost(&r.usage);
        r.cost = cost;
        r.served = Served::Provider {
            attempts: 1 + u32::from(it.retried),
            fallbacks: 0,
            escalated: false,
        };
        inner.commit(it.reservation.take(), cost).await;
        if it.charged > 0 {
            inner
                .reconcile_tokens(&it.req.meta, it.charged, r.usage.total())
                .await;
        }
        if let Some(q) = &it.plan.cache {
            inner.cache_put(q, &r).await;
        }
        let mut rec = it.rec.clone();
        rec.model = Some(r.model.clone());
        rec.provider = Some(provider.name().to_owned());
        rec.usage = r.usage;
        rec.cost = cost;
        rec.outcome = Outcome::Provider;
        rec.set_served(&r.served);
        let finish = r.finish_reason.to_string();
        inner.record(rec, &observe::request_span(&it.req, false), Some(&finish));
        let (index, key) = (it.index, it.key.clone());
        self.progress.answered += 1;
        self.progress.cost += cost;
        self.mark_done(index);
        if let Some(followers) = self.followers.remove(&p) {
            if is_cacheable(&r) {
                for f in followers {
                    self.share(f, &r).await;
                }
            } else {
                self.promoted.extend(followers);
            }
        }
        self.deliver(BatchOutcome {
            index,
            key,
            result: Ok(r),
        });
    }

    /// Settles follower `f` with its leader's answer, as a cache hit.
    async fn share(&mut self, f: usize, leader: &ChatResponse) {
        if !self.release_item(f).await {
            return;
        }
        let inner = Arc::clone(self.inner());
        let it = &self.items[f];
        let hit = super::cache::served_from_cache(leader.clone(), 1.0);
        let mut rec = it.rec.clone();
        rec.set_answer(&hit);
        let finish = hit.finish_reason.to_string();
        inner.record(rec, &observe::request_span(&it.req, false), Some(&finish));
        let (index, key) = (it.index, it.key.clone());
        self.progress.cached += 1;
        self.mark_done(index);
        self.deliver(BatchOutcome {
            index,
            key,
            result: Ok(hit),
        });
    }

    /// Settles item `p` with an error: releases what it held, records it. A deferred
    /// request whose caller went live is only withdrawn: the live call has its record.
    async fn fail(&mut self, p: usize, e: Error) {
        if self.abandoned(p) {
            self.withdraw(p).await;
            return;
        }
        if !self.release_item(p).await {
            return;
        }
        let inner = Arc::clone(self.inner());
        let it = &self.items[p];
        let mut rec = it.rec.clone();
        rec.set_error(&e);
        inner.record(rec, &observe::request_span(&it.req, false), None);
        let (index, key) = (it.index, it.key.clone());
        self.progress.failed += 1;
        self.mark_done(index);
        if let Some(followers) = self.followers.remove(&p) {
            // they may fare better on their own
            self.promoted.extend(followers);
        }
        self.deliver(BatchOutcome {
            index,
            key,
            result: Err(e),
        });
    }

    /// An item refused before it was followed (no reservation held).
    fn emit_error(
        &mut self,
        index: usize,
        key: &str,
        req: &ChatRequest,
        rec: Option<UsageRecord>,
        e: Error,
    ) {
        if let Some(mut rec) = rec {
            rec.set_error(&e);
            self.inner()
                .record(rec, &observe::request_span(req, false), None);
        }
        self.progress.failed += 1;
        self.mark_done(index);
        self.deliver(BatchOutcome {
            index,
            key: key.to_owned(),
            result: Err(e),
        });
    }

    /// Sends an outcome to the item's deferred caller, or else to the handle.
    fn deliver(&mut self, outcome: BatchOutcome) {
        match self.callers.get_mut(outcome.index).and_then(Option::take) {
            Some(caller) => {
                let _ = caller.send(outcome.result);
            }
            None => {
                let _ = self.out.send(outcome);
            }
        }
    }

    /// Whether item `p` is a deferred request whose caller no longer waits for it.
    fn abandoned(&self, p: usize) -> bool {
        self.items.get(p).is_some_and(|it| {
            self.callers
                .get(it.index)
                .and_then(Option::as_ref)
                .is_some_and(oneshot::Sender::is_closed)
        })
    }

    /// Settles item `p`, whose caller went live instead, without an answer from its batch
    /// (not sent, so the provider does not bill it a second time, or failed or cancelled
    /// in its batch): releases what it held. No usage record: the live call wrote the
    /// request's own.
    async fn withdraw(&mut self, p: usize) {
        if !self.release_item(p).await {
            return;
        }
        let index = self.items[p].index;
        if let Some(c) = self.callers.get_mut(index) {
            c.take();
        }
        // counted with the failures: it had no answer from this call
        self.progress.failed += 1;
        self.mark_done(index);
        if let Some(followers) = self.followers.remove(&p) {
            // their callers may still be waiting
            self.promoted.extend(followers);
        }
    }

    /// Marks item `i` done and gives back what it held, spending nothing: its budget
    /// reservation and its token charge. `false` if it was already done.
    async fn release_item(&mut self, i: usize) -> bool {
        let inner = Arc::clone(self.inner());
        let it = &mut self.items[i];
        if it.done {
            return false;
        }
        it.done = true;
        inner.commit(it.reservation.take(), Cost::ZERO).await;
        if it.charged > 0 {
            inner.reconcile_tokens(&it.req.meta, it.charged, 0).await;
        }
        true
    }

    fn mark_done(&mut self, index: usize) {
        if let Some(ji) = lock(&self.journal).items.get_mut(index) {
            ji.done = true;
        }
    }

    fn publish(&self) {
        self.progress_tx.send_replace(self.progress);
    }

    /// On stop: gives back what unfinished items hold; they stay undone in the journal.
    async fn release(&mut self) {
        let inner = Arc::clone(self.inner());
        for it in self.items.iter_mut().filter(|it| !it.done) {
            inner.commit(it.reservation.take(), Cost::ZERO).await;
            if it.charged > 0 {
                inner.reconcile_tokens(&it.req.meta, it.charged, 0).await;
            }
        }
    }
}

/// The same error again, for each item a batch-wide failure reaches.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Provider(p) => {
            let mut c = ProviderError::new(p.kind, p.provider.clone(), p.message.clone());
            c.status = p.status;
            c.retry_after = p.retry_after;
            c.rate_limits = p.rate_limits;
            c.into()
        }
        Error::InvalidRequest(m) => Error::InvalidRequest(m.clone()),
        Error::Config(m) => Error::Config(m.clone()),
        Error::Overloaded { retry_after } => Error::Overloaded {
            retry_after: *retry_after,
        },
        other => {
            ProviderError::new(ProviderErrorKind::Server, "tokenwise", other.to_string()).into()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cache warming.

/// How [`Pipeline::warm`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WarmOptions {
    /// Live calls at once (default 4).
    pub concurrency: usize,
    /// Whether the misses go through the batch path, at the batch discount, instead of
    /// live calls (default off).
    pub via_batch: bool,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            concurrency: 4,
            via_batch: false,
        }
    }
}

impl WarmOptions {
    /// Live calls at once.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Through the batch path.
    #[must_use]
    pub fn via_batch(mut self, on: bool) -> Self {
        self.via_batch = on;
        self
    }
}

/// What [`Pipeline::warm`] did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct WarmReport {
    /// Answers newly stored in the cache.
    pub stored: usize,
    /// Questions already in the cache, skipped.
    pub already_cached: usize,
    /// Answers obtained but not stored (incomplete, or with tool calls).
    pub not_cacheable: usize,
    /// Questions that failed, by position, with why.
    pub failed: Vec<(usize, Error)>,
    /// What the new answers cost.
    pub cost: Cost,
    /// The tokens they used.
    pub usage: Usage,
}

impl Pipeline {
    /// Answers `requests` and stores the answers in the cache ahead of traffic, skipping
    /// those already cached, with at most [`WarmOptions::concurrency`] live calls at once
    /// (or through the batch path), under the pipeline's limits and spend caps. Reports
    /// what it stored and what it cost.
    pub async fn warm(
        &self,
        requests: Vec<ChatRequest>,
        options: WarmOptions,
    ) -> Result<WarmReport> {
        if self.inner.cache.is_none() {
            return Err(Error::Config("warming needs a cache".into()));
        }
        if options.concurrency == 0 {
            return Err(Error::InvalidRequest(
                "warming needs a concurrency of at least 1".into(),
            ));
        }
        let mut report = WarmReport::default();
        let mut misses: Vec<(usize, ChatRequest)> = Vec::new();
        for (i, req) in requests.into_iter().enumerate() {
            match self.inner.plan(&req) {
                Ok(mut plan) if plan.cache.is_some() => {
                    if self.inner.cache_get(&req, &mut plan).await.is_some() {
                        report.already_cached += 1;
                    } else {
                        misses.push((i, req));
                    }
                }
                Ok(_) => report.failed.push((
                    i,
                    Error::InvalidRequest("this request is not cacheable (cache bypassed)".into()),
                )),
                Err(e) => report.failed.push((i, e)),
            }
        }
        let tally = |i: usize, r: Result<ChatResponse>, report: &mut WarmReport| match r {
            Ok(r) if r.served.is_cache_hit() => report.already_cached += 1,
            Ok(r) => {
                report.cost += r.cost;
                report.usage = add_usage(report.usage, r.usage);
                if is_cacheable(&r) {
                    report.stored += 1;
                } else {
                    report.not_cacheable += 1;
                }
            }
            Err(e) => report.failed.push((i, e)),
        };
        if options.via_batch && !misses.is_empty() {
            let (idx, reqs): (Vec<usize>, Vec<ChatRequest>) = misses.into_iter().unzip();
            let handle = self.batch(reqs).await?;
            for o in handle.collect().await {
                tally(idx[o.index], o.result, &mut report);
            }
        } else {
            let mut calls = futures_util::stream::iter(misses)
                .map(|(i, req)| async move { (i, self.chat(req).await) })
                .buffer_unordered(options.concurrency);
            while let Some((i, r)) = calls.next().await {
                tally(i, r, &mut report);
            }
        }
        report.failed.sort_by_key(|(i, _)| *i);
        Ok(report)
    }
}

fn add_usage(a: Usage, b: Usage) -> Usage {
    a + b
}

// ---------------------------------------------------------------------------------------
// Deferrable requests.

/// A deferred request, its caller, and whether it was deferred instead of refused.
type Waiting = (ChatRequest, oneshot::Sender<Result<ChatResponse>>, bool);

/// Deferrable requests waiting to be sent as one batch.
#[derive(Debug, Default)]
struct Deferred {
    waiting: Vec<Waiting>,
    /// Bumped at every flush, so a window timer flushes only its own gathering.
    generation: u64,
}

impl Pipeline {
    /// Whether `req` goes the deferred way: deferrable, with a batch provider set up.
    pub(super) fn defers(&self, req: &ChatRequest) -> bool {
        req.meta.deferrable.is_some() && !self.inner.batch.providers.is_empty()
    }

    /// A deferrable request: gathered into a batch, or called at once if it cannot wait
    /// for one.
    pub(super) async fn chat_deferred(&self, mut req: ChatRequest) -> Result<ChatResponse> {
        let opts = &self.inner.batch.options;
        let max_wait = req.meta.deferrable.take().unwrap_or_default();
        let deadline = Instant::now() + max_wait;
        let needs = opts.defer_window + opts.defer_turnaround + opts.defer_live_margin;
        let batchable = self.inner.plan(&req).is_ok_and(|plan| {
            plan.route
                .targets
                .first()
                .is_some_and(|m| self.inner.batch.provider_for(m).is_ok())
        });
        let refusal = if opts.defer_near_cap && batchable {
            self.inner.refuse_gate(&req.meta).await.err()
        } else {
            None
        };
        if !batchable || (max_wait < needs && refusal.is_none()) {
            tracing::debug!(
                ?max_wait,
                batchable,
                "deferrable request not batched: calling now"
            );
            return Box::pin(self.chat(req)).await;
        }
        let near_cap = refusal.is_some();
        let (tx, rx) = oneshot::channel();
        let flush_now = {
            let mut q = self.inner.batch.deferred();
            if q.waiting.len() >= opts.defer_queue {
                return Err(Error::Overloaded {
                    retry_after: Some(opts.defer_window),
                });
            }
            q.waiting.push((req.clone(), tx, near_cap));
            if q.waiting.len() >= opts.defer_batch_size {
                Some(take_waiting(&mut q))
            } else {
                if q.waiting.len() == 1 {
                    let generation = q.generation;
                    let me = self.clone();
                    let window = opts.defer_window;
                    tokio::spawn(async move {
                        tokio::time::sleep(window).await;
                        let waiting = {
                            let mut q = me.inner.batch.deferred();
                            (q.generation == generation).then(|| take_waiting(&mut q))
                        };
                        if let Some(w) = waiting {
                            me.flush_deferred(w).await;
                        }
                    });
                }
                None
            }
        };
        if let Some(w) = flush_now {
            let me = self.clone();
            tokio::spawn(async move { me.flush_deferred(w).await });
        }
        let fallback_at = deadline
            .checked_sub(opts.defer_live_margin)
            .unwrap_or(deadline);
        tokio::select! {
            r = rx => match r {
                Ok(r) => r,
                // the batch path went away without an answer: call now
                Err(_) => Box::pin(self.chat(req)).await,
            },
            () = tokio::time::sleep_until(fallback_at) => match refusal {
                // near the cap, a live call would be refused: say so
                Some(e) => Err(e),
                None => {
                    tracing::info!("deferred request's batch is late: calling now");
                    Box::pin(self.chat(req)).await
                }
            }
        }
    }

    async fn flush_deferred(&self, waiting: Vec<Waiting>) {
        // Those deferred instead of refused go in a batch of their own, past the gate.
        let (past, normal): (Vec<Waiting>, Vec<Waiting>) = waiting.into_iter().partition(|w| w.2);
        let me = self.clone();
        let other = tokio::spawn(async move { me.flush_group(past, true).await });
        self.flush_group(normal, false).await;
        let _ = other.await;
    }

    async fn flush_group(&self, waiting: Vec<Waiting>, past_refuse_gate: bool) {
        if waiting.is_empty() {
            return;
        }
        let (reqs, callers): (Vec<ChatRequest>, Vec<Option<Caller>>) = waiting
            .into_iter()
            .map(|(req, tx, _)| (req, Some(tx)))
            .unzip();
        // outcomes go to the callers; the handle only says when the call is over (an
        // error here has already been sent to each of them)
        if let Ok(handle) = self.batch_with(reqs, past_refuse_gate, callers) {
            let _ = handle.collect().await;
        }
    }
}

fn take_waiting(q: &mut Deferred) -> Vec<Waiting> {
    q.generation += 1;
    std::mem::take(&mut q.waiting)
}
