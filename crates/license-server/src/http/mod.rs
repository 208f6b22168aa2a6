//! The server's three HTTPS listeners and their routers.
//!
//! - public (internet-facing, server-authenticated TLS): `public`
//! - agent (TLS 1.3, mandatory client certificate, CN = `client_id:machine_id`): `agent`
//! - admin (loopback by default, bearer tokens with roles): `admin`
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind port 0. It also
//! keeps the server's TLS certificate fresh: renewed at start when due and checked every
//! `server_certificate_check_interval_secs` while serving (`service::server_certificate`), and
//! runs the background tasks of a serving process: the change feed, the read replica's
//! monitor, the fleet checks, the key watch and the sweeper.

pub mod admin;
pub mod agent;
pub mod dashboard;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod public;
pub mod refusals;
pub mod shed;
pub mod tls;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::{middleware, Extension, Router};
use tokio::net::TcpListener;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

use crate::config::ServerConfig;
use crate::service::SharedState;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The serialized OpenAPI document, served at `/api/openapi.json`.
#[derive(Debug, Clone)]
pub struct OpenApiDocument(pub Arc<String>);

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "License Secret Agent server", description = "Per-machine PKI, enrollment, agent API (mTLS) and admin API. \
        The public routes are served on the public listener, /api/v1 on the agent listener (TLS 1.3, client certificate), \
        /api/admin on the admin listener (bearer token)."),
    modifiers(&BearerScheme),
    tags((name = "public", description = "Public listener"), (name = "agent", description = "Agent listener, mTLS"),
         (name = "admin", description = "Admin listener, bearer token"))
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The three routers (state not yet attached) and the OpenAPI document covering all of them.
fn routers() -> ([Router<SharedState>; 3], utoipa::openapi::OpenApi) {
    let (public, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(public::router())
        .split_for_parts();
    let (agent, agent_doc) = agent::router().split_for_parts();
    let (admin, admin_doc) = admin::router().split_for_parts();
    doc.merge(agent_doc);
    doc.merge(admin_doc);
    ([public, agent, admin], doc)
}

/// The OpenAPI document, as served (also printed by `license-server openapi`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routers().1
}

/// The three bound listeners.
#[derive(Debug)]
pub struct Listeners {
    pub public: TcpListener,
    pub agent: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &ServerConfig) -> Result<Self, ServeError> {
        async fn one(which: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    which,
                    addr,
                    source,
                })
        }
        Ok(Self {
            public: one("public", config.public_listen).await?,
            agent: one("agent", config.agent_listen).await?,
            admin: one("admin", config.admin_listen).await?,
        })
    }

    /// Bound addresses, in order public, agent, admin.
    pub fn local_addrs(&self) -> std::io::Result<[SocketAddr; 3]> {
        Ok([
            self.public.local_addr()?,
            self.agent.local_addr()?,
            self.admin.local_addr()?,
        ])
    }
}

/// Bodies larger than `limit` bytes are refused with a JSON 413: up front when their
/// `Content-Length` says so, otherwise as they are read.
fn body_limit(router: Router<SharedState>, limit: usize) -> Router<SharedState> {
    router
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(
            limit,
            error::refuse_oversized,
        ))
}

/// Serves the three listeners until `shutdown` completes, then drains in-flight requests.
pub async fn run(
    listeners: Listeners,
    state: SharedState,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server_cert = Arc::new(tls::ServerCertResolver::new(&state.keys)?);
    let mut served_pem = state.keys.server_cert_pem.clone();
    renew_server_certificate(&state, &server_cert, &mut served_pem).await;
    let public_tls = tls::public_config(&server_cert)?;
    let agent_tls = tls::agent_config(&state.keys, &server_cert)?;
    let admin_tls = tls::admin_config(&server_cert)?;

    let ([public, agent, admin], doc) = routers();
    let doc = OpenApiDocument(Arc::new(doc.to_json().unwrap_or_else(|_| "{}".into())));
    let limiter = public::bootstrap_limiter(state.settings.bootstrap_rate_per_minute);

    let http_metrics = metrics::HttpMetrics::default();
    let tracked = |router: Router<SharedState>, listener: &'static str| {
        router.route_layer(middleware::from_fn_with_state(
            (http_metrics.clone(), listener),
            metrics::track,
        ))
    };
    // The rate limit inside the request counter, so its 429s are counted.
    let public = public.route_layer(middleware::from_fn(public::rate_limit));
    let (public, agent) = (tracked(public, "public"), tracked(agent, "agent"));
    // Shedding outside the certificate check: a shed request costs no database access.
    let shedder = shed::Shedder::new(state.settings.shedding);
    let admin = tracked(
        admin.route("/metrics", axum::routing::get(metrics::serve)),
        "admin",
    )
    .layer(Extension(http_metrics.clone()))
    .layer(Extension(shedder.clone()));
    let public = body_limit(public, public::MAX_PUBLIC_BODY_BYTES)
        .layer(Extension(limiter.clone()))
        .layer(Extension(doc))
        .with_state(state.clone());
    let agent = body_limit(
        agent
            .layer(middleware::from_fn_with_state(
                state.clone(),
                agent::authenticate,
            ))
            .layer(middleware::from_fn_with_state(shedder.clone(), shed::shed)),
        agent::MAX_AGENT_BODY_BYTES,
    )
    .with_state(state.clone());
    // The dashboard authenticates with its session cookie instead of a bearer token.
    let dashboard = tracked(dashboard::router(&state), "admin");
    let admin = body_limit(
        admin.merge(dashboard).layer(middleware::from_fn_with_state(
            state.clone(),
            dashboard::bearer_unless_dashboard,
        )),
        public::MAX_PUBLIC_BODY_BYTES,
    )
    .with_state(state.clone());

    // Keeps the limiter's memory bounded under address churn, and destroys secrets past their
    // grace (at start, then every minute; idempotent across replicas).
    let sweep_state = state.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            limiter.retain_recent();
            if let Err(e) = crate::service::secrets::sweep_expired(&sweep_state).await {
                tracing::warn!(error = %e, "could not destroy expired secrets; retrying in a minute");
            }
        }
    });

    // Follows the master key set (a rollover beside this process, or a copy from another
    // replica) and tells the database which keys this process holds.
    let key_state = state.clone();
    let key_watch = std::sync::Arc::new(tokio::sync::Mutex::new(
        crate::service::keys::KeyWatch::new(&state),
    ));
    let watch = key_watch.clone();
    let key_watcher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::service::keys::KEY_FILE_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = watch.lock().await.tick(&key_state).await {
                tracing::warn!(error = %e, "master key set check failed; retrying");
            }
        }
    });

    // The change feed the agents' watch streams follow.
    let keys_state = state.clone();
    let feed = tokio::spawn(crate::service::changes::follow(
        state.changes.clone(),
        state.store.clone(),
        std::time::Duration::from_millis(state.settings.watch.feed_interval_ms),
        move || {
            if let Err(e) = keys_state.keys.license_keys.reload_if_changed() {
                tracing::warn!(error = %e, "cannot read the license key set again");
            }
        },
    ));

    // How fresh the read replica is, when there is one (`store::replica`).
    let replica_monitor = state.reads.replica().map(|replica| {
        tokio::spawn(crate::store::replica::monitor(
            replica.clone(),
            state.store.pool().clone(),
        ))
    });

    // Fleet conditions (machines unseen, certificates not renewed), raised once across replicas.
    let fleet_watch = tokio::spawn(crate::service::fleet_alerts::watch(state.clone()));

    let renew_state = state.clone();
    let renewer = tokio::spawn(async move {
        let every = std::time::Duration::from_secs(
            renew_state.settings.server_certificate_check_interval_secs,
        );
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            renew_server_certificate(&renew_state, &server_cert, &mut served_pem).await;
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let limits = listener::Limits {
        max_connections: listener::MAX_CONNECTIONS,
        per_address: usize::try_from(state.settings.max_connections_per_address)
            .unwrap_or(usize::MAX),
        write_stall: std::time::Duration::from_secs(state.settings.write_stall_timeout_secs),
    };
    let agent_limits = listener::Limits {
        max_connections: state.settings.agent_max_connections,
        ..limits
    };
    let servers = async {
        tokio::join!(
            listener::serve(
                listeners.public,
                public_tls,
                public,
                limits,
                http_metrics.handshakes("public"),
                stopped(stop_rx.clone()),
            ),
            listener::serve(
                listeners.agent,
                agent_tls,
                agent,
                agent_limits,
                http_metrics.handshakes("agent"),
                stopped(stop_rx.clone()),
            ),
            listener::serve(
                listeners.admin,
                admin_tls,
                admin,
                limits,
                http_metrics.handshakes("admin"),
                stopped(stop_rx),
            ),
        );
    };
    tokio::pin!(servers);
    tokio::select! {
        () = shutdown => {
            let _ = stop_tx.send(true);
            servers.await;
        }
        () = &mut servers => {}
    }
    sweeper.abort();
    feed.abort();
    if let Some(monitor) = replica_monitor {
        monitor.abort();
    }
    fleet_watch.abort();
    renewer.abort();
    key_watcher.abort();
    if let Err(e) = key_watch.lock().await.forget(&state).await {
        tracing::warn!(error = %e, "could not withdraw this process from the master key holders");
    }
    if let Some(replica) = state.reads.replica() {
        replica.store().close().await;
    }
    state.store.close().await;
    Ok(())
}

/// Renews the served certificate if it is due, and serves the new one to new connections.
/// A failure is logged and retried at the next check: the current certificate keeps serving.
async fn renew_server_certificate(
    state: &SharedState,
    served: &tls::ServerCertResolver,
    served_pem: &mut String,
) {
    use crate::service::server_certificate::{renew_if_due, Renewal};
    let now = crate::clock::Timestamp::now();
    let (pem, what) = match renew_if_due(state, served_pem, now).await {
        Ok(Renewal::NotDue) => return,
        Ok(Renewal::Adopted(pem)) => (
            pem,
            "adopted (renewed by another process on this data directory)",
        ),
        Ok(Renewal::Renewed(renewed)) => {
            tracing::info!(serial = %renewed.serial, not_after = %renewed.expires_at, "server TLS certificate renewed (same key, same pin)");
            (renewed.pem, "renewed")
        }
        Err(e) => {
            tracing::error!(error = %e, "server TLS certificate renewal failed; retrying at the next check");
            return;
        }
    };
    match served.replace(&pem) {
        Ok(()) => {
            tracing::info!("serving the {what} server TLS certificate to new connections");
            *served_pem = pem;
        }
        Err(e) => tracing::error!(error = %e, "the {what} server certificate cannot be served"),
    }
}
