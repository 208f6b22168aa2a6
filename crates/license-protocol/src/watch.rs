//! `GET /api/v1/watch`: the change stream a connected agent holds, so a revocation, a forced
//! rotation, a key rollover or an update announcement reaches it within a second instead of
//! at its next poll.
//!
//! The stream is server-sent events (`text/event-stream`): each event is one `data:` line of
//! JSON ([`WatchEvent`]) and a blank line. The server sends `hello` first, `ping` while
//! nothing happens, `change` when something concerning the machine (or every machine) was
//! committed, and `resync` when it cannot tell what the agent missed. Every event carries the
//! feed's `cursor`: an agent that reconnects passes the last one it saw (`?since=`), and the
//! server replays what it missed, or says `resync`.
//!
//! An event never carries what changed in detail: it only makes the agent run a round (secret
//! status, licenses), on which every usual check applies. `spread_secs` asks the agent to wait
//! a random time up to it first, so a change for every machine does not bring the whole fleet
//! at once.
//!
//! [`EventReader`] parses the stream as it arrives, bounded: a line longer than
//! [`MAX_EVENT_BYTES`] is refused rather than buffered.

use serde::{Deserialize, Serialize};

/// The route.
pub const WATCH_PATH: &str = "/api/v1/watch";

/// Longest event (its `data:` line) an [`EventReader`] accepts.
pub const MAX_EVENT_BYTES: usize = 4096;

/// `?since=`: the last cursor the agent saw, absent on its first connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct WatchQuery {
    /// The `cursor` of the last event received.
    #[serde(default)]
    pub since: Option<i64>,
}

/// What an event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// The stream is open; nothing to do.
    Hello,
    /// Still open; nothing to do.
    Ping,
    /// Something concerning this machine changed: run a round.
    Change,
    /// The server cannot tell what was missed (cursor too old, a replica just started):
    /// run a round.
    Resync,
}

/// What changed, for logs; the agent's answer is a round whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    MachineRevoked,
    MachineRestored,
    /// The certificate the machine uses was revoked: it is refused from its next request.
    CertificateRevoked,
    LicensesChanged,
    RotationRequested,
    SecretInvalidated,
    KeysChanged,
    UpdateAnnounced,
    /// A kind this agent does not know (a newer server).
    #[serde(other)]
    Other,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MachineRevoked => "machine_revoked",
            Self::MachineRestored => "machine_restored",
            Self::CertificateRevoked => "certificate_revoked",
            Self::LicensesChanged => "licenses_changed",
            Self::RotationRequested => "rotation_requested",
            Self::SecretInvalidated => "secret_invalidated",
            Self::KeysChanged => "keys_changed",
            Self::UpdateAnnounced => "update_announced",
            Self::Other => "other",
        }
    }
}

/// One event of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WatchEvent {
    pub event: EventType,
    /// The feed's position: pass it as `since` when reconnecting.
    pub cursor: i64,
    /// What changed (`change` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ChangeKind>,
    /// Wait a random time up to this many seconds before the round (0: at once).
    #[serde(default)]
    pub spread_secs: u32,
    /// The server's clock, Unix seconds.
    pub server_time: i64,
    /// `hello` only: seconds between two pings of this stream, so the agent knows how long a
    /// silence means the stream is dead (absent from older servers: 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs: Option<u64>,
}

impl WatchEvent {
    /// The event as it goes on the wire: `data: <json>\n\n`.
    pub fn to_sse(&self) -> String {
        // Serializing these plain fields cannot fail.
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("data: {json}\n\n")
    }

    /// Whether the agent should run a round for this event.
    pub fn asks_for_round(&self) -> bool {
        matches!(self.event, EventType::Change | EventType::Resync)
    }
}

/// Why the stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    #[error("an event line is longer than {MAX_EVENT_BYTES} bytes")]
    TooLong,
    #[error("an event is not valid: {0}")]
    BadEvent(String),
}

/// Parses `text/event-stream` bytes as they arrive into [`WatchEvent`]s. Comments (`:`),
/// `event:`, `id:` and `retry:` lines are skipped; each `data:` line is one event.
#[derive(Debug, Default)]
pub struct EventReader {
    line: Vec<u8>,
}

impl EventReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds `bytes`; answers the events they completed, in order. After an error the reader
    /// should be dropped with its stream.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<WatchEvent>, WatchError> {
        let mut events = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut self.line);
                if let Some(event) = Self::parse_line(&line)? {
                    events.push(event);
                }
            } else {
                if self.line.len() >= MAX_EVENT_BYTES {
                    return Err(WatchError::TooLong);
                }
                self.line.push(byte);
            }
        }
        Ok(events)
    }

    fn parse_line(line: &[u8]) -> Result<Option<WatchEvent>, WatchError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return Ok(None);
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        serde_json::from_slice(data)
            .map(Some)
            .map_err(|e| WatchError::BadEvent(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(cursor: i64) -> WatchEvent {
        WatchEvent {
            event: EventType::Change,
            cursor,
            kind: Some(ChangeKind::MachineRevoked),
            spread_secs: 0,
            server_time: 1_700_000_000,
            heartbeat_secs: None,
        }
    }

    #[test]
    fn events_round_trip_whatever_the_chunking() {
        let events = [change(1), change(2)];
        let wire: String = events.iter().map(WatchEvent::to_sse).collect();
        let wire = format!(": comment\nevent: x\n{wire}");
        for chunk in 1..wire.len() {
            let mut reader = EventReader::new();
            let mut got = Vec::new();
            for piece in wire.as_bytes().chunks(chunk) {
                got.extend(reader.push(piece).unwrap());
            }
            assert_eq!(got, events, "chunk size {chunk}");
        }
    }

    #[test]
    fn the_wire_form_is_stable() {
        assert_eq!(
            change(7).to_sse(),
            "data: {\"event\":\"change\",\"cursor\":7,\"kind\":\"machine_revoked\",\
             \"spread_secs\":0,\"server_time\":1700000000}\n\n"
        );
    }

    #[test]
    fn a_newer_kind_is_still_a_change() {
        let mut reader = EventReader::new();
        let events = reader
            .push(b"data: {\"event\":\"change\",\"cursor\":3,\"kind\":\"galaxy\",\"server_time\":1}\r\n\r\n")
            .unwrap();
        assert_eq!(events[0].kind, Some(ChangeKind::Other));
        assert!(events[0].asks_for_round());
    }

    #[test]
    fn garbage_and_floods_are_refused() {
        let mut reader = EventReader::new();
        assert!(matches!(
            reader.push(b"data: {nope}\n"),
            Err(WatchError::BadEvent(_))
        ));
        let mut reader = EventReader::new();
        let flood = vec![b'a'; MAX_EVENT_BYTES + 1];
        assert_eq!(reader.push(&flood), Err(WatchError::TooLong));
    }

    #[test]
    fn only_changes_and_resyncs_ask_for_a_round() {
        let mut hello = change(1);
        hello.event = EventType::Hello;
        assert!(!hello.asks_for_round());
        hello.event = EventType::Ping;
        assert!(!hello.asks_for_round());
        hello.event = EventType::Resync;
        assert!(hello.asks_for_round());
    }
}
