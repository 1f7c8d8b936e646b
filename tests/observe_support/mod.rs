//! Shared helpers for the observability tests (`tests/observe_*.rs`): a tracing layer
//! that captures spans and events with their fields, and a reader over a `metrics-util`
//! debugging snapshot.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, Snapshotter};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as captured: its name, its parent's name, and its fields as text.
#[derive(Debug, Clone, Default)]
pub struct SpanRec {
    pub name: String,
    pub parent: Option<String>,
    pub fields: BTreeMap<String, String>,
    pub closed: bool,
}

impl SpanRec {
    /// A field's value, or a panic naming the span's fields.
    pub fn get(&self, field: &str) -> &str {
        match self.fields.get(field) {
            Some(v) => v,
            None => panic!("span {} has no field {field}: {:?}", self.name, self.fields),
        }
    }

    pub fn has(&self, field: &str) -> bool {
        self.fields.contains_key(field)
    }
}

/// An event as captured.
#[derive(Debug, Clone, Default)]
pub struct EventRec {
    pub level: String,
    pub span: Option<String>,
    pub fields: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct State {
    open: HashMap<u64, SpanRec>,
    closed: Vec<SpanRec>,
    events: Vec<EventRec>,
}

/// Captures every span and event of the thread it is installed on.
#[derive(Debug, Clone, Default)]
pub struct Capture {
    state: Arc<Mutex<State>>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut rec = SpanRec {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.name().to_owned()),
            ..Default::default()
        };
        attrs.record(&mut Fields(&mut rec.fields));
        self.state.lock().unwrap().open.insert(id.into_u64(), rec);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some(rec) = self.state.lock().unwrap().open.get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut rec.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut rec = EventRec {
            level: event.metadata().level().to_string(),
            span: ctx.event_span(event).map(|s| s.name().to_owned()),
            ..Default::default()
        };
        event.record(&mut Fields(&mut rec.fields));
        self.state.lock().unwrap().events.push(rec);
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        let mut st = self.state.lock().unwrap();
        if let Some(mut rec) = st.open.remove(&id.into_u64()) {
            rec.closed = true;
            st.closed.push(rec);
        }
    }
}

impl Capture {
    /// Installs the capture as this thread's subscriber until the guard drops.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let subscriber = tracing_subscriber::registry().with(self.clone());
        tracing::subscriber::set_default(subscriber)
    }

    /// Closed spans named `name`, in the order they closed.
    pub fn closed(&self, name: &str) -> Vec<SpanRec> {
        let st = self.state.lock().unwrap();
        st.closed
            .iter()
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    /// Spans named `name`, open or closed.
    pub fn spans(&self, name: &str) -> Vec<SpanRec> {
        let st = self.state.lock().unwrap();
        st.closed
            .iter()
            .chain(st.open.values())
            .filter(|s| s.name == name)
            .cloned()
            .collect()
    }

    pub fn events(&self) -> Vec<EventRec> {
        self.state.lock().unwrap().events.clone()
    }

    /// Everything captured, as text.
    pub fn dump(&self) -> String {
        format!("{:?}", self.state.lock().unwrap())
    }
}

/// One series of a metrics snapshot.
#[derive(Debug, Clone)]
pub struct Series {
    pub kind: MetricKind,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

/// A metrics snapshot, read by name and label subset.
#[derive(Debug, Clone)]
pub struct Metrics(pub Vec<Series>);

/// Takes (and resets) a snapshot.
pub fn snapshot(s: &Snapshotter) -> Metrics {
    Metrics(
        s.snapshot()
            .into_vec()
            .into_iter()
            .map(|(ck, _, _, v)| {
                let (kind, key) = ck.into_parts();
                Series {
                    kind,
                    name: key.name().to_owned(),
                    labels: key
                        .labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect(),
                    value: match v {
                        DebugValue::Counter(n) => Value::Counter(n),
                        DebugValue::Gauge(g) => Value::Gauge(g.0),
                        DebugValue::Histogram(h) => {
                            Value::Histogram(h.into_iter().map(|x| x.0).collect())
                        }
                    },
                }
            })
            .collect(),
    )
}

impl Metrics {
    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the counters named `name` whose labels include `labels`.
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|s| match s.value {
                Value::Counter(n) => n,
                ref other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    /// The gauge named `name` with `labels`, if exactly one matches.
    pub fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .matching(name, labels)
            .map(|s| match s.value {
                Value::Gauge(g) => g,
                ref other => panic!("{name} is not a gauge: {other:?}"),
            })
            .collect();
        match found.as_slice() {
            [] => None,
            [one] => Some(*one),
            many => panic!("{name} {labels:?} matches {} gauges", many.len()),
        }
    }

    /// Every value recorded in the histograms named `name` whose labels include `labels`.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.matching(name, labels)
            .flat_map(|s| match &s.value {
                Value::Histogram(h) => h.clone(),
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .collect()
    }

    /// The label sets of the series named `name`.
    pub fn series(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.labels.clone())
            .collect()
    }

    /// Every label value of every series.
    pub fn label_values(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|s| s.labels.values().cloned())
            .collect()
    }
}
