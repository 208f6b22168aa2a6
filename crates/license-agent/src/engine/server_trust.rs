//! The server keys and CAs this agent trusts follow the server's rollovers
//! (`license_protocol::server_trust`, docs/PROTOCOL.md "Server trust").
//!
//! Each round the secret status carries the digest of the server's announcement; only when it
//! is not the digest of the trust held does the engine fetch it (one request per rollover
//! step), accept it (signed by a license key trusted and not retired, not older than the one
//! held, a new CA cross-signed by one held), store it in `state_dir/server-trust.json` and
//! reconnect with it: a next TLS key is then accepted beside the current one, a retired one
//! refused, a new CA trusted. A refused announcement is audited and alerted once per digest,
//! and the trust held is kept.

use license_audit::Outcome;

use super::server::AgentServer;
use super::Engine;
use crate::alerts::AlertKind;
use crate::audit::agent_event;
use crate::net::client::ClientError;
use crate::platform::blocking;

impl<S: AgentServer> Engine<S> {
    /// Follows the server's announcement when `announced` (the digest in the secret status)
    /// is not the one held: see the module docs. Only an unreachable or failing server is an
    /// error.
    pub(super) async fn follow_server_trust(
        &mut self,
        announced: Option<&str>,
    ) -> Result<(), ClientError> {
        let Some(announced) = announced else {
            return Ok(());
        };
        if self.machine.server_trust.digest() == Some(announced)
            || self.health.refused_server_trust.as_deref() == Some(announced)
        {
            return Ok(());
        }
        let offered = self.server.server_trust().await?;
        let mut trust = self.machine.server_trust.clone();
        if let Err(e) = trust.accept(&offered, &self.machine.license_keys) {
            self.health.refused_server_trust = Some(announced.to_string());
            tracing::error!(error = %e, "the server's TLS keys and CAs were refused; the ones trusted so far are kept");
            self.audit()
                .note(
                    agent_event("server.trust", Outcome::Error)
                        .detail("reason", e.to_string())
                        .detail("digest", offered.digest()),
                )
                .await;
            self.alerts
                .raise(
                    AlertKind::ServerTrustRefused,
                    "the server announced TLS keys or CAs this agent refuses",
                    serde_json::json!({"reason": e.to_string()}),
                )
                .await;
            return Ok(());
        }
        let file = self.settings.server_trust_file.clone();
        let saving = trust.clone();
        if let Err(e) = blocking::run(move || file.save(&saving)).await {
            // Held in memory all the same; after a restart the agent starts from the file it
            // had and learns the announcement again.
            tracing::error!(error = %e, "cannot write server-trust.json");
        }
        if let Err(e) = self
            .server
            .adopt_trust(trust.clone(), self.machine.key.clone())
        {
            tracing::error!(error = %e, "cannot reconnect with the new server trust; keeping the connection");
        }
        let pins: Vec<String> = trust.pins().iter().map(ToString::to_string).collect();
        let retired: Vec<String> = trust
            .retired_pins()
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(pins = ?pins, cas = trust.cas().len(), "server trust accepted");
        self.audit()
            .note(
                agent_event("server.trust", Outcome::Success)
                    .detail("pins", pins)
                    .detail("retired_pins", retired)
                    .detail("cas", trust.cas().len())
                    .detail("issued_at", offered.issued_at),
            )
            .await;
        self.health.refused_server_trust = None;
        self.machine.server_trust = trust;
        Ok(())
    }
}
