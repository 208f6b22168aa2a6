//! The engine's decisions, pure: each is computed from what the engine knows and the time,
//! with no I/O, so that it can be unit-tested with a made-up clock. The engine
//! ([`super::Engine`]) gathers the inputs, asks here, and carries out the answer.

use std::collections::BTreeSet;
use std::time::Duration;

use license_protocol::agent_api::SecretStatus;
use license_protocol::identity::MachineId;
use license_protocol::mgmt::DegradedSwitch;
use license_protocol::secret::SecretDates;
use rand::Rng;

use crate::config::DegradedPolicy;
use crate::platform::clock::MAX_SKEW_SECS;

/// Failed rounds in a row at which an alert is raised (seed §7.2).
pub const ALERT_AFTER_FAILURES: u32 = 3;
/// Degraded mode lasting this long raises an alert (seed §7.2).
pub const DEGRADED_ALERT_SECS: i64 = 24 * 3600;
/// Longest wait between attempts after failures.
pub const MAX_BACKOFF_SECS: u64 = 300;

/// Where the engine stands with the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Link {
    /// The last round reached the server (or failed while no rotation was overdue).
    #[default]
    Online,
    /// Degraded mode: the server was unreachable while a rotation was overdue, since `since`;
    /// `alerted` once the 24-hour alert went out.
    Degraded { since: i64, alerted: bool },
}

impl Link {
    /// From the persisted `degraded_since`.
    pub fn from_persisted(degraded_since: Option<i64>) -> Self {
        match degraded_since {
            Some(since) => Link::Degraded {
                since,
                alerted: false,
            },
            None => Link::Online,
        }
    }

    /// What is persisted as `degraded_since`.
    pub fn degraded_since(self) -> Option<i64> {
        match self {
            Link::Online => None,
            Link::Degraded { since, .. } => Some(since),
        }
    }
}

/// An administrator's `license-agent-cli degraded on|off|auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Override {
    /// As configured.
    #[default]
    Auto,
    /// Serve offline with the secrets held and do not contact the server.
    ForcedOn,
    /// An overdue rotation with the server unreachable fails validations closed.
    Forbidden,
}

impl Override {
    /// The override `switch` asks for, or why it is refused.
    pub fn switch(
        switch: DegradedSwitch,
        configured: DegradedPolicy,
    ) -> Result<Self, &'static str> {
        match switch {
            DegradedSwitch::On if configured == DegradedPolicy::Deny => {
                Err("the configuration forbids degraded mode (agent.degraded_mode = \"deny\")")
            }
            DegradedSwitch::On => Ok(Override::ForcedOn),
            DegradedSwitch::Off => Ok(Override::Forbidden),
            DegradedSwitch::Auto => Ok(Override::Auto),
        }
    }

    /// The sentence the administrator gets back.
    pub fn describe(self) -> &'static str {
        match self {
            Override::ForcedOn => "forced on: serving offline with the secrets held",
            Override::Forbidden => {
                "forbidden: an overdue rotation with the server unreachable fails validations"
            }
            Override::Auto => "automatic, as configured",
        }
    }

    /// The degraded-mode policy validations follow.
    pub fn policy(self, configured: DegradedPolicy) -> DegradedPolicy {
        match self {
            Override::Auto => configured,
            Override::ForcedOn => DegradedPolicy::Allow,
            Override::Forbidden => DegradedPolicy::Deny,
        }
    }

    /// Whether validations are served in degraded mode.
    pub fn degraded(self, link: Link) -> bool {
        self == Override::ForcedOn || matches!(link, Link::Degraded { .. })
    }
}

/// Whether a rotation is due on our own schedule, or because the newest secret is about to
/// leave ACTIVE (the server's validity may be shorter than our interval): within a tenth of
/// its life.
pub fn rotation_due(next_due: Option<i64>, newest: Option<SecretDates>, now: i64) -> bool {
    let expiring =
        newest.is_some_and(|d| d.valid_until - now <= ((d.valid_until - d.valid_from) / 10).max(1));
    next_due.is_none_or(|t| now >= t) || expiring
}

/// Whether this round rotates: nothing held yet, due, asked by the server (forced rotation,
/// a pending version to finish), or the server knows a newer version than we hold.
pub fn must_rotate(held: Option<u64>, due: bool, status: &SecretStatus) -> bool {
    let server_ahead = status
        .current_version
        .is_some_and(|v| held.is_none_or(|held| v > held));
    held.is_none()
        || due
        || status.rotation_requested
        || status.pending_version.is_some()
        || server_ahead
}

/// When the next rotation is due: `interval` from now, ± a tenth of it so a fleet installed
/// together does not rotate together.
pub fn next_due(now: i64, interval: u64, rng: &mut impl Rng) -> i64 {
    let interval = i64::try_from(interval).unwrap_or(i64::MAX / 4);
    let jitter = if interval >= 10 {
        rng.gen_range(-(interval / 10)..=interval / 10)
    } else {
        0
    };
    now + interval + jitter
}

/// Wait before the next round after `failures` failed rounds in a row: exponential, at most
/// [`MAX_BACKOFF_SECS`] and four poll intervals, at least a second.
pub fn backoff(failures: u32, poll_interval: u64) -> Duration {
    let exponential = 1u64 << failures.min(16);
    Duration::from_secs(
        exponential
            .min(MAX_BACKOFF_SECS)
            .min(poll_interval.max(1) * 4)
            .max(1),
    )
}

/// Wait before the next round after `failures` failed rounds in a row: [`backoff`] with
/// jitter (between half of it and all of it, so a fleet that failed together does not come
/// back together), and never less than the server's `Retry-After` when it shed the request.
pub fn retry_wait(
    failures: u32,
    poll_interval: u64,
    retry_after: Option<u64>,
    rng: &mut impl Rng,
) -> Duration {
    let base = u64::try_from(backoff(failures, poll_interval).as_millis()).unwrap_or(u64::MAX);
    let jittered = rng.gen_range(base / 2..=base).max(1_000);
    let floor = retry_after.unwrap_or(0).saturating_mul(1_000);
    Duration::from_millis(jittered.max(floor))
}

/// When a machine renews a certificate valid from `not_before` to `not_after`: at 2/3 of its
/// life, brought forward by up to a tenth of the life by a jitter fixed per machine (so a
/// fleet enrolled together does not renew together, and a machine does not drift between
/// restarts).
pub fn renewal_at(not_before: i64, not_after: i64, machine: &MachineId) -> i64 {
    let life = (not_after - not_before).max(0);
    let bytes = machine.0.as_bytes();
    let spread = u64::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let jitter =
        i64::try_from(u64::try_from(life / 10).unwrap_or(0) * spread / u64::from(u16::MAX))
            .unwrap_or(0);
    not_before + life * 2 / 3 - jitter
}

/// Whether to renew now: a renewal was left half done, or its time has come. Its time does
/// not come again within a tenth of the certificate's life after a renewal succeeded (at
/// `renewed_at`), even when the new certificate is already past 2/3 (very short lifetimes, a
/// far-off clock): one request per renewal, never one per round — unless the certificate has
/// expired (a retry can hand back an already expired certificate).
pub fn renewal_due(
    pending: bool,
    (not_before, not_after): (i64, i64),
    machine: &MachineId,
    renewed_at: Option<i64>,
    now: i64,
) -> bool {
    if pending {
        return true;
    }
    // …unless it has expired: then renewing is the only way back.
    let settling =
        now < not_after && renewed_at.is_some_and(|t| now < t + (not_after - not_before) / 10);
    !settling && now >= renewal_at(not_before, not_after, machine)
}

/// What a failed round changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterFailure {
    pub link: Link,
    /// Degraded mode starts now.
    pub entered_degraded: bool,
    /// Degraded mode has lasted [`DEGRADED_ALERT_SECS`]: alert (once).
    pub alert_degraded: bool,
    /// [`ALERT_AFTER_FAILURES`] reached: alert.
    pub alert_failures: bool,
}

/// After a failed round: degraded mode when the server was unreachable (rather than answering
/// wrong) and a rotation is overdue.
pub fn after_failure(
    link: Link,
    failures: u32,
    unreachable: bool,
    overdue: bool,
    now: i64,
) -> AfterFailure {
    let alert_failures = failures >= ALERT_AFTER_FAILURES;
    if !(unreachable && overdue) {
        return AfterFailure {
            link,
            entered_degraded: false,
            alert_degraded: false,
            alert_failures,
        };
    }
    let (since, alerted, entered) = match link {
        Link::Online => (now, false, true),
        Link::Degraded { since, alerted } => (since, alerted, false),
    };
    let alert_degraded = !alerted && now - since >= DEGRADED_ALERT_SECS;
    AfterFailure {
        link: Link::Degraded {
            since,
            alerted: alerted || alert_degraded,
        },
        entered_degraded: entered,
        alert_degraded,
        alert_failures,
    }
}

/// Why a held version is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doom {
    /// Past its `grace_until`: its tokens now answer `expired`.
    PastGrace,
    /// Invalidated: its tokens answer `secret_invalidated`.
    Invalidated,
}

/// The held versions to destroy now, and why. Invalidated versions go at once (the server or
/// an administrator said so). A version past its grace goes only by *attested* time — the
/// server's clock at the last contact plus the time elapsed since, `None` before any contact —
/// never by the local clock alone: destruction cannot be undone, and a local clock jumped
/// forward (bad RTC, spoofed NTP) must not wipe the secrets. Until then validations refuse its
/// tokens as `expired` by local time anyway.
pub fn doomed(
    versions: impl Iterator<Item = (u64, SecretDates)>,
    invalidated: &BTreeSet<u64>,
    attested_now: Option<i64>,
) -> Vec<(u64, Doom)> {
    versions
        .filter_map(|(v, d)| {
            if invalidated.contains(&v) {
                Some((v, Doom::Invalidated))
            } else if attested_now.is_some_and(|now| now > d.grace_until) {
                Some((v, Doom::PastGrace))
            } else {
                None
            }
        })
        .collect()
}

/// How far the local clock is ahead of the server's, when it is beyond ordinary drift.
pub fn clock_ahead_of_server(local: i64, server: i64) -> Option<i64> {
    (local - server > MAX_SKEW_SECS).then_some(local - server)
}

/// The version to alert about when the newest secret has left ACTIVE with nothing newer
/// (`Some(0)` when every secret is gone after having had one).
pub fn expired_without_replacement(
    newest: Option<(u64, SecretDates)>,
    ever_rotated: bool,
    now: i64,
) -> Option<u64> {
    match newest {
        Some((version, d)) if now > d.valid_until => Some(version),
        None if ever_rotated => Some(0),
        _ => None,
    }
}

/// While the watch stream is held, the licenses are fetched again at least this often
/// (seconds), whatever the stream said.
pub const LICENSES_REFRESH_SECS: i64 = 6 * 3600;

/// Whether a round fetches the machine's licenses (`GET /api/v1/licenses`): always while
/// polling; while the watch stream is held, when the server asked for the round (a change, a
/// resync), after a rotation (the tokens follow the newest version), when none was fetched
/// since the stream was opened (`last` is cleared then), or when the last fetch is
/// [`LICENSES_REFRESH_SECS`] old. A license issued or revoked is pushed (`licenses_changed`),
/// so the rounds a held stream leaves quiet have nothing to fetch.
pub fn licenses_refresh_due(
    watching: bool,
    asked: bool,
    rotated: bool,
    last: Option<i64>,
    now: i64,
) -> bool {
    !watching
        || asked
        || rotated
        || last.is_none_or(|at| now.saturating_sub(at) >= LICENSES_REFRESH_SECS || now < at)
}

/// A health report unchanged this long is sent again (the server's "last report" stays fresh).
pub const HEALTH_REPORT_REFRESH_SECS: i64 = 86_400;

/// Whether to send `report`: nothing accepted yet, something changed, or the last one is a day
/// old.
pub fn health_report_due(
    last: Option<&(license_protocol::agent_api::HealthReport, i64)>,
    report: &license_protocol::agent_api::HealthReport,
    now: i64,
) -> bool {
    match last {
        None => true,
        Some((sent, at)) => sent != report || now - at >= HEALTH_REPORT_REFRESH_SECS,
    }
}

/// The window in which half the audit log's kept files rotating away is abnormal.
pub const AUDIT_FLOOD_WINDOW_SECS: i64 = 86_400;

/// Watches the audit log's rotations: entries arriving fast enough to rotate half the kept
/// history away within [`AUDIT_FLOOD_WINDOW_SECS`] are someone flushing it (a local user
/// knocking on the sockets, a runaway client), not a till's ordinary day.
#[derive(Debug, Default)]
pub struct AuditFloodWatch {
    /// When each rotation in the window was seen.
    seen: std::collections::VecDeque<i64>,
    /// The writer's rotation count last observed.
    count: u64,
    /// When the last alert was raised (one per window).
    alerted_at: Option<i64>,
}

impl AuditFloodWatch {
    /// Takes the writer's rotation count at `now` with `keep_files` kept; returns the number of
    /// rotations within the window when it reaches half of `keep_files` (at least 2), once
    /// per window.
    pub fn observe(&mut self, count: u64, keep_files: u32, now: i64) -> Option<usize> {
        for _ in self.count..count {
            self.seen.push_back(now);
        }
        self.count = self.count.max(count);
        while self
            .seen
            .front()
            .is_some_and(|&t| now - t >= AUDIT_FLOOD_WINDOW_SECS)
        {
            self.seen.pop_front();
        }
        let threshold = (keep_files as usize).div_ceil(2).max(2);
        let quiet = self
            .alerted_at
            .is_none_or(|t| now - t >= AUDIT_FLOOD_WINDOW_SECS);
        (self.seen.len() >= threshold && quiet).then(|| {
            self.alerted_at = Some(now);
            self.seen.len()
        })
    }
}

/// A held version's phase (seed §4.1) as status and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Active,
    Grace,
    /// Invalidated or past its grace, not yet destroyed.
    Gone,
}

impl Phase {
    /// The newest version is ACTIVE until its `valid_until`; any other is in GRACE until its
    /// `grace_until`.
    pub fn of(
        version: u64,
        dates: &SecretDates,
        newest: Option<u64>,
        invalidated: bool,
        now: i64,
    ) -> Self {
        if invalidated || now > dates.grace_until {
            Phase::Gone
        } else if Some(version) == newest && now <= dates.valid_until {
            Phase::Active
        } else {
            Phase::Grace
        }
    }
}

/// A TPM clock reading against the last one: while the TPM has not been reset, wall time
/// cannot be earlier than the last reading's wall time plus how far the TPM clock advanced.
pub fn tpm_time_floor(
    previous: Option<(u32, u64, i64)>,
    reset_count: u32,
    clock_ms: u64,
) -> Option<i64> {
    let (reset, last_ms, wall) = previous?;
    (reset == reset_count && clock_ms >= last_ms)
        .then(|| wall + i64::try_from((clock_ms - last_ms) / 1000).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn licenses_are_fetched_when_they_may_have_changed() {
        let (t, day) = (1_000_000, LICENSES_REFRESH_SECS);
        // Polling: every round.
        assert!(licenses_refresh_due(false, false, false, Some(t), t));
        // Held stream: asked, rotated, never fetched since it opened, or stale.
        assert!(licenses_refresh_due(true, true, false, Some(t), t));
        assert!(licenses_refresh_due(true, false, true, Some(t), t));
        assert!(licenses_refresh_due(true, false, false, None, t));
        assert!(licenses_refresh_due(true, false, false, Some(t), t + day));
        // A clock that went back does not keep the last fetch fresh.
        assert!(licenses_refresh_due(true, false, false, Some(t), t - 1));
        // Otherwise, a quiet round fetches nothing.
        assert!(!licenses_refresh_due(
            true,
            false,
            false,
            Some(t),
            t + day - 1
        ));
    }

    fn dates(from: i64, until: i64, grace: i64) -> SecretDates {
        SecretDates {
            valid_from: from,
            valid_until: until,
            grace_until: grace,
        }
    }

    fn status() -> SecretStatus {
        serde_json::from_value(serde_json::json!({
            "client_id": "550e8400-e29b-41d4-a716-446655440000",
            "machine_id": "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
            "current_version": 3,
            "state": "active",
            "certificate_expires_at": "2030-01-01T00:00:00Z",
        }))
        .expect("a status")
    }

    #[test]
    fn rotation_is_due_on_schedule_or_before_the_secret_leaves_active() {
        let d = dates(0, 1_000, 2_000);
        assert!(rotation_due(None, Some(d), 10), "never scheduled");
        assert!(!rotation_due(Some(500), Some(d), 499));
        assert!(rotation_due(Some(500), Some(d), 500));
        // Within a tenth of its life (100 s) of valid_until, even if not scheduled yet.
        assert!(!rotation_due(Some(5_000), Some(d), 899));
        assert!(rotation_due(Some(5_000), Some(d), 900));
        assert!(!rotation_due(Some(5_000), None, 900));
    }

    #[test]
    fn what_makes_a_round_rotate() {
        let mut s = status();
        assert!(must_rotate(None, false, &s), "nothing held");
        assert!(!must_rotate(Some(3), false, &s));
        assert!(must_rotate(Some(3), true, &s), "due");
        assert!(must_rotate(Some(2), false, &s), "server ahead");
        s.rotation_requested = true;
        assert!(must_rotate(Some(3), false, &s), "forced");
        s.rotation_requested = false;
        s.pending_version = Some(4);
        assert!(must_rotate(Some(3), false, &s), "pending to finish");
    }

    #[test]
    fn next_rotation_is_jittered_within_a_tenth() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let dues: Vec<i64> = (0..200).map(|_| next_due(1_000, 3_600, &mut rng)).collect();
        assert!(dues
            .iter()
            .all(|d| (1_000 + 3_240..=1_000 + 3_960).contains(d)));
        assert!(dues.iter().any(|d| *d != dues[0]), "jittered");
        assert_eq!(next_due(1_000, 5, &mut rng), 1_005, "no jitter under 10 s");
    }

    #[test]
    fn retries_are_spread_and_honour_retry_after() {
        let mut rng = rand::thread_rng();
        let waits: std::collections::BTreeSet<u128> = (0..500)
            .map(|_| retry_wait(5, 60, None, &mut rng).as_millis())
            .collect();
        // backoff(5) is 32 s: drawn between 16 s and 32 s.
        assert!(*waits.first().unwrap() >= 16_000 && *waits.last().unwrap() <= 32_000);
        assert!(waits.len() > 50, "spread: {} values", waits.len());
        assert_eq!(retry_wait(0, 60, None, &mut rng), Duration::from_secs(1));
        assert!(retry_wait(1, 60, Some(25), &mut rng) >= Duration::from_secs(25));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let secs = |f| backoff(f, 60).as_secs();
        assert_eq!([secs(0), secs(1), secs(2), secs(5)], [1, 2, 4, 32]);
        assert_eq!(secs(8), 240, "four poll intervals");
        assert_eq!(backoff(30, 3_600).as_secs(), MAX_BACKOFF_SECS);
        assert_eq!(backoff(3, 0).as_secs(), 4, "poll interval 0 counts as 1 s");
    }

    #[test]
    fn degraded_mode_starts_only_when_unreachable_and_overdue_and_alerts_once_after_a_day() {
        // A server answering wrong is no reason to serve degraded.
        let a = after_failure(Link::Online, 1, false, true, 100);
        assert_eq!(a.link, Link::Online);
        // Unreachable but nothing overdue: still online.
        assert_eq!(
            after_failure(Link::Online, 1, true, false, 100).link,
            Link::Online
        );
        let a = after_failure(Link::Online, 1, true, true, 100);
        assert!(a.entered_degraded && !a.alert_degraded && !a.alert_failures);
        let a = after_failure(a.link, 3, true, true, 100 + DEGRADED_ALERT_SECS - 1);
        assert!(!a.entered_degraded && !a.alert_degraded && a.alert_failures);
        let a = after_failure(a.link, 4, true, true, 100 + DEGRADED_ALERT_SECS);
        assert!(a.alert_degraded);
        assert_eq!(
            a.link,
            Link::Degraded {
                since: 100,
                alerted: true
            }
        );
        let a = after_failure(a.link, 5, true, true, 100 + 2 * DEGRADED_ALERT_SECS);
        assert!(!a.alert_degraded, "once");
        assert_eq!(
            Link::from_persisted(a.link.degraded_since()).degraded_since(),
            Some(100)
        );
    }

    #[test]
    fn overrides() {
        use DegradedPolicy::{Allow, Deny};
        assert!(Override::switch(DegradedSwitch::On, Deny).is_err());
        assert_eq!(
            Override::switch(DegradedSwitch::On, Allow),
            Ok(Override::ForcedOn)
        );
        assert_eq!(
            Override::switch(DegradedSwitch::Off, Allow),
            Ok(Override::Forbidden)
        );
        assert_eq!(Override::Auto.policy(Deny), Deny);
        assert_eq!(Override::ForcedOn.policy(Deny), Allow);
        assert_eq!(Override::Forbidden.policy(Allow), Deny);
        assert!(Override::ForcedOn.degraded(Link::Online));
        assert!(Override::Auto.degraded(Link::Degraded {
            since: 0,
            alerted: false
        }));
        assert!(!Override::Forbidden.degraded(Link::Online));
    }

    #[test]
    fn what_is_destroyed_and_why() {
        let versions = [
            (1, dates(0, 10, 20)),
            (2, dates(10, 30, 40)),
            (3, dates(30, 50, 60)),
        ];
        let invalidated = BTreeSet::from([3]);
        assert_eq!(
            doomed(versions.into_iter(), &invalidated, Some(25)),
            vec![(1, Doom::PastGrace), (3, Doom::Invalidated)]
        );
        assert_eq!(
            doomed(versions.into_iter(), &BTreeSet::new(), Some(20)),
            vec![],
            "grace_until itself still serves"
        );
        // Without time attested by the server, nothing is destroyed for age.
        assert_eq!(
            doomed(versions.into_iter(), &invalidated, None),
            vec![(3, Doom::Invalidated)]
        );
        let edge = 1_000 + MAX_SKEW_SECS;
        assert_eq!(clock_ahead_of_server(edge, 1_000), None);
        assert_eq!(
            clock_ahead_of_server(edge + 1, 1_000),
            Some(MAX_SKEW_SECS + 1)
        );
        assert_eq!(
            clock_ahead_of_server(0, 1_000),
            None,
            "behind is the floor's business"
        );
    }

    #[test]
    fn expiry_alert_and_phases() {
        let d = dates(0, 100, 200);
        assert_eq!(expired_without_replacement(Some((4, d)), true, 100), None);
        assert_eq!(
            expired_without_replacement(Some((4, d)), true, 101),
            Some(4)
        );
        assert_eq!(expired_without_replacement(None, true, 0), Some(0));
        assert_eq!(expired_without_replacement(None, false, 0), None);
        assert_eq!(Phase::of(4, &d, Some(4), false, 100), Phase::Active);
        assert_eq!(Phase::of(4, &d, Some(4), false, 101), Phase::Grace);
        assert_eq!(Phase::of(3, &d, Some(4), false, 50), Phase::Grace);
        assert_eq!(Phase::of(4, &d, Some(4), false, 201), Phase::Gone);
        assert_eq!(Phase::of(4, &d, Some(4), true, 50), Phase::Gone);
    }

    #[test]
    fn renewal_at_two_thirds_less_a_stable_per_machine_jitter() {
        let life = 365 * 86_400;
        let mut ats = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let machine = MachineId::new_random();
            let at = renewal_at(0, life, &machine);
            assert!(
                (life * 2 / 3 - life / 10..=life * 2 / 3).contains(&at),
                "{at}"
            );
            assert_eq!(at, renewal_at(0, life, &machine), "stable for a machine");
            ats.insert(at);
        }
        assert!(ats.len() > 150, "spread over the fleet");
        let machine = MachineId::new_random();
        let validity = (1_000, 1_000 + life);
        let at = renewal_at(1_000, 1_000 + life, &machine);
        assert!(!renewal_due(false, validity, &machine, None, at - 1));
        assert!(renewal_due(false, validity, &machine, None, at));
        assert!(
            renewal_due(true, validity, &machine, None, 1_000),
            "left half done"
        );
        // Long expired (a till off for a year): due at once.
        assert!(renewal_due(
            false,
            validity,
            &machine,
            None,
            1_000 + 2 * life
        ));
        // Just renewed into a certificate already past 2/3: not again for a tenth of its life.
        let renewed = Some(at);
        assert!(!renewal_due(
            false,
            validity,
            &machine,
            renewed,
            at + life / 10 - 1
        ));
        assert!(renewal_due(
            false,
            validity,
            &machine,
            renewed,
            at + life / 10
        ));
        assert!(
            renewal_due(true, validity, &machine, renewed, at),
            "half done retries"
        );
    }

    #[test]
    fn the_tpm_clock_sets_a_floor_until_the_tpm_resets() {
        assert_eq!(tpm_time_floor(None, 1, 5_000), None);
        assert_eq!(tpm_time_floor(Some((1, 5_000, 100)), 1, 65_000), Some(160));
        assert_eq!(
            tpm_time_floor(Some((1, 5_000, 100)), 2, 65_000),
            None,
            "reset"
        );
        assert_eq!(tpm_time_floor(Some((1, 5_000, 100)), 1, 4_000), None);
    }

    #[test]
    fn audit_flood_alerts_when_half_the_kept_files_rotate_within_a_day() {
        let day = AUDIT_FLOOD_WINDOW_SECS;
        // A till's ordinary pace: one rotation every few days never alerts.
        let mut watch = AuditFloodWatch::default();
        for n in 1..=20 {
            assert_eq!(watch.observe(n, 7, n as i64 * 3 * day), None);
        }
        // Four of seven within the day: alert once, with the count.
        let mut watch = AuditFloodWatch::default();
        assert_eq!(watch.observe(3, 7, 1_000), None);
        assert_eq!(watch.observe(4, 7, 2_000), Some(4));
        assert_eq!(watch.observe(6, 7, 3_000), None, "once per window");
        // A day after the alert, a flood still going alerts again; rotations out of the window
        // no longer count.
        assert_eq!(watch.observe(6, 7, 2_000 + day), None);
        assert_eq!(watch.observe(10, 7, 2_100 + day), Some(6));
        // Small retention: at least two rotations.
        let mut watch = AuditFloodWatch::default();
        assert_eq!(watch.observe(1, 1, 10), None);
        assert_eq!(watch.observe(2, 1, 20), Some(2));
    }

    #[test]
    fn health_reports_go_when_changed_or_a_day_old() {
        let report = license_protocol::agent_api::HealthReport {
            agent_version: "1".into(),
            store: "file".into(),
            tpm_enabled: false,
            tpm_available: false,
            degraded_mode: "inactive".into(),
            degraded_since: None,
            last_rotation: Some(10),
            rotation_failures: 0,
            clock_rollback_secs: None,
            audit_chain_ok: true,
            certificate_expires_at: 1_000,
            secret_version: Some(1),
        };
        assert!(health_report_due(None, &report, 0));
        let sent = (report.clone(), 100);
        assert!(!health_report_due(Some(&sent), &report, 100 + 3_600));
        assert!(health_report_due(
            Some(&sent),
            &report,
            100 + HEALTH_REPORT_REFRESH_SECS
        ));
        let mut changed = report;
        changed.rotation_failures = 1;
        assert!(health_report_due(Some(&sent), &changed, 101));
    }
}
