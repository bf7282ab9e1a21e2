//! The conventions of every command's `--json` output (docs/json.md): named fields instead
//! of bare arrays, RFC 3339 UTC for every time, and the schema version each line carries.
//! Reports use these serializers so the human form keeps its convenient Rust types.

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// Version of the JSON output documented in docs/json.md and docs/schemas/. Bumped when a
/// field is removed or changes meaning; new fields may appear without a bump.
pub const SCHEMA_VERSION: u32 = 2;

/// `[(role, size)]` as `[{"role": .., "size": ..}]`.
pub(crate) fn role_sizes<S: Serializer>(v: &[(String, u64)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct RoleSize<'a> {
        role: &'a str,
        size: u64,
    }
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (role, size) in v {
        seq.serialize_element(&RoleSize { role, size: *size })?;
    }
    seq.end()
}

/// `Some((kind, message))` as `{"kind": .., "message": ..}`, `None` as `null`.
pub(crate) fn kind_message<S: Serializer>(
    v: &Option<(String, String)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some((kind, message)) => {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("kind", kind)?;
            m.serialize_entry("message", message)?;
            m.end()
        }
    }
}

/// `Some((slot, version))` as `{"slot": .., "version": ..}`, `None` as `null`.
pub(crate) fn slot_version<S: Serializer>(
    v: &Option<(crate::slot::SlotId, String)>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some((slot, version)) => {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("slot", slot)?;
            m.serialize_entry("version", version)?;
            m.end()
        }
    }
}

/// `[(role, value)]` as `[{"role": .., ...value's fields}]`.
pub(crate) fn with_role<S: Serializer, T: Serialize>(
    v: &[(String, T)],
    s: S,
) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct WithRole<'a, T: Serialize> {
        role: &'a str,
        #[serde(flatten)]
        value: &'a T,
    }
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for (role, value) in v {
        seq.serialize_element(&WithRole { role, value })?;
    }
    seq.end()
}

use crate::clock::rfc3339;

/// Unix seconds as an RFC 3339 UTC string.
pub(crate) fn unix_time<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
    match rfc3339(*v) {
        Some(t) => s.serialize_str(&t),
        None => Err(serde::ser::Error::custom(format!("time {v} out of range"))),
    }
}

/// Optional unix seconds as an RFC 3339 UTC string or `null`.
pub(crate) fn unix_time_opt<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(t) => unix_time(t, s),
        None => s.serialize_none(),
    }
}

/// A [`std::time::Duration`] as whole milliseconds (`*_ms` fields), the one form of every
/// duration in the JSON output (docs/json.md). Rounded to the nearest millisecond.
pub mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn to_ms(d: Duration) -> u64 {
        u64::try_from((d.as_nanos() + 500_000) / 1_000_000).unwrap_or(u64::MAX)
    }

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_ms(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }

    /// Fractional seconds (`f64`) as whole milliseconds.
    pub(crate) fn from_secs_f64<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to_ms(
            Duration::try_from_secs_f64(v.max(0.0)).unwrap_or(Duration::MAX),
        ))
    }

    /// Optional fractional seconds as whole milliseconds or `null`.
    pub(crate) fn from_secs_f64_opt<S: Serializer>(
        v: &Option<f64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => from_secs_f64(v, s),
            None => s.serialize_none(),
        }
    }
}

/// `value` (an object) with `schema_version` first; anything else wrapped as `{"schema_version",
/// "value"}` so every line is an object.
pub(crate) fn versioned<T: Serialize>(value: &T) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("schema_version".into(), SCHEMA_VERSION.into());
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(m)) => out.extend(m),
        Ok(other) => {
            out.insert("value".into(), other);
        }
        Err(e) => {
            out.insert("error".into(), error(serialize_kind(), &e.to_string()));
        }
    }
    serde_json::Value::Object(out)
}

fn serialize_kind() -> &'static str {
    "serialize"
}

/// The `error` object every command prints on failure: `{"kind", "message"}`.
pub(crate) fn error(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"kind": kind, "message": message})
}

/// The whole failure line: `{"schema_version", "error": {"kind", "message"}}`.
pub(crate) fn error_line(kind: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"schema_version": SCHEMA_VERSION, "error": error(kind, message)})
}
