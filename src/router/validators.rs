//! Built-in validators: weak answers, JSON (with an optional JSON Schema), citations,
//! and combinations.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::{Validator, Verdict};
use crate::types::{ChatRequest, ChatResponse, FinishReason};
use crate::{Error, Result};

/// Escalates answers that look weak: too short, cut by the length limit, or hedging
/// ("I'm not sure", "I cannot", "as an AI" ...).
#[derive(Debug, Clone)]
pub struct WeakAnswer {
    /// Answers with fewer characters (trimmed) escalate (default 12).
    pub min_chars: usize,
    /// Lowercase phrases that mark a weak answer.
    pub phrases: Vec<String>,
}

impl Default for WeakAnswer {
    fn default() -> Self {
        WeakAnswer {
            min_chars: 12,
            phrases: [
                "i'm not sure",
                "i am not sure",
                "i don't know",
                "i do not know",
                "i cannot help",
                "i can't help",
                "i'm unable to",
                "i am unable to",
                "as an ai",
                "i don't have enough information",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

#[async_trait]
impl Validator for WeakAnswer {
    async fn validate(&self, _req: &ChatRequest, resp: &ChatResponse) -> Verdict {
        if !resp.tool_calls.is_empty() {
            return Verdict::Accept;
        }
        if resp.finish_reason == FinishReason::Length {
            return Verdict::Escalate("the answer was cut by the length limit".into());
        }
        let text = resp.content.trim();
        if text.chars().count() < self.min_chars {
            return Verdict::Escalate(format!(
                "the answer is shorter than {} characters",
                self.min_chars
            ));
        }
        let lower = text.to_lowercase();
        match self.phrases.iter().find(|p| lower.contains(p.as_str())) {
            Some(p) => Verdict::Escalate(format!("the answer hedges (\"{p}\")")),
            None => Verdict::Accept,
        }
    }
}

/// Escalates answers that are not valid JSON, or that do not match a JSON Schema.
/// A fenced block (```json ... ```) is unwrapped first.
#[derive(Clone)]
pub struct JsonAnswer {
    schema: Option<Arc<jsonschema::Validator>>,
}

impl fmt::Debug for JsonAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonAnswer")
            .field("schema", &self.schema.is_some())
            .finish()
    }
}

impl JsonAnswer {
    /// Any valid JSON.
    pub fn any() -> Self {
        JsonAnswer { schema: None }
    }

    /// JSON matching `schema`; an invalid schema is a configuration error.
    pub fn with_schema(schema: &serde_json::Value) -> Result<Self> {
        let v = jsonschema::validator_for(schema)
            .map_err(|e| Error::Config(format!("invalid JSON schema: {e}")))?;
        Ok(JsonAnswer {
            schema: Some(Arc::new(v)),
        })
    }
}

fn unfence(text: &str) -> &str {
    let t = text.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    let rest = rest.strip_prefix("json").unwrap_or(rest);
    rest.strip_suffix("```").unwrap_or(rest).trim()
}

#[async_trait]
impl Validator for JsonAnswer {
    async fn validate(&self, _req: &ChatRequest, resp: &ChatResponse) -> Verdict {
        let value: serde_json::Value = match serde_json::from_str(unfence(&resp.content)) {
            Ok(v) => v,
            Err(e) => return Verdict::Escalate(format!("the answer is not valid JSON: {e}")),
        };
        match &self.schema {
            Some(s) => match s.validate(&value) {
                Ok(()) => Verdict::Accept,
                Err(e) => Verdict::Escalate(format!("the answer does not match the schema: {e}")),
            },
            None => Verdict::Accept,
        }
    }
}

/// Escalates answers that cite nothing: no `[n]` reference, no URL, and no id of the
/// request's documents.
#[derive(Debug, Clone, Copy, Default)]
pub struct CitesSource;

#[async_trait]
impl Validator for CitesSource {
    async fn validate(&self, req: &ChatRequest, resp: &ChatResponse) -> Verdict {
        let text = &resp.content;
        let bracket_ref = text.match_indices('[').any(|(i, _)| {
            let rest = &text[i + 1..];
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            digits > 0 && rest[digits..].starts_with(']')
        });
        let url = text.contains("http://") || text.contains("https://");
        let doc_id = req
            .documents
            .iter()
            .filter_map(|d| d.id.as_deref())
            .any(|id| !id.is_empty() && text.contains(id));
        if bracket_ref || url || doc_id {
            Verdict::Accept
        } else {
            Verdict::Escalate("the answer cites no source".into())
        }
    }
}

/// Accepts only what every validator accepts; the first rejection wins.
#[derive(Debug, Clone, Default)]
pub struct AllOf(pub Vec<Arc<dyn Validator>>);

#[async_trait]
impl Validator for AllOf {
    async fn validate(&self, req: &ChatRequest, resp: &ChatResponse) -> Verdict {
        for v in &self.0 {
            if let Verdict::Escalate(why) = v.validate(req, resp).await {
                return Verdict::Escalate(why);
            }
        }
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Document, Usage};

    fn answer(text: &str) -> ChatResponse {
        ChatResponse::new(text, "m", "p", Usage::new(1, 1), FinishReason::Stop)
    }

    async fn verdict(v: &dyn Validator, req: &ChatRequest, text: &str) -> bool {
        v.validate(req, &answer(text)).await == Verdict::Accept
    }

    #[tokio::test]
    async fn weak_answers_escalate() {
        let v = WeakAnswer::default();
        let req = ChatRequest::user_text("q");
        assert!(verdict(&v, &req, "Paris is the capital of France.").await);
        assert!(!verdict(&v, &req, "No idea").await);
        assert!(!verdict(&v, &req, "I'm not sure, but it might be Lyon.").await);
        let mut cut = answer("A long answer that was cut off in the middle of");
        cut.finish_reason = FinishReason::Length;
        assert!(matches!(v.validate(&req, &cut).await, Verdict::Escalate(_)));
    }

    #[tokio::test]
    async fn json_and_schemas() {
        let req = ChatRequest::user_text("q");
        assert!(verdict(&JsonAnswer::any(), &req, "```json\n{\"a\": 1}\n```").await);
        assert!(!verdict(&JsonAnswer::any(), &req, "{\"a\": ").await);
        let schema = serde_json::json!({"type": "object", "required": ["name", "age"],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}});
        let v = JsonAnswer::with_schema(&schema).unwrap();
        assert!(verdict(&v, &req, r#"{"name": "Ann", "age": 31}"#).await);
        assert!(!verdict(&v, &req, r#"{"name": "Ann"}"#).await);
        assert!(!verdict(&v, &req, r#"{"name": "Ann", "age": -1}"#).await);
        assert!(JsonAnswer::with_schema(&serde_json::json!({"type": 12})).is_err());
    }

    #[tokio::test]
    async fn citations_and_combinations() {
        let mut req = ChatRequest::user_text("q");
        req.documents = vec![Document {
            id: Some("kb-42".into()),
            text: "x".into(),
            score: 1.0,
        }];
        assert!(verdict(&CitesSource, &req, "Yes, see [1].").await);
        assert!(verdict(&CitesSource, &req, "Per kb-42, yes.").await);
        assert!(verdict(&CitesSource, &req, "See https://example.org/faq").await);
        assert!(!verdict(&CitesSource, &req, "Yes [a] it is.").await);
        let both = AllOf(vec![Arc::new(WeakAnswer::default()), Arc::new(CitesSource)]);
        assert!(!verdict(&both, &req, "I don't know [1]").await);
        assert!(verdict(&both, &req, "The refund takes five days [1].").await);
    }
}
