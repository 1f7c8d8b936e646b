//! The data that flows through a pipeline: requests, responses, streams, money and
//! the model catalogue.

mod catalog;
mod cost;
mod guard;
mod request;
mod response;
mod scope;
mod stream;

pub use catalog::{Catalog, ModelSpec, TokenizerKind};
pub use cost::{Cost, Price, Pricing};
pub use guard::{GuardKind, GuardRejection};
pub use request::{
    CacheMode, CachePolicy, ChatRequest, Document, GenerationParams, Message, Priority,
    RequestMeta, ResponseFormat, Role, Tier, Tool, ToolCall,
};
pub use response::{ChatResponse, FinishReason, Served, Usage};
pub use scope::{ANONYMOUS, Anonymous, Scope, ScopeKind};
pub use stream::{ChatStream, StreamEnd, StreamEvent, ToolCallDelta, Truncation};
