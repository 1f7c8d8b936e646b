//! Single-flight through the pipeline: concurrent identical misses make one provider
//! call, whole or streamed, and nothing is coalesced that should not be.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use tokenwise::provider::SimulatedProvider;
use tokenwise::{CacheMode, ChatRequest, ChatStream, Cost, Error, Pipeline, Served, StreamEvent};

mod common;

fn sim() -> SimulatedProvider {
    common::sim_paced(Duration::from_millis(300), Duration::from_millis(20))
}

fn pipeline(p: &SimulatedProvider) -> Pipeline {
    Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .build()
        .unwrap()
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest::user_text(text).org("acme").max_tokens(200)
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_misses_make_one_provider_call() {
    let p = sim();
    let pipe = pipeline(&p);
    let answers = join_all((0..25).map(|_| pipe.chat(ask("What is single-flight?")))).await;
    assert_eq!(p.calls(), 1, "25 identical misses, one call");
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    let leader: Vec<_> = answers
        .iter()
        .filter(|a| !a.served.is_cache_hit())
        .collect();
    assert_eq!(leader.len(), 1);
    let leader = leader[0];
    assert!(!leader.cost.is_zero());
    for a in answers.iter().filter(|a| a.served.is_cache_hit()) {
        assert_eq!(a.content, leader.content);
        assert_eq!(a.cost, Cost::ZERO);
        assert!(matches!(
            a.served,
            Served::Cache { similarity, saved_tokens, saved_cost }
                if similarity == 1.0 && saved_tokens == leader.usage.total() && saved_cost == leader.cost
        ));
    }
    let report = pipe.usage();
    assert_eq!(report.totals.requests, 25);
    assert_eq!(report.totals.cache_hits, 24);
    // And afterwards, the cache answers.
    assert!(
        pipe.chat(ask("What is single-flight?"))
            .await
            .unwrap()
            .served
            .is_cache_hit()
    );
    assert_eq!(p.calls(), 1);
}

async fn collect(mut s: ChatStream) -> (String, Vec<StreamEvent>) {
    let (mut text, mut events) = (String::new(), Vec::new());
    while let Some(ev) = s.next().await {
        let ev = ev.unwrap();
        if let StreamEvent::TextDelta { text: t } = &ev {
            text.push_str(t);
        }
        events.push(ev);
    }
    (text, events)
}

#[tokio::test(start_paused = true)]
async fn concurrent_identical_streams_share_one_upstream() {
    let p = sim();
    let pipe = pipeline(&p);
    let opened = join_all((0..10).map(|_| pipe.stream(ask("Stream this once")))).await;
    let streams: Vec<ChatStream> = opened.into_iter().map(Result::unwrap).collect();
    let results = join_all(streams.into_iter().map(collect)).await;
    assert_eq!(p.calls(), 1, "10 identical streams, one upstream");
    let text = &results[0].0;
    assert!(!text.is_empty());
    let mut hits = 0;
    for (t, events) in &results {
        assert_eq!(t, text);
        assert!(
            events
                .iter()
                .filter(|e| matches!(e, StreamEvent::TextDelta { .. }))
                .count()
                > 1
        );
        let Some(StreamEvent::Done(end)) = events.last() else {
            panic!("every reader ends with Done: {events:?}")
        };
        if end.served.is_cache_hit() {
            hits += 1;
            assert_eq!(end.cost, Cost::ZERO);
            assert!(
                matches!(end.served, Served::Cache { saved_cost, .. } if !saved_cost.is_zero())
            );
        } else {
            assert!(!end.cost.is_zero());
        }
    }
    assert_eq!(hits, 9);
    // every follower's usage was recorded as a hit when its stream ended
    assert_eq!(pipe.usage().totals.cache_hits, 9);
    // a late request is served from the cache the stream filled
    let (late, _) = collect(pipe.stream(ask("Stream this once")).await.unwrap()).await;
    assert_eq!(&late, text);
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_follower_joining_mid_stream_gets_the_whole_answer() {
    let p = sim();
    let pipe = pipeline(&p);
    let mut lead = pipe.stream(ask("Join me late")).await.unwrap();
    let mut lead_text = String::new();
    for _ in 0..3 {
        if let Some(Ok(StreamEvent::TextDelta { text })) = lead.next().await {
            lead_text.push_str(&text);
        }
    }
    let late = pipe.stream(ask("Join me late")).await.unwrap();
    let (rest, _) = collect(lead).await;
    lead_text.push_str(&rest);
    let (late_text, events) = collect(late).await;
    assert_eq!(late_text, lead_text, "replayed from the first event");
    assert!(matches!(events.last(), Some(StreamEvent::Done(e)) if e.served.is_cache_hit()));
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn different_requests_and_refreshes_are_not_coalesced() {
    let p = sim();
    let pipe = pipeline(&p);
    let _ = join_all([
        pipe.chat(ask("first question")),
        pipe.chat(ask("second question")),
        pipe.chat(ask("first question").org("globex")), // another tenant
        pipe.chat(ask("first question").cache_mode(CacheMode::Refresh)),
        pipe.chat(ask("first question").cache_mode(CacheMode::Bypass)),
    ])
    .await;
    assert_eq!(p.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn when_the_leader_fails_followers_call_on_their_own() {
    let p = SimulatedProvider::builder()
        .time_to_first_token(Duration::from_millis(300))
        .outage(Duration::ZERO, Duration::from_secs(60), None)
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .default_model("gpt-4o-mini")
        .retry(tokenwise::resilience::RetryPolicy::none())
        .build()
        .unwrap();
    let answers = join_all((0..4).map(|_| pipe.chat(ask("Fails")))).await;
    // A failure is never shared: the leader's error is its own, and each follower,
    // released when the leader failed, made its own call and got its own error.
    assert_eq!(p.calls(), 4);
    for a in &answers {
        assert!(matches!(a, Err(Error::Provider(_))), "{a:?}");
    }
}
