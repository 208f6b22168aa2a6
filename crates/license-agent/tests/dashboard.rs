//! The vendor's dashboard driving real agents (issue "the vendor's fleet console"): signed in
//! with an admin token, an administrator issues a license from a machine's page and the
//! machine's agent fetches it and validates it for the till; revoking the machine from the
//! page makes the agent refuse. HTTP by curl, as a browser would send the forms (session
//! cookie, the page's CSRF token); the browser itself is exercised by the server's dashboard
//! test.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{reason, wait_until, Agent, Server};

const WAIT: Duration = Duration::from_secs(60);

/// The CSRF token of a dashboard page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no CSRF token in:\n{page}"));
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// POSTs a dashboard form (with the session in `jar`) and follows nothing: the answer is a
/// redirect back to the page.
fn post(server: &Server, jar: &Path, path: &str, fields: &[(&str, &str)]) {
    let admin = server.admin_url();
    let mut args = vec![
        "-b".to_string(),
        jar.display().to_string(),
        "-H".to_string(),
        format!("Origin: {admin}"),
        "-o".to_string(),
        "/dev/null".to_string(),
        "-w".to_string(),
        "%{http_code}".to_string(),
    ];
    for (name, value) in fields {
        args.push("--data-urlencode".into());
        args.push(format!("{name}={value}"));
    }
    args.push(format!("{admin}{path}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(server.curl(&args), "303", "POST {path}");
}

#[test]
fn licenses_issued_and_machines_revoked_from_the_dashboard_reach_the_till() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(root.path(), 3600, 3600);
    let mut till = Agent::enroll(&server, root.path(), "till", 3600, |_| {});
    till.start(&[]);
    let token = server.admin(&["api-token", "create", "--name", "ops", "--role", "admin"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let admin = server.admin_url();
    let jar = root.path().join("cookies");
    let jar_arg = jar.to_str().unwrap();
    server.dashboard_sign_in(&token, &jar);

    // The machine's page: issue a license for it.
    let page_path = format!("/dashboard/machines/{}", till.machine_id);
    let page = server.curl(&["-b", jar_arg, &format!("{admin}{page_path}")]);
    assert!(page.contains(&till.machine_id), "{page}");
    let csrf = csrf(&page);
    post(
        &server,
        &jar,
        &format!("{page_path}/licenses"),
        &[
            ("csrf", &csrf),
            ("features", "pos.sale, pos.refund"),
            ("expires_in_days", "30"),
        ],
    );
    let licenses = server.admin(&["license", "list", "--machine", &till.machine_id]);
    let license = licenses[0]["id"].as_str().unwrap().to_string();

    // The till's agent fetches it at its next round and validates it.
    let mut license_token = None;
    wait_until("the agent fetches the license", WAIT, || {
        license_token = till.token(&license);
        license_token.is_some()
    });
    let license_token = license_token.unwrap();
    let answer = till.validate(&license_token);
    assert!(answer.valid, "{answer:?}");

    // Revoked from the page: the till refuses from the round that hears of it.
    post(
        &server,
        &jar,
        &format!("{page_path}/revoke"),
        &[("csrf", &csrf)],
    );
    let machine = server.admin(&["machine", "show", &till.machine_id]);
    assert!(machine["revoked_at"].is_string(), "not revoked: {machine}");
    wait_until(
        "the agent refuses the revoked machine's license",
        WAIT,
        || reason(&till.validate(&license_token)).as_deref() == Some("machine_revoked"),
    );
    let audit = server.admin(&["audit", "list", "--limit", "1000"]);
    for action in ["license.issue", "machine.revoke"] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == action && e["actor"] == "api:ops"),
            "{action} not audited as api:ops"
        );
    }
}
