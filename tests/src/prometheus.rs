//! A strict reader of the Prometheus text exposition format 0.0.4, for tests that scrape
//! `weft agent`'s `/metrics`.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context as _, Result};

/// A strict reader of the Prometheus text format 0.0.4: every sample belongs to a family declared by
/// `# HELP` and `# TYPE` lines before it, names and labels are well formed, counters end in `_total`,
/// and no family or series appears twice. Returns series (`name{labels}`) -> value.
pub fn parse(text: &str) -> Result<BTreeMap<String, f64>> {
    let valid_name = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut help = BTreeMap::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut series = BTreeMap::new();
    ensure!(text.ends_with('\n'), "exposition must end with a newline");
    for (i, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').with_context(at)?;
            ensure!(valid_name(name) && !doc.is_empty(), "bad HELP at {}", at());
            ensure!(
                help.insert(name.to_string(), doc.to_string()).is_none(),
                "duplicate HELP at {}",
                at()
            );
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').with_context(at)?;
            ensure!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type at {}",
                at()
            );
            ensure!(help.contains_key(name), "TYPE before HELP at {}", at());
            ensure!(
                kind != "counter" || name.ends_with("_total"),
                "counter without _total at {}",
                at()
            );
            ensure!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "duplicate TYPE at {}",
                at()
            );
        } else if line.starts_with('#') || line.is_empty() {
            bail!("unexpected comment or blank line at {}", at());
        } else {
            let (key, value) = line.rsplit_once(' ').with_context(at)?;
            let value: f64 = value.parse().with_context(at)?;
            let name = key.split('{').next().unwrap_or(key);
            ensure!(valid_name(name), "bad metric name at {}", at());
            // A histogram's samples carry the family name plus _bucket, _sum or _count.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
                .unwrap_or(name);
            ensure!(
                types.contains_key(family),
                "sample before its TYPE at {}",
                at()
            );
            if let Some(labels) = key.strip_prefix(name).filter(|l| !l.is_empty()) {
                check_labels(labels).with_context(at)?;
            }
            ensure!(
                series.insert(key.to_string(), value).is_none(),
                "duplicate series at {}",
                at()
            );
        }
    }
    Ok(series)
}

fn check_labels(labels: &str) -> Result<()> {
    let inner = labels
        .strip_prefix('{')
        .and_then(|l| l.strip_suffix('}'))
        .context("labels not in braces")?;
    let mut rest = inner;
    while !rest.is_empty() {
        let (name, tail) = rest.split_once("=\"").context("label without =\"")?;
        ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad label name"
        );
        let mut escaped = false;
        let end = tail
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map(|(i, _)| i)
            .context("unterminated label value")?;
        rest = tail[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&tail[end + 1..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_parser_rejects_what_prometheus_would() {
        assert!(parse("x 1\n").is_err(), "sample without TYPE");
        assert!(
            parse("# HELP x h\n# TYPE x counter\nx 1\n").is_err(),
            "counter without _total"
        );
        assert!(
            parse("# HELP x h\n# TYPE x gauge\nx{a=\"1} 1\n").is_err(),
            "unterminated label"
        );
        assert!(
            parse("# HELP x h\n# TYPE x gauge\nx one\n").is_err(),
            "non-numeric value"
        );
        assert!(parse("# HELP x h\n# TYPE x gauge\nx{a=\"q\\\"\",b=\"2\"} 1\n").is_ok());
        let histogram =
            "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1.0\"} 0\nh_sum 0.0\nh_count 0\n";
        assert!(parse(histogram).is_ok());
        assert!(
            parse("# HELP g h\n# TYPE g gauge\ng_count 0\n").is_err(),
            "_count of a gauge"
        );
    }
}
