//! The alert rules, the dashboard and the observability guide stay in step with the
//! metrics the crate emits. (`promtool check rules` / `promtool test rules` check the
//! PromQL itself; see docs/ops/alerts.test.yml.)

use std::collections::BTreeSet;

use tokenwise::observe::metrics as m;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `tokenwise_*` metric name a text mentions, with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tokenwise_") {
        let start = i + at;
        let boundary = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + "tokenwise_".len() {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    if m::ALL.contains(&base) {
                        name = base;
                    }
                }
            }
            names.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

fn assert_known(what: &str, names: &BTreeSet<String>) {
    for n in names {
        assert!(
            m::ALL.contains(&n.as_str()),
            "{what} uses {n}, which tokenwise does not emit"
        );
    }
}

#[test]
fn alert_rules_cover_the_issue_and_use_real_metrics() {
    let rules = read("docs/ops/alerts.yml");
    assert!(!rules.contains('\t'), "YAML must not contain tabs");
    let names = metric_names(&rules);
    assert_known("alerts.yml", &names);
    for needed in [
        "TokenwiseHighErrorRate",
        "TokenwiseCostRunaway",
        "TokenwiseCacheHitRateDrop",
        "TokenwiseBreakerOpen",
        "TokenwiseBudgetAt80Percent",
    ] {
        assert!(
            rules.contains(&format!("- alert: {needed}")),
            "no {needed} alert"
        );
    }
    for metric in [
        m::REQUESTS,
        m::COST,
        m::BREAKER_STATE,
        m::BUDGET_UTILIZATION,
    ] {
        assert!(names.contains(metric), "the alerts never use {metric}");
    }
    // every alert has a unit test
    let tests = read("docs/ops/alerts.test.yml");
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {line}")),
            "{line} has no promtool test"
        );
    }
}

#[test]
fn the_dashboard_is_well_formed_and_uses_real_metrics() {
    let text = read("docs/ops/dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    assert_eq!(dash["uid"], "tokenwise-overview");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut exprs = String::new();
    for p in panels {
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} appears twice");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {id} is wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            let e = t["expr"].as_str().expect("expr");
            assert_eq!(
                e.matches('(').count(),
                e.matches(')').count(),
                "unbalanced: {e}"
            );
            assert_eq!(
                e.matches('{').count(),
                e.matches('}').count(),
                "unbalanced: {e}"
            );
            exprs.push_str(e);
            exprs.push('\n');
        }
    }
    let names = metric_names(&exprs);
    assert_known("dashboard.json", &names);
    for metric in [
        m::REQUESTS,
        m::REQUEST_DURATION,
        m::TIME_TO_FIRST_TOKEN,
        m::TOKENS,
        m::COST,
        m::COST_SAVED,
        m::IN_FLIGHT,
        m::BREAKER_STATE,
        m::LIMITER_REFUSALS,
        m::BUDGET_UTILIZATION,
    ] {
        assert!(names.contains(metric), "the dashboard never shows {metric}");
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(vars, ["datasource", "job", "model"]);
}

#[test]
fn the_guide_documents_every_metric() {
    let guide = read("docs/observability.md");
    for name in m::ALL {
        assert!(
            guide.contains(&format!("`{name}`")),
            "docs/observability.md lacks {name}"
        );
    }
    assert_known("docs/observability.md", &metric_names(&guide));
}
