//! Ten years in the life of a small fleet (issue "the fleet lives for ten years"): a real
//! server and agents with real lifetimes (365-day machine certificates, a 730-day server
//! certificate), every process restarted under libfaketime at each step as if switched off in
//! between. Through every step the tills (file store and TPM) renew their certificates by
//! themselves, one till is switched off for 600 days and comes back by itself, the server's
//! certificate renews itself with the same key (the pins hold), the master key rolls over, the
//! license signing key rolls over and the old one is retired as compromised (its token then
//! answers `key_retired`), the TLS key is announced and switched, the CA rolls over and the old
//! one retires once every till has moved, and a POS client's license validates after every
//! round. Every admin command runs at the date of the step.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::tpm_support::Swtpm;
use common::{faketime, reason, wait_until, Agent, Server};

const WAIT: Duration = Duration::from_secs(60);

fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The till's certificate, as the agent reads it.
fn certificate(agent: &Agent) -> license_agent::engine::renewal::Certificate {
    license_agent::engine::renewal::Certificate::read(&agent.dir.join("client.pem")).unwrap()
}

/// Waits until `agent` has talked to the server at this step, holds a certificate valid at
/// `now` and a token for `license` under its newest secret, one still valid at `now` (the
/// agent saves its state during the round, before its rotation: the newest secret can still
/// be the one that expired while it was off), then checks that it validates.
fn check_till(agent: &Agent, license: &str, now: i64, step: &str) {
    wait_until(
        &format!("{step}: a round with a valid certificate"),
        WAIT,
        || {
            agent.state()["server_time"]
                .as_i64()
                .is_some_and(|t| t >= now - 60)
                && certificate(agent).not_after > now
        },
    );
    let mut token = None;
    wait_until(
        &format!("{step}: a token under the newest secret"),
        WAIT,
        || {
            let newest = agent.state()["secrets"]
                .as_array()
                .and_then(|secrets| secrets.last().cloned())
                .filter(|secret| secret["valid_until"].as_i64().is_some_and(|u| u > now))
                .and_then(|secret| secret["version"].as_u64());
            token = agent
                .token(license)
                .filter(|t| newest.is_some() && decode_version(t) == newest);
            token.is_some()
        },
    );
    let v = agent.validate(&token.unwrap());
    assert!(v.valid, "{step}: {:?}\n{}", v.reason, agent.log());
}

/// The secret version in a token's clear header.
fn decode_version(token: &str) -> Option<u64> {
    license_protocol::token::decode(token)
        .ok()
        .map(|(h, _)| h.secret_version)
}

#[test]
fn a_fleet_through_ten_years_renews_everything_by_itself() {
    let root = tempfile::tempdir().unwrap();
    // Secrets of 30 days with a week of grace, as a production server might issue.
    let mut server = Server::start(root.path(), 30 * 86_400, 7 * 86_400);
    let pin = server.pin.clone();
    // One till keeps its key in a TPM (its swtpm runs on real time throughout).
    let swtpm = Swtpm::start(&root.path().join("south-tpm"));
    // (kept running for the whole test: the till's key lives in it)
    let tcti = swtpm.tcti();
    let mut tills: Vec<(Agent, String)> = [
        ("north", Vec::new()),
        ("south", vec!["--tpm", tcti.as_str()]),
        ("storeroom", Vec::new()),
    ]
    .into_iter()
    .map(|(name, extra)| {
        let agent = Agent::enroll_with(&server, root.path(), name, 86_400, &extra, |_| {});
        let license = server.issue_license(&agent.machine_id, "pos.sale", &[]);
        (agent, license)
    })
    .collect();
    let start = license_agent::platform::clock::system_now();
    let mut pin = pin;
    let mut old_pin = None;
    let mut serials = Vec::new();
    let (mut old_key, mut new_key, mut old_token): (
        Option<String>,
        Option<String>,
        Option<String>,
    ) = (None, None, None);
    // Every 150 days for ten years (certificates of 365 days renew at about day 210-245 of
    // their life, so at every other step); the storeroom till is off from day 900 to day 1500.
    for day in (0..=3_650).step_by(150) {
        let step = format!("day {day}");
        let offset = faketime(&format!("+{day}d"));
        let now = start + day * 86_400;
        // Everything is switched off, then on again at the new date.
        for (agent, _) in tills.iter_mut() {
            if agent.is_running() {
                assert_eq!(agent.stop().code(), Some(0), "{step}");
            }
        }
        server.kill();
        server.resume_with_env(&env(&offset));
        assert_eq!(
            server.pin, pin,
            "{step}: the server's key, hence the agents' pin, holds"
        );
        let admin = |args: &[&str]| server.admin_with_env(args, &env(&offset));
        // Year three: the master key rolls over online.
        if day == 1_200 {
            let rotated = admin(&["keys", "rotate-master"]);
            assert_eq!(rotated["new_key_id"], "k2", "{rotated}");
        }
        // Years six and seven: the TLS key is announced, then switched to; year seven: the CA
        // rolls over; year nine, once every till has renewed under the new CA, the old one
        // retires. Serving processes restart after each step, as the ceremony says.
        let mut restart = false;
        if day == 2_400 {
            admin(&["keys", "rotate-tls"]);
            restart = true;
        }
        if day == 2_550 {
            let switched = admin(&["keys", "switch-tls"]);
            old_pin = Some(pin.clone());
            pin = switched["server_pin"].as_str().unwrap().to_string();
            restart = true;
        }
        if day == 2_700 {
            admin(&["keys", "rotate-ca"]);
            restart = true;
        }
        if day == 3_300 {
            let status = admin(&["keys", "status"]);
            assert_eq!(
                status["previous_ca"]["certificates_needing_it"], 0,
                "{step}: every till renewed under the new CA: {status}"
            );
            admin(&["keys", "retire-ca"]);
            restart = true;
        }
        if restart {
            server.kill();
            server.resume_with_env(&env(&offset));
            assert_eq!(server.pin, pin, "{step}");
        }
        // Year five and again half a year later: the license signing key rolls over; year six:
        // the second key is retired as compromised, and a token it signed stops validating.
        if day == 1_800 || day == 1_950 {
            let rotated = server.admin(&["keys", "rotate-license"]);
            old_key = rotated["old_key_id"].as_str().map(str::to_string);
            new_key = rotated["new_key_id"].as_str().map(str::to_string);
        }
        if day == 2_100 {
            let old = old_key.as_deref().expect("rotated at day 1950");
            server.admin(&["keys", "retire-license", old]);
        }
        for (i, (agent, license)) in tills.iter_mut().enumerate() {
            if i == 2 && (1_000..1_500).contains(&day) {
                continue; // in the storeroom
            }
            agent.start(&env(&offset));
            check_till(agent, license, now, &step);
        }
        if day == 1_800 {
            // A token signed by the key rotated in today (format 2 names it), once the server
            // has picked the key up.
            let key_of = |t: &str| {
                license_protocol::token::decode(t)
                    .ok()
                    .and_then(|(h, _)| h.key_id)
                    .map(|k| k.to_string())
            };
            wait_until("a token under the new license key", WAIT, || {
                old_token = tills[0].0.token(&tills[0].1);
                old_token.as_deref().and_then(key_of) == new_key
            });
        }
        if day >= 2_100 {
            let north = &tills[0].0;
            let token = old_token.as_deref().expect("saved at day 1800");
            let mut last = None;
            let refused = (0..300).any(|_| {
                last = reason(&north.validate(token));
                let done = last.as_deref() == Some("key_retired");
                if !done {
                    std::thread::sleep(Duration::from_millis(100));
                }
                done
            });
            assert!(
                refused,
                "{step}: the retired key's token answered {last:?} (its key: {:?})\n{}",
                license_protocol::token::decode(token)
                    .map(|(h, _)| h.key_id.map(|k| k.to_string())),
                north.log()
            );
        }
        serials.push(certificate(&tills[0].0).serial);
    }
    // The end: every till trusts the new TLS key only and the new CA only, and holds a
    // certificate it issued.
    let ca = std::fs::read_to_string(server.dir.join("ca.pem")).unwrap();
    let ca_subject = {
        let (_, p) = x509_parser::pem::parse_x509_pem(ca.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
        c.subject().to_string()
    };
    for (agent, _) in &tills {
        let trust: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(agent.dir.join("state/server-trust.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(trust["pins"], serde_json::json!([pin]), "{trust}");
        assert_eq!(
            trust["retired_pins"],
            serde_json::json!([old_pin.clone().unwrap()])
        );
        assert_eq!(trust["cas"].as_array().unwrap().len(), 1, "{trust}");
        let pem = std::fs::read_to_string(agent.dir.join("client.pem")).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
        assert_eq!(c.issuer().to_string(), ca_subject);
    }
    serials.dedup();
    assert!(
        serials.len() >= 11,
        "a till renews about every 300 days: {serials:?}"
    );
    // The storeroom till came back after 600 days off, its certificate long expired.
    let back = std::fs::read_to_string(tills[2].0.dir.join("log/audit.log")).unwrap();
    assert!(
        back.contains("\"was_expired\":true"),
        "the storeroom till renewed after expiry"
    );
}
