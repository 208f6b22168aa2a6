//! Fleet conditions every server watches for (issue 11): machines not seen for
//! `machine_unseen_alert_secs`, and machines whose active certificate expires within
//! `certificate_expiry_alert_days` without having renewed. Each check raises the machines newly
//! in a condition and resolves those out of it (`store::fleet_alerts`: once across replicas),
//! audits what changed as `fleet.<condition>` in the same transaction, logs it, and hands it
//! to the webhook ([`crate::webhook`]).
//!
//! Which conditions apply at a given time is a pure decision ([`conditions`]), tested without
//! a database.

use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::store::audit::{self, NewAuditEvent};
use crate::store::fleet_alerts::{self, Changes, Condition};
use crate::store::StoreError;

use super::AppState;

/// Machine ids listed in one audit row or webhook payload, at most (the counts are exact).
pub const MAX_LISTED: usize = 100;

/// The fleet alert keys of `server.toml`, as the running server uses them.
#[derive(Debug, Clone)]
pub struct FleetAlertSettings {
    pub webhook_url: Option<String>,
    pub webhook_retries: u32,
    /// 0: no `machine_unseen` alerts.
    pub machine_unseen_secs: i64,
    /// 0: no `certificate_expiring` alerts.
    pub certificate_expiry_days: u32,
    pub check_interval_secs: u64,
}

/// What one check changed for one condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetAlert {
    pub condition: Condition,
    pub changes: Changes,
}

impl FleetAlert {
    /// `fleet.machine_unseen`, `fleet.certificate_expiring`.
    pub fn event(&self) -> String {
        format!("fleet.{}", self.condition.kind())
    }

    /// The audit details and the webhook's payload (without its envelope).
    pub fn details(&self) -> Value {
        let listed = |ids: &[String]| ids.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>();
        let mut details = json!({
            "raised_count": self.changes.raised.len(),
            "resolved_count": self.changes.resolved.len(),
            "raised": listed(&self.changes.raised),
            "resolved": listed(&self.changes.resolved),
        });
        match self.condition {
            Condition::MachineUnseen { before } => details["not_seen_since"] = before.0.into(),
            Condition::CertificateExpiring { before } => {
                details["expiring_before"] = before.0.into()
            }
        }
        details
    }
}

/// The conditions to check at `now` under `settings`.
pub fn conditions(settings: &FleetAlertSettings, now: Timestamp) -> Vec<Condition> {
    let mut conditions = Vec::new();
    if settings.machine_unseen_secs > 0 {
        conditions.push(Condition::MachineUnseen {
            before: now.plus_secs(-settings.machine_unseen_secs),
        });
    }
    if settings.certificate_expiry_days > 0 {
        conditions.push(Condition::CertificateExpiring {
            before: now.plus_secs(i64::from(settings.certificate_expiry_days) * 86_400),
        });
    }
    conditions
}

/// Checks every condition as of `now`; returns what changed (already audited).
pub async fn check(state: &AppState, now: Timestamp) -> Result<Vec<FleetAlert>, StoreError> {
    let mut alerts = Vec::new();
    let mut tx = state.store.begin_write().await?;
    for condition in conditions(&state.settings.fleet_alerts, now) {
        let changes = fleet_alerts::update(&mut tx, condition, now).await?;
        if changes.raised.is_empty() && changes.resolved.is_empty() {
            continue;
        }
        let alert = FleetAlert { condition, changes };
        let event = alert.event();
        let row = NewAuditEvent::success(now, "server", &event, None, alert.details());
        audit::insert(&mut *tx, &row).await?;
        alerts.push(alert);
    }
    tx.commit().await?;
    Ok(alerts)
}

/// The webhook's JSON for `alert`, checked at `now`.
pub fn webhook_payload(alert: &FleetAlert, now: Timestamp) -> Value {
    let mut payload = alert.details();
    payload["source"] = "license-server".into();
    payload["event"] = alert.event().into();
    payload["at"] = now.rfc3339().into();
    payload
}

/// Checks the fleet every `check_interval_secs` (the first time at once) until aborted.
pub async fn watch(state: super::SharedState) {
    let settings = state.settings.fleet_alerts.clone();
    let webhook = settings
        .webhook_url
        .clone()
        .map(|url| crate::webhook::start(url, settings.webhook_retries));
    let every = std::time::Duration::from_secs(settings.check_interval_secs);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let alerts = match check(&state, now).await {
            Ok(alerts) => alerts,
            Err(e) => {
                tracing::warn!(error = %e, "fleet check failed; retrying at the next one");
                continue;
            }
        };
        for alert in &alerts {
            tracing::warn!(
                event = %alert.event(),
                raised = alert.changes.raised.len(),
                resolved = alert.changes.resolved.len(),
                "fleet alert"
            );
            if let Some(webhook) = &webhook {
                if !webhook.send(webhook_payload(alert, now)) {
                    tracing::warn!(event = %alert.event(), "webhook queue full; alert not forwarded");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(unseen: i64, days: u32) -> FleetAlertSettings {
        FleetAlertSettings {
            webhook_url: None,
            webhook_retries: 0,
            machine_unseen_secs: unseen,
            certificate_expiry_days: days,
            check_interval_secs: 300,
        }
    }

    #[test]
    fn conditions_follow_the_settings_and_the_clock() {
        let now = Timestamp(1_000_000);
        assert_eq!(
            conditions(&settings(86_400, 7), now),
            [
                Condition::MachineUnseen {
                    before: Timestamp(1_000_000 - 86_400)
                },
                Condition::CertificateExpiring {
                    before: Timestamp(1_000_000 + 7 * 86_400)
                },
            ]
        );
        assert_eq!(
            conditions(&settings(0, 2), now),
            [Condition::CertificateExpiring {
                before: Timestamp(1_000_000 + 2 * 86_400)
            }]
        );
        assert!(conditions(&settings(0, 0), now).is_empty());
    }

    #[test]
    fn payloads_list_at_most_a_hundred_machines_and_count_them_all() {
        let alert = FleetAlert {
            condition: Condition::MachineUnseen {
                before: Timestamp(5),
            },
            changes: Changes {
                raised: (0..250).map(|n| format!("m{n:03}")).collect(),
                resolved: vec!["back".into()],
            },
        };
        let payload = webhook_payload(&alert, Timestamp(86_400));
        assert_eq!(payload["event"], "fleet.machine_unseen");
        assert_eq!(payload["raised_count"], 250);
        assert_eq!(payload["raised"].as_array().unwrap().len(), MAX_LISTED);
        assert_eq!(payload["resolved"], json!(["back"]));
        assert_eq!(payload["not_seen_since"], 5);
        assert_eq!(payload["at"], "1970-01-02T00:00:00Z");
    }
}
