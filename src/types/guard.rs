//! What the semantic cache's guards report: which guard refused a near-miss, and why.
//! The guards themselves live in the cache (`cache::Guards`); these types are part of
//! a response, so they live with the other response types.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which guard refused a semantic match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GuardKind {
    /// Numbers, dates, times and relative days differ.
    Numbers,
    /// A named entity (a capitalised name or an acronym) is missing or swapped.
    Entities,
    /// Negation or polarity differs ("open" vs "closed", "is" vs "isn't").
    Negation,
    /// Quantifiers or scope words differ ("all" vs "only", "total" vs "average"), or
    /// whose question it is ("my" vs "your", "my kids").
    Scope,
    /// A content word of one question is replaced by another in the same place of the
    /// other ("return a blender" vs "return a laptop"), or one question adds a
    /// qualifier the other lacks.
    Terms,
}

impl GuardKind {
    /// Every guard, in the order they are checked.
    pub const ALL: [GuardKind; 5] = [
        GuardKind::Numbers,
        GuardKind::Entities,
        GuardKind::Negation,
        GuardKind::Scope,
        GuardKind::Terms,
    ];

    /// The guard's name, as in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardKind::Numbers => "numbers",
            GuardKind::Entities => "entities",
            GuardKind::Negation => "negation",
            GuardKind::Scope => "scope",
            GuardKind::Terms => "terms",
        }
    }
}

impl fmt::Display for GuardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A semantic match that scored above the threshold but that a guard refused.
///
/// Reported in [`ChatResponse::guard_rejected`](crate::ChatResponse::guard_rejected)
/// (and on the final event of a stream) so that a caller can see why a question that
/// looks cached was sent to a provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GuardRejection {
    /// The guard that refused.
    pub guard: GuardKind,
    /// The similarity of the refused candidate.
    pub similarity: f32,
    /// What differed, for example `numbers differ: [3] vs [4]`.
    pub detail: String,
}

impl GuardRejection {
    /// A rejection by `guard` of a candidate with `similarity`.
    pub fn new(guard: GuardKind, similarity: f32, detail: impl Into<String>) -> Self {
        GuardRejection {
            guard,
            similarity,
            detail: detail.into(),
        }
    }
}
