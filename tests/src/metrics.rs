//! Reading samples out of Prometheus / OpenMetrics text.

/// One sample line: `name{label="value",...} value [timestamp]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// True if every `(key, value)` in `subset` is one of the sample's labels.
    pub fn has_labels(&self, subset: &[(&str, &str)]) -> bool {
        subset
            .iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }
}

/// Every sample in `text`; comment lines and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The value of the first sample called exactly `name` (counters include the `_total`
/// suffix) whose labels include `labels`; `None` if there is none.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(text)
        .into_iter()
        .find(|s| s.name == name && s.has_labels(labels))
        .map(|s| s.value)
}

/// Every sample called exactly `name` whose labels include `labels`.
pub fn samples(text: &str, name: &str, labels: &[(&str, &str)]) -> Vec<Sample> {
    parse(text)
        .into_iter()
        .filter(|s| s.name == name && s.has_labels(labels))
        .collect()
}

/// The sum over every sample called `name` whose labels include `labels` (0 if none):
/// e.g. a counter across all values of a label not given.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name, labels)
        .iter()
        .fold(0.0, |sum, s| sum + s.value)
}

impl Sample {
    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find(['{', ' ']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let (labels, rest) = parse_labels(&line[i + 1..])?;
            (&line[..i], labels, rest)
        }
        Some(i) => (&line[..i], Vec::new(), &line[i..]),
        None => return None,
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` (the text after `{`); returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let (key, rest) = s.split_once('=')?;
        let mut chars = rest.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &rest[end + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP mesh_connections_captured Connections captured.
# TYPE mesh_connections_captured counter
mesh_connections_captured_total{task="a"} 3
mesh_connections_captured_total{task="b"} 0
mesh_capture_decisions_total{decision="bypass_loopback"} 7
mesh_tasks_meshed 2
weird{path="a\"b,c}",x="1"} 1.5e3
# EOF
"#;

    #[test]
    fn finds_samples_by_name_and_label_subset() {
        assert_eq!(
            value(TEXT, "mesh_connections_captured_total", &[("task", "a")]),
            Some(3.0)
        );
        assert_eq!(
            value(TEXT, "mesh_connections_captured_total", &[("task", "b")]),
            Some(0.0)
        );
        assert_eq!(
            value(TEXT, "mesh_connections_captured_total", &[("task", "c")]),
            None
        );
        assert_eq!(value(TEXT, "mesh_connections_captured", &[]), None);
        assert_eq!(value(TEXT, "mesh_tasks_meshed", &[]), Some(2.0));
        assert_eq!(
            value(TEXT, "weird", &[("path", "a\"b,c}"), ("x", "1")]),
            Some(1500.0)
        );
        assert_eq!(parse(TEXT).len(), 5);
        assert_eq!(sum(TEXT, "mesh_connections_captured_total", &[]), 3.0);
        assert_eq!(sum(TEXT, "nothing", &[]), 0.0);
        let both = samples(TEXT, "mesh_connections_captured_total", &[]);
        assert_eq!(both.len(), 2);
        assert_eq!(both[1].label("task"), Some("b"));
    }
}
