//! The default transport to a plain `http://` base URL: HTTP/1.1 over hyper's client
//! connections, kept in a small pool, each driven by the task that sends on it.
//!
//! reqwest (used for `https://`, behind a proxy, or when the caller supplies a client)
//! hands every request to a connection task and back, spawns a task per response to
//! return the connection to its pool, and formats and re-parses the URL twice per
//! request for its redirect policy. Here the request's own task polls the connection:
//! while it waits for the answer's head, and while it reads the body; when the body is
//! done the connection goes back to the pool. An idle connection is not polled until
//! it is taken again, when it is polled once: one the server closed meanwhile is then
//! seen closed and replaced, and a request it turned away unsent is sent on a new one.
//!
//! The connection, the answer's head and its body signal one another as they are polled
//! (a request sent wakes the connection; a head or a piece of body read wakes the
//! answer), and all are polled by the request's task: such a wake-up would send the
//! task back through the scheduler to be polled again, which on a multi-threaded
//! runtime also wakes another worker to take it. They are polled with a waker of their
//! own instead ([`Inline`]): a wake-up that arrives while they are being polled has them
//! polled again at once; one that arrives later wakes the task.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{HOST, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::paths::PathCache;

/// Idle connections kept per provider, at most.
const MAX_IDLE: usize = 256;
/// How long an idle connection is kept: 90 s, as reqwest keeps them.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The proxy variables reqwest honours; when one is set, requests go through reqwest.
const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

type Conn = Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// How many times in a row the futures of a request are polled again for wake-ups that
/// arrived while they were being polled, before the task is woken instead.
const MAX_INLINE_POLLS: usize = 4;

/// Not being polled.
const IDLE: u8 = 0;
/// Being polled.
const POLLING: u8 = 1;
/// Being polled, and woken meanwhile.
const WOKEN: u8 = 2;

/// The waker a request's task polls its connection, answer and body with (see the
/// module's documentation).
struct Inline {
    state: AtomicU8,
    /// The task to wake for a wake-up that arrives while nothing is being polled.
    task: AtomicWaker,
}

impl Wake for Inline {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // Noted: the poll under way polls again.
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

/// An [`Inline`] and a waker of it.
#[derive(Clone)]
struct InlineWaker {
    inline: Arc<Inline>,
    waker: Waker,
}

impl InlineWaker {
    fn new() -> Self {
        let inline = Arc::new(Inline {
            state: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        InlineWaker {
            waker: Waker::from(Arc::clone(&inline)),
            inline,
        }
    }

    /// Polls `f` with this waker for the task of `cx`, again while it was woken during
    /// the poll (up to [`MAX_INLINE_POLLS`] times; then the task is woken). A wake-up
    /// during a poll that completes is dropped: whatever it was for is polled again by
    /// the next poll (every future polled with this waker belongs to one request, whose
    /// task polls them all whenever it polls one).
    fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inline.task.register(cx.waker());
        let mut inner = Context::from_waker(&self.waker);
        for _ in 0..MAX_INLINE_POLLS {
            self.inline.state.store(POLLING, Ordering::Release);
            let r = f(&mut inner);
            let was = self.inline.state.swap(IDLE, Ordering::AcqRel);
            if r.is_ready() || was != WOKEN {
                return r;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A connection and its sender.
struct Pooled {
    send: SendRequest<Full<Bytes>>,
    conn: Conn,
    /// Whether `conn` has completed (closed or failed): it must not be polled again.
    done: bool,
    since: Instant,
    /// The waker the connection and its answers are polled with.
    waker: InlineWaker,
}

impl Pooled {
    /// Polls the connection once, unless it has completed.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.done && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.done = true;
        }
    }
}

/// Idle connections, boxed: a connection is large, and moves in and out of the pool.
type Idle = Arc<Mutex<Vec<Box<Pooled>>>>;

/// A failure of the direct transport.
#[derive(Debug)]
pub(crate) enum DirectError {
    /// Connecting took longer than the connect deadline.
    ConnectTimeout(Duration),
    /// Connecting failed.
    Connect(std::io::Error),
    /// The request or the answer failed on the connection.
    Http(hyper::Error),
    /// The request could not be made (an invalid path, say).
    Request(String),
}

impl std::fmt::Display for DirectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirectError::ConnectTimeout(d) => write!(f, "no connection within {d:?}"),
            DirectError::Connect(e) => write!(f, "connecting: {e}"),
            DirectError::Http(e) => write!(f, "{e}"),
            DirectError::Request(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DirectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DirectError::Http(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

impl DirectError {
    pub(crate) fn is_timeout(&self) -> bool {
        matches!(self, DirectError::ConnectTimeout(_))
    }
}

/// Requests to one `http://` origin.
pub(crate) struct Direct {
    /// The host to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// The `Host` header.
    authority: HeaderValue,
    /// The base URL's path, without a trailing `/`.
    prefix: String,
    connect_timeout: Option<Duration>,
    idle: Idle,
    /// `prefix` followed by each path sent to, as a request URI.
    uris: PathCache<Uri>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Direct {
    /// The direct transport for `base`, if it can carry it: a plain `http://` URL
    /// without credentials, query or fragment, and no proxy variable set.
    pub(crate) fn for_base(base: &str, connect_timeout: Option<Duration>) -> Option<Direct> {
        if PROXY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        {
            return None;
        }
        let url = reqwest::Url::parse(base).ok()?;
        if url.scheme() != "http"
            || !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return None;
        }
        let host = url.host_str()?;
        let port = url.port_or_known_default()?;
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        Some(Direct {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: HeaderValue::from_str(&authority).ok()?,
            prefix: url.path().trim_end_matches('/').to_owned(),
            connect_timeout,
            idle: Arc::new(Mutex::new(Vec::new())),
            uris: PathCache::default(),
        })
    }

    /// The request URI for `path`: the base URL's path followed by `path`, made once
    /// per path (a request takes a cheap copy).
    fn uri(&self, path: &str) -> Result<Uri, DirectError> {
        self.uris.get_or_make(path, |path| {
            Uri::try_from(format!("{}{}", self.prefix, path))
                .map_err(|e| DirectError::Request(format!("invalid path `{path}`: {e}")))
        })
    }

    /// An idle connection, if one is left that has not expired.
    fn checkout(&self) -> Option<Box<Pooled>> {
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        while let Some(c) = idle.pop() {
            if !c.done && !c.send.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c);
            }
        }
        None
    }

    async fn connect(&self) -> Result<Box<Pooled>, DirectError> {
        let connecting = TcpStream::connect((self.host.as_str(), self.port));
        let tcp = match self.connect_timeout {
            Some(d) => tokio::time::timeout(d, connecting)
                .await
                .map_err(|_| DirectError::ConnectTimeout(d))?,
            None => connecting.await,
        }
        .map_err(DirectError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(DirectError::Http)?;
        Ok(Box::new(Pooled {
            send,
            conn,
            done: false,
            since: Instant::now(),
            waker: InlineWaker::new(),
        }))
    }

    /// Sends `method` to the base URL's path followed by `path`, with `headers` and
    /// `body`, and returns the answer once its head has arrived.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Vec<u8>,
    ) -> Result<DirectResponse, DirectError> {
        let uri = self.uri(path)?;
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.headers_mut().insert(HOST, self.authority.clone());
        let mut req = Some(req);
        loop {
            let (mut c, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            // An idle connection is polled here first: one the server closed is seen
            // closed, and replaced.
            let waker = c.waker.clone();
            let ready = poll_fn(|cx| {
                waker.poll(cx, |cx| {
                    c.drive(cx);
                    c.send.poll_ready(cx)
                })
            })
            .await;
            if let Err(e) = ready {
                if reused {
                    continue;
                }
                return Err(DirectError::Http(e));
            }
            let Some(r) = req.take() else {
                return Err(DirectError::Request("the request was lost".into()));
            };
            let mut answer = std::pin::pin!(c.send.try_send_request(r));
            let res = poll_fn(|cx| {
                waker.poll(cx, |cx| {
                    c.drive(cx);
                    answer.as_mut().poll(cx)
                })
            })
            .await;
            match res {
                Ok(res) => {
                    let (parts, body) = res.into_parts();
                    return Ok(DirectResponse {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                        conn: Some(c),
                        idle: Arc::clone(&self.idle),
                        waker,
                    });
                }
                Err(mut e) => match e.take_message() {
                    // Turned away unsent by a connection that closed meanwhile: send it
                    // on another.
                    Some(r) if reused => req = Some(r),
                    _ => return Err(DirectError::Http(e.into_error())),
                },
            }
        }
    }
}

/// An answer whose head has arrived; reading its body drives its connection, which
/// goes back to the pool when the body is done.
pub(crate) struct DirectResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Incoming,
    conn: Option<Box<Pooled>>,
    idle: Idle,
    /// The connection's waker, which the body is polled with too.
    waker: InlineWaker,
}

impl std::fmt::Debug for DirectResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectResponse")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl DirectResponse {
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub(crate) fn content_length(&self) -> Option<u64> {
        self.body.size_hint().exact()
    }

    /// The next piece of the body; none at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, DirectError> {
        let waker = self.waker.clone();
        poll_fn(|cx| waker.poll(cx, |cx| self.poll_chunk(cx)))
            .await
            .map_err(DirectError::Http)
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, hyper::Error>> {
        // The body, then the connection that feeds it, then the body again: most
        // pieces arrive within one such round; else the connection's wake-up brings
        // this task back.
        for _ in 0..2 {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Poll::Ready(Ok(Some(data)));
                        }
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    self.conn = None;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => {
                    self.release(cx);
                    return Poll::Ready(Ok(None));
                }
                Poll::Pending => {}
            }
            match &mut self.conn {
                Some(c) if !c.done => c.drive(cx),
                // The connection has completed: dropping it drops the body's sender,
                // so the body ends (or fails) on the next poll rather than never.
                Some(_) => self.conn = None,
                None => return Poll::Pending,
            }
        }
        Poll::Pending
    }

    /// The body is done: the connection goes back to the pool if it is ready for
    /// another request.
    fn release(&mut self, cx: &mut Context<'_>) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        c.drive(cx);
        if c.done || !c.send.is_ready() {
            return;
        }
        c.since = Instant::now();
        let mut idle = match self.idle.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // The oldest idle connections are at the front (taken from the back): those
        // past their time are let go here, so that a pool that is never emptied does
        // not hold them on.
        while idle
            .first()
            .is_some_and(|old| old.since.elapsed() >= IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < MAX_IDLE {
            idle.push(c);
        }
    }
}
