//! Routing and context budgets through the pipeline.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokenwise::context::ContextBudget;
use tokenwise::provider::{Provider, ProviderCall, SimulatedProvider};
use tokenwise::router::{
    Balance, CascadeRouter, ComplexityRouter, Deployments, JsonAnswer, WeakAnswer,
};
use tokenwise::{
    Catalog, ChatRequest, ChatResponse, ChatStream, Document, Message, Pipeline, Served, Tier,
};

/// Records what each call sent, then answers like the simulated provider.
#[derive(Debug, Clone)]
struct Recorder {
    name: &'static str,
    sim: SimulatedProvider,
    seen: Arc<Mutex<Vec<ChatRequest>>>,
}

impl Recorder {
    fn new(name: &'static str) -> Self {
        let sim = SimulatedProvider::builder()
            .name(name)
            .time_to_first_token(std::time::Duration::ZERO)
            .per_token(std::time::Duration::ZERO)
            .build()
            .unwrap();
        Recorder {
            name,
            sim,
            seen: Arc::default(),
        }
    }

    fn seen(&self) -> Vec<ChatRequest> {
        self.seen.lock().unwrap().clone()
    }
}

#[async_trait]
impl Provider for Recorder {
    fn name(&self) -> &str {
        self.name
    }

    async fn chat(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatResponse> {
        self.seen.lock().unwrap().push(call.request.clone());
        self.sim.chat(call).await
    }

    async fn stream(&self, call: ProviderCall<'_>) -> tokenwise::Result<ChatStream> {
        self.seen.lock().unwrap().push(call.request.clone());
        self.sim.stream(call).await
    }
}

#[tokio::test(start_paused = true)]
async fn the_complexity_router_sends_each_request_to_the_cheapest_capable_model() {
    let catalog = Catalog::builtin();
    let router =
        ComplexityRouter::new(&catalog, ["gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"]).unwrap();
    let pipe = Pipeline::builder()
        .provider(Recorder::new("openai"))
        .router(Arc::new(router))
        .no_cache()
        .build()
        .unwrap();
    let easy = pipe
        .chat(ChatRequest::user_text("What time zone is Oslo in?"))
        .await
        .unwrap();
    assert_eq!(easy.model, "gpt-4o-mini");
    let hard = ChatRequest::user_text(
        "Compare these designs and debug this:\n```rust\nfn main() { loop {} }\n```",
    );
    assert_eq!(pipe.chat(hard.clone()).await.unwrap().model, "gpt-4o");
    assert_eq!(
        pipe.chat(hard.tier(Tier::Free)).await.unwrap().model,
        "gpt-4.1-mini",
        "free users stay below the top tier"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cascade_escalates_once_on_a_rejected_answer_and_bills_both() {
    let catalog = Catalog::builtin();
    let cascade =
        CascadeRouter::new(&catalog, [vec!["gpt-4o-mini"], vec!["gpt-4o"], vec!["o3"]]).unwrap();
    let p = Recorder::new("openai");
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .router(Arc::new(cascade))
        .validator(Arc::new(JsonAnswer::any()))
        .no_cache()
        .build()
        .unwrap();
    // the simulated answers are prose, so the JSON validator rejects the small model's
    let r = pipe
        .chat(ChatRequest::user_text("List the order as JSON").user("ann"))
        .await
        .unwrap();
    assert_eq!(r.model, "gpt-4o", "one escalation, to the next tier");
    assert!(matches!(
        r.served,
        Served::Provider {
            attempts: 2,
            escalated: true,
            ..
        }
    ));
    assert_eq!(p.seen().len(), 2, "the third tier was not asked");
    let rec = pipe.recent_usage().pop().unwrap();
    let small = catalog.require("gpt-4o-mini").unwrap();
    let big = catalog.require("gpt-4o").unwrap();
    assert_eq!(
        (r.cost, r.usage),
        (rec.cost, rec.usage),
        "the answer reports everything it was billed, as its record does"
    );
    // some of the tokens at the small model's price, the rest at the big one's
    assert!(
        rec.cost > small.cost(&r.usage) && rec.cost < big.cost(&r.usage),
        "the small model's call is billed too"
    );

    // a good answer is kept: no escalation
    let keep = Pipeline::builder()
        .provider(Recorder::new("openai"))
        .router(Arc::new(
            CascadeRouter::new(&catalog, [vec!["gpt-4o-mini"], vec!["gpt-4o"]]).unwrap(),
        ))
        .validator(Arc::new(WeakAnswer::default()))
        .no_cache()
        .build()
        .unwrap();
    let r = keep
        .chat(ChatRequest::user_text("Say something useful"))
        .await
        .unwrap();
    assert_eq!(r.model, "gpt-4o-mini");
    assert!(matches!(
        r.served,
        Served::Provider {
            escalated: false,
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn deployments_share_the_load() {
    let (eu, us) = (Recorder::new("openai-eu"), Recorder::new("openai-us"));
    let pipe = Pipeline::builder()
        .deployments(
            "gpt-4o-mini",
            Deployments::new(Balance::Weighted)
                .add(eu.clone(), 3)
                .add(us.clone(), 1),
        )
        .default_model("gpt-4o-mini")
        .no_cache()
        .build()
        .unwrap();
    for i in 0..40 {
        let r = pipe
            .chat(ChatRequest::user_text(format!("q{i}")))
            .await
            .unwrap();
        assert!(r.provider.starts_with("openai-"));
    }
    assert_eq!((eu.seen().len(), us.seen().len()), (30, 10));
}

#[tokio::test(start_paused = true)]
async fn a_500_turn_conversation_is_fitted_to_an_8k_model_at_dispatch() {
    let catalog = Catalog::builtin()
        .with_model(tokenwise::ModelSpec::new(
            "small-8k",
            "openai",
            8_192,
            1_024,
            tokenwise::Pricing::per_mtok(0.1, 0.4, 0.05).unwrap(),
            1,
        ))
        .unwrap();
    let p = Recorder::new("openai");
    let pipe = Pipeline::builder()
        .provider(p.clone())
        .catalog(catalog)
        .default_model("small-8k")
        .context_budget(ContextBudget::default())
        .no_cache()
        .build()
        .unwrap();
    let mut req = ChatRequest::new().message(Message::system(
        "You are the support agent of Acme. Be brief.",
    ));
    for i in 0..500 {
        req = req
            .message(Message::user(format!(
                "Turn {i}: is order {i} shipped, and when does it arrive?"
            )))
            .message(Message::assistant(format!(
                "Order {i} shipped yesterday and arrives on Friday."
            )));
    }
    req = req.message(Message::user("What about my last order?"));
    req.documents = vec![
        Document::new("Shipping takes 2 to 4 days.", 0.9),
        Document::new("Returns: 30 days.", 0.2),
    ];
    let r = pipe.chat(req.clone()).await.unwrap();
    assert_eq!(r.model, "small-8k");
    let sent = &p.seen()[0];
    assert_eq!(
        sent.messages[0], req.messages[0],
        "the system prompt is intact"
    );
    assert_eq!(
        sent.messages.last(),
        req.messages.last(),
        "the current turn is intact"
    );
    assert_eq!(
        sent.messages[sent.messages.len() - 2],
        req.messages[req.messages.len() - 2],
        "newest turns kept"
    );
    assert!(sent.messages.len() < req.messages.len());
    assert_eq!(
        sent.documents, req.documents,
        "small documents are kept whole, in order"
    );
    let max = u64::from(sent.params.max_tokens.expect("max_tokens set to fit"));
    assert!(
        r.usage.input_tokens + max <= 8_192,
        "{} + {max}",
        r.usage.input_tokens
    );
}
