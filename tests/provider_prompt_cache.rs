//! Provider prompt caching over loopback: the exact `cache_control` breakpoints and
//! `prompt_cache_key` sent, and what cache reads and writes cost.

#[path = "observe_support/mod.rs"]
mod observe_support;
mod support;

use serde_json::json;
use support::{Reply, Server, client};
use tokenwise::provider::{
    Anthropic, OpenAiCompatible, PromptCacheTtl, PromptCaching, Provider, ProviderCall,
};
use tokenwise::{Catalog, ChatRequest, Cost, Document, Message, Tool, Usage};

fn answer(usage: &str) -> String {
    format!(
        r#"{{"id":"m","type":"message","role":"assistant","model":"claude-sonnet-4-5",
        "content":[{{"type":"text","text":"ok"}}],"stop_reason":"end_turn","usage":{usage}}}"#
    )
}

fn policy() -> String {
    "Refunds are accepted within thirty days of delivery for unopened items. ".repeat(100)
}

fn agent_request() -> ChatRequest {
    let mut req = ChatRequest::new()
        .message(Message::system(policy()))
        .message(Message::user("Where is order 17?"))
        .message(Message::assistant("Order 17 left the warehouse on Monday."))
        .message(Message::user("And can I return it?"))
        .document(Document::new("Order 17: two mugs, delivered Tuesday.", 1.0))
        .max_tokens(50);
    req.params.tools = vec![Tool {
        name: "order_status".into(),
        description: "Looks up an order".into(),
        parameters: json!({"type": "object"}),
    }];
    req
}

#[tokio::test]
async fn anthropic_breakpoints_end_each_stable_section() {
    let server = Server::start(vec![Reply::json(
        200,
        &answer(
            r#"{"input_tokens":30,"cache_creation_input_tokens":1200,"cache_read_input_tokens":0,"output_tokens":5}"#,
        ),
    )])
    .await;
    let p = Anthropic::builder()
        .base_url(server.url(""))
        .api_key("k")
        .http_client(client())
        .build()
        .unwrap();
    let cat = Catalog::builtin();
    let m = cat.require("claude-sonnet-4-5").unwrap();
    let req = agent_request();
    let r = p.chat(ProviderCall::new(&req, m)).await.unwrap();
    let body = server.received()[0].json();
    let eph = json!({"type": "ephemeral"});
    // tools alone are short: no breakpoint there
    assert!(body["tools"][0].get("cache_control").is_none(), "{body}");
    assert_eq!(
        body["system"],
        json!([
            {"type": "text", "text": policy(), "cache_control": eph},
            {"type": "text", "text": "Documents:\n\n<document>\nOrder 17: two mugs, delivered Tuesday.\n</document>\n", "cache_control": eph},
        ])
    );
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "Where is order 17?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Order 17 left the warehouse on Monday.", "cache_control": eph}]},
            {"role": "user", "content": [{"type": "text", "text": "And can I return it?"}]},
        ])
    );
    // 30 + 1,200 written + 0 read; the writes cost 1.25x the $3 input price
    assert_eq!(r.usage, Usage::new(1_230, 5).with_cache_writes(1_200, 0));
    let nanos = 30 * 3_000 + 1_200 * 3_750 + 5 * 15_000;
    assert_eq!(m.cost(&r.usage), Cost::from_nanos(nanos));
}

#[tokio::test]
async fn anthropic_one_hour_route_reads_and_short_prompts() {
    let server = Server::start(vec![
        Reply::json(
            200,
            &answer(
                r#"{"input_tokens":40,"cache_creation_input_tokens":300,"cache_read_input_tokens":1500,"output_tokens":10,
                "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":300}}"#,
            ),
        ),
        Reply::json(200, &answer(r#"{"input_tokens":12,"output_tokens":3}"#)),
    ])
    .await;
    let p = Anthropic::builder()
        .base_url(server.url(""))
        .api_key("k")
        .http_client(client())
        .prompt_cache_ttl_for("agent", PromptCacheTtl::OneHour)
        .build()
        .unwrap();
    let cat = Catalog::builtin();
    let m = cat.require("claude-sonnet-4-5").unwrap();
    let mut req = agent_request();
    req.params.tools[0].description = "Looks up an order. ".repeat(400);
    req.meta.feature = Some("agent".into());
    let r = p.chat(ProviderCall::new(&req, m)).await.unwrap();
    let body = server.received()[0].json();
    let hour = json!({"type": "ephemeral", "ttl": "1h"});
    assert_eq!(body["tools"][0]["cache_control"], hour);
    assert_eq!(body["system"][0]["cache_control"], hour);
    assert_eq!(body["system"][1]["cache_control"], hour);
    assert_eq!(body["messages"][1]["content"][0]["cache_control"], hour);
    assert!(
        body["messages"][2]["content"][0]
            .get("cache_control")
            .is_none()
    );
    let u = Usage::new(1_840, 10)
        .with_cached_input(1_500)
        .with_cache_writes(0, 300);
    assert_eq!(r.usage, u);
    // 40 at $3, 1,500 read at $0.30, 300 written for an hour at $6, 10 out at $15
    let nanos = 40 * 3_000 + 1_500 * 300 + 300 * 6_000 + 10 * 15_000;
    assert_eq!(m.cost(&u), Cost::from_nanos(nanos));
    let full = 1_840 * 3_000 + 10 * 15_000;
    assert_eq!(m.pricing.prompt_cache_saving(&u), i128::from(full - nanos));

    // a prompt too short to cache is sent as before: no breakpoints, system a string
    let short = ChatRequest::new()
        .message(Message::system("Be brief."))
        .message(Message::user("hi"))
        .max_tokens(5);
    p.chat(ProviderCall::new(&short, m)).await.unwrap();
    let body = server.received()[1].json();
    assert_eq!(body["system"], "Be brief.");
    assert!(!body.to_string().contains("cache_control"));

    // caching off: none either
    let server = Server::start(vec![Reply::json(
        200,
        &answer(r#"{"input_tokens":1,"output_tokens":1}"#),
    )])
    .await;
    let off = Anthropic::builder()
        .base_url(server.url(""))
        .api_key("k")
        .http_client(client())
        .prompt_caching(PromptCaching::off())
        .build()
        .unwrap();
    off.chat(ProviderCall::new(&agent_request(), m))
        .await
        .unwrap();
    assert!(
        !server.received()[0]
            .json()
            .to_string()
            .contains("cache_control")
    );
}

#[tokio::test]
async fn openai_sends_a_stable_key_per_tenant_and_prefix_and_prices_cached_tokens() {
    let reply = r#"{"id":"c","object":"chat.completion","model":"gpt-4.1-mini",
        "choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":2000,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":1792}}}"#;
    let server = Server::start(vec![
        Reply::json(200, reply),
        Reply::json(200, reply),
        Reply::json(200, reply),
        Reply::json(200, reply),
    ])
    .await;
    let p = OpenAiCompatible::builder()
        .base_url(server.url("/v1"))
        .api_key("k")
        .http_client(client())
        .build()
        .unwrap();
    let cat = Catalog::builtin();
    let m = cat.require("gpt-4.1-mini").unwrap();
    let a1 = agent_request().org("acme");
    let a2 = agent_request()
        .message(Message::assistant("Yes."))
        .message(Message::user("Thanks, how?"))
        .org("acme");
    let b = agent_request().org("globex");
    let r = p.chat(ProviderCall::new(&a1, m)).await.unwrap();
    for req in [&a2, &b] {
        p.chat(ProviderCall::new(req, m)).await.unwrap();
    }
    let keys: Vec<String> = server
        .received()
        .iter()
        .map(|g| g.json()["prompt_cache_key"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys[0], keys[1], "same tenant and prefix, later turn");
    assert_ne!(keys[0], keys[2], "another tenant");
    assert!(keys[0].starts_with("tw-"));
    // no prefix to share: no key
    p.chat(ProviderCall::new(&ChatRequest::user_text("hi"), m))
        .await
        .unwrap();
    assert!(
        server.received()[3]
            .json()
            .get("prompt_cache_key")
            .is_none()
    );
    assert_eq!(r.usage, Usage::new(2_000, 10).with_cached_input(1_792));
    // 208 at $0.40, 1,792 at $0.10, 10 at $1.60 per million
    let nanos = 208 * 400 + 1_792 * 100 + 10 * 1_600;
    assert_eq!(m.cost(&r.usage), Cost::from_nanos(nanos));
}

#[tokio::test]
async fn the_pipeline_counts_prompt_cache_reads_writes_and_savings_in_metrics() {
    use metrics_util::debugging::DebuggingRecorder;
    use tokenwise::Pipeline;
    use tokenwise::observe::metrics as m;

    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let server = Server::start(vec![
        // the first call writes the prefix (five minutes), the second reads it
        Reply::json(
            200,
            &answer(
                r#"{"input_tokens":40,"cache_creation_input_tokens":1200,"cache_read_input_tokens":0,"output_tokens":5}"#,
            ),
        ),
        Reply::json(
            200,
            &answer(
                r#"{"input_tokens":40,"cache_creation_input_tokens":0,"cache_read_input_tokens":1200,"output_tokens":5}"#,
            ),
        ),
    ])
    .await;
    let p = Anthropic::builder()
        .base_url(server.url(""))
        .api_key("k")
        .http_client(client())
        .build()
        .unwrap();
    let pipe = Pipeline::builder()
        .provider(p)
        .default_model("claude-sonnet-4-5")
        .build()
        .unwrap();
    let ask = |q: &str| {
        let mut r = agent_request();
        r.messages
            .push(Message::assistant("Yes, within thirty days."));
        r.messages.push(Message::user(q));
        r
    };
    pipe.chat(ask("How do I send it back?")).await.unwrap();
    pipe.chat(ask("Who pays the postage?")).await.unwrap();

    // the usage records: the write's premium, then the read's saving
    let recs = pipe.recent_usage();
    assert_eq!(recs.len(), 2);
    // 1,200 written at $3.75 instead of $3; 1,200 read at $0.30 instead of $3
    let premium = 1_200 * (3_750 - 3_000);
    let saved = 1_200 * (3_000 - 300);
    assert_eq!(
        recs[0].prompt_cache_write_premium,
        Cost::from_nanos(premium)
    );
    assert!(recs[0].prompt_cache_saved.is_zero());
    assert_eq!(recs[1].prompt_cache_saved, Cost::from_nanos(saved));
    assert!(recs[1].prompt_cache_write_premium.is_zero());
    let cat = Catalog::builtin();
    let model = cat.require("claude-sonnet-4-5").unwrap();
    assert_eq!(
        model.pricing.prompt_cache_saving(&recs[1].usage)
            + model.pricing.prompt_cache_saving(&recs[0].usage),
        i128::from(saved) - i128::from(premium),
        "the counters' difference is the net saving"
    );

    // the metrics
    let mx = observe_support::snapshot(&snap);
    let sonnet = [("model", "claude-sonnet-4-5")];
    let tokens = |t: &str| {
        mx.counter(
            m::PROMPT_CACHE_TOKENS,
            &[("model", "claude-sonnet-4-5"), ("type", t)],
        )
    };
    assert_eq!(tokens("read"), 1_200);
    assert_eq!(tokens("write"), 1_200);
    assert_eq!(mx.counter(m::PROMPT_CACHE_SAVED, &sonnet), saved);
    assert_eq!(mx.counter(m::PROMPT_CACHE_WRITE_PREMIUM, &sonnet), premium);
    assert_eq!(
        mx.counter(
            m::TOKENS,
            &[("model", "claude-sonnet-4-5"), ("type", "input")]
        ),
        2 * 1_240,
        "reads and writes are part of the input tokens"
    );
    for name in [
        m::PROMPT_CACHE_TOKENS,
        m::PROMPT_CACHE_SAVED,
        m::PROMPT_CACHE_WRITE_PREMIUM,
    ] {
        assert!(m::ALL.contains(&name), "{name} is listed");
    }
}
