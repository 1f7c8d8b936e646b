//! A real call to OpenAI, or to any server that speaks its chat completions API, through
//! a pipeline: one whole answer and one streamed answer, with usage, cost and the
//! rate-limit headers.
//!
//! ```text
//! OPENAI_API_KEY=sk-... cargo run --example openai
//! # Another server speaking the same API (Ollama here), and a model it serves:
//! OPENAI_API_KEY=unused OPENAI_BASE_URL=http://localhost:11434/v1 OPENAI_MODEL=llama3.2 \
//!     cargo run --example openai
//! ```
//!
//! Without `OPENAI_API_KEY` it says what it needs and exits without calling anything.

use std::process::ExitCode;

use futures_util::StreamExt;
use tokenwise::provider::{ApiKey, OpenAiCompatible};
use tokenwise::{Catalog, ChatRequest, Message, Pipeline, StreamEvent};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(key) = ApiKey::from_env("OPENAI_API_KEY") else {
        eprintln!(
            "OPENAI_API_KEY is not set: nothing to call.\n\
             Set it (and optionally OPENAI_BASE_URL and OPENAI_MODEL) to make a real call:\n\
             \n    OPENAI_API_KEY=sk-... cargo run --example openai\n\
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
    let mut builder = OpenAiCompatible::builder().api_key(key);
    if let Ok(url) = std::env::var("OPENAI_BASE_URL") {
        builder = builder.base_url(url);
    }
    let provider = builder.build()?;
    let model = std::env::var("OPENAI_MODEL").unwrap_or_else(|_| "gpt-4o-mini".to_owned());
    let mut catalog = Catalog::builtin();
    if catalog.get(&model).is_none() {
        // A model the catalogue does not know (a local one, say): add it, free.
        catalog = catalog.merge_toml(&format!(
            "[[models]]\nname = {model:?}\nprovider = \"openai\"\ncontext_window = 32768\n\
             max_output = 4096\ninput_per_mtok = 0.0\noutput_per_mtok = 0.0\n\
             cached_input_per_mtok = 0.0\ntier = 1\n"
        ))?;
    }
    let pipeline = Pipeline::builder()
        .provider(provider.clone())
        .catalog(catalog)
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
        "  finish: {}, usage: {} in ({} cached) + {} out{}, cost: {}",
        answer.finish_reason,
        answer.usage.input_tokens,
        answer.usage.cached_input_tokens,
        answer.usage.output_tokens,
        if answer.usage.estimated {
            " (estimated)"
        } else {
            ""
        },
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
                "\n  finish: {}, usage: {} in + {} out{}, cost: {}",
                end.finish_reason,
                end.usage.input_tokens,
                end.usage.output_tokens,
                if end.usage.estimated {
                    " (estimated)"
                } else {
                    ""
                },
                end.cost
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
