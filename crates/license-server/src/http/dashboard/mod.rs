//! The vendor's web dashboard, served on the admin listener under `/dashboard`.
//!
//! Server-rendered HTML (askama templates in `templates/dashboard/`, checked at compile time),
//! one embedded stylesheet and no script at all, so it works without any external network and
//! the build stays `cargo build`. An administrator signs in with an admin API token and gets a
//! session ([`session`]); the session acts with the token's role, exactly as the admin API
//! would: `readonly` sees every page and no action, and any action it posts is refused. Every
//! action calls the same `service::admin::Admin` methods as the admin API and the CLI, with the
//! same actor (`api:<token name>`), so it is audited the same way.
//!
//! - `pages`: the pages (fleet overview, clients, a client's machines, one machine, install
//!   tokens, audit trail) and the sign-in form;
//! - `actions`: sign-in, sign-out and every POST that changes something, each checked against
//!   the session's CSRF token (constant-time) and the request's `Origin`.

pub mod actions;
pub mod pages;
pub mod session;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::admin::AdminPrincipal;
use crate::clock::Timestamp;
use crate::service::admin::{Admin, AdminError};
use crate::service::SharedState;
use crate::store::admin_tokens::{self, Role};
use crate::store::StoreError;
use session::{SessionError, SessionStore, SessionView};

/// Where the dashboard lives on the admin listener.
pub const PREFIX: &str = "/dashboard";

/// The stylesheet, embedded in the binary.
const STYLE_CSS: &str = include_str!("../../../templates/dashboard/style.css");

/// Pages may load only their own stylesheet and post only to themselves; no script runs, no
/// other site may frame them.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Errors of the dashboard, each answered as a page with its status. Messages never carry a
/// token, a session id or a database detail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DashboardError {
    /// No valid session: pages redirect to the sign-in form.
    #[error("{0}")]
    Session(#[from] SessionError),
    /// A signed-in session may not do this (a `readonly` role acting), or a POST came from
    /// another origin or without the session's CSRF token.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("too many sign-in attempts from this address; retry in a minute")]
    RateLimited,
    #[error("{0}")]
    BadForm(String),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("the database failed; see the server log")]
    Store(#[from] StoreError),
    #[error("a page could not be rendered; see the server log")]
    Render(#[from] askama::Error),
}

impl DashboardError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            DashboardError::Session(SessionError::CsrfMismatch) | DashboardError::Forbidden(_) => {
                StatusCode::FORBIDDEN
            }
            DashboardError::Session(_) => StatusCode::SEE_OTHER,
            DashboardError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            DashboardError::BadForm(_) => StatusCode::BAD_REQUEST,
            DashboardError::Admin(AdminError::NotFound { .. }) => StatusCode::NOT_FOUND,
            DashboardError::Admin(AdminError::InvalidInput { .. }) => StatusCode::BAD_REQUEST,
            DashboardError::Admin(AdminError::Conflict(_)) => StatusCode::CONFLICT,
            DashboardError::Admin(AdminError::WindowsStub { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            DashboardError::Admin(_) | DashboardError::Store(_) | DashboardError::Render(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// What the page says: internal failures are logged here and shown without detail.
    fn message(&self) -> String {
        match self {
            DashboardError::Admin(AdminError::Store(e)) | DashboardError::Store(e) => {
                tracing::error!(error = %e, "dashboard: database error");
                "the database failed; see the server log".into()
            }
            DashboardError::Render(e) => {
                tracing::error!(error = %e, "dashboard: template error");
                self.to_string()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::SEE_OTHER {
            return Redirect::to(&format!("{PREFIX}/sign-in")).into_response();
        }
        let page = pages::ErrorPage {
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("error"),
            message: self.message(),
        };
        match askama::Template::render(&page) {
            Ok(html) => (status, axum::response::Html(html)).into_response(),
            Err(_) => (status, page.message).into_response(),
        }
    }
}

pub type DashboardResult<T> = Result<T, DashboardError>;

/// Sign-in attempts per client address (IPv6 /64), as the public listener counts bootstraps.
pub type SignInLimiter = DefaultKeyedRateLimiter<IpAddr>;

/// The dashboard's own state beside the server's: sessions and the sign-in limiter.
#[derive(Debug)]
pub struct Dashboard {
    pub sessions: SessionStore,
    pub sign_in: SignInLimiter,
}

impl Dashboard {
    pub fn new(state: &SharedState) -> Arc<Self> {
        let per_minute =
            NonZeroU32::new(state.settings.dashboard_sign_in_per_minute).unwrap_or(NonZeroU32::MIN);
        Arc::new(Self {
            sessions: SessionStore::new(state.settings.dashboard_sessions),
            sign_in: RateLimiter::keyed(Quota::per_minute(per_minute)),
        })
    }
}

/// The dashboard's routes, under [`PREFIX`]; merged into the admin listener's router outside
/// the admin API's bearer-token layer (a session cookie authenticates here instead).
pub fn router(state: &SharedState) -> Router<SharedState> {
    let dashboard = Dashboard::new(state);
    let r = |path: &str| format!("{PREFIX}{path}");
    Router::new()
        .route(PREFIX, get(pages::overview))
        .route(&r("/"), get(pages::overview))
        .route(&r("/assets/style.css"), get(style_css))
        .route(
            &r("/sign-in"),
            get(pages::sign_in_form).post(actions::sign_in),
        )
        .route(&r("/sign-out"), post(actions::sign_out))
        .route(
            &r("/clients"),
            get(pages::clients).post(actions::create_client),
        )
        .route(&r("/clients/{id}"), get(pages::client))
        .route(&r("/machines/{id}"), get(pages::machine))
        .route(&r("/machines/{id}/revoke"), post(actions::revoke_machine))
        .route(&r("/machines/{id}/restore"), post(actions::restore_machine))
        .route(&r("/machines/{id}/rotate"), post(actions::rotate_machine))
        .route(&r("/machines/{id}/delete"), post(actions::delete_machine))
        .route(
            &r("/machines/{id}/secrets/{version}/invalidate"),
            post(actions::invalidate_secret),
        )
        .route(&r("/machines/{id}/licenses"), post(actions::issue_license))
        .route(&r("/licenses/{id}/revoke"), post(actions::revoke_license))
        .route(
            &r("/certificates/{serial}/revoke"),
            post(actions::revoke_certificate),
        )
        .route(
            &r("/certificates/{serial}/restore"),
            post(actions::restore_certificate),
        )
        .route(&r("/certificates/purge"), post(actions::purge_certificates))
        .route(
            &r("/install-tokens"),
            get(pages::install_tokens).post(actions::create_install_token),
        )
        .route(
            &r("/install-tokens/windows-installer"),
            post(actions::windows_installer),
        )
        .route(&r("/audit"), get(pages::audit))
        .layer(axum::middleware::map_response(security_headers))
        .layer(Extension(dashboard))
}

/// The admin listener's authentication: the admin API's bearer token everywhere
/// ([`super::admin::authenticate`]), except under [`PREFIX`], where the dashboard's session
/// cookie is checked by the pages and actions themselves.
pub async fn bearer_unless_dashboard(
    state: axum::extract::State<SharedState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == PREFIX || path.starts_with(&format!("{PREFIX}/")) {
        next.run(req).await
    } else {
        super::admin::authenticate(state, req, next).await
    }
}

async fn style_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLE_CSS,
    )
}

/// Every dashboard answer: no caching (pages show install tokens once), no framing, no
/// sniffing, no referrer to other sites (`same-origin`: with `no-referrer` browsers send
/// `Origin: null` on form posts, which [`check_origin`] refuses), and the content security
/// policy above.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// What every page shows of the signed-in administrator, and the CSRF token its forms carry
/// (Debug omits it).
#[derive(Clone)]
pub struct Ctx {
    pub name: String,
    pub role: &'static str,
    /// The role may act (`admin`): action forms are shown.
    pub can_act: bool,
    pub csrf: String,
    /// A message after a successful action (`?done=`), if any.
    pub done: Option<String>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("can_act", &self.can_act)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Extractor: a signed-in administrator (a live session whose admin token is still
/// unrevoked), with the server's state. Pages without one redirect to the sign-in form.
#[derive(Debug)]
pub struct Viewer {
    pub state: SharedState,
    pub dashboard: Arc<Dashboard>,
    pub principal: AdminPrincipal,
    pub session: SessionView,
}

impl Viewer {
    /// The service layer, acting as this administrator (the admin API's actor).
    pub fn admin(&self) -> Admin<'_> {
        Admin::new(&self.state, self.principal.actor())
    }

    pub fn can_act(&self) -> bool {
        session::may_act(self.principal.0.role)
    }

    pub fn ctx(&self, done: Option<String>) -> Ctx {
        Ctx {
            name: self.principal.0.name.clone(),
            role: self.principal.0.role.as_str(),
            can_act: self.can_act(),
            csrf: self.session.csrf.to_string(),
            done: done.filter(|d| is_done_message(d)),
        }
    }
}

fn dashboard_of(parts: &Parts) -> DashboardResult<Arc<Dashboard>> {
    parts
        .extensions
        .get::<Arc<Dashboard>>()
        .cloned()
        .ok_or(DashboardError::Forbidden("dashboard state missing"))
}

impl FromRequestParts<SharedState> for Viewer {
    type Rejection = DashboardError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let dashboard = dashboard_of(parts)?;
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::cookie_value)
            .ok_or(SessionError::Unknown)?;
        let session = dashboard.sessions.touch(id, Timestamp::now())?;
        // The token is looked up on every request: revoking it ends its sessions, and a role
        // change applies at once.
        let Some(record) = admin_tokens::find(state.store.pool(), &session.token_hash).await?
        else {
            dashboard.sessions.close(&session.key);
            return Err(SessionError::Unknown.into());
        };
        Ok(Self {
            state: state.clone(),
            dashboard,
            principal: AdminPrincipal(record),
            session,
        })
    }
}

/// Refuses a POST whose `Origin` names another site than the one it was sent to (browsers send
/// `Origin` on every form POST; SameSite=Strict already keeps the cookie off cross-site
/// requests, this and the CSRF token are the other two locks).
pub fn check_origin(headers: &HeaderMap) -> DashboardResult<()> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let same = origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("https://"))
        .is_some_and(|o| Some(o) == host);
    if same {
        Ok(())
    } else {
        Err(DashboardError::Forbidden(
            "cross-origin form posts are refused",
        ))
    }
}

/// Extractor of every action: a signed-in administrator whose role may act, a same-origin
/// POST, and a form carrying the session's CSRF token (compared in constant time) — checked in
/// that order, before the form's own fields are read. The fields are then parsed into `T`
/// (all strings, as HTML forms send them).
#[derive(Debug)]
pub struct Act<T> {
    pub viewer: Viewer,
    pub form: T,
}

impl<T: serde::de::DeserializeOwned> FromRequest<SharedState> for Act<T> {
    type Rejection = DashboardError;

    async fn from_request(req: Request, state: &SharedState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let viewer = match Viewer::from_request_parts(&mut parts, state).await {
            Ok(viewer) => viewer,
            // A POST without a session is refused, not redirected.
            Err(DashboardError::Session(_)) => {
                return Err(DashboardError::Forbidden("not signed in"))
            }
            Err(e) => return Err(e),
        };
        if viewer.principal.0.role == Role::Readonly {
            return Err(DashboardError::Forbidden(
                "this session is readonly: it may not act",
            ));
        }
        check_origin(&parts.headers)?;
        let axum::Form(fields) = axum::Form::<Vec<(String, String)>>::from_request(
            Request::from_parts(parts, body),
            state,
        )
        .await
        .map_err(|e| DashboardError::BadForm(format!("the form could not be read: {e}")))?;
        let csrf = fields
            .iter()
            .find(|(k, _)| k == "csrf")
            .map_or("", |(_, v)| v.as_str());
        session::check_csrf(&viewer.session, csrf)?;
        let object: serde_json::Map<String, serde_json::Value> = fields
            .into_iter()
            .filter(|(k, _)| k != "csrf")
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let form = serde_json::from_value(serde_json::Value::Object(object))
            .map_err(|e| DashboardError::BadForm(format!("the form is incomplete: {e}")))?;
        Ok(Self { viewer, form })
    }
}

/// Whether `?done=` holds what [`done`] puts there (an action name and counts), so that a
/// crafted link cannot make a page say something else.
pub fn is_done_message(done: &str) -> bool {
    !done.is_empty()
        && done.len() <= 64
        && done
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._ ".contains(&b))
}

/// After an action: back to `to` (a dashboard path), telling the page what was done.
pub fn done(to: &str, what: &str) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}done={what}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_must_match_host_when_sent() {
        let mut h = HeaderMap::new();
        assert!(check_origin(&h).is_ok());
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8445"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:8445"),
        );
        assert!(check_origin(&h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            check_origin(&h).unwrap_err().status(),
            StatusCode::FORBIDDEN
        );
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(check_origin(&h).is_err());
    }

    #[test]
    fn done_messages_are_action_names_only() {
        assert!(is_done_message("machine.revoke"));
        assert!(is_done_message("certificates.purge 3 purged"));
        assert!(!is_done_message(""));
        assert!(!is_done_message("Your session expired: call +1 555"));
        assert!(!is_done_message(&"a".repeat(65)));
    }

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(
            DashboardError::from(SessionError::CsrfMismatch).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            DashboardError::from(SessionError::Expired).status(),
            StatusCode::SEE_OTHER
        );
        assert_eq!(
            DashboardError::from(AdminError::Conflict("x".into())).status(),
            StatusCode::CONFLICT
        );
    }
}
