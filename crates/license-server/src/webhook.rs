//! The operator's webhook for fleet alerts: [`license_webhook`] with the server's crypto
//! provider, a queue of 256 and 10 s per attempt. A webhook that is down or slow never delays a
//! fleet check; a full queue drops the alert (it stays in the audit trail and the log).

use std::time::Duration;

use license_webhook::{Webhook, WebhookSettings};

/// Starts the delivery worker (inside a Tokio runtime) for `url`.
pub fn start(url: String, retries: u32) -> Webhook {
    let settings = WebhookSettings {
        url,
        retries,
        attempt_timeout: Duration::from_secs(10),
        queue: 256,
    };
    Webhook::start(settings, crate::http::tls::provider())
}
