//! The operator's webhook: fleet alerts POSTed as JSON through a bounded queue to one
//! background worker, each delivery retried (1 s, 2 s, 4 s … apart). A webhook that is down or
//! slow never delays a fleet check; a full queue drops the alert (it stays in the audit trail
//! and the log).

use std::time::Duration;

use tokio::sync::mpsc;

/// Deliveries waiting for the webhook, at most.
const QUEUE: usize = 256;
/// Time allowed for one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half; the worker stops when it is dropped.
#[derive(Debug, Clone)]
pub struct Webhook {
    queue: mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Starts the worker (inside a Tokio runtime) for `url`.
    pub fn start(url: String, retries: u32) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(url, retries, rx));
        Self { queue }
    }

    /// Queues `payload` without waiting.
    pub fn send(&self, payload: serde_json::Value) {
        if self.queue.try_send(payload).is_err() {
            tracing::warn!("webhook queue full or closed; alert not forwarded");
        }
    }
}

async fn deliver(url: String, retries: u32, mut queue: mpsc::Receiver<serde_json::Value>) {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crate::http::tls::provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let client = match tls.map_err(|e| e.to_string()).and_then(|tls| {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())
    }) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhook client unavailable; alerts stay in the audit trail and the log");
            return;
        }
    };
    while let Some(payload) = queue.recv().await {
        for attempt in 0..=retries {
            match client.post(&url).json(&payload).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    attempt,
                    "webhook refused the alert"
                ),
                Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
            }
            if attempt < retries {
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(5))).await;
            }
        }
    }
}
