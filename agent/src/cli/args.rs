//! Typed flag values: each parser turns one string into the type the agent uses, with a message that
//! says what a good value looks like. clap shows it as `invalid value '<v>' for '--<flag>': <message>`
//! and exits 64 (EX_USAGE), before tokio starts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

/// Parse `30s`, `5m`, `24h`, `1h30m`, `500ms` (Go's time.ParseDuration units, no fractions).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(n).ok()?)?)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// A duration flag of at least `min`.
pub fn duration_at_least(
    min: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |v| match parse_duration(v) {
        Some(d) if d >= min => Ok(d),
        Some(_) => Err(format!("must be at least {min:?}")),
        None => Err("expected a duration like 30s, 5m or 24h".into()),
    }
}

/// Go's strconv.ParseBool, as flanneld's flags take it.
pub fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "t" | "T" | "TRUE" | "True" => Ok(true),
        "false" | "0" | "f" | "F" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// `--subnet-lease-renew-margin`: whole minutes, as flanneld takes it.
pub fn renew_margin(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .ok()
        .filter(|m| (1..=1439).contains(m))
        .map(|m| Duration::from_secs(m * 60))
        .ok_or_else(|| "minutes from 1 to 1439".into())
}

/// `--iptables-resync`: whole seconds, at least one.
pub fn resync_secs(v: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| "seconds, at least 1".into())
}

pub fn port(v: &str) -> Result<u16, String> {
    v.parse().map_err(|_| "a port number 0..65535".into())
}

pub fn ip(v: &str) -> Result<IpAddr, String> {
    v.parse().map_err(|_| "expected an IP address".into())
}

pub fn ipv4(v: &str) -> Result<Ipv4Addr, String> {
    v.parse().map_err(|_| "expected an IPv4 address".into())
}

pub fn ipv6(v: &str) -> Result<Ipv6Addr, String> {
    v.parse().map_err(|_| "expected an IPv6 address".into())
}

pub fn regex(v: &str) -> Result<Regex, regex::Error> {
    Regex::new(v)
}

/// An interface name the kernel accepts (IFNAMSIZ - 1).
pub fn ifname(v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > 15 {
        return Err("an interface name of 1 to 15 characters".into());
    }
    Ok(v.to_string())
}

pub fn etcd_endpoint(v: &str) -> Result<String, String> {
    if v.starts_with("http://") || v.starts_with("https://") {
        Ok(v.to_string())
    } else {
        Err("each endpoint must start with http:// or https://".into())
    }
}

/// `--etcd-prefix`, without its trailing slashes (keys are joined with `/`).
pub fn etcd_prefix(v: &str) -> Result<String, String> {
    if !v.starts_with('/') {
        return Err("must start with /, e.g. /coreos.com/network".into());
    }
    Ok(v.trim_end_matches('/').to_string())
}

/// A file that exists now, so a typo fails the start instead of the first TLS handshake.
pub fn existing_file(v: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_file() {
        Ok(p)
    } else {
        Err("no such file".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "30", "s", "5x", "-5s", "1.5h", "99999999999h"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
