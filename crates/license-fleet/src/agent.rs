//! Simulated agents: what each does on the wire, and a fleet of them run together.
//!
//! A round is what `license-agent` does: `GET /api/v1/secret-status`, a signed rotation and its
//! acknowledgement when the status asks for one (or the agent's own schedule does), then `GET
//! /api/v1/licenses`. A 503 `server_busy` makes it wait the `Retry-After` (with jitter), any
//! other failure a jittered backoff; a 403 (revoked) the longest backoff, as the agent does.
//!
//! In [`Mode::Watch`] each agent keeps one HTTP/2 connection with its watch stream open and
//! makes a round when a change arrives (after the random delay the event asks for) and every
//! `watch_poll_interval` otherwise; in [`Mode::Poll`] it opens a new connection (full TLS
//! handshake) for every round, every `poll_interval`. With a `renew_interval`, the agent
//! renews its certificate on that schedule (on its kept connection in watch mode, after a
//! round in poll mode) and connects again with the new certificate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use license_protocol::identity::MachineId;
use license_protocol::rotation::RotateSecretRequest;
use license_protocol::watch::{EventReader, EventType, WatchEvent};
use p256::pkcs8::DecodePrivateKey as _;
use rand::Rng as _;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::{h1_round, request, Answer, HttpError, Target, H2};
use crate::identity::{new_key_and_csr, Identity, IdentityCache};
use crate::stats::{Counters, Recorder};

/// How agents talk to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One kept HTTP/2 connection with a watch stream; rounds every `watch_poll_interval` and
    /// when a change is pushed.
    Watch,
    /// A new connection with a full handshake for every round, every `poll_interval`.
    Poll,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "watch" => Ok(Self::Watch),
            "poll" => Ok(Self::Poll),
            other => Err(format!("mode {other:?}: expected watch or poll")),
        }
    }
}

/// How one simulated machine behaves during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// Connected throughout.
    Online,
    /// Drops its connection every `flap_every` (± half) and comes back a few seconds later.
    Flapping,
    /// Switched off for the whole run (days, for the server): never connects.
    Offline,
    /// Revoked by an administrator before the run: refused, backs off.
    Revoked,
}

/// Shares of each profile in a fleet, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileMix {
    pub online: u32,
    pub flapping: u32,
    pub offline: u32,
    pub revoked: u32,
}

impl Default for ProfileMix {
    fn default() -> Self {
        Self {
            online: 100,
            flapping: 0,
            offline: 0,
            revoked: 0,
        }
    }
}

impl std::str::FromStr for ProfileMix {
    type Err = String;
    /// `online=90,flapping=5,offline=3,revoked=2` (missing ones are 0; the sum must be 100).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mix = Self {
            online: 0,
            flapping: 0,
            offline: 0,
            revoked: 0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("mix {part:?}: expected profile=percent"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("mix {part:?}: the percent is not a number"))?;
            match name.trim() {
                "online" => mix.online = value,
                "flapping" => mix.flapping = value,
                "offline" => mix.offline = value,
                "revoked" => mix.revoked = value,
                other => {
                    return Err(format!(
                        "mix: unknown profile {other:?} (online, flapping, offline, revoked)"
                    ))
                }
            }
        }
        let sum = mix.online + mix.flapping + mix.offline + mix.revoked;
        if sum != 100 {
            return Err(format!("mix: the percents add up to {sum}, not 100"));
        }
        Ok(mix)
    }
}

impl ProfileMix {
    /// The profile of machine `index` of `count`: revoked ones first, then offline, flapping,
    /// online (so the revoked are a known prefix of the identity list).
    pub fn profile(&self, index: usize, count: usize) -> Profile {
        let count = count.max(1) as u64;
        let at = |percent: u32| count * u64::from(percent) / 100;
        let i = index as u64;
        let revoked = at(self.revoked);
        let offline = revoked + at(self.offline);
        let flapping = offline + at(self.flapping);
        if i < revoked {
            Profile::Revoked
        } else if i < offline {
            Profile::Offline
        } else if i < flapping {
            Profile::Flapping
        } else {
            Profile::Online
        }
    }

    /// How many of `count` machines are revoked (the first ones).
    pub fn revoked_count(&self, count: usize) -> usize {
        count * self.revoked as usize / 100
    }
}

/// A fleet run's settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Where agents connect, round robin (a load balancer is one target).
    pub targets: Vec<Target>,
    pub mode: Mode,
    pub poll_interval: Duration,
    pub watch_poll_interval: Duration,
    /// Rotate on this schedule too (each agent at a random phase); `None`: only when asked.
    pub rotation_interval: Option<Duration>,
    /// Renew the machine certificate on this schedule (a new key and CSR, `POST
    /// /api/v1/renew-certificate`, then a new connection with the new certificate); `None`:
    /// never (a real agent renews at two thirds of a certificate's life: not within a run).
    pub renew_interval: Option<Duration>,
    /// Where renewed identities are written (appended: the cache reads a machine's last).
    pub cache: Option<IdentityCache>,
    /// New agents started per second while the fleet ramps up.
    pub connect_rate: u32,
    pub flap_every: Duration,
    pub mix: ProfileMix,
}

/// A running fleet.
#[derive(Debug)]
pub struct Fleet {
    pub recorder: Arc<Recorder>,
    connected: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Agents whose watch stream is open now.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` watch streams are open, or `timeout`; answers how many are.
    pub async fn wait_connected(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.connected() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.connected()
    }

    /// Stops every agent and waits for them.
    pub async fn stop(self) -> Arc<Recorder> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.recorder
    }
}

/// Starts one simulated agent per identity (profiles from `config.mix`, by position).
pub fn run_fleet(identities: Vec<Identity>, config: FleetConfig) -> Fleet {
    let recorder = Arc::new(Recorder::default());
    let connected = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = watch::channel(false);
    let count = identities.len();
    let config = Arc::new(config);
    let tasks = identities
        .into_iter()
        .enumerate()
        .map(|(index, identity)| {
            let agent = SimAgent {
                profile: config.mix.profile(index, count),
                target: config.targets[index % config.targets.len().max(1)].clone(),
                start_after: Duration::from_secs_f64(
                    index as f64 / f64::from(config.connect_rate.max(1)),
                ),
                identity,
                config: config.clone(),
                recorder: recorder.clone(),
                connected: connected.clone(),
                version: 0,
                phased: false,
                asked: false,
                licenses_fetched: None,
                stopped: stopped.clone(),
            };
            tokio::spawn(agent.run())
        })
        .collect();
    Fleet {
        recorder,
        connected,
        stop,
        tasks,
    }
}

/// Why a round ended early.
enum RoundError {
    /// 503: come back after this many seconds.
    Busy(Option<u64>),
    /// 403: revoked.
    Refused,
    /// Another answer, or the connection.
    Failed,
}

struct SimAgent {
    identity: Identity,
    profile: Profile,
    target: Target,
    start_after: Duration,
    config: Arc<FleetConfig>,
    recorder: Arc<Recorder>,
    connected: Arc<AtomicUsize>,
    /// The secret version held.
    version: u64,
    /// Whether the rounds after the first have been put at this agent's own phase.
    phased: bool,
    /// The stream asked for a round (a change, a resync) not made yet.
    asked: bool,
    /// When the licenses were last fetched on the current connection's stream.
    licenses_fetched: Option<Instant>,
    stopped: watch::Receiver<bool>,
}

/// While the stream is held, a round fetches the licenses only when asked, after a rotation,
/// on a new stream, or this long after the last fetch: as the agent does
/// (`license_agent::engine::decide::licenses_refresh_due`).
const LICENSES_REFRESH: Duration = Duration::from_secs(6 * 3600);

/// Whether a schedule of `every` (none: never) is due since `last`; if so, `last` is now.
fn due(every: Option<Duration>, last: &mut Instant) -> bool {
    match every {
        Some(every) if last.elapsed() >= every => {
            *last = Instant::now();
            true
        }
        _ => false,
    }
}

/// A random time between half of `d` and all of it.
fn jitter(d: Duration) -> Duration {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(2);
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

impl SimAgent {
    fn counters(&self) -> &Counters {
        &self.recorder.counters
    }

    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            _ = self.stopped.changed() => false,
        }
    }

    async fn run(mut self) {
        if self.profile == Profile::Offline || !self.sleep(self.start_after).await {
            return;
        }
        match self.config.mode {
            Mode::Poll => self.poll().await,
            Mode::Watch => self.watch().await,
        }
    }

    /// The wait after a failed round.
    fn after_failure(&self, error: &RoundError, failures: u32) -> Duration {
        match error {
            RoundError::Busy(retry) => jitter(Duration::from_secs(retry.unwrap_or(30)))
                .max(Duration::from_secs(retry.unwrap_or(1))),
            RoundError::Refused => jitter(Duration::from_secs(300)),
            RoundError::Failed => jitter(Duration::from_secs((1u64 << failures.min(8)).min(300))),
        }
    }

    fn answer_ok(
        &self,
        route: &'static str,
        answer: &Answer,
        took: Duration,
    ) -> Result<(), RoundError> {
        self.recorder.latency(route, took);
        match answer.status {
            200..=299 => Ok(()),
            503 => {
                Counters::add(&self.counters().shed);
                Err(RoundError::Busy(answer.retry_after))
            }
            403 => {
                Counters::add(&self.counters().refused);
                Err(RoundError::Refused)
            }
            _ => {
                Counters::add(&self.counters().http_errors);
                Err(RoundError::Failed)
            }
        }
    }

    fn transport(&self, _e: &HttpError) -> RoundError {
        Counters::add(&self.counters().transport_errors);
        RoundError::Failed
    }

    fn rotate_request(&self) -> Option<Vec<u8>> {
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&self.identity.key_pem).ok()?;
        let id: MachineId = self.identity.machine_id.parse().ok()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let req = RotateSecretRequest::new_signed(&key, id, self.version, i64::try_from(now).ok()?);
        serde_json::to_vec(&req).ok()
    }

    /// Whether the status asks for a rotation (or this agent's own schedule does).
    fn must_rotate(status: &Value, scheduled: bool) -> bool {
        scheduled
            || status["rotation_requested"].as_bool() == Some(true)
            || status["pending_version"].is_u64()
            || status["current_version"].is_null()
    }

    /// One round on a kept HTTP/2 connection; answers the status's watch cursor.
    async fn round_h2(
        &mut self,
        conn: &mut H2,
        scheduled_rotation: bool,
    ) -> Result<Option<i64>, RoundError> {
        let call =
            |conn: &mut H2, method: &'static str, path: &'static str, body: Option<Vec<u8>>| {
                let req = request(method, &self.target.uri(path), body);
                let mut conn = conn.clone();
                async move {
                    let started = Instant::now();
                    let answer = conn.call(req).await;
                    (answer, started.elapsed())
                }
            };
        let (answer, took) = call(conn, "GET", "/api/v1/secret-status", None).await;
        let answer = answer.map_err(|e| self.transport(&e))?;
        self.answer_ok("secret-status", &answer, took)?;
        let status: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let rotated = Self::must_rotate(&status, scheduled_rotation);
        if rotated {
            let Some(body) = self.rotate_request() else {
                return Err(RoundError::Failed);
            };
            let (answer, took) = call(conn, "POST", "/api/v1/rotate-secret", Some(body)).await;
            let answer = answer.map_err(|e| self.transport(&e))?;
            self.answer_ok("rotate-secret", &answer, took)?;
            let rotated: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            let version = rotated["secret_version"]
                .as_u64()
                .ok_or(RoundError::Failed)?;
            let ack = json!({"secret_version": version}).to_string().into_bytes();
            let (answer, took) = call(conn, "POST", "/api/v1/rotate-secret/ack", Some(ack)).await;
            let answer = answer.map_err(|e| self.transport(&e))?;
            self.answer_ok("rotate-secret/ack", &answer, took)?;
            self.version = version;
            Counters::add(&self.counters().rotations);
        }
        let stale = self
            .licenses_fetched
            .is_none_or(|at| at.elapsed() >= LICENSES_REFRESH);
        if self.asked || rotated || stale {
            let (answer, took) = call(conn, "GET", "/api/v1/licenses", None).await;
            let answer = answer.map_err(|e| self.transport(&e))?;
            self.answer_ok("licenses", &answer, took)?;
            self.licenses_fetched = Some(Instant::now());
        }
        self.asked = false;
        Ok(status["watch_cursor"].as_i64())
    }

    /// A renewal request: the new key (PEM) and the request's body.
    fn renewal_request() -> Option<(String, Vec<u8>)> {
        let (key_pem, csr) = new_key_and_csr().ok()?;
        Some((key_pem, json!({ "csr": csr }).to_string().into_bytes()))
    }

    /// Takes the renewed certificate on (and writes it to the cache): the old one is
    /// superseded from now on.
    fn renewed(&mut self, key_pem: String, answer: &Answer) -> Result<(), RoundError> {
        let renewed: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let certificate = renewed["certificate"].as_str().ok_or(RoundError::Failed)?;
        self.identity.certificate_pem = certificate.to_string();
        self.identity.key_pem = key_pem;
        if let Some(cache) = &self.config.cache {
            // A renewal the cache misses leaves the next run with a superseded certificate.
            if cache.append(std::slice::from_ref(&self.identity)).is_err() {
                Counters::add(&self.counters().cache_errors);
            }
        }
        Counters::add(&self.counters().renewals);
        Ok(())
    }

    /// A renewal on the kept connection (watch mode).
    async fn renew_h2(&mut self, conn: &mut H2) -> Result<(), RoundError> {
        let (key_pem, body) = Self::renewal_request().ok_or(RoundError::Failed)?;
        let req = request(
            "POST",
            &self.target.uri("/api/v1/renew-certificate"),
            Some(body),
        );
        let started = Instant::now();
        let answer = conn.call(req).await.map_err(|e| self.transport(&e))?;
        self.answer_ok("renew-certificate", &answer, started.elapsed())?;
        self.renewed(key_pem, &answer)
    }

    /// POST `body` to `path` on a connection of its own (poll mode), counted, its answer
    /// checked and timed as `route`.
    async fn post_h1(
        &mut self,
        tls: &Arc<rustls::ClientConfig>,
        route: &'static str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Answer, RoundError> {
        Counters::add(&self.counters().connections);
        let req = request("POST", &self.target.uri(path), Some(body));
        let mut answers = h1_round(&self.target, tls.clone(), vec![req])
            .await
            .map_err(|e| self.transport(&e))?;
        let (answer, took) = answers.remove(0);
        self.answer_ok(route, &answer, took)?;
        Ok(answer)
    }

    /// A renewal on a connection of its own (poll mode).
    async fn renew_h1(&mut self, tls: &Arc<rustls::ClientConfig>) -> Result<(), RoundError> {
        let (key_pem, body) = Self::renewal_request().ok_or(RoundError::Failed)?;
        let answer = self
            .post_h1(tls, "renew-certificate", "/api/v1/renew-certificate", body)
            .await?;
        self.renewed(key_pem, &answer)
    }

    /// The TLS client configuration of the machine's current certificate.
    fn tls(&self, alpn: &[u8], resume: bool) -> Option<Arc<rustls::ClientConfig>> {
        self.target
            .client_config(
                &self.identity.certificate_pem,
                &self.identity.key_pem,
                alpn,
                resume,
            )
            .ok()
    }

    fn rotation_due(&self, last: &mut Instant) -> bool {
        due(self.config.rotation_interval, last)
    }

    /// [`Mode::Poll`]: a new connection per round.
    async fn poll(mut self) {
        let Some(mut tls) = self.tls(b"http/1.1", false) else {
            Counters::add(&self.counters().transport_errors);
            return;
        };
        let mut failures = 0;
        let mut last_rotation = Instant::now();
        let mut last_renewal = Instant::now();
        // Each agent at its own phase of the interval.
        let phase = rand::thread_rng().gen_range(Duration::ZERO..=self.config.poll_interval);
        if !self.sleep(phase).await {
            return;
        }
        loop {
            let scheduled = self.rotation_due(&mut last_rotation);
            let requests = vec![
                request("GET", &self.target.uri("/api/v1/secret-status"), None),
                request("GET", &self.target.uri("/api/v1/licenses"), None),
            ];
            Counters::add(&self.counters().connections);
            let result = match h1_round(&self.target, tls.clone(), requests).await {
                Ok(answers) => {
                    let mut result = Ok(());
                    let mut status = Value::Null;
                    for ((answer, took), route) in answers.iter().zip(["secret-status", "licenses"])
                    {
                        if let Err(e) = self.answer_ok(route, answer, *took) {
                            result = Err(e);
                            break;
                        }
                        if route == "secret-status" {
                            status = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                        }
                    }
                    if result.is_ok() && Self::must_rotate(&status, scheduled) {
                        result = self.rotate_h1(&tls).await;
                    }
                    if result.is_ok() && due(self.config.renew_interval, &mut last_renewal) {
                        result = self.renew_h1(&tls).await;
                        match self.tls(b"http/1.1", false) {
                            Some(renewed) => tls = renewed,
                            None => result = Err(RoundError::Failed),
                        }
                    }
                    result
                }
                Err(e) => Err(self.transport(&e)),
            };
            let wait = match result {
                Ok(()) => {
                    failures = 0;
                    Counters::add(&self.counters().rounds_ok);
                    self.config.poll_interval
                }
                Err(e) => {
                    failures += 1;
                    Counters::add(&self.counters().rounds_failed);
                    self.after_failure(&e, failures)
                }
            };
            if !self.sleep(wait).await {
                return;
            }
        }
    }

    /// A rotation and its acknowledgement on a connection of their own (poll mode).
    async fn rotate_h1(&mut self, tls: &Arc<rustls::ClientConfig>) -> Result<(), RoundError> {
        let body = self.rotate_request().ok_or(RoundError::Failed)?;
        let answer = self
            .post_h1(tls, "rotate-secret", "/api/v1/rotate-secret", body)
            .await?;
        let rotated: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let version = rotated["secret_version"]
            .as_u64()
            .ok_or(RoundError::Failed)?;
        let ack = json!({"secret_version": version}).to_string().into_bytes();
        self.post_h1(tls, "rotate-secret/ack", "/api/v1/rotate-secret/ack", ack)
            .await?;
        self.version = version;
        Counters::add(&self.counters().rotations);
        Ok(())
    }

    /// [`Mode::Watch`]: one kept connection, its watch stream, rounds when told and on
    /// schedule.
    async fn watch(mut self) {
        let Some(mut tls) = self.tls(b"h2", true) else {
            Counters::add(&self.counters().transport_errors);
            return;
        };
        let mut failures = 0u32;
        let mut cursor: Option<i64> = None;
        let mut last_rotation = Instant::now();
        let mut last_renewal = Instant::now();
        // The first round at start, as the agent's first tick.
        let mut next_round = Instant::now();
        loop {
            Counters::add(&self.counters().connections);
            // A new stream: what was pushed while none was held is not known.
            self.licenses_fetched = None;
            let mut conn = match H2::connect(&self.target, tls.clone()).await {
                Ok(conn) => conn,
                Err(e) => {
                    failures += 1;
                    let error = self.transport(&e);
                    let wait = self.after_failure(&error, failures);
                    if !self.sleep(wait).await {
                        return;
                    }
                    continue;
                }
            };
            let flap_at = (self.profile == Profile::Flapping)
                .then(|| Instant::now() + jitter(self.config.flap_every));
            match self
                .hold(
                    &mut conn,
                    &mut cursor,
                    &mut next_round,
                    (&mut last_rotation, &mut last_renewal),
                    flap_at,
                )
                .await
            {
                Held::Stopped => return,
                Held::Renewed => {
                    // A new connection with the new certificate: the old one is superseded.
                    failures = 0;
                    let Some(renewed) = self.tls(b"h2", true) else {
                        Counters::add(&self.counters().transport_errors);
                        return;
                    };
                    tls = renewed;
                }
                Held::Flapped => {
                    failures = 0;
                    if !self.sleep(jitter(Duration::from_secs(4))).await {
                        return;
                    }
                }
                Held::Failed(error) => {
                    failures += 1;
                    let wait = self.after_failure(&error, failures);
                    // The agent, its stream lost, talks to the server at its next tick (every
                    // `poll_interval`, at its own phase).
                    let tick =
                        rand::thread_rng().gen_range(Duration::ZERO..=self.config.poll_interval);
                    next_round = next_round.min(Instant::now() + wait + tick);
                    if !self.sleep(wait).await {
                        return;
                    }
                }
            }
        }
    }

    /// Holds the watch stream on `conn` (reopening it when the server ends it) and makes the
    /// rounds, until the connection fails, the agent flaps or the run stops.
    async fn hold(
        &mut self,
        conn: &mut H2,
        cursor: &mut Option<i64>,
        next_round: &mut Instant,
        (last_rotation, last_renewal): (&mut Instant, &mut Instant),
        flap_at: Option<Instant>,
    ) -> Held {
        let flap = async {
            match flap_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(flap);
        loop {
            let path = match cursor {
                Some(c) => format!("/api/v1/watch?since={c}"),
                None => "/api/v1/watch".to_string(),
            };
            let response = match conn
                .open(request("GET", &self.target.uri(&path), None))
                .await
            {
                Ok(response) => response,
                Err(e) => return Held::Failed(self.transport(&e)),
            };
            let status = response.status().as_u16();
            if status != 200 {
                let answer = Answer {
                    status,
                    retry_after: response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    body: Default::default(),
                };
                return Held::Failed(
                    self.answer_ok("watch (open)", &answer, Duration::ZERO)
                        .err()
                        .unwrap_or(RoundError::Failed),
                );
            }
            Counters::add(&self.counters().watches);
            let mut body = response.into_body();
            let mut reader = EventReader::new();
            let mut counted = false;
            let ended = loop {
                let round_at = tokio::time::sleep_until((*next_round).into());
                let renew_due = self
                    .config
                    .renew_interval
                    .map(|every| *last_renewal + every);
                let renew_at = async move {
                    match renew_due {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = self.stopped.changed() => {
                        if counted { self.connected.fetch_sub(1, Ordering::Relaxed); }
                        return Held::Stopped;
                    }
                    () = &mut flap => {
                        if counted { self.connected.fetch_sub(1, Ordering::Relaxed); }
                        return Held::Flapped;
                    }
                    () = renew_at => {
                        *last_renewal = Instant::now();
                        if counted { self.connected.fetch_sub(1, Ordering::Relaxed); }
                        return match self.renew_h2(conn).await {
                            Ok(()) => Held::Renewed,
                            Err(e) => Held::Failed(e),
                        };
                    }
                    () = round_at => {
                        let scheduled = self.rotation_due(last_rotation);
                        match self.round_h2(conn, scheduled).await {
                            Ok(c) => {
                                if let Some(c) = c { *cursor = Some(cursor.map_or(c, |old| old.max(c))); }
                                Counters::add(&self.counters().rounds_ok);
                                // After its first round, each agent at its own phase of the
                                // interval, as in a fleet whose tills started at any time.
                                let interval = self.config.watch_poll_interval;
                                let wait = if std::mem::replace(&mut self.phased, true) {
                                    interval
                                } else {
                                    rand::thread_rng().gen_range(Duration::ZERO..=interval)
                                };
                                *next_round = Instant::now() + wait;
                            }
                            Err(e) => {
                                Counters::add(&self.counters().rounds_failed);
                                *next_round = Instant::now() + self.after_failure(&e, 1);
                            }
                        }
                    }
                    frame = body.frame() => {
                        let events = match frame {
                            Some(Ok(frame)) => match frame.into_data() {
                                Ok(data) => reader.push(&data).unwrap_or_default(),
                                Err(_) => Vec::new(),
                            },
                            Some(Err(_)) => break false,
                            None => break true,
                        };
                        for event in events {
                            self.event(&event, cursor, next_round, &mut counted);
                        }
                    }
                }
            };
            if counted {
                self.connected.fetch_sub(1, Ordering::Relaxed);
            }
            if !ended || !conn.is_open() {
                Counters::add(&self.counters().transport_errors);
                return Held::Failed(RoundError::Failed);
            }
            // Ended by the server (its `watch_max_secs`): reopened on the same connection.
        }
    }

    fn event(
        &mut self,
        event: &WatchEvent,
        cursor: &mut Option<i64>,
        next_round: &mut Instant,
        counted: &mut bool,
    ) {
        *cursor = Some(cursor.map_or(event.cursor, |c| c.max(event.cursor)));
        if !*counted {
            *counted = true;
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        match event.event {
            EventType::Change | EventType::Resync => {
                let kind = event.kind.map_or(
                    if event.event == EventType::Resync {
                        "resync"
                    } else {
                        "other"
                    },
                    |k| k.as_str(),
                );
                self.recorder.delivered(&self.identity.machine_id, kind);
                let spread = u64::from(event.spread_secs) * 1000;
                let delay = Duration::from_millis(rand::thread_rng().gen_range(0..=spread));
                *next_round = (*next_round).min(Instant::now() + delay);
                self.asked = true;
            }
            EventType::Hello | EventType::Ping => {}
        }
    }
}

/// How holding a connection ended.
enum Held {
    Stopped,
    /// The certificate was renewed: connect again with the new one.
    Renewed,
    Flapped,
    Failed(RoundError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_parses_and_assigns_profiles_by_position() {
        let mix: ProfileMix = "online=90,flapping=5,offline=3,revoked=2".parse().unwrap();
        let profiles: Vec<Profile> = (0..100).map(|i| mix.profile(i, 100)).collect();
        let count = |p| profiles.iter().filter(|&&q| q == p).count();
        assert_eq!(
            (
                count(Profile::Revoked),
                count(Profile::Offline),
                count(Profile::Flapping),
                count(Profile::Online)
            ),
            (2, 3, 5, 90)
        );
        assert_eq!(profiles[0], Profile::Revoked, "the revoked come first");
        assert_eq!(mix.revoked_count(1000), 20);
        assert!("online=50"
            .parse::<ProfileMix>()
            .unwrap_err()
            .contains("50"));
        assert!("sleepy=100"
            .parse::<ProfileMix>()
            .unwrap_err()
            .contains("sleepy"));
        assert!("online=x".parse::<ProfileMix>().is_err());
        assert_eq!("poll".parse::<Mode>(), Ok(Mode::Poll));
        assert!("push".parse::<Mode>().is_err());
    }

    #[test]
    fn a_status_asks_for_a_rotation_when_the_server_or_the_schedule_says_so() {
        let quiet =
            json!({"current_version": 3, "rotation_requested": false, "pending_version": null});
        assert!(!SimAgent::must_rotate(&quiet, false));
        assert!(SimAgent::must_rotate(&quiet, true));
        assert!(SimAgent::must_rotate(
            &json!({"current_version": 3, "rotation_requested": true}),
            false
        ));
        assert!(SimAgent::must_rotate(
            &json!({"current_version": 3, "pending_version": 4}),
            false
        ));
        assert!(
            SimAgent::must_rotate(&json!({"current_version": null}), false),
            "first secret"
        );
    }
}
