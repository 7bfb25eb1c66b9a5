//! kube-apiserver's request counter, `apiserver_request_total`, as its `/metrics` shows it. The
//! fake API server renders it; `far bench` reads it the same way from the fake or from a real
//! API server, so API requests are counted in one place whichever serves them.

use std::collections::BTreeMap;

/// The counter's name.
pub const NAME: &str = "apiserver_request_total";

/// One series of the counter: the labels a controller's requests are told apart by.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    /// As the API server names it: `GET`, `LIST`, `WATCH`, `POST`, `PUT`, `PATCH`, `APPLY`
    /// (server-side apply), `DELETE`.
    pub verb: String,
    /// API group, empty for the core group.
    pub group: String,
    /// API version.
    pub version: String,
    /// The resource's plural name.
    pub resource: String,
    /// `status`, or empty.
    pub subresource: String,
    /// `resource` (one object), `namespace` or `cluster` (a collection).
    pub scope: String,
    /// The HTTP status answered.
    pub code: u16,
}

/// The verb as RBAC and kubectl name it (`get`, `list`, `watch`, `create`, `update`, `patch`,
/// `delete`), from the counter's verb.
pub fn rbac_verb(verb: &str) -> String {
    match verb {
        "POST" => "create".to_owned(),
        "PUT" => "update".to_owned(),
        "PATCH" | "APPLY" => "patch".to_owned(),
        "WATCHLIST" => "watch".to_owned(),
        other => other.to_ascii_lowercase(),
    }
}

/// Requests by `(verb, resource)`, verbs as [`rbac_verb`] names them; besides, `conflict`
/// counts the requests of any verb answered 409 and `forbidden` those answered 403.
pub fn by_verb(series: &BTreeMap<Series, u64>) -> BTreeMap<(String, String), u64> {
    let mut counts = BTreeMap::new();
    for (s, n) in series {
        let mut add = |verb: String| *counts.entry((verb, s.resource.clone())).or_default() += n;
        add(rbac_verb(&s.verb));
        match s.code {
            409 => add("conflict".to_owned()),
            403 => add("forbidden".to_owned()),
            _ => {}
        }
    }
    counts
}

/// The counter in the Prometheus text format, as kube-apiserver's `/metrics` serves it.
pub fn render(series: &BTreeMap<Series, u64>) -> String {
    let mut text = format!(
        "# HELP {NAME} [STABLE] Counter of apiserver requests broken out for each verb, dry run value, group, version, resource, scope, component, and HTTP response code.\n# TYPE {NAME} counter\n"
    );
    for (s, n) in series {
        text.push_str(&format!(
            "{NAME}{{code=\"{}\",component=\"apiserver\",dry_run=\"\",group=\"{}\",resource=\"{}\",scope=\"{}\",subresource=\"{}\",verb=\"{}\",version=\"{}\"}} {n}\n",
            s.code,
            escape(&s.group),
            escape(&s.resource),
            escape(&s.scope),
            escape(&s.subresource),
            escape(&s.verb),
            escape(&s.version)
        ));
    }
    text
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The counter's series in a `/metrics` text; other metrics and lines that do not parse are
/// skipped. Series that differ only in labels not kept here (`component`, `dry_run`) are added.
pub fn parse(text: &str) -> BTreeMap<Series, u64> {
    let mut series = BTreeMap::new();
    for line in text.lines() {
        let Some((s, n)) = line
            .strip_prefix(NAME)
            .and_then(|rest| rest.strip_prefix('{'))
            .and_then(parse_series)
        else {
            continue;
        };
        *series.entry(s).or_default() += n;
    }
    series
}

/// `code="200",verb="GET",...} 12` (the part after `{`).
fn parse_series(mut rest: &str) -> Option<(Series, u64)> {
    let mut s = Series::default();
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(value) = rest.strip_prefix('}') {
            // Prometheus' float form (`12`, `1.2e+06`); a timestamp may follow.
            let n: f64 = value.split_whitespace().next()?.parse().ok()?;
            return Some((s, n as u64));
        }
        let (name, after) = rest.split_once("=\"")?;
        let (value, after) = quoted(after)?;
        match name {
            "verb" => s.verb = value,
            "group" => s.group = value,
            "version" => s.version = value,
            "resource" => s.resource = value,
            "subresource" => s.subresource = value,
            "scope" => s.scope = value,
            "code" => s.code = value.parse().ok()?,
            _ => {}
        }
        rest = after;
    }
}

/// A label value up to its closing quote, unescaped; and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as a kube-apiserver (v1.31) serves them, with labels this module does not keep.
    const REAL: &str = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests broken out for each verb, dry run value, group, version, resource, scope, component, and HTTP response code.
# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="tiffany.dev",resource="faragents",scope="resource",subresource="",verb="POST",version="v1"} 10
apiserver_request_total{code="200",component="apiserver",dry_run="",group="tiffany.dev",resource="faragents",scope="resource",subresource="status",verb="PATCH",version="v1"} 30
apiserver_request_total{code="409",component="apiserver",dry_run="",group="tiffany.dev",resource="faragents",scope="resource",subresource="status",verb="PATCH",version="v1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="tiffany.dev",resource="faragents",scope="resource",subresource="",verb="APPLY",version="v1"} 1
apiserver_request_total{code="0",component="apiserver",dry_run="",group="tiffany.dev",resource="faragents",scope="namespace",subresource="",verb="WATCH",version="v1"} 1.2e+06
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 4
apiserver_request_duration_seconds_count{component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="POST",version="v1"} 4
"#;

    #[test]
    fn a_real_api_servers_counter_is_read_by_verb_and_resource() {
        let counts = by_verb(&parse(REAL));
        let get = |verb: &str, resource: &str| {
            counts.get(&(verb.to_owned(), resource.to_owned())).copied()
        };
        assert_eq!(get("create", "faragents"), Some(10));
        assert_eq!(
            get("patch", "faragents"),
            Some(33),
            "status patches and applies"
        );
        assert_eq!(get("conflict", "faragents"), Some(2));
        assert_eq!(get("watch", "faragents"), Some(1_200_000));
        assert_eq!(
            get("create", "events"),
            Some(4),
            "not the duration histogram"
        );
        assert_eq!(counts.len(), 5, "{counts:?}");
    }

    #[test]
    fn what_is_rendered_parses_back_to_the_same_series() {
        let series: BTreeMap<Series, u64> = parse(REAL);
        assert_eq!(parse(&render(&series)), series);
        let odd = Series {
            verb: "GET".into(),
            resource: "we\"ird\\\n".into(),
            code: 200,
            ..Series::default()
        };
        let one = BTreeMap::from([(odd, 3)]);
        assert_eq!(parse(&render(&one)), one);
    }

    #[test]
    fn lines_that_do_not_parse_are_skipped() {
        let text = "apiserver_request_total{code=\"200\",verb=\"GET\"\napiserver_request_total{code=\"x\"} 1\napiserver_request_total{verb=\"GET\"} many\n";
        assert!(parse(text).is_empty());
    }
}
