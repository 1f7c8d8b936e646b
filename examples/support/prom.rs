//! A minimal `/metrics` endpoint over plain tokio TCP, a loopback client for it, and a
//! strict checker of the Prometheus text exposition format (version 0.0.4). Shared by
//! `examples/prometheus.rs` and `tests/observe_prometheus.rs`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const MAX_RESPONSE: u64 = 16 << 20;
const MAX_CONNECTIONS: usize = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` from `handle` on `listener` until the task is aborted: one
/// response per connection, at most 16 connections at once, 8 KiB of request head and
/// five seconds of I/O per connection.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => continue,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(IO_TIMEOUT, answer(conn, &handle)).await;
        });
    }
}

async fn answer(mut conn: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => respond(&mut conn, "200 OK", CONTENT_TYPE, &handle.render()).await,
        ("GET", _) => respond(&mut conn, "404 Not Found", "text/plain", "try /metrics\n").await,
        _ => respond(&mut conn, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// A response: status code, content type, body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// Fetches `path` from `addr` over HTTP/1.1 (loopback only in this project).
pub async fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let work = async {
        let mut conn = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        conn.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut conn).take(MAX_RESPONSE).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(IO_TIMEOUT, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response"))??;
    let text = String::from_utf8(raw).map_err(|_| bad("response is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Ok(Response {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// A series: a sample name and its labels, sorted.
pub type SeriesKey = (String, BTreeMap<String, String>);

/// What a valid exposition holds.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Metric family name to its type.
    pub types: BTreeMap<String, String>,
    /// Families with a HELP line.
    pub helped: HashSet<String>,
    /// Every sample: (name, sorted labels) to value.
    pub samples: HashMap<SeriesKey, f64>,
}

impl Exposition {
    /// The value of the sample `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.samples.get(&(name.to_owned(), labels)).copied()
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .fold(0.0, |acc, (_, v)| acc + v)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse::<f64>().ok().filter(|_| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
        }),
    }
}

/// Parses `{a="1",b="2"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
    loop {
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = rest[..eq].trim();
        if !is_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("invalid escape {other:?} in a label value")),
                },
                Some((_, '\n')) => return Err("newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} appears twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.trim_start_matches(' ');
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if let Some(t) = types.get(base) {
                if t == "histogram" || (t == "summary" && suffix != "_bucket") {
                    return Some(base);
                }
            }
        }
    }
    None
}

/// Checks `text` against the text exposition format, strictly: well-formed HELP and
/// TYPE lines (at most one each per family, TYPE before the family's samples), valid
/// metric and label names, correctly escaped label values, numeric values, every
/// sample typed and its family contiguous, no duplicate series, and histograms whose
/// buckets are cumulative and end in `le="+Inf"` equal to `_count`.
pub fn validate(text: &str) -> Result<Exposition, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the exposition must end with a newline".into());
    }
    let mut ex = Exposition::default();
    let mut seen_families: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut buckets: HashMap<SeriesKey, Vec<(f64, f64)>> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !is_metric_name(name) {
                        return Err(at("invalid metric name".into()));
                    }
                    if !ex.helped.insert(name.to_owned()) {
                        return Err(at("a second HELP".into()));
                    }
                }
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let kind = words
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !is_metric_name(name) {
                        return Err(at("invalid metric name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind}")));
                    }
                    if ex.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(at("a second TYPE".into()));
                    }
                    if seen_families.contains(name) {
                        return Err(at("TYPE after the family's samples".into()));
                    }
                }
                _ => {} // a comment
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(at("invalid metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split(' ').filter(|s| !s.is_empty());
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| at("invalid value".into()))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at("invalid timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing text".into()));
        }
        let family = family_of(name, &ex.types)
            .ok_or_else(|| at("sample of an undeclared family".into()))?
            .to_owned();
        if current.as_deref() != Some(family.as_str()) {
            if !seen_families.insert(family.clone()) {
                return Err(at(format!("family {family} is not contiguous")));
            }
            current = Some(family.clone());
        }
        let kind = ex.types[&family].as_str();
        if kind == "histogram" && name.ends_with("_bucket") {
            let le = labels
                .get("le")
                .ok_or_else(|| at("bucket without le".into()))?;
            let bound = parse_value(le).ok_or_else(|| at("invalid le".into()))?;
            let mut rest_labels = labels.clone();
            rest_labels.remove("le");
            buckets
                .entry((family.clone(), rest_labels))
                .or_default()
                .push((bound, value));
        }
        if kind == "summary" && name == family && !labels.contains_key("quantile") {
            return Err(at("summary sample without quantile".into()));
        }
        if kind == "counter" && value < 0.0 {
            return Err(at("negative counter".into()));
        }
        if ex
            .samples
            .insert((name.to_owned(), labels), value)
            .is_some()
        {
            return Err(at("duplicate series".into()));
        }
    }
    for ((family, labels), list) in &buckets {
        let mut last = (f64::NEG_INFINITY, 0.0);
        for &(bound, count) in list {
            if bound <= last.0 || count < last.1 {
                return Err(format!("{family}{labels:?}: buckets are not cumulative"));
            }
            last = (bound, count);
        }
        if last.0 != f64::INFINITY {
            return Err(format!("{family}{labels:?}: no le=\"+Inf\" bucket"));
        }
        let count = ex
            .samples
            .get(&(format!("{family}_count"), labels.clone()))
            .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
        if *count != last.1 {
            return Err(format!(
                "{family}{labels:?}: +Inf bucket {} != count {count}",
                last.1
            ));
        }
        if !ex
            .samples
            .contains_key(&(format!("{family}_sum"), labels.clone()))
        {
            return Err(format!("{family}{labels:?}: no _sum"));
        }
    }
    Ok(ex)
}
