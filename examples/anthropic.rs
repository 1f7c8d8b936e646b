//! A real call to the Anthropic Messages API through a pipeline: one whole answer and
//! one streamed answer, with usage (cache reads included), cost and the rate-limit
//! headers.
//!
//! ```text
//! ANTHROPIC_API_KEY=sk-ant-... cargo run --example anthropic
//! ANTHROPIC_MODEL=claude-sonnet-4-5 ANTHROPIC_API_KEY=sk-ant-... cargo run --example anthropic
//! ```
//!
//! Without `ANTHROPIC_API_KEY` it says what it needs and exits without calling anything.

use std::process::ExitCode;

use futures_util::StreamExt;
use tokenwise::provider::{Anthropic, ApiKey};
use tokenwise::{ChatRequest, Message, Pipeline, StreamEvent};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(key) = ApiKey::from_env("ANTHROPIC_API_KEY") else {
        eprintln!(
            "ANTHROPIC_API_KEY is not set: nothing to call.\n\
             Set it (and optionally ANTHROPIC_BASE_URL and ANTHROPIC_MODEL) to make a real call:\n\
             \n    ANTHROPIC_API_KEY=sk-ant-... cargo run --example anthropic\n\
             \nFor an offline tour of tokenwise, run `cargo run --example quickstart`."
        );
        return ExitCode::SUCCESS;
    };
    match run(key).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {e}\n  kind: {}, retryable: {}, retry after: {:?}",
                e.reason(),
                e.is_retryable(),
                e.retry_after()
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(key: ApiKey) -> tokenwise::Result<()> {
    let mut builder = Anthropic::builder().api_key(key);
    if let Ok(url) = std::env::var("ANTHROPIC_BASE_URL") {
        builder = builder.base_url(url);
    }
    let provider = builder.build()?;
    let model = std::env::var("ANTHROPIC_MODEL").unwrap_or_else(|_| "claude-haiku-4-5".to_owned());
    let pipeline = Pipeline::builder()
        .provider(provider.clone())
        .default_model(&model)
        .build()?;
    println!("calling {model} at {}", provider.base_url());

    let question = ChatRequest::new()
        .message(Message::system("Answer in one sentence."))
        .message(Message::user(
            "What does a circuit breaker do in a distributed system?",
        ))
        .max_tokens(120);
    let answer = pipeline.chat(question).await?;
    println!("\nwhole answer: {}", answer.content);
    println!(
        "  finish: {}, usage: {} in ({} from cache) + {} out, cost: {}",
        answer.finish_reason,
        answer.usage.input_tokens,
        answer.usage.cached_input_tokens,
        answer.usage.output_tokens,
        answer.cost
    );

    print!("\nstreamed answer: ");
    let mut stream = pipeline
        .stream(ChatRequest::user_text("Name three prime numbers, briefly.").max_tokens(60))
        .await?;
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::TextDelta { text } => print!("{text}"),
            StreamEvent::Done(end) => println!(
                "\n  finish: {}, usage: {} in + {} out, cost: {}",
                end.finish_reason, end.usage.input_tokens, end.usage.output_tokens, end.cost
            ),
            _ => {}
        }
    }
    if let Some(limits) = provider.last_rate_limits() {
        println!(
            "\nrate limits left: {:?} requests, {:?} tokens",
            limits.remaining_requests, limits.remaining_tokens
        );
    }
    Ok(())
}
