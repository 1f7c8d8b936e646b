//! A hand-rolled HTTP/1.1 server on 127.0.0.1, port 0, that replays scripted bytes:
//! each accepted connection reads one request and answers with the next [`Reply`].
//! Bytes are written in the pieces given, so a test decides exactly where reads split,
//! and a reply can end with a clean close, a connection reset, or silence.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a reply ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Finish the body properly and close.
    Close,
    /// Reset the connection (RST) after the pieces, without finishing the body.
    Reset,
    /// Keep the connection open and send nothing more.
    Hang,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    pieces: Vec<Vec<u8>>,
    chunked: bool,
    close_delimited: bool,
    end: End,
    /// Send nothing at all, not even headers.
    silent: bool,
    /// A Content-Length to declare instead of the real one.
    declared_length: Option<usize>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        529 => "Overloaded",
        _ => "Status",
    }
}

impl Reply {
    /// A whole body with a Content-Length.
    pub fn body(status: u16, content_type: &str, body: impl AsRef<[u8]>) -> Self {
        Reply {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            pieces: vec![body.as_ref().to_vec()],
            chunked: false,
            close_delimited: false,
            end: End::Close,
            silent: false,
            declared_length: None,
        }
    }

    /// A JSON body.
    pub fn json(status: u16, body: &str) -> Self {
        Self::body(status, "application/json", body)
    }

    /// An event stream, chunked, one chunk per piece.
    pub fn sse<P: AsRef<[u8]>>(pieces: impl IntoIterator<Item = P>) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "text/event-stream".into())],
            pieces: pieces.into_iter().map(|p| p.as_ref().to_vec()).collect(),
            chunked: true,
            close_delimited: false,
            end: End::Close,
            silent: false,
            declared_length: None,
        }
    }

    /// A connection that reads the request and never answers.
    pub fn silent() -> Self {
        Reply {
            status: 200,
            headers: Vec::new(),
            pieces: Vec::new(),
            chunked: false,
            close_delimited: false,
            end: End::Hang,
            silent: true,
            declared_length: None,
        }
    }

    /// A connection that reads the request and resets without answering.
    pub fn reset() -> Self {
        Reply {
            end: End::Reset,
            ..Self::silent()
        }
    }

    /// Declares a Content-Length of `n` whatever the pieces hold.
    pub fn content_length(mut self, n: usize) -> Self {
        self.declared_length = Some(n);
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Ends with `end` instead of a clean close.
    pub fn ending(mut self, end: End) -> Self {
        self.end = end;
        self
    }

    /// Sends the body close-delimited: no Content-Length, no chunking.
    pub fn close_delimited(mut self) -> Self {
        self.chunked = false;
        self.close_delimited = true;
        self
    }

    fn head(&self) -> Vec<u8> {
        let mut h = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (k, v) in &self.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        // One request per connection: the client never reuses a closed one.
        h.push_str("connection: close\r\n");
        if self.chunked {
            h.push_str("transfer-encoding: chunked\r\n");
        } else if !self.close_delimited {
            let n: usize = self
                .declared_length
                .unwrap_or_else(|| self.pieces.iter().map(Vec::len).sum());
            h.push_str(&format!("content-length: {n}\r\n"));
        }
        h.push_str("\r\n");
        h.into_bytes()
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The request line and headers, as text.
    pub head: String,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }

    /// A header's value (names compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The request line.
    pub fn line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }
}

/// The scripted server.
pub struct Server {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

/// Pause between pieces, so that each arrives in its own read. Tiny and never waited on
/// for a result: the tests pass however the bytes are grouped.
const PIECE_GAP: Duration = Duration::from_millis(5);

impl Server {
    /// Starts a server answering connection `i` with `replies[i]` (the last reply repeats).
    pub async fn start(replies: Vec<Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = Arc::clone(&received);
        tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let reply = replies
                    .get(n)
                    .or_else(|| replies.last())
                    .cloned()
                    .expect("at least one reply");
                n += 1;
                let rec = Arc::clone(&rec);
                tokio::spawn(async move {
                    serve(socket, reply, rec).await;
                });
            }
        });
        Server { addr, received }
    }

    /// The base URL, with `path` appended (e.g. `/v1`).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn read_request(socket: &mut TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = socket.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(Received {
        head,
        body: buf[head_end..head_end + len].to_vec(),
    })
}

async fn serve(mut socket: TcpStream, reply: Reply, rec: Arc<Mutex<Vec<Received>>>) {
    let _ = socket.set_nodelay(true);
    let Some(req) = read_request(&mut socket).await else {
        return;
    };
    rec.lock().unwrap().push(req);
    if reply.silent {
        if reply.end == End::Reset {
            let _ = socket.set_zero_linger();
            drop(socket);
            return;
        }
        std::future::pending::<()>().await;
    }
    if socket.write_all(&reply.head()).await.is_err() {
        return;
    }
    for (i, piece) in reply.pieces.iter().enumerate() {
        if i > 0 {
            let _ = socket.flush().await;
            tokio::time::sleep(PIECE_GAP).await;
        }
        let framed = if reply.chunked {
            let mut f = format!("{:x}\r\n", piece.len()).into_bytes();
            f.extend_from_slice(piece);
            f.extend_from_slice(b"\r\n");
            f
        } else {
            piece.clone()
        };
        if piece.is_empty() && reply.chunked {
            continue; // an empty chunk would end the body
        }
        if socket.write_all(&framed).await.is_err() {
            return;
        }
    }
    let _ = socket.flush().await;
    match reply.end {
        End::Close => {
            if reply.chunked {
                let _ = socket.write_all(b"0\r\n\r\n").await;
            }
            let _ = socket.shutdown().await;
        }
        End::Reset => {
            tokio::time::sleep(PIECE_GAP).await;
            let _ = socket.set_zero_linger();
            drop(socket);
        }
        End::Hang => {
            std::future::pending::<()>().await;
        }
    }
}

/// A reqwest client that ignores proxy settings, for loopback tests.
pub fn client() -> reqwest::Client {
    tokenwise::provider::http_client_builder()
        .expect("TLS setup")
        .no_proxy()
        .build()
        .expect("client")
}

/// Drains a stream: the events, and the error that ended it, if any.
pub async fn drain(
    mut s: tokenwise::ChatStream,
) -> (Vec<tokenwise::StreamEvent>, Option<tokenwise::Error>) {
    use futures_util::StreamExt;
    let mut events = Vec::new();
    let mut error = None;
    while let Some(item) = s.next().await {
        match item {
            Ok(ev) => events.push(ev),
            Err(e) => {
                assert!(error.is_none(), "a stream yields at most one error");
                error = Some(e);
            }
        }
    }
    (events, error)
}

/// The text of a stream's deltas.
pub fn text_of(events: &[tokenwise::StreamEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            tokenwise::StreamEvent::TextDelta { text } => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

/// The final event, if the stream completed.
pub fn done_of(events: &[tokenwise::StreamEvent]) -> Option<&tokenwise::StreamEnd> {
    match events.last() {
        Some(tokenwise::StreamEvent::Done(end)) => Some(end),
        _ => None,
    }
}
