//! A Server-Sent Events decoder: bytes in, events out.
//!
//! [`SseDecoder`] follows the WHATWG "interpreting an event stream" rules: lines end
//! with LF, CRLF or a lone CR; a line starting with `:` is a comment; `data:` lines of
//! one event are joined with `\n`; a blank line dispatches the event; an event with no
//! `data` is dropped; a leading byte order mark is skipped. It works on raw bytes, so a
//! line, an event or a UTF-8 character may be split across reads at any byte: only
//! complete lines are decoded (invalid UTF-8 becomes U+FFFD, as the specification says).
//!
//! Nothing grows without bound: a line or an event's data longer than the decoder's
//! limit is an [`SseError::TooLarge`], after which the decoder refuses further input.
//!
//! ```
//! use tokenwise::provider::sse::SseDecoder;
//!
//! let mut decoder = SseDecoder::new();
//! let mut events = Vec::new();
//! // The stream arrives in arbitrary pieces; "é" is split between its two bytes.
//! decoder.feed(b"event: delta\r\ndata: caf\xc3", &mut events).unwrap();
//! decoder.feed(b"\xa9\r\ndata: au lait\r\n\r\n: a comment\n\ndata: [DONE]\n\n", &mut events).unwrap();
//! assert_eq!(events.len(), 2);
//! assert_eq!(events[0].event, "delta");
//! assert_eq!(events[0].data, "café\nau lait");
//! assert_eq!(events[1].event, "message");
//! assert_eq!(events[1].data, "[DONE]");
//! ```

use std::fmt;

/// The default limit on one line and on one event's data: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SseEvent {
    /// The event type: the last `event:` field, or `message` when there was none.
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
    /// The last event id seen on the stream so far, if any.
    pub id: Option<String>,
}

impl SseEvent {
    /// An event of type `event` carrying `data`, with no id.
    pub fn new(event: impl Into<String>, data: impl Into<String>) -> Self {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: None,
        }
    }
}

/// Why the decoder refused its input.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SseError {
    /// A line or an event's data exceeded the decoder's limit.
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::TooLarge { limit } => {
                write!(f, "an SSE line or event exceeds the limit of {limit} bytes")
            }
        }
    }
}

impl std::error::Error for SseError {}

/// An incremental, bounded Server-Sent Events decoder. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct SseDecoder {
    max: usize,
    /// The bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The previous input ended with CR: a LF at the start of the next input belongs to it.
    after_cr: bool,
    /// No line has been completed yet (a byte order mark may still lead).
    first_line: bool,
    data: String,
    has_data: bool,
    event: String,
    last_id: Option<String>,
    failed: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the [default limit](DEFAULT_MAX_EVENT_BYTES).
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder refusing lines and events longer than `max` bytes (at least 1).
    pub fn with_max_event_bytes(max: usize) -> Self {
        SseDecoder {
            max: max.max(1),
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id: None,
            failed: None,
        }
    }

    /// The limit on one line and on one event's data, in bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max
    }

    /// Decodes `bytes`, the next piece of the stream, appending every event it completes
    /// to `out`. Events completed before an error are still appended.
    ///
    /// # Errors
    ///
    /// [`SseError::TooLarge`] when a line or an event grows past the limit; the decoder
    /// then returns the same error for any further input.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.feed_inner(bytes, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.line = Vec::new();
            self.data = String::new();
        }
        result
    }

    fn feed_inner(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut rest = bytes;
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some((b'\n', tail)) = rest.split_first() {
                rest = tail;
            }
        }
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.push_line_bytes(rest)?;
                    break;
                }
                Some(i) => {
                    let (head, tail) = rest.split_at(i);
                    self.push_line_bytes(head)?;
                    // `tail` starts with the line ending.
                    let (ending, mut after) = match tail.split_first() {
                        Some((b, after)) => (*b, after),
                        None => break,
                    };
                    if ending == b'\r' {
                        match after.split_first() {
                            Some((b'\n', after_lf)) => after = after_lf,
                            Some(_) => {}
                            None => self.after_cr = true,
                        }
                    }
                    rest = after;
                    self.end_line(out)?;
                }
            }
        }
        Ok(())
    }

    /// Whether the input so far ends in the middle of a line or an event: at the end of
    /// the stream, that partial event is discarded.
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.has_data
    }

    fn push_line_bytes(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len().saturating_add(bytes.len()) > self.max {
            return Err(SseError::TooLarge { limit: self.max });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let raw = std::mem::take(&mut self.line);
        let mut bytes: &[u8] = &raw;
        if self.first_line {
            self.first_line = false;
            if let Some(stripped) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
                bytes = stripped;
            }
        }
        if bytes.is_empty() {
            self.dispatch(out);
        } else if bytes.first() != Some(&b':') {
            let text = String::from_utf8_lossy(bytes);
            let (field, value) = match text.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (text.as_ref(), ""),
            };
            match field {
                "data" => {
                    let extra = value.len() + usize::from(self.has_data);
                    if self.data.len().saturating_add(extra) > self.max {
                        return Err(SseError::TooLarge { limit: self.max });
                    }
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "event" => {
                    self.event.clear();
                    self.event.push_str(value);
                }
                "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
                // `retry` and unknown fields mean nothing to a one-shot response stream.
                _ => {}
            }
        }
        // Reuse the line's allocation.
        let mut raw = raw;
        raw.clear();
        self.line = raw;
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data: std::mem::take(&mut self.data),
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        d.feed(input, &mut out).unwrap();
        out
    }

    #[test]
    fn fields_comments_and_line_endings() {
        let ev =
            decode(b"\xEF\xBB\xBFdata:a\rdata: b\r\n: note\nevent:x\nid: 7\nretry: 10\nfoo\n\n");
        assert_eq!(
            ev,
            vec![SseEvent {
                event: "x".into(),
                data: "a\nb".into(),
                id: Some("7".into())
            }]
        );
    }

    #[test]
    fn events_without_data_are_dropped_and_empty_data_is_kept() {
        let ev = decode(b"event: ping\n\ndata\n\ndata:\n\n");
        assert_eq!(ev.len(), 2);
        assert!(ev.iter().all(|e| e.data.is_empty() && e.event == "message"));
    }

    #[test]
    fn cr_at_the_end_of_a_read_pairs_with_lf_at_the_start_of_the_next() {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        d.feed(b"data: 1\r", &mut out).unwrap();
        d.feed(b"\n", &mut out).unwrap();
        d.feed(b"\r", &mut out).unwrap();
        d.feed(b"", &mut out).unwrap();
        d.feed(b"\ndata: 2\n\n", &mut out).unwrap();
        let data: Vec<_> = out.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["1", "2"]);
    }

    #[test]
    fn limits_are_enforced_and_sticky() {
        let mut d = SseDecoder::with_max_event_bytes(16);
        let mut out = Vec::new();
        d.feed(b"data: 12345\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            d.feed(b"data: 12345678901", &mut out),
            Err(SseError::TooLarge { limit: 16 })
        );
        assert!(d.feed(b"\n\n", &mut out).is_err());
        let mut d = SseDecoder::with_max_event_bytes(16);
        // Short lines, but the joined data is too long.
        assert!(
            d.feed(b"data: 12345678\ndata: 12345678\n", &mut out)
                .is_err()
        );
    }

    #[test]
    fn partial_input_is_reported() {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        d.feed(b"data: x\n", &mut out).unwrap();
        assert!(d.has_partial());
        d.feed(b"\n", &mut out).unwrap();
        assert!(!d.has_partial());
        d.feed(b"data", &mut out).unwrap();
        assert!(d.has_partial());
    }
}
