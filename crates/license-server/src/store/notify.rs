//! PostgreSQL's `LISTEN/NOTIFY` on the audit trail: every statement that adds audit rows
//! notifies [`CHANNEL`] when it commits (a trigger, `migrations/postgres/0011_feed_notify.sql`),
//! whoever wrote them (a serving process or an `admin` command), so the change feed of each
//! serving process reads the trail when it grew rather than polling it (`service::changes`).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};

use super::StoreError;

/// The channel the audit trail's trigger notifies.
pub const CHANNEL: &str = "lsa_audit";

/// The database to listen on (the primary's connect options; never printed, as they may hold
/// a password).
#[derive(Clone)]
pub struct ListenTarget(PgConnectOptions);

impl std::fmt::Debug for ListenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenTarget(..)")
    }
}

impl ListenTarget {
    pub fn new(options: PgConnectOptions) -> Self {
        Self(options)
    }

    /// A connection of its own listening on [`CHANNEL`]. It reconnects by itself when the
    /// connection drops (`PgListener::try_recv` answers `None` then: notifications sent in
    /// between are lost).
    pub async fn listen(&self) -> Result<PgListener, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(self.0.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }
}
