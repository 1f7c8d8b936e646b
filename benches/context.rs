//! Context budgets: re-fitting a 100k-token conversation after one appended turn, and
//! raw token counting throughput.
//!
//! ```text
//! cargo bench --bench context
//! ```

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokenwise::context::{ContextBudget, CountCache, TiktokenCounter};
use tokenwise::{Catalog, ChatRequest, Message, TokenCounter, TokenizerKind};

fn conversation(turns: usize) -> ChatRequest {
    let mut req = ChatRequest::new().message(Message::system(
        "You are a meticulous support agent for Acme. Answer briefly.",
    ));
    for i in 0..turns {
        req = req
            .message(Message::user(format!(
                "Turn {i}: my order {i} was supposed to arrive on Monday but the tracking page still shows it in the regional depot, what should I do?"
            )))
            .message(Message::assistant(format!(
                "Order {i} left the depot this morning; couriers scan parcels late, so expect it tomorrow before noon. If not, reply here and we will resend it."
            )));
    }
    req.message(Message::user("And the newest one?"))
}

fn bench(c: &mut Criterion) {
    let counter = TiktokenCounter::new();
    let catalog = Catalog::builtin();
    let model = catalog.require("gpt-4o").expect("in the catalogue").clone();
    let conv = conversation(1_700);
    let tokens = counter.count_request(&conv, TokenizerKind::O200k);
    println!(
        "conversation: {} messages, {tokens} tokens",
        conv.messages.len()
    );
    let budget = ContextBudget::default();
    let cache = CountCache::default();
    budget.fit(&conv, &model, &counter, &cache).expect("fits");

    let mut turn = 0u64;
    c.bench_function("refit_100k_token_conversation_after_one_turn", |b| {
        b.iter_batched(
            || {
                turn += 1;
                let mut next = conv.clone();
                next.messages.push(Message::assistant(format!(
                    "Reply {turn}: it is on its way."
                )));
                next.messages.push(Message::user(format!(
                    "Thanks! One more question, number {turn}?"
                )));
                next
            },
            |next| {
                let fitted = budget
                    .fit(black_box(&next), &model, &counter, &cache)
                    .expect("fits");
                black_box(fitted.prompt_tokens);
            },
            BatchSize::LargeInput,
        )
    });

    let text: String = conv
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let mut g = c.benchmark_group("count");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("o200k_count_text", |b| {
        b.iter(|| counter.count_text(black_box(&text), TokenizerKind::O200k))
    });
    g.finish();
    let t0 = std::time::Instant::now();
    let n = counter.count_text(&text, TokenizerKind::O200k);
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "counting throughput: {n} tokens in {:.1} ms = {:.1} M tokens/s",
        secs * 1e3,
        n as f64 / secs / 1e6
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
