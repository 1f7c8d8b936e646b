//! [`JsonlSink`]: usage records as JSON lines, written off the request path.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, BufRead, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{UsageRecord, UsageSink, metrics};

/// The longest line [`read_jsonl`] accepts.
const MAX_LINE: u64 = 1 << 20;

enum Msg {
    Record(Box<UsageRecord>),
    Flush(SyncSender<io::Result<()>>),
    Close,
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
}

/// What a [`JsonlSink`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct JsonlStats {
    /// Records handed to the writer.
    pub written: u64,
    /// Records lost: the queue was full, the sink was closed, or their write failed.
    pub dropped: u64,
    /// I/O errors the writer met (each one logged); a failed flush may lose the
    /// records buffered at the time.
    pub write_errors: u64,
}

/// A [`UsageSink`] that appends one JSON object per line to a file or any writer.
///
/// `record` never blocks and never does I/O: it puts the record on a bounded queue
/// that a dedicated thread drains into a buffered writer, flushing whenever the queue
/// runs empty. When the queue is full the record is dropped, and every drop is counted
/// ([`stats`](Self::stats)), metered (`tokenwise_usage_records_dropped_total{sink="jsonl"}`)
/// and logged (at the first drop and every power of two after it), so records are never
/// lost silently. [`flush`](Self::flush) waits until everything queued so far is
/// written; dropping the sink (or [`close`](Self::close)) writes what is queued and
/// stops the thread.
///
/// The line format is [`UsageRecord`]'s serde form; read it back with [`read_jsonl`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenwise::observe::{JsonlSink, read_jsonl};
/// use tokenwise::provider::SimulatedProvider;
/// use tokenwise::{ChatRequest, Pipeline};
///
/// let path = std::env::temp_dir().join(format!("tokenwise-doc-{}.jsonl", std::process::id()));
/// let sink = Arc::new(JsonlSink::create(&path)?);
/// let pipeline = Pipeline::builder()
///     .provider(SimulatedProvider::new())
///     .default_model("gpt-4o-mini")
///     .usage_sink(sink.clone())
///     .build()?;
/// pipeline.chat(ChatRequest::user_text("hello").user("ann")).await?;
/// sink.flush()?;
/// let records = read_jsonl(std::io::BufReader::new(std::fs::File::open(&path)?))
///     .collect::<Result<Vec<_>, _>>()?;
/// assert_eq!(records.len(), 1);
/// assert_eq!(records[0].user.as_deref(), Some("ann"));
/// # std::fs::remove_file(&path)?;
/// # Ok(()) }
/// ```
pub struct JsonlSink {
    tx: SyncSender<Msg>,
    counters: Arc<Counters>,
    worker: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    capacity: usize,
}

impl fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonlSink")
            .field("capacity", &self.capacity)
            .field("stats", &self.stats())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl JsonlSink {
    /// Records queued by default before new ones are dropped.
    pub const DEFAULT_CAPACITY: usize = 10_000;

    /// Appends to the file at `path`, creating it if needed, with the default queue of
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) records.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Self::with_capacity(file, Self::DEFAULT_CAPACITY)
    }

    /// Writes to `writer` with the default queue of [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) records.
    pub fn new(writer: impl Write + Send + 'static) -> io::Result<Self> {
        Self::with_capacity(writer, Self::DEFAULT_CAPACITY)
    }

    /// Writes to `writer`, queueing at most `capacity` records (at least one). Fails
    /// only if the writer thread cannot be started.
    pub fn with_capacity(writer: impl Write + Send + 'static, capacity: usize) -> io::Result<Self> {
        let capacity = capacity.max(1);
        let (tx, rx) = sync_channel(capacity);
        let counters = Arc::new(Counters::default());
        let shared = Arc::clone(&counters);
        let out: Box<dyn Write + Send> = Box::new(writer);
        let worker = std::thread::Builder::new()
            .name("tokenwise-jsonl".into())
            .spawn(move || run(BufWriter::new(out), &rx, &shared))?;
        Ok(JsonlSink {
            tx,
            counters,
            worker: Mutex::new(Some(worker)),
            closed: AtomicBool::new(false),
            capacity,
        })
    }

    /// Counts so far.
    pub fn stats(&self) -> JsonlStats {
        JsonlStats {
            written: self.counters.written.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            write_errors: self.counters.write_errors.load(Ordering::Relaxed),
        }
    }

    /// Blocks until every record queued before this call is written and flushed.
    /// For shutdown paths and tests; never call it on a request path.
    pub fn flush(&self) -> io::Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let (ack, done) = sync_channel(1);
        self.tx
            .send(Msg::Flush(ack))
            .map_err(|_| io::Error::other("the JSONL writer has stopped"))?;
        done.recv()
            .map_err(|_| io::Error::other("the JSONL writer has stopped"))?
    }

    /// Writes everything queued, flushes, and stops the writer thread. Records sent
    /// after this are dropped (and counted). Idempotent; dropping the sink does it too.
    pub fn close(&self) -> io::Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // A full queue makes this wait for room: shutdown, not the request path.
        let _ = self.tx.send(Msg::Close);
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = worker {
            w.join()
                .map_err(|_| io::Error::other("the JSONL writer thread panicked"))?;
        }
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "JSONL usage sink closed; records were dropped");
        }
        Ok(())
    }

    fn drop_one(&self, reason: &'static str) {
        let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::record_dropped("jsonl", reason, 1);
        if n.is_power_of_two() {
            tracing::warn!(
                dropped = n,
                reason,
                capacity = self.capacity,
                "JSONL usage sink dropped a record"
            );
        }
    }
}

impl UsageSink for JsonlSink {
    fn record(&self, record: &UsageRecord) {
        if self.closed.load(Ordering::Acquire) {
            self.drop_one("closed");
            return;
        }
        match self.tx.try_send(Msg::Record(Box::new(record.clone()))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.drop_one("queue_full"),
            Err(TrySendError::Disconnected(_)) => self.drop_one("closed"),
        }
    }
}

impl Drop for JsonlSink {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "JSONL usage sink failed to close");
        }
    }
}

fn write_error(counters: &Counters, e: &io::Error, what: &'static str) {
    let n = counters.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::error!(error = %e, errors = n, "JSONL usage sink could not {what}");
    }
}

/// The writer thread: drains the queue into `out`, flushing when it runs empty.
fn run(mut out: BufWriter<Box<dyn Write + Send>>, rx: &Receiver<Msg>, counters: &Counters) {
    let mut dirty = false;
    let mut line = Vec::with_capacity(512);
    loop {
        let msg = if dirty {
            match rx.try_recv() {
                Ok(m) => m,
                Err(TryRecvError::Empty) => {
                    if let Err(e) = out.flush() {
                        write_error(counters, &e, "flush");
                    }
                    dirty = false;
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            }
        };
        match msg {
            Msg::Record(r) => {
                line.clear();
                let written = serde_json::to_writer(&mut line, &*r)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        line.push(b'\n');
                        out.write_all(&line)
                    });
                match written {
                    Ok(()) => {
                        counters.written.fetch_add(1, Ordering::Relaxed);
                        dirty = true;
                    }
                    Err(e) => {
                        counters.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::record_dropped("jsonl", "io_error", 1);
                        write_error(counters, &e, "write a record");
                    }
                }
            }
            Msg::Flush(ack) => {
                let result = out.flush();
                if let Err(e) = &result {
                    write_error(counters, e, "flush");
                }
                dirty = false;
                let _ = ack.send(result);
            }
            Msg::Close => break,
        }
    }
    if let Err(e) = out.flush() {
        write_error(counters, &e, "flush");
    }
}

/// Reads usage records written by [`JsonlSink`], one per line, skipping blank lines.
/// A malformed line yields an `InvalidData` error naming its line number; so does a
/// line over 1 MiB.
pub fn read_jsonl<R: BufRead>(reader: R) -> impl Iterator<Item = io::Result<UsageRecord>> {
    let mut reader = reader;
    let mut number = 0u64;
    let mut done = false;
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        loop {
            if done {
                return None;
            }
            buf.clear();
            number += 1;
            let n = match reader
                .by_ref()
                .take(MAX_LINE + 1)
                .read_until(b'\n', &mut buf)
            {
                Ok(n) => n,
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            };
            if n == 0 {
                return None;
            }
            if buf.len() as u64 > MAX_LINE {
                done = true;
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("line {number} is longer than {MAX_LINE} bytes"),
                )));
            }
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(serde_json::from_slice(&buf).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("line {number}: {e}"))
            }));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::types::{Cost, RequestMeta};

    /// A writer that shares its bytes, can be held at its next flush, and can fail.
    #[derive(Clone, Default)]
    struct Shared {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
        flushing: Arc<Mutex<Option<SyncSender<()>>>>,
        fail: Arc<AtomicBool>,
    }

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(io::Error::other("disk full"));
            }
            self.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            if let Some(tell) = self.flushing.lock().unwrap().take() {
                let _ = tell.send(());
            }
            let _wait = self.gate.lock().unwrap();
            if self.fail.load(Ordering::Relaxed) {
                return Err(io::Error::other("disk full"));
            }
            Ok(())
        }
    }

    fn record(i: u64) -> UsageRecord {
        let meta = RequestMeta {
            user: Some(format!("u{i}")),
            ..Default::default()
        };
        let mut r = UsageRecord::new(Timestamp::from_secs(i), &meta, false);
        r.cost = Cost::from_nanos(i);
        r
    }

    #[test]
    fn writes_every_record_as_a_line_and_reads_them_back() {
        let out = Shared::default();
        let sink = JsonlSink::new(out.clone()).unwrap();
        for i in 0..100 {
            sink.record(&record(i));
        }
        sink.flush().unwrap();
        assert_eq!(sink.stats().written, 100);
        let bytes = out.bytes.lock().unwrap().clone();
        let back: Vec<UsageRecord> = read_jsonl(&bytes[..]).collect::<io::Result<_>>().unwrap();
        assert_eq!(back.len(), 100);
        assert_eq!(back[42], record(42));
        drop(sink);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let out = Shared::default();
        let (tell, flushing) = sync_channel(1);
        *out.flushing.lock().unwrap() = Some(tell);
        let sink = JsonlSink::with_capacity(out.clone(), 4).unwrap();
        let gate = out.gate.lock().unwrap();
        sink.record(&record(0));
        flushing.recv().unwrap(); // the writer is now stuck in its flush
        for i in 1..=50 {
            sink.record(&record(i)); // never blocks
        }
        assert_eq!(sink.stats().dropped, 46, "4 queued, the rest dropped");
        drop(gate);
        sink.close().unwrap();
        let st = sink.stats();
        assert_eq!((st.written, st.dropped), (5, 46));
        let bytes = out.bytes.lock().unwrap().clone();
        assert_eq!(read_jsonl(&bytes[..]).count(), 5);
        // after close, records are dropped and counted
        sink.record(&record(99));
        assert_eq!(sink.stats().dropped, 47);
    }

    #[test]
    fn write_errors_are_counted_not_hidden() {
        let out = Shared::default();
        out.fail.store(true, Ordering::Relaxed);
        let sink = JsonlSink::with_capacity(out.clone(), 8).unwrap();
        sink.record(&record(1));
        assert!(sink.flush().is_err());
        assert!(sink.stats().write_errors >= 1);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        let text = format!(
            "{}\n\n{{not json}}\n",
            serde_json::to_string(&record(1)).unwrap()
        );
        let mut it = read_jsonl(text.as_bytes());
        assert!(it.next().unwrap().is_ok());
        let e = it.next().unwrap().unwrap_err();
        assert!(e.to_string().starts_with("line 3:"), "{e}");
        let long = vec![b'x'; (MAX_LINE + 10) as usize];
        assert!(read_jsonl(&long[..]).next().unwrap().is_err());
    }
}
