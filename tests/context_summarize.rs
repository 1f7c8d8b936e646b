//! Model-written summaries of dropped turns: asked through the pipeline (usage recorded),
//! cached per conversation prefix, each turn sent to the summarizing model once.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokenwise::context::{
    ContextBudget, ModelSummarizer, Preparing, SUMMARY_INSTRUCTION, Summarizer,
};
use tokenwise::provider::{Provider, ProviderCall};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, ChatStream, FinishReason, Message, ModelSpec, Pipeline,
    Pricing, Usage,
};

/// Answers summary requests with "digest N" and the rest with "ok"; keeps every request.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<ChatRequest>>,
}

#[async_trait]
impl Provider for Recorder {
    fn name(&self) -> &str {
        "p"
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        let mut seen = self.seen.lock().unwrap();
        seen.push(call.request.clone());
        let summaries = seen
            .iter()
            .filter(|r| r.meta.feature.as_deref() == Some("summary"))
            .count();
        let text = if call.request.meta.feature.as_deref() == Some("summary") {
            format!("digest {summaries}")
        } else {
            "ok".to_owned()
        };
        Ok(ChatResponse::new(
            text,
            &call.model.name,
            "p",
            Usage::new(100, 10),
            FinishReason::Stop,
        ))
    }

    async fn stream(&self, _call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        Err(tokenwise::Error::InvalidRequest("no streams here".into()))
    }
}

fn conversation(turns: usize) -> ChatRequest {
    let mut req = ChatRequest::new()
        .model("small")
        .message(Message::system("You help with orders."))
        .user("u1");
    for i in 0..turns {
        req = req
            .message(Message::user(format!("Question {i}: ").repeat(20)))
            .message(Message::assistant(format!("Answer {i}: ").repeat(20)));
    }
    req.message(Message::user("And now?")).max_tokens(100)
}

#[tokio::test]
async fn dropped_turns_are_summarised_once_per_prefix_through_the_pipeline() {
    let price = Pricing::per_mtok(1.0, 1.0, 0.1).unwrap();
    let catalog = Catalog::empty()
        .with_model(ModelSpec::new("small", "p", 1_200, 500, price, 2))
        .unwrap()
        .with_model(ModelSpec::new("cheap", "p", 100_000, 1_000, price, 1))
        .unwrap();
    let provider = Arc::new(Recorder::default());
    let summarizer = Arc::new(ModelSummarizer::new("cheap"));
    let budget = ContextBudget::default().summarizer(summarizer.clone());
    let pipeline = Pipeline::builder()
        .catalog(catalog)
        .provider_arc(provider.clone())
        .context_budget(budget.clone())
        .build()
        .unwrap();
    let small = pipeline.catalog().require("small").unwrap().clone();

    // 10 turns of ~60 tokens each do not fit 1,200 - 100: the oldest are dropped
    let first = conversation(10);
    let n = summarizer
        .prepare(&pipeline, &budget, &small, &first)
        .await
        .unwrap();
    assert!(n >= 2, "{n}");
    pipeline.chat(first.clone()).await.unwrap();
    {
        let seen = provider.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one summary, one answer");
        assert_eq!(seen[0].model.as_deref(), Some("cheap"));
        assert_eq!(seen[0].messages[0].content, SUMMARY_INSTRUCTION);
        assert_eq!(
            seen[0].meta.user.as_deref(),
            Some("u1"),
            "the user's identity"
        );
        assert!(seen[0].messages[1].content.starts_with("User: Question 0"));
        let sent = &seen[1];
        assert_eq!(sent.messages[0].content, "You help with orders.");
        assert_eq!(
            sent.messages[1].content,
            "Summary of the earlier conversation: digest 1"
        );
        assert_eq!(sent.messages.len(), 2 + (21 - n), "the rest kept whole");
    }
    assert_eq!(summarizer.cached(), 1);

    // the same conversation again: no new summary call
    summarizer
        .prepare(&pipeline, &budget, &small, &first)
        .await
        .unwrap();
    pipeline
        .chat(first.clone().cache_mode(tokenwise::CacheMode::Bypass))
        .await
        .unwrap();
    assert_eq!(provider.seen.lock().unwrap().len(), 3, "no second summary");

    // two more turns: only the newly dropped turns go to the model, with the summary so far
    let longer = conversation(12);
    let m = summarizer
        .prepare(&pipeline, &budget, &small, &longer)
        .await
        .unwrap();
    assert!(m > n, "{m} > {n}");
    pipeline.chat(longer).await.unwrap();
    let seen = provider.seen.lock().unwrap();
    assert_eq!(seen.len(), 5);
    let update = &seen[3].messages[1].content;
    assert!(
        update.starts_with("Summary so far:\ndigest 1\n\nNew turns:\n"),
        "{update}"
    );
    assert!(
        !update.contains("Question 0"),
        "old turns are not sent again: {update}"
    );
    assert_eq!(
        seen[4].messages[1].content,
        "Summary of the earlier conversation: digest 2"
    );
    assert_eq!(summarizer.cached(), 2);
}

#[tokio::test]
async fn the_cache_is_bounded() {
    let s = ModelSummarizer::with_capacity("cheap", 2);
    assert_eq!(s.cached(), 0);
    let price = Pricing::per_mtok(1.0, 1.0, 0.1).unwrap();
    let catalog = Catalog::empty()
        .with_model(ModelSpec::new("cheap", "p", 100_000, 1_000, price, 1))
        .unwrap();
    let pipeline = Pipeline::builder()
        .catalog(catalog)
        .provider_arc(Arc::new(Recorder::default()))
        .build()
        .unwrap();
    let like = ChatRequest::user_text("x");
    for i in 0..5 {
        let dropped = [Message::user(format!("turn {i}"))];
        s.summarize_async(&pipeline, &dropped, &like).await.unwrap();
    }
    assert_eq!(s.cached(), 2);
}

#[tokio::test]
async fn a_pipeline_writes_the_summaries_itself_once_per_prefix() {
    let price = Pricing::per_mtok(1.0, 1.0, 0.1).unwrap();
    let catalog = Catalog::empty()
        .with_model(ModelSpec::new("small", "p", 1_200, 500, price, 2))
        .unwrap()
        .with_model(ModelSpec::new("cheap", "p", 100_000, 1_000, price, 1))
        .unwrap();
    let provider = Arc::new(Recorder::default());
    let summarizer = Arc::new(ModelSummarizer::new("cheap"));
    let pipeline = Pipeline::builder()
        .catalog(catalog)
        .provider_arc(provider.clone())
        .context_budget(ContextBudget::default().summarizer(summarizer.clone()))
        .build()
        .unwrap();

    // no prepare() call: the pipeline summarises the dropped turns before the answer
    pipeline.chat(conversation(10)).await.unwrap();
    let dropped = {
        let seen = provider.seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one summary, one answer");
        assert_eq!(seen[0].meta.feature.as_deref(), Some("summary"));
        assert_eq!(seen[0].meta.user.as_deref(), Some("u1"));
        let sent = &seen[1];
        assert_eq!(
            sent.messages[1].content,
            "Summary of the earlier conversation: digest 1"
        );
        2 + 21 - sent.messages.len()
    };
    assert!(dropped >= 2, "{dropped}");
    let summaries = pipeline
        .recent_usage()
        .iter()
        .filter(|r| r.feature.as_deref() == Some("summary"))
        .count();
    assert_eq!(summaries, 1, "the summary request has its own usage record");

    // the same conversation again: the summary is reused
    pipeline
        .chat(conversation(10).cache_mode(tokenwise::CacheMode::Bypass))
        .await
        .unwrap();
    assert_eq!(provider.seen.lock().unwrap().len(), 3, "no second summary");
    assert_eq!(summarizer.cached(), 1);

    // a longer one: only the turns dropped since go to the model
    pipeline.chat(conversation(12)).await.unwrap();
    {
        let seen = provider.seen.lock().unwrap();
        assert_eq!(seen.len(), 5);
        let update = &seen[3].messages[1].content;
        assert!(update.starts_with("Summary so far:\ndigest 1\n\nNew turns:\n"));
        assert!(!update.contains("Question 0"), "{update}");
        assert_eq!(
            seen[4].messages[1].content,
            "Summary of the earlier conversation: digest 2"
        );
    }
    // a short request has no history to drop: nothing is summarised
    pipeline
        .chat(ChatRequest::user_text("hi").model("small").max_tokens(10))
        .await
        .unwrap();
    assert_eq!(provider.seen.lock().unwrap().len(), 6);
    assert_eq!(summarizer.cached(), 2);
}

/// A summarizer that prepares, and fails: the request goes on without a summary.
#[derive(Debug, Default)]
struct Failing {
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait]
impl Summarizer for Failing {
    fn summarize(&self, _dropped: &[Message]) -> Option<Message> {
        None
    }

    fn prepares(&self) -> bool {
        true
    }

    async fn prepare(&self, ahead: Preparing<'_>) -> tokenwise::Result<usize> {
        assert_eq!(ahead.model.name, "small", "the primary target");
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(tokenwise::Error::InvalidRequest("no model today".into()))
    }
}

/// A summarizer with nothing to prepare: never asked to.
#[derive(Debug, Default)]
struct Plain;

impl Summarizer for Plain {
    fn summarize(&self, dropped: &[Message]) -> Option<Message> {
        Some(Message::system(format!("({} left out)", dropped.len())))
    }
}

#[tokio::test]
async fn a_failed_summary_leaves_the_turns_out_and_a_plain_summarizer_is_not_prepared() {
    let price = Pricing::per_mtok(1.0, 1.0, 0.1).unwrap();
    let catalog = || {
        Catalog::empty()
            .with_model(ModelSpec::new("small", "p", 1_200, 500, price, 2))
            .unwrap()
    };
    let provider = Arc::new(Recorder::default());
    let failing = Arc::new(Failing::default());
    let pipeline = Pipeline::builder()
        .catalog(catalog())
        .provider_arc(provider.clone())
        .context_budget(ContextBudget::default().summarizer(failing.clone()))
        .build()
        .unwrap();
    pipeline.chat(conversation(10)).await.unwrap();
    assert_eq!(failing.asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    {
        let seen = provider.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "the answer only");
        assert!(seen[0].messages.len() < 22, "turns were dropped");
        assert!(
            seen[0]
                .messages
                .iter()
                .all(|m| !m.content.starts_with("Summary")),
            "no summary"
        );
    }

    let pipeline = Pipeline::builder()
        .catalog(catalog())
        .provider_arc(provider.clone())
        .context_budget(ContextBudget::default().summarizer(Arc::new(Plain)))
        .build()
        .unwrap();
    pipeline.chat(conversation(10)).await.unwrap();
    let seen = provider.seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].messages[1].content.ends_with("left out)"));
}
