//! How `license-server admin` prints results: aligned tables for people, JSON with `--json`.

use license_protocol::agent_api::LicenseToken;
use license_server::clock::Timestamp;
use license_server::service::admin::PurgeReport;
use license_server::service::keys::{
    KeysStatus, LicenseKeysReport, Progress, RotateReport, ServerTrustReport,
};
use license_server::service::releases::{ReleaseView, RotateKeyReport};
use license_server::store::audit::AuditEvent;
use license_server::store::certificates::{CertificateRecord, CertificateStats};
use license_server::store::clients::ClientRecord;
use license_server::store::install_tokens::InstallTokenRecord;
use license_server::store::licenses::LicenseRecord;
use license_server::store::machines::MachineRecord;
use license_server::store::secrets::SecretRecord;
use serde::Serialize;

pub fn json<T: Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".into())
    );
}

pub fn json_line<T: Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).unwrap_or_else(|_| "null".into())
    );
}

/// One JSON line on stderr (progress beside a JSON result on stdout).
pub fn json_line_stderr<T: Serialize + ?Sized>(value: &T) {
    eprintln!(
        "{}",
        serde_json::to_string(value).unwrap_or_else(|_| "null".into())
    );
}

/// A value that can be shown as table rows.
pub trait Render: Serialize {
    fn headers() -> &'static [&'static str];
    fn row(&self) -> Vec<String>;
}

/// Prints one value or a list, as JSON or as a table.
pub fn print<T: Printable + ?Sized>(as_json: bool, value: &T) {
    if as_json {
        json(value);
    } else {
        value.print_table();
    }
}

pub trait Printable: Serialize {
    fn print_table(&self);
}

impl<T: Render> Printable for T {
    fn print_table(&self) {
        table(T::headers(), vec![self.row()]);
    }
}

impl<T: Render> Printable for Vec<T> {
    fn print_table(&self) {
        if self.is_empty() {
            println!("(none)");
        } else {
            table(T::headers(), self.iter().map(Render::row).collect());
        }
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn opt(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".into(), |t| t.rfc3339())
}

/// A one-line confirmation.
#[derive(Serialize)]
pub struct Done(pub String);

impl Render for Done {
    fn headers() -> &'static [&'static str] {
        &["RESULT"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.0.clone()]
    }
}

impl Render for ClientRecord {
    fn headers() -> &'static [&'static str] {
        &["ID", "NAME", "CREATED"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.name.clone(),
            self.created_at.rfc3339(),
        ]
    }
}

impl Render for InstallTokenRecord {
    fn headers() -> &'static [&'static str] {
        &["ID", "CLIENT", "EXPIRES", "USED", "MACHINE"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.client_id.clone(),
            self.expires_at.rfc3339(),
            opt(self.used_at),
            self.used_by_machine.clone().unwrap_or_else(|| "-".into()),
        ]
    }
}

impl Render for MachineRecord {
    fn headers() -> &'static [&'static str] {
        &[
            "ID",
            "CLIENT",
            "HOSTNAME",
            "ARCH",
            "STATUS",
            "CERTIFICATE",
            "CERT EXPIRES",
            "ROTATION",
            "LAST SEEN",
            "HEALTH",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.client_id.clone(),
            self.hostname.clone(),
            self.arch.clone(),
            if self.revoked_at.is_some() {
                "revoked".into()
            } else {
                "enrolled".into()
            },
            self.certificate_serial
                .clone()
                .unwrap_or_else(|| "-".into()),
            opt(self.certificate_expires_at),
            if self.rotation_requested_at.is_some() {
                "requested".into()
            } else {
                "-".into()
            },
            opt(self.last_seen_at),
            self.health_summary(),
        ]
    }
}

impl Render for SecretRecord {
    fn headers() -> &'static [&'static str] {
        &[
            "VERSION",
            "STATE",
            "VALID FROM",
            "VALID UNTIL",
            "GRACE UNTIL",
            "ACKED",
            "INVALIDATED",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.version.to_string(),
            if self.destroyed {
                format!("{} (destroyed)", self.effective_state)
            } else {
                self.effective_state.clone()
            },
            self.valid_from.rfc3339(),
            self.valid_until.rfc3339(),
            self.grace_until.rfc3339(),
            opt(self.acked_at),
            opt(self.invalidated_at),
        ]
    }
}

impl Render for LicenseRecord {
    fn headers() -> &'static [&'static str] {
        &[
            "ID",
            "MACHINE",
            "STATE",
            "FEATURES",
            "NOT BEFORE",
            "EXPIRES",
            "METADATA",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.machine_id.clone(),
            self.state.clone(),
            self.features.join(","),
            self.not_before.rfc3339(),
            self.expires_at
                .map_or_else(|| "never".into(), Timestamp::rfc3339),
            self.metadata
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        ]
    }
}

/// A license token, on its own line so it can be copied.
pub fn token(t: &LicenseToken) {
    println!(
        "Token of license {} under secret version {}:",
        t.license_id, t.secret_version
    );
    println!("  {}", t.token);
}

impl Render for CertificateRecord {
    fn headers() -> &'static [&'static str] {
        &["SERIAL", "MACHINE", "STATE", "KEY", "ISSUED", "EXPIRES"]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.serial.clone(),
            self.machine_id.clone(),
            self.effective_state.clone(),
            self.key_origin.clone(),
            self.issued_at.rfc3339(),
            self.expires_at.rfc3339(),
        ]
    }
}

impl Render for CertificateStats {
    fn headers() -> &'static [&'static str] {
        &[
            "TOTAL",
            "ACTIVE",
            "EXPIRING<30D",
            "EXPIRED",
            "REVOKED",
            "SUPERSEDED",
        ]
    }
    fn row(&self) -> Vec<String> {
        [
            self.total,
            self.active,
            self.expiring_soon,
            self.expired,
            self.revoked,
            self.superseded,
        ]
        .iter()
        .map(i64::to_string)
        .collect()
    }
}

impl Render for PurgeReport {
    fn headers() -> &'static [&'static str] {
        &["PURGED"]
    }
    fn row(&self) -> Vec<String> {
        vec![self.purged.to_string()]
    }
}

impl Render for AuditEvent {
    fn headers() -> &'static [&'static str] {
        &[
            "SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAILS",
        ]
    }
    fn row(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.at.rfc3339(),
            self.actor.clone(),
            self.action.clone(),
            self.target.clone().unwrap_or_else(|| "-".into()),
            self.outcome.clone(),
            self.details.to_string(),
        ]
    }
}

/// "3 d", "5 h", "40 min", "12 s": how long ago (or ahead) `t` is from `now`.
fn span(now: Timestamp, t: Timestamp) -> String {
    let secs = (now.0 - t.0).abs();
    match secs {
        s if s >= 2 * 86_400 => format!("{} d", s / 86_400),
        s if s >= 2 * 3600 => format!("{} h", s / 3600),
        s if s >= 120 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// `admin keys rotate-tls|switch-tls|rotate-ca|retire-ca` for people.
pub fn server_trust_report(r: &ServerTrustReport) {
    println!("{}: done", r.action);
    println!("  server pin   {}", r.server_pin);
    if let Some(next) = &r.next_pin {
        println!("  next pin     {next} (announced to agents at their next poll)");
    }
    for pin in &r.retired_pins {
        println!("  retired pin  {pin}");
    }
    println!("  CA serial    {}", r.ca_serial);
    if let Some(previous) = &r.previous_ca_serial {
        println!(
            "  previous CA  {previous} (still needed by {} active machine certificates)",
            r.certificates_needing_previous_ca
        );
    }
    if r.retired_cas > 0 {
        println!("  retired CAs  {}", r.retired_cas);
    }
    println!(
        "Restart every serving process to apply it (copy server-trust.json, ca.* and server.* \
         to replicas with their own data directory first)."
    );
}

/// `admin keys status` for people.
pub fn keys_status(s: &KeysStatus) {
    let now = s.now;
    let ahead = |t: Timestamp| {
        if t >= now {
            format!("in {}", span(now, t))
        } else {
            format!("{} ago", span(now, t))
        }
    };
    println!("CA certificate");
    println!("  serial       {}", s.ca.serial);
    println!(
        "  issued       {} ({} old)",
        s.ca.not_before.rfc3339(),
        span(now, s.ca.not_before)
    );
    println!(
        "  not after    {} ({})",
        s.ca.not_after.rfc3339(),
        ahead(s.ca.not_after)
    );
    println!(
        "  signs        {} active machine certificates ({} expiring within 30 days, renewed by their agents)",
        s.ca.active_machine_certificates, s.ca.machine_certificates_expiring_soon
    );
    if let Some(p) = &s.previous_ca {
        println!("Previous CA certificate (trusted until `keys retire-ca`)");
        println!("  serial       {}", p.serial);
        println!(
            "  not after    {} ({})",
            p.not_after.rfc3339(),
            ahead(p.not_after)
        );
        println!(
            "  still needed by {} active machine certificates (they move at their next renewal)",
            p.certificates_needing_it
        );
    }
    if s.retired_cas > 0 {
        println!("Retired CAs: {}", s.retired_cas);
    }
    println!("Server TLS certificate");
    println!("  pin          {}", s.server_tls.pin);
    if let Some(next) = &s.server_tls.next_pin {
        println!("  next pin     {next} (announced; `keys switch-tls` serves it)");
    }
    for pin in &s.server_tls.retired_pins {
        println!("  retired pin  {pin}");
    }
    println!("  serial       {}", s.server_tls.serial);
    println!(
        "  issued       {} ({} old)",
        s.server_tls.not_before.rfc3339(),
        span(now, s.server_tls.not_before)
    );
    println!(
        "  not after    {} ({})",
        s.server_tls.not_after.rfc3339(),
        ahead(s.server_tls.not_after)
    );
    println!(
        "  renews at    {} ({})",
        s.server_tls.renews_at.rfc3339(),
        ahead(s.server_tls.renews_at)
    );
    println!("License signing key (current)");
    println!("  id           {}", s.license_signing_key.key_id);
    println!("  public key   {}", s.license_signing_key.public_key);
    match s.license_signing_key.created_at {
        Some(t) => println!("  created      {} ({} old)", t.rfc3339(), span(now, t)),
        None => println!("  created      -"),
    }
    println!("License keys ({})", s.license_key_set);
    table(
        &["  ID", "STATE", "CREATED", "AGE"],
        s.license_keys
            .iter()
            .map(|k| {
                vec![
                    format!("  {}", k.id),
                    k.state.clone(),
                    k.created_at.rfc3339(),
                    span(now, k.created_at),
                ]
            })
            .collect(),
    );
    println!("Master keys ({})", s.master_key_set);
    let rows: Vec<Vec<String>> = s
        .master_keys
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.state.clone(),
                k.created_at.rfc3339(),
                span(now, k.created_at),
                k.rows.to_string(),
                if k.held_here { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    table(
        &["  ID", "STATE", "CREATED", "AGE", "SECRETS", "HELD HERE"],
        rows.into_iter()
            .map(|mut r| {
                r[0] = format!("  {}", r[0]);
                r
            })
            .collect(),
    );
    println!("Serving processes (heard from in the last 30 s)");
    if s.serving_processes.is_empty() {
        println!("  (none)");
    }
    for h in &s.serving_processes {
        println!("  {}  holds {}", h.description, h.key_ids.join(", "));
    }
}

/// The outcome of `admin keys rotate-license` or `retire-license`, for people.
pub fn license_keys_report(r: &LicenseKeysReport) {
    match r.new_key_id {
        Some(new) => println!(
            "License key rotated: {new} is current; {} is previous (its tokens keep validating).",
            r.old_key_id
        ),
        None => println!(
            "License key {} retired: its tokens answer key_retired on every agent that has heard of it.",
            r.old_key_id
        ),
    }
    for k in &r.keys {
        println!(
            "  {}  {:<8}  created {}",
            k.id,
            k.state,
            k.created_at.rfc3339()
        );
    }
    println!("Key set: {} (digest {})", r.key_set, r.digest);
    println!("Replicas with their own data directory: copy it there (docs/OPERATIONS.md).");
}

/// One step of `admin keys rotate-master`, for people.
pub fn rotate_progress(p: &Progress) {
    match p {
        Progress::Resumed { key } => println!("Resuming the rollover to master key {key}"),
        Progress::Staged { key, key_set } => {
            println!("Staged master key {key} in {key_set}")
        }
        Progress::Waiting { key, holders } => println!(
            "Waiting for serving processes to hold {key}: {}",
            holders.join("; ")
        ),
        Progress::Current { key, previous } => println!(
            "{key} is current: new secrets are sealed under it (previous: {})",
            if previous.is_empty() {
                "-".to_string()
            } else {
                previous.join(", ")
            }
        ),
        Progress::Batch { done, total } => println!("  re-encrypted {done}/{total} secrets"),
    }
}

/// The outcome of `admin keys rotate-master`, for people.
pub fn rotate_report(r: &RotateReport) {
    println!(
        "Master key rollover to {} complete: {} secrets re-encrypted by this run, {} under {} now",
        r.new_key_id, r.reencrypted, r.rows_under_new_key, r.new_key_id
    );
    if !r.retired.is_empty() {
        println!(
            "  retired {} (removed from {})",
            r.retired.join(", "),
            r.key_set
        );
    }
    if !r.kept.is_empty() {
        println!("  kept {} (--keep-old)", r.kept.join(", "));
    }
}

impl Render for ReleaseView {
    fn headers() -> &'static [&'static str] {
        &[
            "ID",
            "VERSION",
            "CHANNEL",
            "ARCH",
            "STATE",
            "PERCENT",
            "CLIENTS",
            "PUBLISHED",
            "SIZE",
            "OK",
            "FAILED",
            "REFUSED",
        ]
    }
    fn row(&self) -> Vec<String> {
        let state = match &self.halted_reason {
            Some(reason) => format!("{} ({reason})", self.state.as_str()),
            None => self.state.as_str().to_string(),
        };
        vec![
            self.id.clone(),
            self.version.clone(),
            self.channel.clone(),
            self.arch.clone(),
            state,
            format!("{}%", self.percent),
            if self.clients.is_empty() {
                "-".into()
            } else {
                self.clients.join(",")
            },
            self.published_at.rfc3339(),
            self.size.to_string(),
            self.reports.success.to_string(),
            self.reports.failed.to_string(),
            self.reports.refused.to_string(),
        ]
    }
}

/// `admin release show`: every field, one per line.
pub fn release(r: &ReleaseView) {
    println!("Release {}", r.id);
    println!("  version              {}", r.version);
    println!("  channel              {}", r.channel);
    println!("  arch                 {}", r.arch);
    println!("  state                {}", r.state.as_str());
    if let Some(reason) = &r.halted_reason {
        println!("  halted because       {reason}");
    }
    println!("  percent              {}%", r.percent);
    println!(
        "  clients              {}",
        if r.clients.is_empty() {
            "-".to_string()
        } else {
            r.clients.join(", ")
        }
    );
    println!("  published            {}", r.published_at.rfc3339());
    println!("  size                 {} bytes", r.size);
    println!("  sha256               {}", r.sha256);
    println!(
        "  min version          {}",
        r.min_version.as_deref().unwrap_or("-")
    );
    println!(
        "  rollback             {}",
        if r.rollback { "yes" } else { "no" }
    );
    println!("  signed by            release key {}", r.key_id);
    println!("  halt after failures  {}", r.halt_after_failures);
    println!(
        "  reports              {} success, {} failed, {} refused",
        r.reports.success, r.reports.failed, r.reports.refused
    );
}

/// `admin release rotate-key`.
pub fn release_key_rotated(r: &RotateKeyReport) {
    println!(
        "Release key {} is current; {} is retired.",
        r.new_key_id, r.retired_key_id
    );
    println!(
        "Re-signed {} release manifest(s) with the new key; agents learn the new key set with their next offer.",
        r.resigned.len()
    );
}
