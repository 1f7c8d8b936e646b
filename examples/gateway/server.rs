//! The HTTP/1.1 server: hyper under the axum router, with the bounds a public endpoint
//! needs and `axum::serve` does not set.
//!
//! - At most `max_connections` connections; further ones wait in the listen backlog.
//! - A header read timeout: a client that opens a connection and trickles (or never
//!   sends) its request head is disconnected, idle keep-alive connections included.
//!   One timer per connection, checked when it runs out rather than re-armed for every
//!   request: arming a timer that runs out before every other one makes tokio wake
//!   its driver (a system call, and on a multi-threaded runtime another thread), and
//!   hyper's own header timer did that for every request on a keep-alive connection.
//! - A write-stall timeout: a client that stops reading its response for that long is
//!   disconnected, so it cannot pin a connection and a stream forever.
//! - Graceful shutdown: stop accepting, let requests in flight finish for a grace
//!   period, then return.
//! - Optional busy polling (`Limits::busy_poll`): a task that keeps the runtime polling
//!   its sockets for a short window after each request starts or finishes, so that the
//!   next event on the gateway's hops is seen without the runtime's thread going to
//!   sleep and being woken again.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::Limits;

/// The client's address, put into every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The longest busy-polling window taken; a longer one is taken as this.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// Settles busy polling and the runtime's worker threads from what was asked: the
/// window in microseconds (`None` or 0: off) and the workers (`None`: the default, 2).
/// Busy polling runs the gateway on one thread, so it takes 1 worker by default and
/// refuses more; a window over [`MAX_BUSY_POLL`] is refused, not cut.
pub fn busy_poll_threads(
    busy_us: Option<u64>,
    workers: Option<usize>,
) -> Result<(Option<u64>, usize), String> {
    let busy = busy_us.filter(|&us| us > 0);
    let max = MAX_BUSY_POLL.as_micros();
    if let Some(us) = busy.filter(|&us| u128::from(us) > max) {
        return Err(format!(
            "busy polling for {us} us: at most {max} us (it spends that much CPU time after each request)"
        ));
    }
    let workers = match (busy, workers) {
        (Some(_), Some(n)) if n > 1 => {
            return Err(format!(
                "busy polling runs the gateway on one thread: --workers {n} does not go with it"
            ));
        }
        (Some(_), _) => 1,
        (None, n) => n.unwrap_or(2),
    };
    Ok((busy, workers))
}

/// Serves `app` on `listener` until `shutdown` completes, then drains connections for
/// up to `limits.shutdown_grace`.
///
/// Busy polling (`limits.busy_poll`) needs a single-threaded runtime: on a
/// multi-threaded one the polling worker seldom holds the I/O driver (an idle worker
/// waits in it), so it would spend a core without polling the sockets. There it is
/// left off, with a warning.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let spinner = match limits.busy_poll.filter(|w| !w.is_zero()) {
        Some(_)
            if tokio::runtime::Handle::current().runtime_flavor()
                != tokio::runtime::RuntimeFlavor::CurrentThread =>
        {
            tracing::warn!(
                "busy polling needs a single-threaded runtime (gateway --workers 1); it is off"
            );
            None
        }
        Some(w) => Some(Spinner::start(w)),
        None => None,
    };
    serve_with(listener, app, limits, shutdown, spinner).await;
}

/// [`serve`] with its busy-polling task, if any, made.
async fn serve_with(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    spinner: Option<Spinner>,
) {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let (closing, closed) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(Guarded::new(tcp, limits.write_stall_timeout, permit));
        let app = app.clone();
        let header_timeout = limits.header_read_timeout;
        let idle = Arc::new(IdleClock::new());
        let spin = spinner.as_ref().map(|s| Arc::clone(&s.0));
        let svc = {
            let idle = Arc::clone(&idle);
            service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(Peer(peer));
                let mut app = app.clone();
                // Busy from the complete request head until the response body is done
                // with (written or dropped).
                let busy = Busy::new(Arc::clone(&idle), spin.clone());
                async move {
                    let res = unwrap_infallible(app.call(req.map(Body::new)).await);
                    Ok::<_, Infallible>(res.map(|body| Body::new(Tracked { body, _busy: busy })))
                }
            })
        };
        let mut closed = closed.clone();
        tokio::spawn(async move {
            // No header timer of hyper's (it would arm one for every request): the
            // watchdog below does its work.
            let conn = http1::Builder::new()
                .header_read_timeout(None)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                }
                () = idle.watch(header_timeout) => {
                    tracing::debug!(%peer, "no complete request head in time; closing");
                }
                _ = closed.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    drop(spinner);
    let _ = closing.send(true);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.shutdown_grace, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; dropping the remaining connections");
    }
}

fn unwrap_infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(t) => t,
        Err(never) => match never {},
    }
}

/// How long a connection has been without a request: since it was opened, or since
/// its last response body was done with. Shared by the connection's service, its
/// response bodies and its watchdog (all in the connection's task).
struct IdleClock {
    origin: Instant,
    /// Requests whose response body is not done with yet.
    busy: AtomicU32,
    /// When the connection last became idle, in nanoseconds after `origin`.
    idle_since: AtomicU64,
}

impl IdleClock {
    fn new() -> Self {
        IdleClock {
            origin: Instant::now(),
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Completes when the connection has been idle for `timeout` without a complete
    /// request head. The timer is set once per `timeout`, not per request: when it runs
    /// out early (a request came and went meanwhile), it is set again for the rest.
    async fn watch(&self, timeout: Duration) {
        let mut at = self.origin + timeout;
        loop {
            tokio::time::sleep_until(at).await;
            if self.busy.load(Ordering::Acquire) > 0 {
                at = Instant::now() + timeout;
                continue;
            }
            let since = self.origin + Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
            match since.checked_add(timeout) {
                Some(end) if end > Instant::now() => at = end,
                _ => return,
            }
        }
    }
}

/// A request in progress on a connection, until dropped.
struct Busy(Arc<IdleClock>, Option<Arc<Spin>>);

impl Busy {
    fn new(clock: Arc<IdleClock>, spin: Option<Arc<Spin>>) -> Self {
        clock.busy.fetch_add(1, Ordering::AcqRel);
        if let Some(s) = &spin {
            s.touch();
        }
        Busy(clock, spin)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::Release);
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
        if let Some(s) = &self.1 {
            s.touch();
        }
    }
}

/// The busy-polling task's shared state: when a request last started or finished, and
/// how to wake the task when it sleeps.
struct Spin {
    origin: std::time::Instant,
    /// The window, in nanoseconds.
    window: u64,
    /// The last request event, in nanoseconds after `origin`.
    last: AtomicU64,
    /// Whether the task is polling now (a touch then needs no wake-up).
    polling: AtomicBool,
    wake: Notify,
}

impl Spin {
    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A request started or finished: poll for another window from now.
    ///
    /// `last` and `polling` are written and read in opposite orders here and in
    /// [`Spin::run`], so both sides use `SeqCst`: with weaker orderings each side could
    /// read the other's old value, and a touch would send no wake-up to a task that is
    /// going to sleep.
    fn touch(&self) {
        // Two requests touching at once must not move `last` back.
        self.last.fetch_max(self.now(), Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Whether a whole window has passed since the last request event.
    fn window_over(&self) -> bool {
        self.now().saturating_sub(self.last.load(Ordering::SeqCst)) >= self.window
    }

    /// Sleeps until a request event, then yields to the runtime until a whole window
    /// passes without one, and again. Each yield sends the runtime's thread back to
    /// its I/O driver with a zero timeout: it polls the sockets instead of sleeping
    /// in `epoll_wait`, so the next event needs no wake-up. Real time, not tokio's:
    /// the point is the CPU's.
    async fn run(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            self.polling.store(true, Ordering::SeqCst);
            loop {
                while !self.window_over() {
                    tokio::task::yield_now().await;
                }
                self.polling.store(false, Ordering::SeqCst);
                // A touch between the last check and the store saw `polling` set and
                // sent no wake-up: look once more before sleeping.
                if self.window_over() {
                    break;
                }
                self.polling.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// The busy-polling task, stopped when dropped.
struct Spinner(Arc<Spin>, tokio::task::JoinHandle<()>);

impl Spinner {
    /// Polling windows of `window`, at most [`MAX_BUSY_POLL`].
    fn start(window: Duration) -> Self {
        Self::start_with_origin(window.min(MAX_BUSY_POLL), std::time::Instant::now())
    }

    /// With its clock started at `origin` (tests put it in the past).
    fn start_with_origin(window: Duration, origin: std::time::Instant) -> Self {
        let spin = Arc::new(Spin {
            origin,
            window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            last: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let task = tokio::spawn(Arc::clone(&spin).run());
        Spinner(spin, task)
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.1.abort();
    }
}

/// A response body that keeps its request [`Busy`] until it is done with.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection that holds its slot and fails writes that stall for too long.
struct Guarded {
    io: TcpStream,
    stall: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(io: TcpStream, stall: Duration, slot: OwnedSemaphorePermit) -> Self {
        Guarded {
            io,
            stall,
            timer: None,
            _slot: slot,
        }
    }

    /// A write made no progress: arm the timer, or fail if it already ran out.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        r: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.progressed(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spinner whose clock started `ago` before now, so that a test can put the last
    /// request event as far back as it needs by storing into `last`, without waiting.
    fn spinner(window: Duration, ago: Duration) -> Spinner {
        let origin = std::time::Instant::now()
            .checked_sub(ago)
            .unwrap_or_else(std::time::Instant::now);
        Spinner::start_with_origin(window, origin)
    }

    /// Yields until `f` holds, at most a bounded number of times.
    async fn until(f: impl Fn() -> bool) -> bool {
        for _ in 0..10_000 {
            if f() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        f()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn busy_polling_runs_only_after_a_request_event_and_stops_when_idle() {
        let s = spinner(Duration::from_secs(60), Duration::from_secs(120));
        let spin = Arc::clone(&s.0);
        // Idle from the start: the task sleeps.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!spin.polling.load(Ordering::Acquire));
        // A request event: the task polls (a minute's window, far longer than this test).
        spin.touch();
        assert!(until(|| spin.polling.load(Ordering::Acquire)).await);
        // More events while it polls need no wake-up and keep it polling.
        spin.touch();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(spin.polling.load(Ordering::Acquire));
        // The last event two minutes back: the window is over and the task sleeps again.
        spin.last.store(0, Ordering::Release);
        assert!(until(|| !spin.polling.load(Ordering::Acquire)).await);
        // And the next event wakes it once more.
        spin.touch();
        assert!(until(|| spin.polling.load(Ordering::Acquire)).await);
        // Dropping the spinner stops the task.
        let task_done = {
            drop(s);
            until(|| Arc::strong_count(&spin) == 1).await
        };
        assert!(
            task_done,
            "the polling task holds its state after the spinner is dropped"
        );
    }

    #[test]
    fn busy_polling_takes_one_thread_and_a_bounded_window() {
        assert_eq!(busy_poll_threads(None, None), Ok((None, 2)));
        assert_eq!(busy_poll_threads(None, Some(4)), Ok((None, 4)));
        // 0 is off, whatever the workers.
        assert_eq!(busy_poll_threads(Some(0), Some(3)), Ok((None, 3)));
        assert_eq!(busy_poll_threads(Some(200), None), Ok((Some(200), 1)));
        assert_eq!(busy_poll_threads(Some(200), Some(1)), Ok((Some(200), 1)));
        assert_eq!(busy_poll_threads(Some(10_000), None), Ok((Some(10_000), 1)));
        let e = busy_poll_threads(Some(200), Some(2)).unwrap_err();
        assert!(e.contains("--workers 2"), "{e}");
        let e = busy_poll_threads(Some(10_001), None).unwrap_err();
        assert!(e.contains("at most 10000 us"), "{e}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_server_marks_each_request_for_busy_polling_and_stops_it_on_shutdown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let s = spinner(Duration::from_secs(60), Duration::from_secs(120));
        let spin = Arc::clone(&s.0);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_with(
            listener,
            app,
            Limits::default(),
            async {
                let _ = stopped.await;
            },
            Some(s),
        ));
        assert_eq!(spin.last.load(Ordering::SeqCst), 0, "no request yet");
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("ok"), "{out}");
        // The request's start and end moved the last event on (the clock began two
        // minutes back), and the task is polling for its window.
        assert!(spin.last.load(Ordering::SeqCst) >= 120_000_000_000);
        assert!(until(|| spin.polling.load(Ordering::SeqCst)).await);
        // Shutdown stops the task.
        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(until(|| Arc::strong_count(&spin) == 1).await);
    }
}
