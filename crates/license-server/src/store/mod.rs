//! Persistent state of the server, one module per table family: `clients`, `install_tokens`,
//! `machines` (with recovery tokens and the per-machine lock), `certificates`, `admin_tokens`,
//! the append-only `audit` trail, machine `secrets`, `licenses`, rotation `nonces`, and the
//! `master_keys` registry with the processes holding them, and agent `releases` (keys, manifests,
//! binaries in chunks, update reports).
//!
//! One set of SQL serves both backends (`$N` placeholders, `RETURNING`, `ON CONFLICT`, and
//! integer Unix times all mean the same on SQLite and PostgreSQL); only the DDL differs, in
//! `migrations/{sqlite,postgres}`, embedded at compile time. SQLite in the data directory is the
//! default; several stateless replicas share one PostgreSQL database, and may read from a hot
//! standby of it (`replica`: how fresh it is).
//!
//! Reads take any [`AnyExecutor`] (the pool, or a caller's transaction as `&mut *tx`); writes
//! that compose into a caller's transaction take `&mut AnyConnection`.

pub mod admin_tokens;
pub mod audit;
pub mod certificates;
pub mod clients;
pub mod fleet;
pub mod fleet_alerts;
pub mod install_tokens;
pub mod licenses;
pub mod machines;
pub mod master_keys;
pub mod nonces;
pub mod notify;
pub mod releases;
pub mod replica;
pub mod secrets;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, ConnectOptions as _, Executor, Row as _};

use crate::clock::Timestamp;

/// What a query runs on: the pool, or a transaction (`&mut *tx`).
pub trait AnyExecutor<'e>: Executor<'e, Database = Any> {}

impl<'e, T: Executor<'e, Database = Any>> AnyExecutor<'e> for T {}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A non-null Unix-time column.
fn ts(row: &AnyRow, col: &str) -> Result<Timestamp> {
    Ok(Timestamp(row.try_get::<i64, _>(col)?))
}

/// The row `sql` selects by `$1 = key` (a primary or unique key), mapped by `map`.
async fn find_one<'e, T>(
    ex: impl AnyExecutor<'e>,
    sql: &str,
    key: &str,
    map: impl FnOnce(&AnyRow) -> Result<T>,
) -> Result<Option<T>> {
    let row = sqlx::query(sql).bind(key).fetch_optional(ex).await?;
    row.as_ref().map(map).transpose()
}

/// A nullable Unix-time column.
fn opt_ts(row: &AnyRow, col: &str) -> Result<Option<Timestamp>> {
    Ok(row.try_get::<Option<i64>, _>(col)?.map(Timestamp))
}

/// Which database a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }
}

/// Errors of the storage layer. Messages never include bound values (tokens are hashed before
/// they get here anyway).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("database URL must start with sqlite: or postgres://")]
    UnsupportedUrl,
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("a uniqueness rule of the database refused the change: {0}")]
    Conflict(String),
    #[error("stored value is malformed: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Maps unique-constraint violations to [`StoreError::Conflict`], naming the constraint.
    pub(crate) fn classify(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return StoreError::Conflict(
                    db.constraint()
                        .map_or_else(|| db.message().to_string(), str::to_string),
                );
            }
        }
        StoreError::Database(e)
    }
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A handle on the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// SQLite has one writer at a time; writers of this process queue here instead of in
    /// SQLite's busy handler, which sleeps in growing steps and inflates tail latency.
    write_queue: Option<Arc<tokio::sync::Mutex<()>>>,
    /// Where the audit trail's notifications are heard (PostgreSQL, [`notify`]).
    listen: Option<notify::ListenTarget>,
}

/// A write transaction; on SQLite it also holds this process's place in the write queue.
#[derive(Debug)]
pub struct WriteTx {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), StoreError> {
        Ok(self.tx.commit().await?)
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.tx.rollback().await?)
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

impl Store {
    /// Connects (creating a SQLite file if needed) without running migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, None).await
    }

    /// [`Store::connect`] with at most `max_connections` in the pool (8 on SQLite and 16 on
    /// PostgreSQL when `None`).
    pub async fn connect_with(url: &str, max_connections: Option<u32>) -> Result<Self, StoreError> {
        let (backend, options, pool_options) = Self::options(url, max_connections)?;
        let pool = pool_options.connect_with(options).await?;
        let mut store = Self::of_pool(pool, backend);
        if backend == Backend::Postgres {
            let options = sqlx::postgres::PgConnectOptions::from_str(url)?;
            store.listen = Some(notify::ListenTarget::new(options));
        }
        Ok(store)
    }

    /// A store on a PostgreSQL read replica: connects when first used, so a replica that is
    /// down at start does not keep the server from serving; a read waits at most a second for
    /// a connection; no migrations (a standby is read only). Never written to.
    pub fn connect_replica(url: &str, max_connections: Option<u32>) -> Result<Self, StoreError> {
        let (backend, options, pool_options) = Self::options(url, max_connections)?;
        if backend != Backend::Postgres {
            return Err(StoreError::UnsupportedUrl);
        }
        // Waiting long for a replica connection is worse than reading from the primary.
        let pool_options = pool_options.acquire_timeout(Duration::from_secs(1));
        Ok(Self::of_pool(
            pool_options.connect_lazy_with(options),
            backend,
        ))
    }

    fn options(
        url: &str,
        max_connections: Option<u32>,
    ) -> Result<(Backend, AnyConnectOptions, AnyPoolOptions), StoreError> {
        let backend = Backend::of_url(url)?;
        sqlx::any::install_default_drivers();
        let mut url = url.to_string();
        if backend == Backend::Sqlite && !url.contains("mode=") {
            url.push_str(if url.contains('?') {
                "&mode=rwc"
            } else {
                "?mode=rwc"
            });
        }
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let pool_options = AnyPoolOptions::new()
            .max_connections(max_connections.unwrap_or(if backend == Backend::Sqlite {
                8
            } else {
                16
            }))
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (the per-request revocation check) run beside the
                        // writer; busy_timeout makes concurrent writers queue instead of fail.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = FULL").await?;
                        // Destroyed secrets' ciphertext is overwritten, not left in free pages.
                        conn.execute("PRAGMA secure_delete = ON").await?;
                    }
                    Ok(())
                })
            });
        Ok((backend, options, pool_options))
    }

    fn of_pool(pool: AnyPool, backend: Backend) -> Self {
        let write_queue =
            (backend == Backend::Sqlite).then(|| Arc::new(tokio::sync::Mutex::new(())));
        Self {
            pool,
            backend,
            write_queue,
            listen: None,
        }
    }

    /// Where the audit trail's notifications are heard: PostgreSQL connected by URL.
    pub fn listen_target(&self) -> Option<&notify::ListenTarget> {
        self.listen.as_ref()
    }

    /// Begins a transaction that will write.
    pub async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        let turn = match &self.write_queue {
            Some(queue) => Some(queue.clone().lock_owned().await),
            None => None,
        };
        // On SQLite the write lock is taken at BEGIN (IMMEDIATE), waiting in busy_timeout for
        // another process's writer (an `admin` command beside `serve`): a deferred transaction
        // that read first would instead fail at its first write with "database is locked"
        // (SQLITE_BUSY_SNAPSHOT), without waiting, whenever another process wrote since its read.
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(WriteTx { tx, _turn: turn })
    }

    /// Connects and brings the schema up to date.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, None).await
    }

    /// [`Store::open`] with at most `max_connections` in the pool.
    pub async fn open_with(url: &str, max_connections: Option<u32>) -> Result<Self, StoreError> {
        let store = Self::connect_with(url, max_connections).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;

    /// Two stores on one SQLite file are two processes (`serve` and an `admin` command): a
    /// write transaction that read first must still commit when the other wrote meanwhile —
    /// the other waits for it instead.
    #[tokio::test]
    async fn writers_in_two_processes_wait_for_each_other_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("license.db").display());
        let (a, b) = (
            Store::open(&url).await.unwrap(),
            Store::open(&url).await.unwrap(),
        );
        let mut ta = a.begin_write().await.unwrap();
        clients::list(&mut *ta).await.unwrap();
        let other = tokio::spawn(async move {
            let mut tb = b.begin_write().await?;
            clients::create(&mut tb, "b", "written by the other", Timestamp::now()).await?;
            tb.commit().await
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        clients::create(&mut ta, "a", "read, then written", Timestamp::now())
            .await
            .unwrap();
        ta.commit().await.unwrap();
        other.await.unwrap().unwrap();
        assert_eq!(clients::list(a.pool()).await.unwrap().len(), 2);
    }
}
