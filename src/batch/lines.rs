//! Reading JSONL result files as they arrive, within caps, and gathering their lines.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

use super::{BatchCall, BatchLine, BatchResults, ItemResult};
use crate::error::{ProviderError, ProviderErrorKind};
use crate::provider::http::{HttpCore, Sent};

/// The default cap on one batch's result files, in bytes.
pub(super) const DEFAULT_MAX_RESULTS_BYTES: u64 = 512 << 20;

/// Reads `resp` line by line as its chunks arrive, calling `each` with every non-blank
/// line. Stops with an `InvalidResponse` past `max_bytes` in all, or a line longer than
/// the core's body cap.
pub(super) async fn read_lines(
    core: &HttpCore,
    resp: &mut crate::provider::http::Response,
    sent: &Sent,
    max_bytes: u64,
    mut each: impl FnMut(&[u8]),
) -> std::result::Result<(), ProviderError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let max_line = core.max_body_bytes;
    while let Some(chunk) = core.next_chunk(resp, sent, None).await? {
        total = total.saturating_add(chunk.len() as u64);
        if total > max_bytes {
            return Err(core.error(
                ProviderErrorKind::InvalidResponse,
                format!("the batch results exceed the cap of {max_bytes} bytes"),
            ));
        }
        let mut rest: &[u8] = &chunk;
        while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
            let (line, after) = rest.split_at(nl);
            if pending.is_empty() {
                emit(line, &mut each);
            } else {
                pending.extend_from_slice(line);
                emit(&pending, &mut each);
                pending.clear();
            }
            rest = after.get(1..).unwrap_or_default();
        }
        if pending.len().saturating_add(rest.len()) > max_line {
            return Err(core.error(
                ProviderErrorKind::InvalidResponse,
                format!("a batch result line exceeds the cap of {max_line} bytes"),
            ));
        }
        pending.extend_from_slice(rest);
    }
    emit(&pending, &mut each);
    Ok(())
}

fn emit(line: &[u8], each: &mut impl FnMut(&[u8])) {
    let line = line.trim_ascii();
    if !line.is_empty() {
        each(line);
    }
}

/// Gathers result lines: the first line per request of the batch is kept, a line that
/// is not JSON, names no request of the batch or repeats one is counted malformed.
pub(super) struct Gather<'c, 'a> {
    calls: HashMap<&'c str, &'c BatchCall<'a>>,
    seen: HashSet<String>,
    pub(super) out: BatchResults,
}

impl<'c, 'a> Gather<'c, 'a> {
    pub(super) fn new(calls: &'c [BatchCall<'a>]) -> Self {
        Gather {
            calls: calls.iter().map(|c| (c.custom_id, c)).collect(),
            seen: HashSet::new(),
            out: BatchResults::default(),
        }
    }

    /// Parses `line` and hands its call and JSON to `read`, which makes the result.
    pub(super) fn line(
        &mut self,
        line: &[u8],
        read: impl FnOnce(&BatchCall<'a>, &Value) -> ItemResult,
    ) {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            self.out.malformed += 1;
            return;
        };
        let Some(id) = v.get("custom_id").and_then(Value::as_str) else {
            self.out.malformed += 1;
            return;
        };
        let Some(call) = self.calls.get(id).copied() else {
            self.out.malformed += 1;
            return;
        };
        if !self.seen.insert(id.to_owned()) {
            self.out.malformed += 1;
            return;
        }
        let result = read(call, &v);
        self.out.lines.push(BatchLine::new(id, result));
    }
}

/// A per-item error for a result line that does not read as expected.
pub(super) fn malformed(provider: &str, what: impl std::fmt::Display) -> ItemResult {
    ItemResult::Failed(
        ProviderError::new(
            ProviderErrorKind::InvalidResponse,
            provider,
            format!("malformed batch result line: {what}"),
        )
        .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Catalog, ChatRequest};

    #[test]
    fn gather_keeps_the_first_line_per_request_and_counts_the_rest() {
        let model = Catalog::builtin().resolve("gpt-4o-mini").unwrap();
        let req = ChatRequest::user_text("hi");
        let calls = [
            BatchCall::new("a", &req, &model),
            BatchCall::new("b", &req, &model),
        ];
        let mut g = Gather::new(&calls);
        let expired = |_: &BatchCall<'_>, _: &Value| ItemResult::Expired;
        g.line(br#"{"custom_id":"a"}"#, expired);
        g.line(br#"{"custom_id":"a"}"#, |_, _| {
            panic!("a repeated line is not read")
        });
        g.line(br#"{"custom_id":"zzz"}"#, expired);
        g.line(br#"{"no_id":1}"#, expired);
        g.line(b"not json", expired);
        g.line(br#"{"custom_id":"b"}"#, |_, _| malformed("p", "broken"));
        assert_eq!(g.out.malformed, 4);
        assert_eq!(g.out.lines.len(), 2);
        assert!(matches!(g.out.lines[0].result, ItemResult::Expired));
        match &g.out.lines[1].result {
            ItemResult::Failed(e) => assert_eq!(
                e.as_provider().unwrap().kind,
                ProviderErrorKind::InvalidResponse
            ),
            other => panic!("{other:?}"),
        }
    }
}
