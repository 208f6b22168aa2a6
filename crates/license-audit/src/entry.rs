//! One audit record: the event a caller submits, the entry written to disk, and its hash.
//!
//! This module is the single definition of the on-disk format and of the hash chain, so the
//! writer and the verifier cannot disagree about what is hashed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

use crate::error::AuditError;

/// The `prev_hash` of the first entry of a chain: 64 zeros (32 zero bytes, hex-encoded).
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Sequence number of the first entry of a chain (an empty log has "last seq" 0).
pub const FIRST_SEQ: u64 = 1;

/// Event name of the marker the writer puts at the top of every file after a rotation, so that
/// the oldest file kept still starts at a recognisable boundary.
pub const FILE_STARTED_EVENT: &str = "audit.file_started";

/// Largest accepted line (entry JSON plus newline), in bytes. Bounds what a caller can put in
/// `details` and what a reader has to buffer.
pub const MAX_ENTRY_BYTES: usize = 16 * 1024;

/// Longest accepted event name, in bytes.
pub const MAX_EVENT_NAME_BYTES: usize = 64;

/// Who caused an event: the peer credentials of the caller, when there is one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// Unix user id of the peer (`SO_PEERCRED`), `null` for the agent itself.
    pub uid: Option<u32>,
    /// Process id of the peer, `null` when unknown.
    pub pid: Option<u32>,
}

impl Actor {
    /// The agent itself (no peer): `{"uid": null, "pid": null}`.
    pub const AGENT: Actor = Actor {
        uid: None,
        pid: None,
    };

    /// A local peer identified by its credentials.
    pub fn peer(uid: u32, pid: u32) -> Self {
        Actor {
            uid: Some(uid),
            pid: Some(pid),
        }
    }
}

/// How the audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The action was performed.
    Success,
    /// The action was refused (authorisation, policy, invalid input).
    Refused,
    /// The action failed for an internal or external reason.
    Error,
}

impl Outcome {
    /// The string written in the `outcome` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }
}

/// What a caller asks to record. The writer adds `seq`, `time`, `prev_hash` and `hash`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    name: String,
    actor: Actor,
    outcome: Outcome,
    details: Map<String, Value>,
}

impl Event {
    /// An event named `name` (e.g. `"license.validate"`) by the agent itself, with no details.
    pub fn new(name: impl Into<String>, outcome: Outcome) -> Self {
        Event {
            name: name.into(),
            actor: Actor::AGENT,
            outcome,
            details: Map::new(),
        }
    }

    /// Sets the actor.
    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    /// Adds one detail. Never put a secret here: the log is readable by operators.
    pub fn detail(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.details.insert(key.into(), value.into());
        self
    }

    /// The event name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the name: 1 to [`MAX_EVENT_NAME_BYTES`] bytes of `[A-Za-z0-9._-]`.
    pub(crate) fn check(&self) -> Result<(), AuditError> {
        let ok = !self.name.is_empty()
            && self.name.len() <= MAX_EVENT_NAME_BYTES
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(())
        } else {
            Err(AuditError::InvalidEvent {
                reason: format!(
                    "event name must be 1 to {MAX_EVENT_NAME_BYTES} characters of [A-Za-z0-9._-]"
                ),
            })
        }
    }
}

/// One line of the log, exactly as stored.
///
/// Field order here is the order written on disk (for people reading the file); the hash does
/// not depend on it, see [`Entry::canonical_bytes`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the chain, starting at [`FIRST_SEQ`], +1 per entry, across rotated files.
    pub seq: u64,
    /// RFC 3339 UTC time with milliseconds, e.g. `2026-04-01T12:00:00.123Z`.
    pub time: String,
    /// Event name, e.g. `license.validate`.
    pub event: String,
    /// Who caused it.
    pub actor: Actor,
    /// `success`, `refused`, `error` (readers accept any string for forward compatibility).
    pub outcome: String,
    /// Event-specific fields; never secrets.
    pub details: Map<String, Value>,
    /// `hash` of the previous entry, or [`GENESIS_HASH`] for the first one.
    pub prev_hash: String,
    /// Lowercase hex SHA-256, see [`Entry::compute_hash`].
    pub hash: String,
}

impl Entry {
    /// Builds the entry following `prev` in the chain, hash included.
    pub(crate) fn seal(event: Event, seq: u64, time: OffsetDateTime, prev_hash: &str) -> Self {
        let mut entry = Entry {
            seq,
            time: format_time(time),
            event: event.name,
            actor: event.actor,
            outcome: event.outcome.as_str().to_owned(),
            details: event.details,
            prev_hash: prev_hash.to_owned(),
            hash: String::new(),
        };
        entry.hash = entry.compute_hash();
        entry
    }

    /// The canonical JSON the hash covers: this entry without `hash`, as one JSON object with
    /// no whitespace, the keys of every object (top level, `actor`, `details` and anything
    /// nested) sorted by their UTF-8 bytes, strings escaped as `serde_json` does (only `"`,
    /// `\` and control characters; other characters as UTF-8), numbers as `serde_json` writes
    /// them. For example:
    ///
    /// `{"actor":{"pid":null,"uid":0},"details":{},"event":"x","outcome":"success","prev_hash":"00…00","seq":1,"time":"2026-04-01T12:00:00.123Z"}`
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut top = Map::new();
        top.insert("seq".into(), Value::from(self.seq));
        top.insert("time".into(), Value::from(self.time.as_str()));
        top.insert("event".into(), Value::from(self.event.as_str()));
        let mut actor = Map::new();
        actor.insert(
            "uid".into(),
            self.actor.uid.map_or(Value::Null, Value::from),
        );
        actor.insert(
            "pid".into(),
            self.actor.pid.map_or(Value::Null, Value::from),
        );
        top.insert("actor".into(), Value::Object(actor));
        top.insert("outcome".into(), Value::from(self.outcome.as_str()));
        top.insert("details".into(), Value::Object(self.details.clone()));
        top.insert("prev_hash".into(), Value::from(self.prev_hash.as_str()));
        let mut out = Vec::with_capacity(256);
        write_canonical(&Value::Object(top), &mut out);
        out
    }

    /// `hex(SHA-256(prev_hash_bytes || canonical_bytes))`, where `prev_hash_bytes` are the 32
    /// bytes `prev_hash` encodes (if `prev_hash` is not 64 hex digits, its UTF-8 text is used
    /// instead, which can never reproduce a valid hash).
    pub fn compute_hash(&self) -> String {
        let mut hasher = Sha256::new();
        match decode_hash(&self.prev_hash) {
            Some(raw) => hasher.update(raw),
            None => hasher.update(self.prev_hash.as_bytes()),
        }
        hasher.update(self.canonical_bytes());
        hex::encode(hasher.finalize())
    }

    /// The line written to the file, without the trailing newline.
    pub(crate) fn to_line(&self) -> Result<String, AuditError> {
        serde_json::to_string(self).map_err(|e| AuditError::InvalidEvent {
            reason: format!("not serializable: {e}"),
        })
    }

    /// Parses the `time` field.
    pub fn timestamp(&self) -> Result<OffsetDateTime, time::error::Parse> {
        OffsetDateTime::parse(&self.time, &Rfc3339)
    }
}

/// Formats a time as stored in `time`: RFC 3339, UTC, milliseconds, `Z`.
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    // The format only has numeric components of a valid date: it cannot fail for years 0-9999.
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// 64 lowercase hex digits → 32 bytes.
pub(crate) fn decode_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                if let Some(v) = map.get(key) {
                    write_canonical(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar JSON value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Entry {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_775_044_800_123_456_789).unwrap();
        Entry::seal(
            Event::new("license.validate", Outcome::Refused)
                .actor(Actor::peer(1000, 42))
                .detail("reason", "replayed_nonce")
                .detail("b", json!({"z": 1, "a": [true, null]})),
            7,
            t,
            GENESIS_HASH,
        )
    }

    #[test]
    fn time_is_utc_millis() {
        assert_eq!(sample().time, "2026-04-01T12:00:00.123Z");
        assert!(sample().timestamp().is_ok());
    }

    #[test]
    fn canonical_form_is_sorted_and_compact() {
        let c = String::from_utf8(sample().canonical_bytes()).unwrap();
        assert_eq!(
            c,
            format!(
                "{{\"actor\":{{\"pid\":42,\"uid\":1000}},\"details\":{{\"b\":{{\"a\":[true,null],\"z\":1}},\"reason\":\"replayed_nonce\"}},\"event\":\"license.validate\",\"outcome\":\"refused\",\"prev_hash\":\"{GENESIS_HASH}\",\"seq\":7,\"time\":\"2026-04-01T12:00:00.123Z\"}}"
            )
        );
    }

    #[test]
    fn hash_matches_definition_and_survives_a_round_trip() {
        let e = sample();
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update(e.canonical_bytes());
        assert_eq!(e.hash, hex::encode(h.finalize()));
        let back: Entry = serde_json::from_str(&e.to_line().unwrap()).unwrap();
        assert_eq!(back.compute_hash(), e.hash);
        // Key order on disk does not matter, content does.
        let mut v: Value = serde_json::from_str(&e.to_line().unwrap()).unwrap();
        v["details"]["reason"] = json!("other");
        let tampered: Entry = serde_json::from_value(v).unwrap();
        assert_ne!(tampered.compute_hash(), e.hash);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut v: Value = serde_json::from_str(&sample().to_line().unwrap()).unwrap();
        v["extra"] = json!(1);
        assert!(serde_json::from_value::<Entry>(v).is_err());
    }

    #[test]
    fn event_names_are_checked() {
        assert!(Event::new("mgmt.rotate", Outcome::Success).check().is_ok());
        assert!(Event::new("", Outcome::Success).check().is_err());
        assert!(Event::new("a b", Outcome::Success).check().is_err());
        assert!(Event::new("x".repeat(65), Outcome::Success)
            .check()
            .is_err());
    }
}
