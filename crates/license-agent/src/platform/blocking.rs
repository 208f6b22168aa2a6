//! Blocking calls from async code: TPM commands (milliseconds each on a real chip), fsyncs of
//! the secret store and state file, audit appends that wait for their fsync. Run on a runtime
//! worker they would stall every connection scheduled on it, so they go through here.

/// Runs `f` on Tokio's blocking pool and waits for it without holding a worker. A panic in `f`
/// resumes in the caller.
pub async fn run<T, F>(f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Only a runtime that is shutting down cancels a blocking task; nothing awaits
            // this future then.
            Err(e) => panic!("blocking task did not run: {e}"),
        },
    }
}

/// Runs `f` where the caller cannot be async (a TLS handshake signing with a TPM key): on a
/// multi-threaded runtime the worker hands its other tasks to the rest of the pool first; on a
/// current-thread runtime (one-shot commands, nothing else to serve) or outside one it just runs.
pub fn in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_off_the_worker_and_returns_the_value() {
        let worker = std::thread::current().id();
        let ran_on = run(|| std::thread::current().id()).await;
        assert_ne!(ran_on, worker);
        assert_eq!(in_place(|| 7), 7);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn in_place_on_a_current_thread_runtime() {
        assert_eq!(in_place(|| 8), 8);
    }
}
