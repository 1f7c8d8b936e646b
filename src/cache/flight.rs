//! Single-flight: concurrent identical cache misses share one provider call.
//!
//! The first request to miss on a key becomes the [`Leader`] and calls the provider;
//! requests that miss on the same key while it is in flight become [`Follower`]s and
//! wait for what the leader [publishes](Leader::publish). A whole answer is published
//! once; a stream is published as a [`SharedStream`] as soon as it opens, and every
//! follower reads the same upstream events from the start, as the leader reads them.
//!
//! Everything is bounded: at most `max_keys` keys in flight (past that, requests go
//! [`Alone`](Join::Alone), uncoalesced), at most `max_waiters` followers a key (the same),
//! and a shared stream buffers at most [`MAX_SHARED_STREAM_EVENTS`] events and
//! [`MAX_SHARED_STREAM_BYTES`] bytes of text (past that its followers get a
//! [`StreamInterrupted`](crate::Error::StreamInterrupted) error; the leader is unaffected).

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::CacheKey;
use crate::Error;
use crate::types::{ChatStream, Cost, Served, StreamEnd, StreamEvent};

/// The most events a shared stream buffers for its followers.
pub const MAX_SHARED_STREAM_EVENTS: usize = 1 << 20;
/// The most bytes of text and tool-call arguments a shared stream buffers.
pub const MAX_SHARED_STREAM_BYTES: usize = 32 << 20;

/// One key's flight. Its channel is made by the first follower to join (most flights
/// have none), under the flights' lock, and taken away by the leader when it ends, which
/// tells followers still waiting that nothing more will come.
struct Slot<V> {
    tx: Mutex<Option<watch::Sender<Option<V>>>>,
    waiters: AtomicUsize,
}

impl<V> Slot<V> {
    fn sender(&self) -> MutexGuard<'_, Option<watch::Sender<Option<V>>>> {
        // One operation per critical section: a poisoned slot is consistent.
        self.tx.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Flights by key (digests: hashed by their first bytes).
type Flights<V> = HashMap<CacheKey, Arc<Slot<V>>, super::BuildKeyHasher>;

struct Map<V> {
    flights: Mutex<Flights<V>>,
    max_keys: usize,
    max_waiters: usize,
}

impl<V> Map<V> {
    fn lock(&self) -> MutexGuard<'_, Flights<V>> {
        // Each critical section is one map operation: a poisoned map is consistent.
        self.flights.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Coalesces concurrent work on the same [`CacheKey`]. Cheap to clone; clones share
/// the flights.
pub(crate) struct SingleFlight<V> {
    map: Arc<Map<V>>,
}

impl<V> Clone for SingleFlight<V> {
    fn clone(&self) -> Self {
        SingleFlight {
            map: Arc::clone(&self.map),
        }
    }
}

impl<V> fmt::Debug for SingleFlight<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight")
            .field("in_flight", &self.in_flight())
            .field("max_keys", &self.map.max_keys)
            .field("max_waiters", &self.map.max_waiters)
            .finish()
    }
}

impl<V> Default for SingleFlight<V> {
    /// 10,000 keys in flight, 1,024 followers a key.
    fn default() -> Self {
        SingleFlight::new(10_000, 1_024)
    }
}

/// The role of a request in a flight.
#[derive(Debug)]
pub(crate) enum Join<V> {
    /// First on this key: do the work, then [`publish`](Leader::publish).
    Leader(Leader<V>),
    /// The key is in flight: [`wait`](Follower::wait) for the leader.
    Follower(Follower<V>),
    /// Too many keys or followers in flight: do the work without coalescing.
    Alone,
}

impl<V> SingleFlight<V> {
    /// A flight map of at most `max_keys` keys and `max_waiters` followers a key (zero
    /// turns coalescing off).
    pub(crate) fn new(max_keys: usize, max_waiters: usize) -> Self {
        SingleFlight {
            map: Arc::new(Map {
                flights: Mutex::new(HashMap::default()),
                max_keys,
                max_waiters,
            }),
        }
    }

    /// Keys in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.map.lock().len()
    }

    /// Joins the flight on `key`, or starts it.
    pub(crate) fn join(&self, key: CacheKey) -> Join<V> {
        let mut flights = self.map.lock();
        if let Some(slot) = flights.get(&key) {
            let n = slot.waiters.fetch_add(1, Ordering::AcqRel);
            if n >= self.map.max_waiters {
                slot.waiters.fetch_sub(1, Ordering::AcqRel);
                return Join::Alone;
            }
            let rx = {
                let mut tx = slot.sender();
                match tx.as_ref() {
                    Some(tx) => tx.subscribe(),
                    None => {
                        let (sender, rx) = watch::channel(None);
                        *tx = Some(sender);
                        rx
                    }
                }
            };
            return Join::Follower(Follower {
                rx,
                slot: Arc::clone(slot),
            });
        }
        if flights.len() >= self.map.max_keys || self.map.max_waiters == 0 {
            return Join::Alone;
        }
        let slot = Arc::new(Slot {
            tx: Mutex::new(None),
            waiters: AtomicUsize::new(0),
        });
        flights.insert(key, Arc::clone(&slot));
        Join::Leader(Leader {
            map: Arc::clone(&self.map),
            key,
            slot,
        })
    }
}

/// The request doing the work for a key. Dropping it ends the flight: followers that
/// got nothing published go on alone.
pub(crate) struct Leader<V> {
    map: Arc<Map<V>>,
    key: CacheKey,
    slot: Arc<Slot<V>>,
}

impl<V> fmt::Debug for Leader<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader")
            .field("key", &self.key)
            .field("waiters", &self.waiters())
            .finish()
    }
}

impl<V> Leader<V> {
    /// Hands `value` to every follower, present and future, until the leader is dropped.
    pub(crate) fn publish(&self, value: V) {
        let mut tx = self.slot.sender();
        match tx.as_ref() {
            Some(tx) => {
                tx.send_replace(Some(value));
            }
            // no follower yet: the channel is made with the value in it
            None => *tx = Some(watch::channel(Some(value)).0),
        }
    }

    /// Hands the value `make` gives to every follower, present and future, until the
    /// leader is dropped; with no follower yet, ends the flight instead (no request can
    /// join it any more, and `make` is not called): the common case pays no copy.
    pub(crate) fn publish_with(&self, make: impl FnOnce() -> V) {
        {
            // Followers join under this lock, so none can join between the count and
            // the removal.
            let mut flights = self.map.lock();
            if self.slot.waiters.load(Ordering::Acquire) == 0 {
                self.retire(&mut flights);
                return;
            }
        }
        self.publish(make());
    }

    /// Followers waiting or reading.
    pub(crate) fn waiters(&self) -> usize {
        self.slot.waiters.load(Ordering::Acquire)
    }

    /// Ends this flight in `flights` (the map, locked), if it is still this leader's:
    /// no request can join it any more.
    fn retire(&self, flights: &mut Flights<V>) {
        if flights
            .get(&self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            flights.remove(&self.key);
        }
    }
}

impl<V> Drop for Leader<V> {
    fn drop(&mut self) {
        self.retire(&mut self.map.lock());
        // No follower can join any more: closing the channel tells those waiting that
        // nothing (more) will come.
        drop(self.slot.sender().take());
    }
}

/// A request waiting for its leader.
pub(crate) struct Follower<V> {
    rx: watch::Receiver<Option<V>>,
    slot: Arc<Slot<V>>,
}

impl<V> fmt::Debug for Follower<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower").finish_non_exhaustive()
    }
}

impl<V> Drop for Follower<V> {
    fn drop(&mut self) {
        self.slot.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<V> Follower<V> {
    /// What the leader published, or `None` when it ended without publishing (it
    /// failed, or its answer may not be shared): then do the work alone.
    pub(crate) async fn wait(self) -> Option<V>
    where
        V: Clone,
    {
        self.wait_with(V::clone).await
    }

    /// Like [`wait`](Self::wait), applying `f` to the value while still counted as a
    /// waiter (so a shared stream cannot end for lack of readers in between).
    pub(crate) async fn wait_with<R>(mut self, f: impl FnOnce(&V) -> R) -> Option<R> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(v) => v.as_ref().map(f),
            Err(_) => None,
        }
    }
}

/// How a shared stream ended.
#[derive(Debug, Clone)]
enum End {
    Done,
    Failed { chunks: u64, reason: String },
}

#[derive(Debug, Default)]
struct Buffer {
    events: Vec<StreamEvent>,
    bytes: usize,
    chunks: u64,
    end: Option<End>,
}

/// One upstream stream, recorded for every reader: the leader's own stream feeds it as
/// the leader reads; [`subscribe`](Self::subscribe) replays it from the start and then
/// follows it live.
pub(crate) struct SharedStream {
    buffer: Mutex<Buffer>,
    version: watch::Sender<u64>,
    readers: AtomicUsize,
}

impl fmt::Debug for SharedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.lock();
        f.debug_struct("SharedStream")
            .field("events", &b.events.len())
            .field("ended", &b.end.is_some())
            .field("readers", &self.readers.load(Ordering::Relaxed))
            .finish()
    }
}

/// Called once with the final event a follower reads.
pub(crate) type OnEnd = Box<dyn FnOnce(&StreamEnd) + Send>;

impl SharedStream {
    fn new() -> Arc<Self> {
        Arc::new(SharedStream {
            buffer: Mutex::new(Buffer::default()),
            version: watch::channel(0).0,
            readers: AtomicUsize::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // Each critical section leaves the buffer consistent.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn push(&self, ev: &StreamEvent) {
        {
            let mut b = self.lock();
            if b.end.is_some() {
                return;
            }
            let size = match ev {
                StreamEvent::TextDelta { text } => text.len(),
                StreamEvent::ToolCallDelta(d) => d.arguments.len(),
                _ => 0,
            };
            if matches!(
                ev,
                StreamEvent::TextDelta { .. } | StreamEvent::ToolCallDelta(_)
            ) {
                b.chunks += 1;
            }
            if b.events.len() >= MAX_SHARED_STREAM_EVENTS
                || b.bytes.saturating_add(size) > MAX_SHARED_STREAM_BYTES
            {
                let chunks = b.chunks;
                b.end = Some(End::Failed {
                    chunks,
                    reason: "the shared stream outgrew its buffer".into(),
                });
            } else {
                b.bytes += size;
                b.events.push(ev.clone());
                if matches!(ev, StreamEvent::Done(_)) {
                    b.end = Some(End::Done);
                }
            }
        }
        self.notify();
    }

    fn fail(&self, reason: String) {
        {
            let mut b = self.lock();
            if b.end.is_some() {
                return;
            }
            let chunks = b.chunks;
            b.end = Some(End::Failed { chunks, reason });
        }
        self.notify();
    }

    fn ended(&self) -> bool {
        self.lock().end.is_some()
    }

    /// Readers still attached (the leader's own included).
    pub(crate) fn readers(&self) -> usize {
        self.readers.load(Ordering::Acquire)
    }

    /// A follower's view: every event from the start, then live ones, ending like the
    /// upstream. The final event reports the answer as served by the cache (no cost,
    /// the tokens and cost saved), and `on_end` is called with it.
    pub(crate) fn subscribe(self: &Arc<Self>, on_end: Option<OnEnd>) -> ChatStream {
        self.readers.fetch_add(1, Ordering::AcqRel);
        let reader = Reader {
            shared: Arc::clone(self),
            at: 0,
            rx: self.version.subscribe(),
            on_end,
            finished: false,
        };
        Box::pin(futures_util::stream::unfold(reader, |mut r| async move {
            let item = r.next_event().await?;
            Some((item, r))
        }))
    }
}

struct Reader {
    shared: Arc<SharedStream>,
    at: usize,
    rx: watch::Receiver<u64>,
    on_end: Option<OnEnd>,
    finished: bool,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.shared.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reader {
    async fn next_event(&mut self) -> Option<crate::Result<StreamEvent>> {
        if self.finished {
            return None;
        }
        loop {
            self.rx.borrow_and_update();
            let found = {
                let b = self.shared.lock();
                match b.events.get(self.at) {
                    Some(ev) => Some(Ok(ev.clone())),
                    None => match &b.end {
                        Some(End::Failed { chunks, reason }) => {
                            Some(Err(Error::StreamInterrupted {
                                chunks: *chunks,
                                reason: reason.clone(),
                            }))
                        }
                        // `Done` is the last event: reaching past it ends the stream.
                        Some(End::Done) => return None,
                        None => None,
                    },
                }
            };
            match found {
                Some(Ok(ev)) => {
                    self.at += 1;
                    return Some(Ok(self.as_hit(ev)));
                }
                Some(Err(e)) => {
                    self.finished = true;
                    return Some(Err(e));
                }
                None => {
                    if self.rx.changed().await.is_err() {
                        return None; // cannot happen while `shared` is held
                    }
                }
            }
        }
    }

    fn as_hit(&mut self, ev: StreamEvent) -> StreamEvent {
        match ev {
            StreamEvent::Done(mut end) => {
                self.finished = true;
                end.served = Served::Cache {
                    similarity: 1.0,
                    saved_tokens: end.usage.total(),
                    saved_cost: end.cost,
                };
                end.cost = Cost::ZERO;
                if let Some(f) = self.on_end.take() {
                    f(&end);
                }
                StreamEvent::Done(end)
            }
            other => other,
        }
    }
}

/// The leader's stream with a [`SharedStream`] attached: every event the leader reads is
/// recorded for the followers. Published to the followers at once.
///
/// If the leader drops its stream while followers are still reading, the rest of the
/// upstream is read on a spawned task so that they get the whole answer; without
/// followers, dropping it drops the upstream at once, as it would without sharing.
pub(crate) fn share_stream(upstream: ChatStream, leader: Leader<Arc<SharedStream>>) -> ChatStream {
    let shared = SharedStream::new();
    leader.publish(Arc::clone(&shared));
    Box::pin(Tee {
        upstream: Some(upstream),
        shared,
        leader: Some(leader),
    })
}

struct Tee {
    upstream: Option<ChatStream>,
    shared: Arc<SharedStream>,
    leader: Option<Leader<Arc<SharedStream>>>,
}

impl Tee {
    fn record(shared: &SharedStream, item: &Option<crate::Result<StreamEvent>>) -> bool {
        match item {
            Some(Ok(ev)) => {
                shared.push(ev);
                matches!(ev, StreamEvent::Done(_))
            }
            Some(Err(e)) => {
                let reason = match e {
                    Error::StreamInterrupted { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                shared.fail(reason);
                true
            }
            None => {
                shared.fail("the stream ended without a final event".into());
                true
            }
        }
    }
}

impl Stream for Tee {
    type Item = crate::Result<StreamEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(up) = this.upstream.as_mut() else {
            return Poll::Ready(None);
        };
        let item = match up.as_mut().poll_next(cx) {
            Poll::Ready(item) => item,
            Poll::Pending => return Poll::Pending,
        };
        if Self::record(&this.shared, &item) {
            // The flight is over once its stream is: later requests hit the cache.
            this.leader = None;
        }
        if item.is_none() {
            this.upstream = None;
        }
        Poll::Ready(item)
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        let Some(upstream) = self.upstream.take() else {
            return;
        };
        if self.shared.ended() {
            return;
        }
        let followers =
            self.shared.readers() > 0 || self.leader.as_ref().is_some_and(|l| l.waiters() > 0);
        let handle = tokio::runtime::Handle::try_current();
        match (followers, handle) {
            (true, Ok(h)) => {
                let shared = Arc::clone(&self.shared);
                let leader = self.leader.take();
                h.spawn(drive(upstream, shared, leader));
            }
            _ => {
                self.shared
                    .fail("the stream was dropped by the request that opened it".into());
                drop(upstream);
            }
        }
    }
}

/// Reads the rest of `upstream` for the followers after the leader left; stops early
/// once no follower is left.
async fn drive(
    mut upstream: ChatStream,
    shared: Arc<SharedStream>,
    leader: Option<Leader<Arc<SharedStream>>>,
) {
    loop {
        let item = upstream.next().await;
        if Tee::record(&shared, &item) {
            break;
        }
        let waiting = leader.as_ref().is_some_and(|l| l.waiters() > 0);
        if shared.readers() == 0 && !waiting {
            shared.fail("every reader left".into());
            break;
        }
    }
    drop(upstream);
    drop(leader);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_follower_gets_the_leaders_answer_and_the_next_request_leads() {
        let flights: SingleFlight<String> = SingleFlight::new(1_000, 100);
        let key = CacheKey::from_bytes([7; 32]);
        let Join::Leader(leader) = flights.join(key) else {
            panic!("the first request leads")
        };
        let Join::Follower(follower) = flights.join(key) else {
            panic!("the second follows")
        };
        leader.publish("the answer".to_owned());
        drop(leader);
        assert_eq!(follower.wait().await.as_deref(), Some("the answer"));
        assert!(matches!(flights.join(key), Join::Leader(_)));
    }
    use crate::types::{FinishReason, Usage};

    fn key(b: u8) -> CacheKey {
        CacheKey::from_bytes([b; 32])
    }

    #[tokio::test(start_paused = true)]
    async fn publishing_with_no_follower_ends_the_flight_without_a_copy() {
        let f = SingleFlight::<u32>::new(8, 8);
        let Join::Leader(l) = f.join(key(1)) else {
            panic!("first is the leader")
        };
        l.publish_with(|| panic!("no follower: nothing to copy"));
        assert_eq!(f.in_flight(), 0);
        // a request after it leads a flight of its own
        let Join::Leader(l2) = f.join(key(1)) else {
            panic!("the ended flight is not joined")
        };
        drop(l); // the first leader's drop leaves the new flight alone
        assert_eq!(f.in_flight(), 1);
        let Join::Follower(w) = f.join(key(1)) else {
            panic!("a follower of the new flight")
        };
        l2.publish_with(|| 7);
        assert_eq!(w.wait().await, Some(7));
    }

    #[tokio::test]
    async fn a_follower_after_the_publication_gets_it_at_once_and_one_left_waiting_is_released() {
        let f = SingleFlight::<u32>::new(8, 8);
        let Join::Leader(l) = f.join(key(2)) else {
            panic!("first is the leader")
        };
        l.publish(5); // no follower yet
        let Join::Follower(late) = f.join(key(2)) else {
            panic!("the flight is still on")
        };
        assert_eq!(late.wait().await, Some(5));
        drop(l);
        let Join::Leader(l) = f.join(key(3)) else {
            panic!("a new flight")
        };
        let Join::Follower(waiting) = f.join(key(3)) else {
            panic!("a follower")
        };
        let waited = tokio::spawn(waiting.wait());
        drop(l); // ends without publishing
        assert_eq!(waited.await.ok(), Some(None));
    }

    #[tokio::test]
    async fn bounded_keys_and_waiters() {
        let f: SingleFlight<u32> = SingleFlight::new(2, 1);
        let Join::Leader(a) = f.join(key(1)) else {
            panic!()
        };
        let Join::Leader(_b) = f.join(key(2)) else {
            panic!()
        };
        assert!(matches!(f.join(key(3)), Join::Alone), "too many keys");
        let Join::Follower(w) = f.join(key(1)) else {
            panic!()
        };
        assert!(matches!(f.join(key(1)), Join::Alone), "too many waiters");
        assert_eq!(a.waiters(), 1);
        drop(a);
        assert_eq!(w.wait().await, None, "the leader left without publishing");
        assert_eq!(f.in_flight(), 1);
        assert!(matches!(
            SingleFlight::<u32>::new(10, 0).join(key(1)),
            Join::Alone
        ));
    }

    fn events() -> Vec<crate::Result<StreamEvent>> {
        let mut end = StreamEnd::new(FinishReason::Stop, "m", "p");
        end.usage = Usage::new(3, 2);
        end.cost = Cost::from_micros(5);
        vec![
            Ok(StreamEvent::text("a ")),
            Ok(StreamEvent::text("b")),
            Ok(StreamEvent::Usage(Usage::new(3, 2))),
            Ok(StreamEvent::Done(end)),
        ]
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_stream_replays_then_follows_and_reports_a_hit() {
        let f: SingleFlight<Arc<SharedStream>> = SingleFlight::default();
        let Join::Leader(l) = f.join(key(1)) else {
            panic!()
        };
        let mut lead = share_stream(Box::pin(futures_util::stream::iter(events())), l);
        let first = lead.next().await;
        assert!(matches!(first, Some(Ok(StreamEvent::TextDelta { .. }))));
        // joins after the first event: replays it
        let Join::Follower(w) = f.join(key(1)) else {
            panic!()
        };
        let seen = Arc::new(Mutex::new(None));
        let seen2 = Arc::clone(&seen);
        let mut follow = w
            .wait_with(|s| {
                s.subscribe(Some(Box::new(move |end: &StreamEnd| {
                    *seen2.lock().unwrap() = Some(end.served.clone());
                })))
            })
            .await
            .unwrap();
        let lead_rest: Vec<_> = lead.by_ref().collect().await;
        assert_eq!(lead_rest.len(), 3);
        let got: Vec<StreamEvent> = follow.by_ref().map(|e| e.unwrap()).collect().await;
        assert_eq!(got.len(), 4);
        let Some(StreamEvent::Done(end)) = got.last() else {
            panic!()
        };
        assert_eq!(end.cost, Cost::ZERO);
        assert!(matches!(
            end.served,
            Served::Cache { saved_tokens: 5, saved_cost, .. } if saved_cost == Cost::from_micros(5)
        ));
        assert!(seen.lock().unwrap().is_some());
        assert_eq!(f.in_flight(), 0, "the flight ended with the stream");
    }

    #[tokio::test(start_paused = true)]
    async fn followers_get_the_rest_when_the_leader_drops_and_an_error_when_it_breaks() {
        let f: SingleFlight<Arc<SharedStream>> = SingleFlight::default();
        let Join::Leader(l) = f.join(key(1)) else {
            panic!()
        };
        let mut lead = share_stream(Box::pin(futures_util::stream::iter(events())), l);
        let Join::Follower(w) = f.join(key(1)) else {
            panic!()
        };
        let follow = w.wait_with(|s| s.subscribe(None)).await.unwrap();
        let _ = lead.next().await;
        drop(lead);
        let got: Vec<_> = follow.collect().await;
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got.iter().all(Result::is_ok));

        // A broken upstream breaks the followers too, never a clean end.
        let Join::Leader(l) = f.join(key(2)) else {
            panic!()
        };
        let broken: Vec<crate::Result<StreamEvent>> = vec![
            Ok(StreamEvent::text("a")),
            Err(Error::StreamInterrupted {
                chunks: 1,
                reason: "cut".into(),
            }),
        ];
        let lead = share_stream(Box::pin(futures_util::stream::iter(broken)), l);
        let Join::Follower(w) = f.join(key(2)) else {
            panic!()
        };
        let follow = w.wait_with(|s| s.subscribe(None)).await.unwrap();
        let _: Vec<_> = lead.collect().await;
        let got: Vec<_> = follow.collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(
            got[1],
            Err(Error::StreamInterrupted { chunks: 1, .. })
        ));

        // Dropped with nobody else reading: the upstream is dropped at once.
        let Join::Leader(l) = f.join(key(3)) else {
            panic!()
        };
        let mut lead = share_stream(Box::pin(futures_util::stream::iter(events())), l);
        let _ = lead.next().await;
        drop(lead);
        assert_eq!(f.in_flight(), 0);
    }
}
