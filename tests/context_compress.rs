//! Document compression on a small question-answering set (tests/data/compress_qa.json):
//! each item is a question, the documents retrieved for it (the passage that answers it
//! and one that does not) and the sentence holding the answer. The compressor must keep
//! that sentence while cutting at least half of the documents' tokens.

use serde::Deserialize;
use std::collections::HashMap;
use tokenwise::context::{
    Compressor, ContextBudget, CountCache, TiktokenCounter, TokenCounter, normalize,
};
use tokenwise::{Catalog, ChatRequest, Document, TokenizerKind};

#[derive(Deserialize)]
struct Set {
    passages: HashMap<String, String>,
    calibration: Vec<Item>,
    test: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    question: String,
    documents: Vec<String>,
    answer: String,
}

fn set() -> Set {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/compress_qa.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn documents(set: &Set, item: &Item) -> Vec<Document> {
    item.documents
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut d = Document::new(set.passages[id].clone(), 1.0 - i as f32 * 0.1);
            d.id = Some(id.clone());
            d
        })
        .collect()
}

/// (answer kept rate, share of document tokens cut) over `items`.
fn measure(set: &Set, items: &[Item], c: &Compressor) -> (f64, f64, Vec<String>) {
    let counter = TiktokenCounter::new();
    let (mut kept, mut before, mut after) = (0usize, 0u64, 0u64);
    let mut missed = Vec::new();
    for item in items {
        let out = c.compress(
            &item.question,
            &documents(set, item),
            &counter,
            TokenizerKind::O200k,
        );
        before += out.tokens_before;
        after += out.tokens_after;
        let answer = normalize(&item.answer);
        if out.documents.iter().any(|d| d.text.contains(&answer)) {
            kept += 1;
        } else {
            missed.push(item.question.clone());
        }
    }
    (
        kept as f64 / items.len() as f64,
        1.0 - after as f64 / before as f64,
        missed,
    )
}

#[test]
fn the_answer_survives_while_half_the_tokens_go() {
    let set = set();
    assert!(set.test.len() >= 20, "a meaningful test part");
    let c = Compressor::new();
    let (cal_kept, cal_cut, cal_missed) = measure(&set, &set.calibration, &c);
    let (kept, cut, missed) = measure(&set, &set.test, &c);
    println!(
        "calibration: answer kept {:.1} %, tokens cut {:.1} % (missed {cal_missed:?})",
        cal_kept * 100.0,
        cal_cut * 100.0
    );
    println!(
        "test: answer kept {:.1} %, tokens cut {:.1} % over {} items (missed {missed:?})",
        kept * 100.0,
        cut * 100.0,
        set.test.len()
    );
    assert!(kept >= 0.95, "answer kept {kept} (missed {missed:?})");
    assert!(cut >= 0.5, "cut {cut}");
}

#[test]
fn a_context_budget_with_a_compressor_sends_the_cut_documents() {
    let set = set();
    let item = &set.test[0];
    let mut req = ChatRequest::user_text(item.question.clone()).max_tokens(100);
    req.documents = documents(&set, item);
    let cat = Catalog::builtin();
    let m = cat.require("gpt-4o-mini").unwrap();
    let counter = TiktokenCounter::new();
    let budget = ContextBudget::default().compressor(Compressor::new());
    let f = budget
        .fit(&req, m, &counter, &CountCache::default())
        .unwrap();
    let sent: u64 = f
        .request
        .documents
        .iter()
        .map(|d| counter.count_text(&d.text, m.tokenizer))
        .sum();
    let given: u64 = req
        .documents
        .iter()
        .map(|d| counter.count_text(&d.text, m.tokenizer))
        .sum();
    assert!(sent * 2 <= given, "{sent} of {given}");
    assert!(f.trimmed_documents >= 1);
    assert!(
        f.request
            .documents
            .iter()
            .any(|d| d.text.contains(&normalize(&item.answer)))
    );
    assert_eq!(
        f.prompt_tokens,
        counter.count_request(&f.request, m.tokenizer)
    );
}
