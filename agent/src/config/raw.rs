//! The network config as serde reads it: keys folded to lowercase (Go's encoding/json matches field
//! names in any case), every field optional and [`Typed`], so a value of the wrong type reaches the
//! checks in [`super`] with what was there and gets flannel's message instead of serde's.

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{invalid, ConfigError};

/// A field as found: of the expected type, or whatever else was there, kept so the error can show it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Typed<T> {
    Ok(T),
    Other(Value),
}

impl<T> Typed<T> {
    /// What a field held when it was not a `T` (`None` when it was missing).
    pub(crate) fn found(field: Option<Self>) -> Option<Value> {
        match field {
            Some(Typed::Other(v)) => Some(v),
            _ => None,
        }
    }
}

/// The object with keys lowercased, for a struct whose field names are lowercase: Go's encoding/json
/// matches field names in any case. Two keys differing only in case are an error (Go would silently
/// pick one, which hides typos).
pub(crate) fn lowercase_keys(obj: Map<String, Value>) -> Result<Value, ConfigError> {
    let mut out = Map::new();
    let mut original: std::collections::HashMap<String, String> = Default::default();
    for (k, v) in obj {
        let lk = k.to_ascii_lowercase();
        if let Some(first) = original.get(&lk) {
            return Err(ConfigError::Duplicate {
                field: lk,
                first: first.clone(),
                second: k,
            });
        }
        original.insert(lk.clone(), k);
        out.insert(lk, v);
    }
    Ok(Value::Object(out))
}

/// `<prefix>/config` as read (keys lowercased), each field still to be checked.
#[derive(Deserialize)]
pub(super) struct RawConfig {
    pub(super) network: Option<Typed<String>>,
    pub(super) subnetlen: Option<Typed<u64>>,
    pub(super) subnetmin: Option<Typed<String>>,
    pub(super) subnetmax: Option<Typed<String>>,
    pub(super) enableipv4: Option<Typed<bool>>,
    pub(super) enableipv6: Option<Typed<bool>>,
    pub(super) enablenftables: Option<Typed<bool>>,
    pub(super) ipv6network: Option<Typed<String>>,
    pub(super) ipv6subnetlen: Option<Typed<u64>>,
    pub(super) ipv6subnetmin: Option<Typed<String>>,
    pub(super) ipv6subnetmax: Option<Typed<String>>,
    pub(super) backend: Option<Value>,
}

/// The `Backend` object as read (keys lowercased).
#[derive(Deserialize)]
pub(super) struct RawBackend {
    #[serde(rename = "type")]
    pub(super) ty: Option<Typed<String>>,
    pub(super) vni: Option<Typed<u64>>,
    pub(super) port: Option<Typed<u64>>,
    pub(super) mtu: Option<Typed<u64>>,
    pub(super) gbp: Option<Typed<bool>>,
    pub(super) learning: Option<Typed<bool>>,
    pub(super) directrouting: Option<Typed<bool>>,
}

/// Deserialise a lowercased object into `T`; every field is optional and [`Typed`], so this only
/// fails on input that is not an object.
pub(super) fn raw<T: serde::de::DeserializeOwned>(
    obj: Map<String, Value>,
) -> Result<T, ConfigError> {
    serde_json::from_value(lowercase_keys(obj)?).map_err(|e| ConfigError::Syntax {
        reason: e.to_string(),
    })
}

pub(super) fn boolean(
    v: Option<Typed<bool>>,
    field: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match v {
        None => Ok(default),
        Some(Typed::Ok(b)) => Ok(b),
        Some(Typed::Other(v)) => Err(ConfigError::WrongType {
            field,
            value: v.to_string(),
            expected: "true or false",
            fix: "write it without quotes",
        }),
    }
}

/// An optional unsigned integer field no larger than `max`.
pub(super) fn uint(
    v: Option<Typed<u64>>,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    let out_of_range = |v: &dyn ToString| {
        invalid(
            field,
            v.to_string(),
            format!("must be a whole number from 0 to {max}"),
            "use a value in range",
        )
    };
    match v {
        None => Ok(None),
        Some(Typed::Ok(x)) if x <= max => Ok(Some(x)),
        Some(Typed::Ok(x)) => Err(out_of_range(&x)),
        Some(Typed::Other(v @ Value::Number(_))) => Err(out_of_range(&v)),
        Some(Typed::Other(v)) => Err(ConfigError::WrongType {
            field,
            value: v.to_string(),
            expected: "a number",
            fix: "write it as a number without quotes",
        }),
    }
}

pub(super) fn string(
    v: Option<Typed<String>>,
    field: &'static str,
) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Typed::Ok(s)) => Ok(Some(s)),
        Some(Typed::Other(v)) => Err(ConfigError::WrongType {
            field,
            value: v.to_string(),
            expected: "a string",
            fix: "put the value in quotes",
        }),
    }
}

pub(super) fn ip(
    v: Option<Typed<String>>,
    field: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    parsed(v, field, "not an IPv4 address", "write e.g. \"10.1.10.0\"")
}

pub(super) fn ip6(
    v: Option<Typed<String>>,
    field: &'static str,
) -> Result<Option<Ipv6Addr>, ConfigError> {
    parsed(
        v,
        field,
        "not an IPv6 address",
        "write e.g. \"fd00:10:1::\"",
    )
}

/// An optional string field that must parse as a `T`.
pub(super) fn parsed<T: std::str::FromStr>(
    v: Option<Typed<String>>,
    field: &'static str,
    reason: &str,
    fix: &str,
) -> Result<Option<T>, ConfigError> {
    string(v, field)?
        .map(|s| {
            s.parse()
                .map_err(|_| invalid(field, format!("{s:?}"), reason, fix))
        })
        .transpose()
}
