//! An operator's webhook: JSON payloads POSTed through a bounded queue to one background
//! worker, each delivery retried `retries` times (1 s, 2 s, 4 s … apart, at most 32 s). The
//! sender never waits on the network: a full queue refuses the payload and the caller keeps
//! its own record (the agent's audit log, the server's audit trail). HTTPS is checked against
//! the public roots (webpki-roots) with the caller's rustls crypto provider.
//!
//! The agent forwards its alerts here, the server its fleet alerts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

/// Where and how to deliver.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    /// Retries after a failed attempt.
    pub retries: u32,
    /// Time allowed for one attempt.
    pub attempt_timeout: Duration,
    /// Payloads waiting for delivery, at most.
    pub queue: usize,
}

/// The sending half; the worker stops once every clone is dropped.
#[derive(Debug, Clone)]
pub struct Webhook {
    queue: mpsc::Sender<serde_json::Value>,
}

impl Webhook {
    /// Starts the worker (inside a Tokio runtime).
    pub fn start(settings: WebhookSettings, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        let (queue, rx) = mpsc::channel(settings.queue.max(1));
        tokio::spawn(deliver(settings, provider, rx));
        Self { queue }
    }

    /// Queues `payload` without waiting; false when the queue is full (or the worker gone).
    pub fn send(&self, payload: serde_json::Value) -> bool {
        self.queue.try_send(payload).is_ok()
    }
}

async fn deliver(
    settings: WebhookSettings,
    provider: Arc<rustls::crypto::CryptoProvider>,
    mut queue: mpsc::Receiver<serde_json::Value>,
) {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let client = match tls.map_err(|e| e.to_string()).and_then(|tls| {
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(settings.attempt_timeout)
            .build()
            .map_err(|e| e.to_string())
    }) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhook client unavailable; alerts stay in the log and the audit");
            return;
        }
    };
    while let Some(payload) = queue.recv().await {
        for attempt in 0..=settings.retries {
            match client.post(&settings.url).json(&payload).send().await {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    attempt,
                    "webhook refused the alert"
                ),
                Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
            }
            if attempt < settings.retries {
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(5))).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A receiver answering each request with the next of `statuses`; yields each body.
    async fn receiver(statuses: Vec<u16>) -> (String, mpsc::Receiver<serde_json::Value>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for status in statuses {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    let n = stream.read(&mut buf).await.unwrap();
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().unwrap())
                            })
                            .unwrap();
                        if data.len() >= end + 4 + length {
                            break data[end + 4..end + 4 + length].to_vec();
                        }
                    }
                };
                tx.send(serde_json::from_slice(&body).unwrap())
                    .await
                    .unwrap();
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url, rx)
    }

    fn settings(url: String, retries: u32, queue: usize) -> WebhookSettings {
        WebhookSettings {
            url,
            retries,
            attempt_timeout: Duration::from_secs(5),
            queue,
        }
    }

    #[tokio::test]
    async fn a_refused_delivery_is_retried_then_the_next_one_sent() {
        let (url, mut received) = receiver(vec![500, 204, 204]).await;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webhook = Webhook::start(settings(url, 1, 4), provider);
        assert!(webhook.send(serde_json::json!({"n": 1})));
        assert!(webhook.send(serde_json::json!({"n": 2})));
        // The first is refused once (500), retried a second later; then the second.
        for expected in [1, 1, 2] {
            let body = received.recv().await.unwrap();
            assert_eq!(body["n"], expected);
        }
    }

    #[tokio::test]
    async fn a_full_queue_refuses_without_waiting() {
        // Nobody listens: the worker holds the first payload in its retries.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webhook = Webhook::start(settings("http://127.0.0.1:9/".into(), 5, 1), provider);
        let accepted = (0..10)
            .filter(|n| webhook.send(serde_json::json!({ "n": n })))
            .count();
        assert!(accepted < 10, "a queue of one took {accepted}");
    }
}
