//! `deploy/prometheus/` and `deploy/grafana/`: the alerting rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), each alert with a case where it fires and one
//! where it does not; every query of the rules and of the dashboard names only metrics of the
//! product's metrics contract, and the gateway exports no metric outside it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_yaml::Value;

use super::{at, both, deploy_dir, run, str_at, tool, yaml_documents};

const INSTALL_PROMTOOL: &str = "promtool is part of Prometheus: on Debian and Ubuntu \
     `apt-get install --no-install-recommends prometheus`, elsewhere the release archive from \
     https://prometheus.io/download/; .ci/run installs it where it is missing.";

/// A metric family's type: histograms also answer to `_bucket`, `_sum` and `_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Counter,
    Gauge,
    Histogram,
}

/// The metrics contract: every metric tokengate exports or is to export, by name and type
/// (docs/operations.md "Metrics" documents those exported today).
const CONTRACT: &[(&str, Type)] = &[
    ("tokengate_requests_total", Type::Counter),
    ("tokengate_request_duration_seconds", Type::Histogram),
    ("tokengate_upstream_errors_total", Type::Counter),
    ("tokengate_token_requests_total", Type::Counter),
    ("tokengate_token_request_duration_seconds", Type::Histogram),
    ("tokengate_token_expiry_timestamp_seconds", Type::Gauge),
    ("tokengate_token_consecutive_failures", Type::Gauge),
    ("tokengate_upstream_unauthorized_total", Type::Counter),
    ("tokengate_denied_total", Type::Counter),
    ("tokengate_subject_tokens", Type::Gauge),
    ("tokengate_vended_tokens_total", Type::Counter),
    ("tokengate_cluster_up", Type::Gauge),
    ("tokengate_cluster_operations_total", Type::Counter),
    ("tokengate_connections", Type::Gauge),
    ("tokengate_connections_refused_total", Type::Counter),
    ("tokengate_client_timeouts_total", Type::Counter),
    ("tokengate_config_reloads_total", Type::Counter),
    ("tokengate_build_info", Type::Gauge),
];

/// The contract family a series name belongs to, if any.
fn family_of(series: &str) -> Option<&'static str> {
    CONTRACT.iter().find_map(|&(name, kind)| {
        let matches = series == name
            || (kind == Type::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series.strip_prefix(name) == Some(suffix)));
        matches.then_some(name)
    })
}

/// PromQL words that are not metric names when not followed by `(`.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

/// Modifiers followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Index just past the delimiter that closes the one at `start` (`"`, `'`, backtick, `{`,
/// `[`, `(`), skipping quoted strings inside brackets.
fn skip_closed(b: &[u8], start: usize) -> Result<usize, String> {
    let open = b[start];
    if matches!(open, b'"' | b'\'' | b'`') {
        let mut i = start + 1;
        while i < b.len() {
            if b[i] == b'\\' && open != b'`' {
                i += 2;
                continue;
            }
            if b[i] == open {
                return Ok(i + 1);
            }
            i += 1;
        }
        return Err("unterminated string".into());
    }
    let close = match open {
        b'{' => b'}',
        b'[' => b']',
        b'(' => b')',
        _ => unreachable!("not a bracket"),
    };
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_closed(b, i)?,
            c if c == close => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("unclosed {:?}", open as char))
}

/// The metric names a PromQL expression selects. Conservative: every identifier outside label
/// matchers, range brackets, strings and label lists that is neither a keyword nor a function
/// call counts as a metric name; a selector by `__name__` is refused, since its metric cannot
/// be checked. Grafana's `$variables` are skipped.
fn promql_metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    if expr.contains("__name__") {
        return Err("selects by __name__".into());
    }
    let b = expr.as_bytes();
    let is_start = |c: u8| c.is_ascii_alphabetic() || c == b'_' || c == b':';
    let is_part = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`' | b'{' | b'[') {
            i = skip_closed(b, i)?;
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'$' {
            i += 1;
            if i < b.len() && b[i] == b'{' {
                i = skip_closed(b, i)?;
            } else {
                while i < b.len() && is_part(b[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            // A number or a duration (1e3, 0.99, 5m).
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if is_start(c) {
            let begin = i;
            while i < b.len() && is_part(b[i]) {
                i += 1;
            }
            let word = &expr[begin..i];
            let mut next = i;
            while next < b.len() && b[next].is_ascii_whitespace() {
                next += 1;
            }
            let call = b.get(next) == Some(&b'(');
            if LABEL_LISTS.contains(&word) && call {
                i = skip_closed(b, next)?;
            } else if !KEYWORDS.contains(&word) && !call {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// Checks one query: it names at least one metric and only metrics of the contract. Returns
/// the contract families it uses.
fn check_query(origin: &str, expr: &str, problems: &mut Vec<String>) -> BTreeSet<&'static str> {
    let mut used = BTreeSet::new();
    match promql_metric_names(expr) {
        Err(e) => problems.push(format!("{origin}: {e}: {expr}")),
        Ok(names) if names.is_empty() => {
            problems.push(format!("{origin}: names no metric: {expr}"))
        }
        Ok(names) => {
            for name in names {
                match family_of(&name) {
                    Some(family) => {
                        used.insert(family);
                    }
                    None => problems.push(format!("{origin}: unknown metric {name:?} in {expr}")),
                }
            }
        }
    }
    used
}

fn alerts_path() -> std::path::PathBuf {
    deploy_dir().join("prometheus/alerts.yml")
}

/// Alert name → expression, from alerts.yml.
fn alert_rules() -> BTreeMap<String, String> {
    let docs = yaml_documents(&alerts_path());
    let mut rules = BTreeMap::new();
    for group in at(&docs[0], "groups").as_sequence().expect("groups") {
        for rule in at(group, "rules").as_sequence().expect("rules") {
            let name = str_at(rule, "alert").to_string();
            let expr = str_at(rule, "expr").to_string();
            assert!(rules.insert(name.clone(), expr).is_none(), "{name} twice");
        }
    }
    rules
}

/// Every PromQL query of the dashboard: (where, query).
fn dashboard_queries() -> Vec<(String, String)> {
    let path = deploy_dir().join("grafana/tokengate.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/tokengate.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    collect_exprs(&dashboard, "dashboard", &mut queries);
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .expect("a query variable's query");
        let origin = format!("dashboard variable {}", var["name"]);
        // label_values(<selector>, <label>): the selector is PromQL, the label is not.
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map(|(selector, _label)| selector.to_string())
            .unwrap_or_else(|| panic!("{origin}: only label_values(…) is understood: {query}"));
        queries.push((origin, inner));
    }
    queries
}

fn collect_exprs(value: &serde_json::Value, origin: &str, out: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            let here = match map.get("title").and_then(|t| t.as_str()) {
                Some(title) => format!("dashboard panel {title:?}"),
                None => origin.to_string(),
            };
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push((here.clone(), e.clone())),
                    _ => collect_exprs(v, &here, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                collect_exprs(v, origin, out);
            }
        }
        _ => {}
    }
}

/// The metric names the gateway's source registers (string literals in src/metrics/).
fn exported_names() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics");
    let literal = regex::Regex::new(r#""(tokengate_[a-z0-9_]+)""#).unwrap();
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/metrics/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        names.extend(literal.captures_iter(&text).map(|c| c[1].to_string()));
    }
    names
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("TOKENGATE_PROMTOOL", "promtool", INSTALL_PROMTOOL);
    let dir = deploy_dir().join("prometheus");
    let out = run(
        &promtool,
        &["check", "rules", alerts_path().to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        both(&out)
    );
    assert!(
        both(&out).contains(&format!("SUCCESS: {} rules found", alert_rules().len())),
        "{}",
        both(&out)
    );
    let tests = dir.join("alerts_test.yml");
    let out = run(&promtool, &["test", "rules", tests.to_str().unwrap()]);
    assert!(out.status.success(), "promtool test rules:\n{}", both(&out));
}

#[test]
fn promtool_test_rules_fails_when_an_alert_does_not_fire_as_expected() {
    let promtool = tool("TOKENGATE_PROMTOOL", "promtool", INSTALL_PROMTOOL);
    let dir = std::env::temp_dir().join(format!("tokengate-deploy-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(alerts_path(), dir.join("alerts.yml")).unwrap();
    // The token expiring in 30 s with its renewal failing, expected quiet: the unit test must
    // fail.
    let test = "rule_files: [alerts.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    \
                input_series:\n      - series: 'tokengate_token_expiry_timestamp_seconds{route=\"a\"}'\n        \
                values: '630x10'\n      - series: 'tokengate_token_consecutive_failures{route=\"a\"}'\n        \
                values: '1x10'\n    alert_rule_test:\n      - eval_time: 10m\n        \
                alertname: TokengateTokenExpiringSoon\n        exp_alerts: []\n";
    std::fs::write(dir.join("wrong_test.yml"), test).unwrap();
    let out = run(
        &promtool,
        &[
            "test",
            "rules",
            dir.join("wrong_test.yml").to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "{}", both(&out));
    assert!(
        both(&out).contains("TokengateTokenExpiringSoon"),
        "{}",
        both(&out)
    );
}

#[test]
fn every_alert_has_a_unit_test_where_it_fires_and_one_where_it_does_not() {
    let tests = &yaml_documents(&deploy_dir().join("prometheus/alerts_test.yml"))[0];
    let files: Vec<&str> = at(tests, "rule_files")
        .as_sequence()
        .expect("rule_files")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(files, ["alerts.yml"]);
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for case in at(tests, "tests").as_sequence().expect("tests") {
        for check in at(case, "alert_rule_test")
            .as_sequence()
            .expect("alert_rule_test")
        {
            let name = str_at(check, "alertname").to_string();
            let expected = at(check, "exp_alerts").as_sequence().expect("exp_alerts");
            if expected.is_empty() {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    let alerts: BTreeSet<String> = alert_rules().into_keys().collect();
    assert_eq!(fires, alerts, "alerts with a firing case");
    assert_eq!(quiet, alerts, "alerts with a quiet case");
}

#[test]
fn alerts_watch_expiry_token_failures_errors_redis_and_reloads() {
    let rules = alert_rules();
    let squeeze = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let expected = [
        (
            "TokengateTokenExpiringSoon",
            "tokengate_token_expiry_timestamp_seconds - time() < 60",
        ),
        (
            "TokengateNoToken",
            "tokengate_token_expiry_timestamp_seconds == 0",
        ),
        (
            "TokengateTokenRequestsFailing",
            "tokengate_token_consecutive_failures > 0",
        ),
        ("TokengateHighServerErrorRatio", "code=~\"5..\""),
        ("TokengateUpstreamErrors", "tokengate_upstream_errors_total"),
        ("TokengateClusterRedisDown", "tokengate_cluster_up == 0"),
        (
            "TokengateConfigReloadFailed",
            "tokengate_config_reloads_total{outcome=\"error\"}",
        ),
    ];
    for (alert, part) in expected {
        let expr = rules
            .get(alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(squeeze(expr).contains(part), "{alert}: {expr}");
    }
    // "for five minutes" of token failures.
    let docs = yaml_documents(&alerts_path());
    let failing = at(&docs[0], "groups.0.rules")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| at(r, "alert").as_str() == Some("TokengateTokenRequestsFailing"))
        .unwrap();
    assert_eq!(str_at(failing, "for"), "5m");
}

#[test]
fn every_query_names_only_metrics_of_the_contract() {
    let mut problems = Vec::new();
    let mut used_by_alerts = BTreeSet::new();
    for (alert, expr) in alert_rules() {
        used_by_alerts.extend(check_query(&format!("alert {alert}"), &expr, &mut problems));
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "dashboard queries: {}", queries.len());
    let mut used_by_dashboard = BTreeSet::new();
    for (origin, expr) in &queries {
        used_by_dashboard.extend(check_query(origin, expr, &mut problems));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboard shows every metric of the contract.
    let contract: BTreeSet<&str> = CONTRACT.iter().map(|&(name, _)| name).collect();
    let unused: Vec<_> = contract.difference(&used_by_dashboard).collect();
    assert!(unused.is_empty(), "not on the dashboard: {unused:?}");

    // Every metric the rules and the dashboard may use is one the gateway exports.
    let exported = exported_names();
    let missing: Vec<_> = contract
        .iter()
        .filter(|name| !exported.contains(**name))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics of the contract not exported by src/metrics/: {missing:?}"
    );
}

#[test]
fn dashboard_panels_use_the_data_source_variable_and_fit_the_grid() {
    let path = deploy_dir().join("grafana/tokengate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "tokengate");
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    assert!(variables.iter().any(|v| v["name"] == "datasource"
        && v["type"] == "datasource"
        && v["query"] == "prometheus"));
    let mut ids = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "{title}: id twice"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the grid");
        if panel["type"] == "row" {
            continue;
        }
        // Imported dashboards resolve their data source through the variable, not a fixed uid.
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
}

#[test]
fn the_gateway_exports_and_documents_only_metrics_of_the_contract() {
    let exported = exported_names();
    assert!(exported.len() >= 10, "{exported:?}");
    let outside: Vec<_> = exported
        .iter()
        .filter(|name| family_of(name).is_none())
        .collect();
    assert!(
        outside.is_empty(),
        "exported, not in the contract: {outside:?}"
    );

    let operations =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"))
            .unwrap();
    let row = regex::Regex::new(r"(?m)^\| `(tokengate_[a-z0-9_]+)` \|").unwrap();
    let documented: Vec<String> = row
        .captures_iter(&operations)
        .map(|c| c[1].to_string())
        .collect();
    assert!(documented.len() >= 10, "{documented:?}");
    for name in &documented {
        assert!(
            family_of(name).is_some(),
            "documented, not in the contract: {name}"
        );
        assert!(exported.contains(name), "documented, not exported: {name}");
    }
}

#[test]
fn promql_metric_names_are_read_conservatively() {
    let names = |e: &str| {
        promql_metric_names(e)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(tokengate_request_duration_seconds_bucket{route=~"$route", code!="}"}[$__rate_interval])))"#
        ),
        ["tokengate_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names("tokengate_token_expiry_timestamp_seconds - time() < 60\nand tokengate_token_expiry_timestamp_seconds > 0"),
        ["tokengate_token_expiry_timestamp_seconds"]
    );
    assert_eq!(
        names("sum without (instance) (a_total) / on (route) group_left (kind) b offset 5m > bool 1e3"),
        ["a_total", "b"]
    );
    // A misspelt metric is a metric name too, and is then not in the contract.
    assert_eq!(
        names("rate(tokengate_request_total[5m])"),
        ["tokengate_request_total"]
    );
    assert!(family_of("tokengate_request_total").is_none());
    assert!(family_of("tokengate_request_duration_seconds_count").is_some());
    assert!(family_of("tokengate_requests_total_count").is_none());
    assert!(promql_metric_names(r#"{__name__=~"tokengate_.*"}"#).is_err());
    assert!(promql_metric_names(r#"sum(rate(x{a="b"[5m]))"#).is_err());
}
