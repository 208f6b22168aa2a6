//! The dashboard's actions (POST): sign-in and sign-out, and every change an administrator can
//! make, each through the same `service::admin::Admin` method as the admin API and CLI (so it
//! is audited the same way, with the same actor). Each action is an [`Act`]: signed in, role
//! `admin`, same origin, CSRF token checked; it then redirects back to the page it came from
//! (POST/redirect/GET), except creating an install token, whose answer shows the token once,
//! and building a Windows installer, whose answer is the file.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::json;

use super::pages::{self, Created};
use super::session;
use super::{check_origin, done, Act, Dashboard, DashboardError, DashboardResult, Viewer, PREFIX};
use crate::clock::Timestamp;
use crate::http::admin::{installer_response, AdminPrincipal};
use crate::http::listener::ConnInfo;
use crate::http::public::rate_key;
use crate::service::admin::AdminError;
use crate::service::licenses::LicenseRequest;
use crate::service::windows_installer::StubSource;
use crate::service::{credential_hash, SharedState};
use crate::store::admin_tokens;
use crate::store::audit::{self, NewAuditEvent};

/// Keyed limiters keep one entry per address seen; past this many, stale ones are dropped.
const LIMITER_RETAIN_ABOVE: usize = 10_000;

#[derive(Deserialize)]
pub struct SignIn {
    #[serde(default)]
    token: String,
}

impl std::fmt::Debug for SignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignIn").finish_non_exhaustive()
    }
}

/// Exchanges an admin API token for a session (rate-limited per address, audited either way).
pub async fn sign_in(
    State(state): State<SharedState>,
    Extension(dashboard): Extension<Arc<Dashboard>>,
    conn: Option<Extension<ConnInfo>>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> DashboardResult<Response> {
    check_origin(&headers)?;
    if let Some(Extension(conn)) = conn {
        if dashboard.sign_in.len() > LIMITER_RETAIN_ABOVE {
            dashboard.sign_in.retain_recent();
        }
        if dashboard
            .sign_in
            .check_key(&rate_key(conn.remote.ip()))
            .is_err()
        {
            return Err(DashboardError::RateLimited);
        }
    }
    let hash = credential_hash(form.token.trim());
    let Some(record) = admin_tokens::find(state.store.pool(), &hash).await? else {
        let event = NewAuditEvent::refused(
            "dashboard",
            "dashboard.sign_in",
            None,
            json!({}),
            "unauthorized",
        );
        audit::insert(state.store.pool(), &event).await?;
        let page = pages::sign_in_refused("Unknown or revoked admin token.")?;
        return Ok((StatusCode::UNAUTHORIZED, Html(page)).into_response());
    };
    let principal = AdminPrincipal(record);
    let actor = principal.actor();
    let event = NewAuditEvent::success(
        Timestamp::now(),
        &actor,
        "dashboard.sign_in",
        None,
        json!({"role": principal.0.role.as_str()}),
    );
    audit::insert(state.store.pool(), &event).await?;
    let new = dashboard.sessions.open(&hash, Timestamp::now());
    let cookie = session::set_cookie(&new.id, dashboard.sessions.policy());
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(PREFIX)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct Empty {}

/// Ends the session (any role may sign out; the CSRF token is still required).
pub async fn sign_out(
    State(state): State<SharedState>,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> DashboardResult<Response> {
    check_origin(&headers)?;
    let (mut parts, body) = req.into_parts();
    let viewer = match <Viewer as axum::extract::FromRequestParts<SharedState>>::from_request_parts(
        &mut parts, &state,
    )
    .await
    {
        Ok(v) => v,
        Err(DashboardError::Session(_)) => {
            return Ok(Redirect::to(&format!("{PREFIX}/sign-in")).into_response())
        }
        Err(e) => return Err(e),
    };
    let Form(fields) =
        <Form<Vec<(String, String)>> as axum::extract::FromRequest<SharedState>>::from_request(
            axum::extract::Request::from_parts(parts, body),
            &state,
        )
        .await
        .map_err(|e| DashboardError::BadForm(format!("the form could not be read: {e}")))?;
    let csrf = fields
        .iter()
        .find(|(k, _)| k == "csrf")
        .map_or("", |(_, v)| v.as_str());
    session::check_csrf(&viewer.session, csrf)?;
    viewer.dashboard.sessions.close(&viewer.session.key);
    let actor = viewer.principal.actor();
    let event = NewAuditEvent::success(
        Timestamp::now(),
        &actor,
        "dashboard.sign_out",
        None,
        json!({}),
    );
    audit::insert(state.store.pool(), &event).await?;
    Ok((
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to(&format!("{PREFIX}/sign-in?out=1")),
    )
        .into_response())
}

fn machine_page(id: &str) -> String {
    format!("{PREFIX}/machines/{id}")
}

#[derive(Debug, Deserialize)]
pub struct NewClient {
    name: String,
}

pub async fn create_client(act: Act<NewClient>) -> DashboardResult<Response> {
    let client = act.viewer.admin().create_client(&act.form.name).await?;
    Ok(done(
        &format!("{PREFIX}/clients/{}", client.id),
        "client.create",
    ))
}

pub async fn revoke_machine(Path(id): Path<String>, act: Act<Empty>) -> DashboardResult<Response> {
    act.viewer.admin().revoke_machine(&id).await?;
    Ok(done(&machine_page(&id), "machine.revoke"))
}

pub async fn restore_machine(Path(id): Path<String>, act: Act<Empty>) -> DashboardResult<Response> {
    act.viewer.admin().restore_machine(&id).await?;
    Ok(done(&machine_page(&id), "machine.restore"))
}

pub async fn rotate_machine(Path(id): Path<String>, act: Act<Empty>) -> DashboardResult<Response> {
    act.viewer.admin().request_rotation(&id).await?;
    Ok(done(&machine_page(&id), "machine.rotate"))
}

/// Deletes the machine with its certificates, secrets and licenses (`machine.delete`).
pub async fn delete_machine(Path(id): Path<String>, act: Act<Empty>) -> DashboardResult<Response> {
    let admin = act.viewer.admin();
    let client_id = admin.get_machine(&id).await?.client_id;
    admin.delete_machine(&id).await?;
    Ok(done(
        &format!("{PREFIX}/clients/{client_id}"),
        "machine.delete",
    ))
}

pub async fn invalidate_secret(
    Path((id, version)): Path<(String, String)>,
    act: Act<Empty>,
) -> DashboardResult<Response> {
    let version: u64 = version.parse().map_err(|_| AdminError::InvalidInput {
        field: "version",
        message: "must be a secret version number".into(),
    })?;
    act.viewer.admin().invalidate_secret(&id, version).await?;
    Ok(done(&machine_page(&id), "secret.invalidate"))
}

#[derive(Debug, Deserialize)]
pub struct NewLicense {
    /// Comma- or space-separated feature names.
    features: String,
    /// Days until it expires; empty: never.
    #[serde(default)]
    expires_in_days: String,
}

/// Issues a license for the machine, as `POST /api/admin/licenses` does.
pub async fn issue_license(
    Path(id): Path<String>,
    act: Act<NewLicense>,
) -> DashboardResult<Response> {
    let features = act
        .form
        .features
        .split([',', ' '])
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    let days = act.form.expires_in_days.trim();
    let expires_at = if days.is_empty() {
        None
    } else {
        let days: i64 = days
            .parse()
            .ok()
            .filter(|d| (1..=36_500).contains(d))
            .ok_or(AdminError::InvalidInput {
                field: "expires_in_days",
                message: "must be a whole number of days from 1 to 36500, or empty".into(),
            })?;
        Some(Timestamp::now().plus_secs(days * 86_400))
    };
    let request = LicenseRequest {
        machine_id: id.clone(),
        features,
        metadata: BTreeMap::new(),
        not_before: None,
        expires_at,
    };
    act.viewer.admin().issue_license(&request).await?;
    Ok(done(&machine_page(&id), "license.issue"))
}

pub async fn revoke_license(Path(id): Path<String>, act: Act<Empty>) -> DashboardResult<Response> {
    let license = act.viewer.admin().revoke_license(&id).await?;
    Ok(done(&machine_page(&license.machine_id), "license.revoke"))
}

pub async fn revoke_certificate(
    Path(serial): Path<String>,
    act: Act<Empty>,
) -> DashboardResult<Response> {
    let cert = act.viewer.admin().revoke_certificate(&serial).await?;
    Ok(done(&machine_page(&cert.machine_id), "certificate.revoke"))
}

pub async fn restore_certificate(
    Path(serial): Path<String>,
    act: Act<Empty>,
) -> DashboardResult<Response> {
    let cert = act.viewer.admin().restore_certificate(&serial).await?;
    Ok(done(&machine_page(&cert.machine_id), "certificate.restore"))
}

/// Deletes revoked, superseded and expired certificates (seed 004's purge).
pub async fn purge_certificates(act: Act<Empty>) -> DashboardResult<Response> {
    let report = act.viewer.admin().purge_certificates().await?;
    Ok(done(
        PREFIX,
        &format!("certificates.purge+{}+purged", report.purged),
    ))
}

#[derive(Debug, Deserialize)]
pub struct NewInstallToken {
    client_id: String,
    /// Hours the token lives; empty: the server's default.
    #[serde(default)]
    ttl_hours: String,
    /// Bind it to this machine of the client (re-enrollment); empty: a new machine.
    #[serde(default)]
    machine_id: String,
}

impl NewInstallToken {
    /// The lifetime asked for, in seconds (`None`: the server's default).
    fn ttl_secs(&self) -> Result<Option<u64>, AdminError> {
        let ttl = self.ttl_hours.trim();
        if ttl.is_empty() {
            return Ok(None);
        }
        let hours: u64 = ttl.parse().map_err(|_| AdminError::InvalidInput {
            field: "ttl_hours",
            message: "must be a whole number of hours, or empty".into(),
        })?;
        Ok(Some(hours.saturating_mul(3600)))
    }

    fn machine_id(&self) -> Option<&str> {
        Some(self.machine_id.trim()).filter(|m| !m.is_empty())
    }
}

/// Mints an install token and answers with the page showing it and its one-liner, once.
pub async fn create_install_token(act: Act<NewInstallToken>) -> DashboardResult<Response> {
    let created = act
        .viewer
        .admin()
        .create_install_token(
            act.form.client_id.trim(),
            act.form.ttl_secs()?,
            act.form.machine_id(),
        )
        .await?;
    let client_id = created.record.client_id.clone();
    pages::install_tokens_page(
        &act.viewer,
        Some(client_id),
        Some(Created::from(created)),
        None,
    )
    .await
}

/// Mints an install token into a Windows installer and answers with the file, as
/// `POST /api/admin/install-tokens/windows-installer` does; without a usable Windows agent on
/// the server, the error page (503) names its path and no token is minted.
pub async fn windows_installer(act: Act<NewInstallToken>) -> DashboardResult<Response> {
    let stub = StubSource::configured(&act.viewer.state.settings.windows_stub);
    let installer = act
        .viewer
        .admin()
        .create_windows_installer(
            act.form.client_id.trim(),
            act.form.ttl_secs()?,
            act.form.machine_id(),
            &stub,
        )
        .await?;
    Ok(installer_response(installer))
}
