//! The dashboard's pages (GET), each a compile-checked askama template fed by a small view
//! struct of display strings: the fleet overview, clients, one client's machines, one machine
//! (certificates, secret versions, licenses, last health report, audit trail, actions), install
//! tokens, the audit trail, and the sign-in form.
//!
//! Reads go through the same store queries as the admin API; the overview's counts are the
//! `/metrics` fleet gauges (`store::fleet`).

use askama::Template;
use axum::extract::{Path, Query};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::{Ctx, DashboardResult, Viewer};
use crate::clock::Timestamp;
use crate::service::admin::CreatedInstallToken;
use crate::store::audit::{self, AuditEvent, AuditFilter};
use crate::store::fleet::{self, Expiring, Gauges};
use crate::store::machines::MachineRecord;
use crate::store::{clients, install_tokens, Store};

/// How far ahead the overview lists expiring certificates and licenses.
pub const EXPIRING_WITHIN_SECS: i64 = 30 * 86_400;
/// Rows of each overview list.
pub const OVERVIEW_ROWS: i64 = 20;
/// Audit events per page.
pub const AUDIT_PAGE_ROWS: i64 = 200;
/// Audit events on a machine's page.
pub const MACHINE_AUDIT_ROWS: i64 = 100;

/// `-` for an absent time, else RFC 3339.
fn when(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".into(), |t| t.rfc3339())
}

fn html<T: Template>(page: &T) -> DashboardResult<Response> {
    Ok(Html(page.render()?).into_response())
}

#[derive(Debug, Deserialize)]
pub struct DoneQuery {
    pub done: Option<String>,
}

#[derive(Debug, Template)]
#[template(path = "dashboard/error.html")]
pub struct ErrorPage {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

#[derive(Template)]
#[template(path = "dashboard/sign_in.html")]
struct SignInPage {
    message: Option<&'static str>,
}

#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    pub out: Option<String>,
}

pub async fn sign_in_form(Query(q): Query<SignInQuery>) -> DashboardResult<Response> {
    let message = q.out.map(|_| "Signed out.");
    html(&SignInPage { message })
}

/// A page that failed the sign-in (wrong token), with its status.
pub fn sign_in_refused(message: &'static str) -> DashboardResult<String> {
    Ok(SignInPage {
        message: Some(message),
    }
    .render()?)
}

// --- overview ----------------------------------------------------------------------------------

/// One row of an overview list.
#[derive(Debug, Clone)]
pub struct ExpiringRow {
    pub id: String,
    pub machine_id: String,
    pub hostname: String,
    pub expires_at: String,
}

impl From<Expiring> for ExpiringRow {
    fn from(e: Expiring) -> Self {
        Self {
            id: e.id,
            machine_id: e.machine_id,
            hostname: e.hostname,
            expires_at: e.expires_at.rfc3339(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TroubledRow {
    pub id: String,
    pub hostname: String,
    pub last_seen: String,
    pub rotation_failures: String,
    pub clock_rollback: String,
}

#[derive(Debug, Template)]
#[template(path = "dashboard/overview.html")]
pub struct OverviewPage {
    pub ctx: Ctx,
    pub now: String,
    pub g: Gauges,
    pub certificates: Vec<ExpiringRow>,
    pub licenses: Vec<ExpiringRow>,
    pub troubled: Vec<TroubledRow>,
}

/// The overview page as HTML, as of `now` (also what `benches/dashboard.rs` times).
pub async fn overview_html(store: &Store, ctx: Ctx, now: Timestamp) -> DashboardResult<String> {
    let pool = store.pool();
    let g = fleet::gauges(pool, now).await?;
    let certificates =
        fleet::expiring_certificates(pool, now, EXPIRING_WITHIN_SECS, OVERVIEW_ROWS).await?;
    let licenses = fleet::expiring_licenses(pool, now, EXPIRING_WITHIN_SECS, OVERVIEW_ROWS).await?;
    let troubled = fleet::troubled_machines(pool, OVERVIEW_ROWS)
        .await?
        .into_iter()
        .map(|m| {
            let report = m.health.unwrap_or_default();
            TroubledRow {
                id: m.id,
                hostname: m.hostname,
                last_seen: when(m.last_seen_at),
                rotation_failures: report["rotation_failures"].to_string(),
                clock_rollback: match report["clock_rollback_secs"].as_i64() {
                    Some(secs) => format!("{secs} s"),
                    None => "-".into(),
                },
            }
        })
        .collect();
    Ok(OverviewPage {
        ctx,
        now: now.rfc3339(),
        g,
        certificates: certificates.into_iter().map(Into::into).collect(),
        licenses: licenses.into_iter().map(Into::into).collect(),
        troubled,
    }
    .render()?)
}

pub async fn overview(viewer: Viewer, Query(q): Query<DoneQuery>) -> DashboardResult<Response> {
    let page = overview_html(&viewer.state.store, viewer.ctx(q.done), Timestamp::now()).await?;
    Ok(Html(page).into_response())
}

// --- clients -----------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ClientRow {
    pub id: String,
    pub name: String,
    pub created_at: String,
    pub machines: i64,
    pub revoked: i64,
}

#[derive(Template)]
#[template(path = "dashboard/clients.html")]
struct ClientsPage {
    ctx: Ctx,
    clients: Vec<ClientRow>,
}

pub async fn clients(viewer: Viewer, Query(q): Query<DoneQuery>) -> DashboardResult<Response> {
    let clients = fleet::clients_with_counts(viewer.state.store.pool())
        .await?
        .into_iter()
        .map(|c| ClientRow {
            id: c.id,
            name: c.name,
            created_at: c.created_at.rfc3339(),
            machines: c.machines,
            revoked: c.revoked,
        })
        .collect();
    html(&ClientsPage {
        ctx: viewer.ctx(q.done),
        clients,
    })
}

#[derive(Debug, Clone)]
pub struct MachineRow {
    pub id: String,
    pub hostname: String,
    pub health: String,
    pub last_seen: String,
    pub certificate_expires: String,
    pub revoked: bool,
}

impl From<&MachineRecord> for MachineRow {
    fn from(m: &MachineRecord) -> Self {
        Self {
            id: m.id.clone(),
            hostname: m.hostname.clone(),
            health: m.health_summary(),
            last_seen: when(m.last_seen_at),
            certificate_expires: when(m.certificate_expires_at),
            revoked: m.revoked_at.is_some(),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/client.html")]
struct ClientPage {
    ctx: Ctx,
    id: String,
    name: String,
    machines: Vec<MachineRow>,
}

pub async fn client(
    viewer: Viewer,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> DashboardResult<Response> {
    let record = clients::get(viewer.state.store.pool(), &id).await?.ok_or(
        crate::service::admin::AdminError::NotFound {
            what: "client",
            id: id.clone(),
        },
    )?;
    let machines = viewer.admin().list_machines(Some(&id)).await?;
    html(&ClientPage {
        ctx: viewer.ctx(q.done),
        id: record.id,
        name: record.name,
        machines: machines.iter().map(MachineRow::from).collect(),
    })
}

// --- one machine -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct CertRow {
    pub serial: String,
    pub state: String,
    pub key_origin: String,
    pub issued_at: String,
    pub expires_at: String,
    pub revoked_at: String,
    pub superseded_at: String,
    pub can_revoke: bool,
    pub can_restore: bool,
}

#[derive(Debug, Clone)]
pub struct SecretRow {
    pub version: u64,
    pub state: String,
    pub valid_from: String,
    pub valid_until: String,
    pub grace_until: String,
    pub acked_at: String,
    pub can_invalidate: bool,
}

#[derive(Debug, Clone)]
pub struct LicenseRow {
    pub id: String,
    pub features: String,
    pub state: String,
    pub not_before: String,
    pub expires_at: String,
    pub can_revoke: bool,
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub details: String,
}

impl From<AuditEvent> for AuditRow {
    fn from(e: AuditEvent) -> Self {
        Self {
            seq: e.seq,
            at: e.at.rfc3339(),
            actor: e.actor,
            action: e.action,
            target: e.target.unwrap_or_else(|| "-".into()),
            outcome: e.outcome,
            details: e.details.to_string(),
        }
    }
}

#[derive(Template)]
#[template(path = "dashboard/machine.html")]
struct MachinePage {
    ctx: Ctx,
    m: MachineRow,
    client_id: String,
    hardware_id: String,
    arch: String,
    enrolled_at: String,
    last_enrolled_at: String,
    revoked_at: String,
    rotation_requested_at: String,
    health_reported_at: String,
    health: Vec<(String, String)>,
    certificates: Vec<CertRow>,
    secrets: Vec<SecretRow>,
    licenses: Vec<LicenseRow>,
    audit: Vec<AuditRow>,
}

pub async fn machine(
    viewer: Viewer,
    Path(id): Path<String>,
    Query(q): Query<DoneQuery>,
) -> DashboardResult<Response> {
    let admin = viewer.admin();
    let m = admin.get_machine(&id).await?;
    let now = Timestamp::now();
    let certificates = admin.list_certificates(Some(&id), None).await?;
    let secrets = admin.list_secrets(&id).await?;
    let licenses = admin.list_licenses(Some(&id)).await?;
    let mut targets = vec![id.clone()];
    targets.extend(certificates.iter().map(|c| c.serial.clone()));
    targets.extend(licenses.iter().map(|l| l.id.clone()));
    let filter = AuditFilter {
        targets: Some(&targets),
        ..AuditFilter::default()
    };
    let trail = audit::search(viewer.state.store.pool(), &filter, MACHINE_AUDIT_ROWS).await?;
    let health = match &m.health {
        Some(serde_json::Value::Object(fields)) => fields
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), shown)
            })
            .collect(),
        _ => Vec::new(),
    };
    let page = MachinePage {
        ctx: viewer.ctx(q.done),
        m: MachineRow::from(&m),
        client_id: m.client_id.clone(),
        hardware_id: m.hardware_id.clone(),
        arch: m.arch.clone(),
        enrolled_at: m.enrolled_at.rfc3339(),
        last_enrolled_at: m.last_enrolled_at.rfc3339(),
        revoked_at: when(m.revoked_at),
        rotation_requested_at: when(m.rotation_requested_at),
        health_reported_at: when(m.health_reported_at),
        health,
        certificates: certificates
            .into_iter()
            .rev()
            .map(|c| CertRow {
                can_revoke: c.effective_state == "active",
                can_restore: c.effective_state == "revoked",
                serial: c.serial,
                state: c.effective_state,
                key_origin: c.key_origin,
                issued_at: c.issued_at.rfc3339(),
                expires_at: c.expires_at.rfc3339(),
                revoked_at: when(c.revoked_at),
                superseded_at: when(c.superseded_at),
            })
            .collect(),
        secrets: secrets
            .into_iter()
            .rev()
            .map(|s| SecretRow {
                can_invalidate: s.usable(now) || s.effective_state == "pending",
                version: s.version,
                state: if s.destroyed {
                    format!("{} (destroyed)", s.effective_state)
                } else {
                    s.effective_state
                },
                valid_from: s.valid_from.rfc3339(),
                valid_until: s.valid_until.rfc3339(),
                grace_until: s.grace_until.rfc3339(),
                acked_at: when(s.acked_at),
            })
            .collect(),
        licenses: licenses
            .into_iter()
            .rev()
            .map(|l| LicenseRow {
                can_revoke: l.revoked_at.is_none(),
                id: l.id,
                features: l.features.join(", "),
                state: l.state,
                not_before: l.not_before.rfc3339(),
                expires_at: when(l.expires_at),
            })
            .collect(),
        audit: trail.into_iter().map(AuditRow::from).collect(),
    };
    html(&page)
}

// --- install tokens ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct TokenRow {
    pub id: String,
    pub client_id: String,
    pub created_at: String,
    pub expires_at: String,
    pub used: String,
    pub machine_id: String,
}

/// The token just created, shown on this one answer only. Debug omits the token and the
/// command that carries it.
pub struct Created {
    pub token: String,
    pub install_command: String,
    pub expires_at: String,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl From<CreatedInstallToken> for Created {
    fn from(c: CreatedInstallToken) -> Self {
        Self {
            expires_at: c.record.expires_at.rfc3339(),
            token: c.token,
            install_command: c.install_command,
        }
    }
}

#[derive(Debug, Template)]
#[template(path = "dashboard/install_tokens.html")]
pub struct InstallTokensPage {
    pub ctx: Ctx,
    pub clients: Vec<(String, String)>,
    pub selected: String,
    pub tokens: Vec<TokenRow>,
    pub created: Option<Created>,
}

#[derive(Debug, Deserialize)]
pub struct TokensQuery {
    pub client_id: Option<String>,
    pub done: Option<String>,
}

/// The install-tokens page; `created` is shown once, on the answer to the POST that made it.
pub async fn install_tokens_page(
    viewer: &Viewer,
    client_id: Option<String>,
    created: Option<Created>,
    done: Option<String>,
) -> DashboardResult<Response> {
    let pool = viewer.state.store.pool();
    let client_id = client_id.filter(|c| !c.is_empty());
    let tokens = install_tokens::list(pool, client_id.as_deref())
        .await?
        .into_iter()
        .rev()
        .take(200)
        .map(|t| TokenRow {
            id: t.id,
            client_id: t.client_id,
            created_at: t.created_at.rfc3339(),
            expires_at: t.expires_at.rfc3339(),
            used: match (t.used_at, t.used_by_machine) {
                (Some(at), Some(m)) => format!("{} by {m}", at.rfc3339()),
                (Some(at), None) => at.rfc3339(),
                _ => "-".into(),
            },
            machine_id: t.machine_id.unwrap_or_else(|| "-".into()),
        })
        .collect();
    let clients = clients::list(pool)
        .await?
        .into_iter()
        .map(|c| (c.id, c.name))
        .collect();
    html(&InstallTokensPage {
        ctx: viewer.ctx(done),
        clients,
        selected: client_id.unwrap_or_default(),
        tokens,
        created,
    })
}

pub async fn install_tokens(
    viewer: Viewer,
    Query(q): Query<TokensQuery>,
) -> DashboardResult<Response> {
    install_tokens_page(&viewer, q.client_id, None, q.done).await
}

// --- audit trail -------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub before: Option<i64>,
}

#[derive(Template)]
#[template(path = "dashboard/audit.html")]
struct AuditPage {
    ctx: Ctx,
    actor: String,
    action: String,
    target: String,
    events: Vec<AuditRow>,
    /// The query string of the next (older) page, when there may be one.
    older: Option<String>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

pub async fn audit(viewer: Viewer, Query(q): Query<AuditQuery>) -> DashboardResult<Response> {
    let targets: Option<Vec<String>> = nonempty(&q.target).map(|t| vec![t.to_string()]);
    let filter = AuditFilter {
        actor: nonempty(&q.actor),
        action: nonempty(&q.action),
        targets: targets.as_deref(),
        before_seq: q.before,
    };
    let events = audit::search(viewer.state.store.pool(), &filter, AUDIT_PAGE_ROWS).await?;
    let older = (events.len() as i64 == AUDIT_PAGE_ROWS)
        .then(|| events.last().map(|e| e.seq))
        .flatten()
        .map(|seq| {
            let enc = |s: Option<&str>| encode_query(s.unwrap_or(""));
            format!(
                "actor={}&action={}&target={}&before={seq}",
                enc(filter.actor),
                enc(filter.action),
                enc(nonempty(&q.target)),
            )
        });
    html(&AuditPage {
        ctx: viewer.ctx(None),
        actor: filter.actor.unwrap_or_default().to_string(),
        action: filter.action.unwrap_or_default().to_string(),
        target: nonempty(&q.target).unwrap_or_default().to_string(),
        events: events.into_iter().map(AuditRow::from).collect(),
        older,
    })
}

/// Percent-encodes a query-string value (everything but unreserved characters).
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query("api:ops"), "api%3Aops");
        assert_eq!(encode_query("a&b=c d"), "a%26b%3Dc%20d");
        assert_eq!(encode_query("machine.revoke"), "machine.revoke");
    }

    #[test]
    fn pages_escape_what_they_show() {
        let page = ErrorPage {
            status: 400,
            reason: "Bad Request",
            message: "<script>alert(1)</script>".into(),
        };
        let html = page.render().unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"));
    }
}
