//! Properties of the SSE decoder: any split of a valid stream decodes to the events the
//! stream was written from; arbitrary bytes, split anyhow, never panic and decode the same
//! as when fed at once.

use proptest::prelude::*;
use tokenwise::provider::sse::{SseDecoder, SseError, SseEvent};

/// One event as written: optional comment, type and id, and its data lines.
#[derive(Debug, Clone)]
struct Written {
    comment: Option<String>,
    event: Option<String>,
    id: Option<String>,
    data: Vec<String>,
}

fn text() -> impl Strategy<Value = String> {
    // Any characters but control characters (so no line breaks), multi-byte included.
    prop_oneof![
        "\\PC{0,12}",
        Just("{\"choices\":[{\"delta\":{\"content\":\"é👋\"}}]}".to_owned()),
        Just("[DONE]".to_owned()),
        Just(" leading space".to_owned()),
        Just(String::new()),
    ]
}

fn written() -> impl Strategy<Value = Written> {
    (
        proptest::option::of("\\PC{0,8}"),
        proptest::option::of("[a-z_]{1,12}"),
        proptest::option::of("[a-z0-9]{0,6}"),
        proptest::collection::vec(text(), 0..4),
    )
        .prop_map(|(comment, event, id, data)| Written {
            comment,
            event,
            id,
            data,
        })
}

/// Serializes `events` with one kind of line ending, and the events a conforming
/// decoder must produce from it.
fn render(events: &[Written], eol: &str, bom: bool) -> (Vec<u8>, Vec<SseEvent>) {
    let mut out = String::new();
    if bom {
        out.push('\u{FEFF}');
    }
    let mut expected = Vec::new();
    let mut last_id: Option<String> = None;
    for w in events {
        if let Some(c) = &w.comment {
            out.push_str(&format!(":{c}{eol}"));
        }
        if let Some(e) = &w.event {
            out.push_str(&format!("event: {e}{eol}"));
        }
        if let Some(id) = &w.id {
            out.push_str(&format!("id: {id}{eol}"));
            last_id = Some(id.clone());
        }
        for d in &w.data {
            out.push_str(&format!("data: {d}{eol}"));
        }
        out.push_str(eol);
        if !w.data.is_empty() {
            let mut ev = SseEvent::new(
                w.event.clone().unwrap_or_else(|| "message".to_owned()),
                w.data.join("\n"),
            );
            ev.id = last_id.clone();
            expected.push(ev);
        }
    }
    (out.into_bytes(), expected)
}

/// Feeds `bytes` cut at `cuts`; returns the events and whether the decoder refused.
fn decode_split(bytes: &[u8], cuts: &[usize], max: usize) -> (Vec<SseEvent>, Option<SseError>) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut d = SseDecoder::with_max_event_bytes(max);
    let mut events = Vec::new();
    let mut at = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        if let Err(e) = d.feed(&bytes[at..p], &mut events) {
            return (events, Some(e));
        }
        at = p;
    }
    (events, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_split_of_a_valid_stream_gives_the_same_events(
        events in proptest::collection::vec(written(), 0..8),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        bom in any::<bool>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let (bytes, expected) = render(&events, eol, bom);
        let (whole, err) = decode_split(&bytes, &[], 1 << 20);
        prop_assert!(err.is_none());
        prop_assert_eq!(&whole, &expected);
        let (split, err) = decode_split(&bytes, &cuts, 1 << 20);
        prop_assert!(err.is_none());
        prop_assert_eq!(&split, &expected);
    }

    #[test]
    fn byte_by_byte_gives_the_same_events(
        events in proptest::collection::vec(written(), 0..6),
        eol in prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
    ) {
        let (bytes, expected) = render(&events, eol, false);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        let (split, err) = decode_split(&bytes, &cuts, 1 << 20);
        prop_assert!(err.is_none());
        prop_assert_eq!(split, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decode_the_same_however_split(
        bytes in proptest::collection::vec(
            prop_oneof![
                any::<u8>(),
                Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '),
                Just(b'd'), Just(b'a'), Just(b't'),
            ],
            0..600,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        max in 1usize..80,
    ) {
        let whole = decode_split(&bytes, &[], max);
        let split = decode_split(&bytes, &cuts, max);
        prop_assert_eq!(&whole, &split);
        for ev in &whole.0 {
            prop_assert!(ev.data.len() <= max);
        }
    }

    #[test]
    fn arbitrary_data_payloads_survive(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Whatever bytes a data line holds (bar line breaks), the decoder returns them,
        // invalid UTF-8 replaced.
        let clean: Vec<u8> = data.into_iter().filter(|b| *b != b'\n' && *b != b'\r').collect();
        let mut stream = b"data:".to_vec();
        stream.extend_from_slice(&clean);
        stream.extend_from_slice(b"\n\n");
        let (events, err) = decode_split(&stream, &[], 1 << 20);
        prop_assert!(err.is_none());
        prop_assert_eq!(events.len(), 1);
        let text = String::from_utf8_lossy(&clean);
        let want = text.strip_prefix(' ').unwrap_or(&text);
        prop_assert_eq!(&events[0].data, want);
    }
}

#[test]
fn a_real_anthropic_transcript_fed_one_byte_at_a_time() {
    let transcript = concat!(
        "event: message_start\r\n",
        "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n",
        "event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n",
        "event: content_block_delta\r\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Grüße 世界\"}}\r\n\r\n",
        "event: error\r\n",
        "data: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\r\n\r\n",
    )
    .as_bytes();
    let mut d = SseDecoder::new();
    let mut events = Vec::new();
    for b in transcript {
        d.feed(std::slice::from_ref(b), &mut events).unwrap();
    }
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["message_start", "ping", "content_block_delta", "error"]
    );
    assert!(events[2].data.contains("Grüße 世界"));
    assert!(!d.has_partial());
}

#[test]
fn a_stream_cut_mid_event_leaves_a_partial() {
    let mut d = SseDecoder::new();
    let mut events = Vec::new();
    d.feed(b"data: {\"choices\":[]}\n\ndata: {\"cho", &mut events)
        .unwrap();
    assert_eq!(events.len(), 1);
    assert!(d.has_partial());
}

/// Arbitrary bytes, split anywhere, into a decoder with a small limit: no panic, every
/// event within the limit, and the decoder's memory bounded by it.
fn fuzz_decoder(cases: u32) {
    use proptest::test_runner::{Config, RngAlgorithm, TestRunner};
    // Raw bytes, a quarter of them turned into the bytes SSE framing is made of.
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..400).prop_map(|mut b| {
            const FRAMING: &[u8] = b"\n\r: data";
            for x in &mut b {
                if *x < 64 {
                    *x = FRAMING[usize::from(*x) % FRAMING.len()];
                }
            }
            b
        }),
        proptest::collection::vec(any::<usize>(), 0..8),
        1usize..64,
    );
    let config = Config {
        rng_algorithm: RngAlgorithm::XorShift,
        ..Config::with_cases(cases)
    };
    TestRunner::new(config)
        .run(&strategy, |(bytes, cuts, max)| {
            let (events, _) = decode_split(&bytes, &cuts, max);
            for ev in &events {
                prop_assert!(ev.data.len() <= max);
                prop_assert!(ev.event.len() <= max);
            }
            prop_assert!(events.len() <= bytes.len() / 2 + 1);
            Ok(())
        })
        .unwrap();
}

#[test]
fn ten_thousand_arbitrary_inputs_never_panic() {
    fuzz_decoder(10_000);
}

#[test]
#[ignore = "a million cases: run with --ignored"]
fn a_million_arbitrary_inputs_never_panic() {
    fuzz_decoder(1_000_000);
}
