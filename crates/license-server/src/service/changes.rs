//! The change feed behind `GET /api/v1/watch`: what agents must hear of at once, read from the
//! audit trail every replica shares.
//!
//! Every administrative mutation commits with its audit row (`finish_audited`), so the audit
//! trail, ordered by `seq`, already is the database's change log: the same on every replica,
//! written by the serving processes and by `admin` CLI runs alike. Each serving process reads
//! the rows past the last it has seen (one indexed range read per process, whatever the number
//! of agents) — on PostgreSQL when a commit added some (`store::notify`: at most every
//! `watch_feed_interval_ms`, and every [`QUIET_READ_INTERVAL`] regardless), elsewhere every
//! `watch_feed_interval_ms` —, turns the few actions that concern agents into [`Change`]s
//! ([`change_of`]), and hands them to the watch streams of its connections.
//!
//! Sequence numbers are taken before commit, so on PostgreSQL a row may become visible after
//! a higher one. [`Cursor`] keeps the feed's position (`cursor`: every row at or below it has
//! been seen) below such a gap until the row shows up or [`GAP_TIMEOUT`] passes (a rolled-back
//! transaction leaves its number unused for good); rows above it are read again, and handed
//! on once.
//!
//! The changes of the last [`RETAIN`] are kept, so an agent that reconnects with the cursor it
//! last saw gets what it missed, from any replica; an older cursor gets `resync`.
//!
//! The feed also notes when it saw the last write concerning each machine (any audited success
//! naming it, [`concerns_of`]; every machine for the changes that concern them all), for the
//! last [`CHANGED_RETAIN`]: a machine's reads go to the read replica only once it holds that
//! write (`service::reads`). This process's own writes are noted as they commit
//! ([`ChangeFeed::note_write`]), before the feed reads them back.
//!
//! A machine holds at most [`MAX_STREAMS_PER_MACHINE`] streams on one process at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use license_protocol::watch::ChangeKind;
use serde_json::Value;
use tokio::sync::{broadcast, Notify};
use tokio_util::task::AbortOnDropHandle;

use crate::clock::Timestamp;
use crate::store::audit;
use crate::store::notify::ListenTarget;
use crate::store::{Store, StoreError};

/// How long a missing sequence number holds the cursor back.
pub const GAP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long changes are kept for reconnecting agents.
pub const RETAIN: Duration = Duration::from_secs(15 * 60);
/// How long the instant of a machine's last write is kept: as long as the largest
/// `read_replica_max_lag_ms`, past which a replica fresh enough to be read holds it anyway.
pub const CHANGED_RETAIN: Duration = Duration::from_secs(60);
/// Rows read per poll at most.
const BATCH: i64 = 1000;
/// Changes queued per watch stream before it is told to resync.
const CHANNEL: usize = 4096;

/// One change agents must hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: i64,
    /// The machine concerned, or `None` for every machine.
    pub machine: Option<String>,
    pub kind: ChangeKind,
}

impl Change {
    /// Whether the agent of `machine` must hear of it.
    pub fn concerns(&self, machine: &str) -> bool {
        self.machine.as_deref().is_none_or(|m| m == machine)
    }
}

/// The change an audited action means for agents, if any (`outcome` = success only).
pub fn change_of(
    action: &str,
    target: Option<&str>,
    details: &Value,
) -> Option<(Option<String>, ChangeKind)> {
    let target = || target.map(str::to_string);
    let machine_in_details = || {
        details
            .get("machine_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (machine, kind) = match action {
        "machine.revoke" | "machine.delete" => (target()?, ChangeKind::MachineRevoked),
        "machine.restore" => (target()?, ChangeKind::MachineRestored),
        "machine.rotate" => (target()?, ChangeKind::RotationRequested),
        "secret.invalidate" => (target()?, ChangeKind::SecretInvalidated),
        "license.issue" | "license.revoke" => (machine_in_details()?, ChangeKind::LicensesChanged),
        "certificate.revoke" => (machine_in_details()?, ChangeKind::CertificateRevoked),
        "release.rollout" | "release.resume" | "release.pause" | "release.withdraw" => {
            return Some((None, ChangeKind::UpdateAnnounced))
        }
        // Published to some machines already (`--percent` or `--clients`); at 0 % to no one,
        // nothing to announce until its rollout.
        "release.publish" => {
            let offered = details.get("percent").and_then(Value::as_u64).unwrap_or(0) > 0
                || details
                    .get("clients")
                    .and_then(Value::as_array)
                    .is_some_and(|c| !c.is_empty());
            return offered.then_some((None, ChangeKind::UpdateAnnounced));
        }
        "keys.rotate_license"
        | "keys.retire_license"
        | "keys.rotate_tls"
        | "keys.switch_tls"
        | "keys.rotate_ca"
        | "keys.retire_ca"
        | "release.rotate_key" => return Some((None, ChangeKind::KeysChanged)),
        _ => return None,
    };
    Some((Some(machine), kind))
}

/// Whose reads an audited write may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concerns {
    /// The machines (or other ids) it names; possibly none.
    Machines(Vec<String>),
    /// Every machine (a change for every machine, [`change_of`]).
    Every,
}

/// Whose reads a successful audited action may have changed: every machine's for the changes
/// that concern them all; otherwise the ids it names — its target, `details.machine_id`, the
/// machine of a `machine:` actor. Ids that are not machines' (a client's, a license's) cost a
/// map entry and nothing else.
pub fn concerns_of(actor: &str, action: &str, target: Option<&str>, details: &Value) -> Concerns {
    if let Some((None, _)) = change_of(action, target, details) {
        return Concerns::Every;
    }
    let named = [
        target,
        details.get("machine_id").and_then(Value::as_str),
        actor.strip_prefix("machine:"),
    ];
    let mut machines: Vec<String> = named.into_iter().flatten().map(str::to_string).collect();
    machines.sort_unstable();
    machines.dedup();
    Concerns::Machines(machines)
}

/// One row of the audit trail as the feed takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub seq: i64,
    /// What agents must hear of, if anything.
    pub change: Option<Change>,
    /// Whose reads it may have changed (nobody's for a refusal).
    pub concerns: Concerns,
}

/// The feed's position over sequence numbers that may appear out of order (module docs).
#[derive(Debug, Clone)]
pub struct Cursor {
    /// Every number at or below it has been seen (or given up on).
    at: i64,
    /// Numbers seen above `at`.
    above: BTreeSet<i64>,
    /// Since when `at + 1` has been missing while a higher number was seen.
    gap_since: Option<Instant>,
}

impl Cursor {
    pub fn new(at: i64) -> Self {
        Self {
            at,
            above: BTreeSet::new(),
            gap_since: None,
        }
    }

    pub fn at(&self) -> i64 {
        self.at
    }

    /// Records `seq` as seen; answers whether it is new.
    pub fn see(&mut self, seq: i64) -> bool {
        seq > self.at && self.above.insert(seq)
    }

    /// Moves `at` over what has been seen, and over a gap older than [`GAP_TIMEOUT`].
    pub fn advance(&mut self, now: Instant) {
        loop {
            while self.above.remove(&(self.at + 1)) {
                self.at += 1;
                self.gap_since = None;
            }
            let Some(&next) = self.above.first() else {
                self.gap_since = None;
                return;
            };
            let since = *self.gap_since.get_or_insert(now);
            if now.duration_since(since) < GAP_TIMEOUT {
                return;
            }
            // Given up on: the numbers below `next` were never committed.
            self.at = next - 1;
            self.gap_since = None;
        }
    }
}

/// What a new watch stream starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backlog {
    /// The changes for the machine after the agent's cursor (possibly none).
    Replay(Vec<Change>),
    /// The feed cannot tell what the agent missed.
    Resync,
}

#[derive(Debug)]
struct FeedState {
    cursor: Cursor,
    /// Every change above `floor` (and seen) is in `kept`.
    floor: i64,
    kept: BTreeMap<i64, (Instant, Change)>,
    started: bool,
    /// When the last write concerning each machine was seen, for [`CHANGED_RETAIN`].
    changed: HashMap<String, Instant>,
    /// When the last write concerning every machine was seen (the feed's start counts: what
    /// was committed before it was not seen).
    changed_all: Option<Instant>,
    /// Watch streams open on this process, by machine (none: not listed).
    streams: HashMap<String, usize>,
}

impl FeedState {
    fn note(&mut self, concerns: &Concerns, now: Instant) {
        match concerns {
            Concerns::Every => self.changed_all = Some(now),
            Concerns::Machines(machines) => {
                for machine in machines {
                    self.changed.insert(machine.clone(), now);
                }
            }
        }
    }
}

/// Watch streams one machine may hold at once on one serving process: its agent holds one,
/// and a reconnection may overlap the end of the one before for a moment. A machine's key
/// cannot open streams without bound (each costs a task and a feed subscription).
pub const MAX_STREAMS_PER_MACHINE: usize = 4;

/// One watch stream's place among its machine's ([`ChangeFeed::take_place`]); given back on
/// drop.
#[derive(Debug)]
pub struct StreamPlace {
    feed: Arc<ChangeFeed>,
    machine: String,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let mut state = self.feed.lock();
        if let Some(held) = state.streams.get_mut(&self.machine) {
            *held -= 1;
            if *held == 0 {
                state.streams.remove(&self.machine);
            }
        }
    }
}

/// The change feed of one serving process (module docs).
#[derive(Debug)]
pub struct ChangeFeed {
    state: Mutex<FeedState>,
    sender: broadcast::Sender<Change>,
    /// Reads of the audit trail so far.
    reads: AtomicU64,
    /// Whether the feed hears the trail's notifications (`store::notify`).
    listening: AtomicBool,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeFeed {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(FeedState {
                cursor: Cursor::new(0),
                floor: 0,
                kept: BTreeMap::new(),
                started: false,
                changed: HashMap::new(),
                changed_all: None,
                streams: HashMap::new(),
            }),
            sender: broadcast::channel(CHANNEL).0,
            reads: AtomicU64::new(0),
            listening: AtomicBool::new(false),
        }
    }

    /// Reads of the audit trail so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Whether the feed hears the audit trail's notifications, rather than polling it.
    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watch streams open on this process (each holds one subscription).
    pub fn streams(&self) -> usize {
        self.sender.receiver_count()
    }

    /// A place for one more watch stream of `machine`, or `None` when it already holds
    /// [`MAX_STREAMS_PER_MACHINE`] here; the place is given back when dropped.
    pub fn take_place(self: &Arc<Self>, machine: &str) -> Option<StreamPlace> {
        let mut state = self.lock();
        let held = state.streams.entry(machine.to_string()).or_default();
        if *held >= MAX_STREAMS_PER_MACHINE {
            return None;
        }
        *held += 1;
        Some(StreamPlace {
            feed: self.clone(),
            machine: machine.to_string(),
        })
    }

    /// The feed's position: what a `since` of now means.
    pub fn cursor(&self) -> i64 {
        self.lock().cursor.at()
    }

    /// When the feed, or this process, last saw a write concerning `machine` (or every
    /// machine), if within [`CHANGED_RETAIN`]; `now` until the feed has started, as it cannot
    /// tell yet.
    pub fn last_change(&self, machine: &str, now: Instant) -> Option<Instant> {
        let state = self.lock();
        if !state.started {
            return Some(now);
        }
        state.changed.get(machine).copied().max(state.changed_all)
    }

    /// Notes a write this process just committed (after the commit), before the feed reads
    /// it back: the machines' next reads go to the primary until the replica holds it.
    pub fn note_write(&self, concerns: &Concerns) {
        self.lock().note(concerns, Instant::now());
    }

    /// [`ChangeFeed::note_write`] for one machine.
    pub fn note_machine_write(&self, machine_id: &str) {
        self.note_write(&Concerns::Machines(vec![machine_id.to_string()]));
    }

    /// A receiver of the changes from now on, and what `machine` missed since `since`.
    pub fn subscribe(
        &self,
        machine: &str,
        since: Option<i64>,
    ) -> (broadcast::Receiver<Change>, Backlog) {
        let state = self.lock();
        let receiver = self.sender.subscribe();
        let backlog = match since {
            None => Backlog::Replay(Vec::new()),
            Some(_) if !state.started => Backlog::Resync,
            Some(since) if since < state.floor => Backlog::Resync,
            Some(since) => Backlog::Replay(
                state
                    .kept
                    .range(since.saturating_add(1)..)
                    .map(|(_, (_, change))| change)
                    .filter(|change| change.concerns(machine))
                    .cloned()
                    .collect(),
            ),
        };
        (receiver, backlog)
    }

    /// Starts the feed at `seq` (the changes at or below it are not handed on), with `recent`
    /// (changes already committed, at or below `seq`) kept for reconnecting agents.
    pub fn start(&self, seq: i64, floor: i64, recent: Vec<Change>, now: Instant) {
        let mut state = self.lock();
        state.cursor = Cursor::new(seq);
        state.floor = floor;
        state.kept = recent.into_iter().map(|c| (c.seq, (now, c))).collect();
        state.started = true;
        state.changed_all = Some(now);
    }

    /// Takes in rows read from the audit trail: hands new changes on, notes whose reads they
    /// concern, moves the cursor, forgets changes older than [`RETAIN`] and writes older than
    /// [`CHANGED_RETAIN`].
    pub fn ingest(&self, rows: Vec<Row>, now: Instant) {
        let mut state = self.lock();
        for row in rows {
            if !state.cursor.see(row.seq) {
                continue;
            }
            state.note(&row.concerns, now);
            if let Some(change) = row.change {
                // No receiver is not an error: no agent is connected.
                let _ = self.sender.send(change.clone());
                state.kept.insert(row.seq, (now, change));
            }
        }
        let recent = |at: &Instant| now.saturating_duration_since(*at) < CHANGED_RETAIN;
        state.changed.retain(|_, at| recent(at));
        if !state.changed_all.as_ref().is_some_and(recent) {
            state.changed_all = None;
        }
        state.cursor.advance(now);
        while let Some(entry) = state.kept.first_entry() {
            if now.duration_since(entry.get().0) < RETAIN {
                break;
            }
            let (seq, _) = entry.remove_entry();
            state.floor = state.floor.max(seq);
        }
    }

    /// Where the next read starts.
    fn read_from(&self) -> i64 {
        self.lock().cursor.at()
    }
}

/// Rows of the audit trail as the feed takes them.
fn rows_of(events: Vec<audit::FeedRow>) -> Vec<Row> {
    events
        .into_iter()
        .map(|row| {
            if row.outcome != "success" {
                return Row {
                    seq: row.seq,
                    change: None,
                    concerns: Concerns::Machines(Vec::new()),
                };
            }
            let details = serde_json::from_str(&row.details).unwrap_or(Value::Null);
            let target = row.target.as_deref();
            let change = change_of(&row.action, target, &details).map(|(machine, kind)| Change {
                seq: row.seq,
                machine,
                kind,
            });
            Row {
                seq: row.seq,
                change,
                concerns: concerns_of(&row.actor, &row.action, target, &details),
            }
        })
        .collect()
}

/// Starts `feed` at the end of the audit trail, with the changes of the last [`RETAIN`] kept.
pub async fn start(feed: &ChangeFeed, pool: &sqlx::AnyPool) -> Result<(), StoreError> {
    let end = audit::last_seq(pool).await?;
    let since = Timestamp::now().plus_secs(-i64::try_from(RETAIN.as_secs()).unwrap_or(0));
    let first = audit::first_seq_since(pool, since)
        .await?
        .unwrap_or(end + 1);
    let mut recent = Vec::new();
    let mut from = first - 1;
    while from < end {
        let rows = audit::feed_rows(pool, from, BATCH).await?;
        let Some(last) = rows.last().map(|r| r.seq) else {
            break;
        };
        from = last;
        recent.extend(
            rows_of(rows)
                .into_iter()
                .filter_map(|row| (row.seq <= end).then_some(row.change).flatten()),
        );
    }
    feed.start(end, first - 1, recent, Instant::now());
    Ok(())
}

/// How often the feed reads the trail while it listens and hears nothing (a notification lost
/// with a dropped connection is made up for by then).
pub const QUIET_READ_INTERVAL: Duration = Duration::from_secs(5);
/// Wait before listening again after the listening connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(5);

/// Follows the audit trail until dropped (the server aborts it at shutdown): on PostgreSQL
/// when a commit added rows to it (`store::notify`; and every [`QUIET_READ_INTERVAL`]), never
/// more often than every `interval`; elsewhere, or while it cannot listen, every `interval`.
/// `keys_changed` runs before a key change is handed on, so that the agents it brings see the
/// key files as they now are (the files are read again when their stamp changed).
pub async fn follow(
    feed: std::sync::Arc<ChangeFeed>,
    store: Store,
    interval: Duration,
    keys_changed: impl Fn() + Send + 'static,
) {
    let pool = store.pool().clone();
    let wake = Arc::new(Notify::new());
    let _listener = store.listen_target().cloned().map(|target| {
        AbortOnDropHandle::new(tokio::spawn(listen(target, wake.clone(), feed.clone())))
    });
    let mut started = false;
    let mut last_read: Option<Instant> = None;
    loop {
        if let Some(last) = last_read {
            tokio::time::sleep_until((last + interval).into()).await;
            if feed.listening() {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(QUIET_READ_INTERVAL) => {}
                }
            }
        }
        last_read = Some(Instant::now());
        if !started {
            match start(&feed, &pool).await {
                Ok(()) => started = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the change feed; retrying");
                    continue;
                }
            }
        }
        loop {
            feed.reads.fetch_add(1, Ordering::Relaxed);
            match audit::feed_rows(&pool, feed.read_from(), BATCH).await {
                Ok(rows) => {
                    let full = rows.len() as i64 >= BATCH;
                    let rows = rows_of(rows);
                    let keys = rows.iter().any(|row| {
                        row.change
                            .as_ref()
                            .is_some_and(|c| c.kind == ChangeKind::KeysChanged)
                    });
                    if keys {
                        keys_changed();
                    }
                    feed.ingest(rows, Instant::now());
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the change feed; retrying");
                    break;
                }
            }
        }
    }
}

/// Listens on the audit trail's channel and wakes the feed at each notification, and
/// whenever notifications may have been missed (listening started, the connection dropped);
/// [`ChangeFeed::listening`] says whether it is.
async fn listen(target: ListenTarget, wake: Arc<Notify>, feed: Arc<ChangeFeed>) {
    let listening = &feed.listening;
    loop {
        match target.listen().await {
            Ok(mut listener) => {
                listening.store(true, Ordering::Relaxed);
                wake.notify_one();
                loop {
                    match listener.try_recv().await {
                        // A notification, or the connection dropped (it reconnects at the
                        // next call): read the trail either way.
                        Ok(_) => wake.notify_one(),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot hear the audit trail's notifications; reading it every watch_feed_interval_ms");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen to the audit trail's notifications; reading it every watch_feed_interval_ms");
            }
        }
        listening.store(false, Ordering::Relaxed);
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const M: &str = "6ba7b810-9dad-11d1-80b4-00c04fd430c8";

    fn change(seq: i64, machine: Option<&str>) -> Change {
        Change {
            seq,
            machine: machine.map(str::to_string),
            kind: ChangeKind::MachineRevoked,
        }
    }

    /// A row of the trail carrying `change` (a revocation of its machine, or of every one).
    fn row(seq: i64, change: Option<Change>) -> Row {
        let concerns = match change.as_ref().map(|c| c.machine.clone()) {
            Some(None) => Concerns::Every,
            Some(Some(machine)) => Concerns::Machines(vec![machine]),
            None => Concerns::Machines(vec![]),
        };
        Row {
            seq,
            change,
            concerns,
        }
    }

    #[test]
    fn agent_facing_actions_are_changes_and_the_rest_are_not() {
        let none = json!({});
        assert_eq!(
            change_of("machine.revoke", Some(M), &none),
            Some((Some(M.into()), ChangeKind::MachineRevoked))
        );
        assert_eq!(
            change_of("license.revoke", Some("lic"), &json!({"machine_id": M})),
            Some((Some(M.into()), ChangeKind::LicensesChanged))
        );
        assert_eq!(
            change_of("keys.rotate_ca", None, &none),
            Some((None, ChangeKind::KeysChanged))
        );
        assert_eq!(
            change_of("release.rollout", Some("r"), &none),
            Some((None, ChangeKind::UpdateAnnounced))
        );
        assert_eq!(change_of("client.create", Some("c"), &none), None);
        assert_eq!(
            change_of(
                "release.publish",
                Some("r"),
                &json!({"percent": 10, "clients": []})
            ),
            Some((None, ChangeKind::UpdateAnnounced))
        );
        assert_eq!(
            change_of(
                "release.publish",
                Some("r"),
                &json!({"percent": 0, "clients": []})
            ),
            None,
            "published to no one yet"
        );
        // A license event without its machine concerns nobody in particular: not a change.
        assert_eq!(change_of("license.issue", None, &none), None);
    }

    #[test]
    fn a_machine_holds_a_bounded_number_of_streams() {
        let feed = Arc::new(ChangeFeed::new());
        let mut places: Vec<_> = (0..MAX_STREAMS_PER_MACHINE)
            .map(|_| feed.take_place("m1").expect("a place"))
            .collect();
        assert!(feed.take_place("m1").is_none(), "one too many");
        assert!(
            feed.take_place("m2").is_some(),
            "another machine's are its own"
        );
        drop(places.pop());
        let again = feed.take_place("m1");
        assert!(again.is_some(), "a place given back is taken again");
        drop(again);
        assert_eq!(
            feed.lock().streams.get("m1"),
            Some(&(MAX_STREAMS_PER_MACHINE - 1))
        );
        drop(places);
        assert!(feed.lock().streams.is_empty(), "every place given back");
    }

    #[test]
    fn the_cursor_waits_at_a_gap_then_gives_up_on_it() {
        let t0 = Instant::now();
        let mut cursor = Cursor::new(10);
        assert!(cursor.see(11));
        assert!(cursor.see(13));
        assert!(!cursor.see(13), "seen once");
        assert!(!cursor.see(9), "at or below the cursor");
        cursor.advance(t0);
        assert_eq!(cursor.at(), 11, "12 is missing");
        cursor.advance(t0 + GAP_TIMEOUT / 2);
        assert_eq!(cursor.at(), 11);
        assert!(cursor.see(12), "late but in time");
        cursor.advance(t0 + GAP_TIMEOUT / 2);
        assert_eq!(cursor.at(), 13);
        assert!(cursor.see(16));
        cursor.advance(t0 + GAP_TIMEOUT);
        assert_eq!(cursor.at(), 13);
        cursor.advance(t0 + GAP_TIMEOUT * 2 + Duration::from_millis(1));
        assert_eq!(cursor.at(), 16, "14 and 15 were never committed");
    }

    #[test]
    fn changes_are_handed_on_once_and_replayed_to_reconnecting_agents() {
        let t0 = Instant::now();
        let feed = ChangeFeed::new();
        let (_, backlog) = feed.subscribe(M, Some(3));
        assert_eq!(backlog, Backlog::Resync, "not started yet");
        feed.start(5, 2, vec![change(4, Some(M)), change(5, Some("other"))], t0);
        let (mut rx, backlog) = feed.subscribe(M, Some(3));
        assert_eq!(backlog, Backlog::Replay(vec![change(4, Some(M))]));
        assert_eq!(
            feed.subscribe(M, Some(1)).1,
            Backlog::Resync,
            "below the floor"
        );
        assert_eq!(feed.subscribe(M, None).1, Backlog::Replay(vec![]));
        // 7 arrives before 6; both handed on once; the cursor waits for 6.
        feed.ingest(vec![row(7, Some(change(7, None)))], t0);
        assert_eq!(feed.cursor(), 5);
        feed.ingest(vec![row(6, None), row(7, Some(change(7, None)))], t0);
        assert_eq!(feed.cursor(), 7);
        assert_eq!(rx.try_recv().unwrap(), change(7, None));
        assert!(rx.try_recv().is_err(), "handed on once");
        assert_eq!(
            feed.subscribe(M, Some(5)).1,
            Backlog::Replay(vec![change(7, None)])
        );
        // Past RETAIN the kept changes go and the floor rises with them.
        feed.ingest(vec![], t0 + RETAIN);
        assert_eq!(feed.subscribe(M, Some(5)).1, Backlog::Resync);
        assert_eq!(feed.subscribe(M, Some(7)).1, Backlog::Replay(vec![]));
    }

    #[test]
    fn writes_are_attributed_to_the_machines_they_name() {
        let none = json!({});
        assert_eq!(
            concerns_of("admin:ops", "machine.revoke", Some(M), &none),
            Concerns::Machines(vec![M.into()])
        );
        assert_eq!(
            concerns_of(
                "admin:ops",
                "license.issue",
                Some("lic"),
                &json!({"machine_id": M})
            ),
            Concerns::Machines(vec![M.into(), "lic".into()])
        );
        assert_eq!(
            concerns_of(
                &format!("machine:{M}"),
                "release.report",
                Some("rel"),
                &none
            ),
            Concerns::Machines(vec![M.into(), "rel".into()])
        );
        assert_eq!(
            concerns_of(&format!("machine:{M}"), "secret.ack", Some(M), &none),
            Concerns::Machines(vec![M.into()])
        );
        assert_eq!(
            concerns_of("admin:ops", "keys.rotate_license", None, &none),
            Concerns::Every
        );
        assert_eq!(
            concerns_of("admin:ops", "client.create", None, &none),
            Concerns::Machines(vec![])
        );
    }

    #[test]
    fn the_last_write_per_machine_is_kept_for_a_minute() {
        let t0 = Instant::now();
        let feed = ChangeFeed::new();
        assert_eq!(
            feed.last_change(M, t0),
            Some(t0),
            "before the feed started it cannot tell"
        );
        feed.start(5, 0, vec![], t0);
        assert_eq!(
            feed.last_change(M, t0),
            Some(t0),
            "the start counts for every machine"
        );
        let t1 = t0 + Duration::from_secs(61);
        feed.ingest(vec![], t1);
        assert_eq!(feed.last_change(M, t1), None, "forgotten after a minute");
        let rotate = Row {
            seq: 6,
            change: None,
            concerns: concerns_of(
                &format!("machine:{M}"),
                "secret.rotate",
                Some(M),
                &json!({}),
            ),
        };
        feed.ingest(vec![rotate.clone()], t1);
        assert_eq!(feed.last_change(M, t1), Some(t1));
        assert_eq!(feed.last_change("other", t1), None);
        // Seen once: read again below a gap, it is not a new write.
        let t2 = t1 + Duration::from_secs(1);
        feed.ingest(vec![rotate], t2);
        assert_eq!(feed.last_change(M, t2), Some(t1));
        // A refusal changed nothing.
        let refused = Row {
            seq: 7,
            change: None,
            concerns: Concerns::Machines(vec![]),
        };
        feed.ingest(vec![refused], t2);
        assert_eq!(feed.last_change(M, t2), Some(t1));
        // A change for every machine concerns each one.
        let t3 = t2 + Duration::from_secs(1);
        feed.ingest(vec![row(8, Some(change(8, None)))], t3);
        assert_eq!(feed.last_change("other", t3), Some(t3));
        assert_eq!(feed.last_change(M, t3), Some(t3));
        // This process's own write counts at once, before the feed reads it back.
        let before = Instant::now();
        feed.note_machine_write("other");
        assert!(feed.lock().changed["other"] >= before);
        let t4 = t3 + CHANGED_RETAIN;
        feed.ingest(vec![], t4);
        assert_eq!(feed.last_change(M, t4), None);
    }
}
