//! The transport on Windows: a byte-mode named pipe opened for overlapped I/O, so that a read
//! or write still pending when its timeout passes can be cancelled, as a socket's timeout would
//! end it.
//!
//! This module and the C ABI are the crate's only `unsafe` code: calls into kernel32 through
//! windows-sys. Every overlapped operation started here is waited for until it completes or its
//! cancellation does, before the function that started it returns, so no `OVERLAPPED` and no
//! buffer is ever left in the kernel's hands.
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::io;
use std::os::windows::ffi::OsStrExt as _;
use std::os::windows::io::{AsRawHandle as _, FromRawHandle as _, OwnedHandle};
use std::path::Path;
use std::ptr;
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::{
    GetLastError, ERROR_BROKEN_PIPE, ERROR_IO_PENDING, ERROR_NO_DATA, ERROR_OPERATION_ABORTED,
    ERROR_PIPE_BUSY, ERROR_PIPE_CONNECTED, ERROR_PIPE_NOT_CONNECTED, ERROR_SEM_TIMEOUT, FALSE,
    GENERIC_READ, GENERIC_WRITE, HANDLE, INVALID_HANDLE_VALUE, TRUE, WAIT_OBJECT_0, WAIT_TIMEOUT,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, ReadFile, WriteFile, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED,
    OPEN_EXISTING, PIPE_ACCESS_DUPLEX, SECURITY_IDENTIFICATION, SECURITY_SQOS_PRESENT,
};
use windows_sys::Win32::System::Pipes::{
    ConnectNamedPipe, CreateNamedPipeW, WaitNamedPipeW, PIPE_READMODE_BYTE,
    PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE, PIPE_UNLIMITED_INSTANCES, PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{CreateEventW, WaitForSingleObject, INFINITE};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

/// Size of each pipe instance's in and out buffers: one maximal frame (64 KiB) and its header
/// fit in without the writer waiting for the reader.
const PIPE_BUFFER_BYTES: u32 = 64 * 1024 + 4;

/// One end of a connected pipe instance.
#[derive(Debug)]
pub(super) struct Stream {
    pipe: OwnedHandle,
    /// Manual-reset event signalled when the pending operation completes (one at a time:
    /// reads and writes take `&mut self`).
    event: OwnedHandle,
    /// `None`: wait as long as it takes.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

impl Stream {
    pub(super) fn connect(
        path: &Path,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> io::Result<Self> {
        let name = wide_name(path)?;
        let deadline = Instant::now() + write_timeout;
        let pipe = loop {
            // SAFETY: `name` is a NUL-terminated UTF-16 string that outlives the call; NULL
            // security attributes (a handle not inherited) and a NULL template are allowed. The
            // SQOS flags let the agent identify this process (its SID) but not impersonate it.
            let handle = unsafe {
                CreateFileW(
                    name.as_ptr(),
                    GENERIC_READ | GENERIC_WRITE,
                    0,
                    ptr::null(),
                    OPEN_EXISTING,
                    FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                    ptr::null_mut(),
                )
            };
            if handle != INVALID_HANDLE_VALUE {
                // SAFETY: a valid handle just opened, owned by nothing else.
                break unsafe { OwnedHandle::from_raw_handle(handle) };
            }
            let err = last_error();
            if err != ERROR_PIPE_BUSY {
                return Err(io::Error::from_raw_os_error(err as i32));
            }
            // Every instance is serving another client: wait for one to free up, within the
            // deadline, then race the other waiters for it.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out("every instance of the pipe stayed busy"));
            }
            // SAFETY: `name` as above; the wait is bounded (never 0, which would mean the
            // pipe's default, nor INFINITE).
            if unsafe { WaitNamedPipeW(name.as_ptr(), wait_millis(left)) } == FALSE {
                let err = last_error();
                if err == ERROR_SEM_TIMEOUT {
                    return Err(timed_out("every instance of the pipe stayed busy"));
                }
                return Err(io::Error::from_raw_os_error(err as i32));
            }
        };
        Ok(Self {
            pipe,
            event: new_event()?,
            read_timeout: Some(read_timeout),
            write_timeout: Some(write_timeout),
        })
    }

    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = chunk_len(buf.len());
        let data = buf.as_mut_ptr();
        let result = self.overlapped(self.read_timeout, |pipe, ov| {
            // SAFETY: `pipe` and `ov` come from `overlapped`; `data` is valid for writes of
            // `len` bytes for the whole operation, because `overlapped` returns only once the
            // operation is over and `buf` stays borrowed mutably until then.
            unsafe { ReadFile(pipe, data, len, ptr::null_mut(), ov) }
        });
        match result {
            // The other end closed (or disconnected) the pipe: end of stream, as a socket's.
            Err(e) if is_closed(&e) => Ok(0),
            other => other,
        }
    }

    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = chunk_len(buf.len());
        let data = buf.as_ptr();
        let result = self.overlapped(self.write_timeout, |pipe, ov| {
            // SAFETY: as in `read`, `data` is valid for reads of `len` bytes until the operation
            // is over.
            unsafe { WriteFile(pipe, data, len, ptr::null_mut(), ov) }
        });
        result.map_err(|e| {
            if is_closed(&e) {
                io::Error::new(io::ErrorKind::BrokenPipe, e)
            } else {
                e
            }
        })
    }

    /// Starts one overlapped operation with `start` and waits for it at most `timeout`; past
    /// that it is cancelled and, once the cancellation is through, reported as `TimedOut`. An
    /// operation that completes while being cancelled counts as completed.
    fn overlapped(
        &mut self,
        timeout: Option<Duration>,
        start: impl FnOnce(HANDLE, *mut OVERLAPPED) -> i32,
    ) -> io::Result<usize> {
        let pipe = self.pipe.as_raw_handle();
        let event = self.event.as_raw_handle();
        let mut ov = OVERLAPPED {
            hEvent: event,
            ..OVERLAPPED::default()
        };
        if start(pipe, &mut ov) == FALSE {
            let err = last_error();
            if err != ERROR_IO_PENDING {
                // Failed at once: nothing is pending.
                return Err(io::Error::from_raw_os_error(err as i32));
            }
        }
        // From here on the operation may be in flight: `ov` stays where it is until
        // GetOverlappedResult below has waited for the end.
        let millis = timeout.map_or(INFINITE, wait_millis);
        // SAFETY: `event` is a live event handle owned by `self`.
        let waited = unsafe { WaitForSingleObject(event, millis) };
        if waited != WAIT_OBJECT_0 {
            // SAFETY: `pipe` is live and `ov` is the OVERLAPPED of the operation to cancel. A
            // failure means it completed meanwhile, which GetOverlappedResult reports.
            unsafe { CancelIoEx(pipe, &ov) };
        }
        let mut transferred = 0u32;
        // SAFETY: `pipe` and `ov` are the operation's; waiting (TRUE) returns only once it has
        // completed or been cancelled, after which nothing refers to `ov` or the buffer.
        let done = unsafe { GetOverlappedResult(pipe, &ov, &mut transferred, TRUE) };
        if done != FALSE {
            return Ok(transferred as usize);
        }
        let err = last_error();
        if err == ERROR_OPERATION_ABORTED && waited == WAIT_TIMEOUT {
            return Err(timed_out(
                "the pipe's other end did not keep up within the timeout",
            ));
        }
        Err(io::Error::from_raw_os_error(err as i32))
    }
}

/// The server end: creates pipe instances and waits for clients on them. One instance is
/// always listening, as a socket's backlog would be, so a client never finds the name missing
/// while the listener lives.
#[derive(Debug)]
pub(super) struct Listener {
    name: Vec<u16>,
    /// The listening instance (`None` only when making it failed after the last `accept`; the
    /// next `accept` tries again).
    listening: Option<OwnedHandle>,
}

impl Listener {
    pub(super) fn bind(path: &Path) -> io::Result<Self> {
        let name = wide_name(path)?;
        // FILE_FLAG_FIRST_PIPE_INSTANCE: Windows refuses if another process already serves the
        // name (wine 8.0 ignores the flag, so no test here can show it).
        let first = create_instance(
            &name,
            FILE_FLAG_FIRST_PIPE_INSTANCE,
            PIPE_UNLIMITED_INSTANCES,
        )?;
        Ok(Self {
            name,
            listening: Some(first),
        })
    }

    pub(super) fn accept(&mut self) -> io::Result<Stream> {
        let pipe = match self.listening.take() {
            Some(pipe) => pipe,
            None => create_instance(&self.name, 0, PIPE_UNLIMITED_INSTANCES)?,
        };
        let event = new_event()?;
        wait_for_client(&pipe, &event)?;
        // The next instance listens before this one is handed over. Should making it fail, the
        // next `accept` makes it or says why.
        self.listening = create_instance(&self.name, 0, PIPE_UNLIMITED_INSTANCES).ok();
        Ok(Stream {
            pipe,
            event,
            read_timeout: None,
            write_timeout: None,
        })
    }
}

/// Waits until a client has connected to the listening instance `pipe`.
fn wait_for_client(pipe: &OwnedHandle, event: &OwnedHandle) -> io::Result<()> {
    let mut ov = OVERLAPPED {
        hEvent: event.as_raw_handle(),
        ..OVERLAPPED::default()
    };
    // SAFETY: `pipe` is a live pipe instance opened for overlapped I/O and `ov` carries a live
    // event; `ov` outlives the operation (waited for below).
    if unsafe { ConnectNamedPipe(pipe.as_raw_handle(), &mut ov) } != FALSE {
        return Ok(());
    }
    match last_error() {
        // A client connected between CreateNamedPipeW and here.
        ERROR_PIPE_CONNECTED => Ok(()),
        ERROR_IO_PENDING => {
            let mut ignored = 0u32;
            // SAFETY: as above; waits until a client has connected.
            let done =
                unsafe { GetOverlappedResult(pipe.as_raw_handle(), &ov, &mut ignored, TRUE) };
            if done == FALSE {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        err => Err(io::Error::from_raw_os_error(err as i32)),
    }
}

/// A new instance of the byte-mode pipe `name` (NUL-terminated), local clients only.
fn create_instance(name: &[u16], extra_flags: u32, max_instances: u32) -> io::Result<OwnedHandle> {
    // SAFETY: `name` is NUL-terminated UTF-16 and outlives the call; NULL security attributes
    // give the default security descriptor.
    let handle = unsafe {
        CreateNamedPipeW(
            name.as_ptr(),
            PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | extra_flags,
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            max_instances,
            PIPE_BUFFER_BYTES,
            PIPE_BUFFER_BYTES,
            0,
            ptr::null(),
        )
    };
    if handle == INVALID_HANDLE_VALUE {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid handle just created, owned by nothing else.
    Ok(unsafe { OwnedHandle::from_raw_handle(handle) })
}

/// A manual-reset event, not signalled (ReadFile, WriteFile and ConnectNamedPipe reset it when
/// they start).
fn new_event() -> io::Result<OwnedHandle> {
    // SAFETY: NULL attributes and name are allowed: an unnamed event, handle not inherited.
    let handle = unsafe { CreateEventW(ptr::null(), TRUE, FALSE, ptr::null()) };
    if handle.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid handle just created, owned by nothing else.
    Ok(unsafe { OwnedHandle::from_raw_handle(handle) })
}

/// `path` as a NUL-terminated UTF-16 pipe name.
fn wide_name(path: &Path) -> io::Result<Vec<u16>> {
    let mut name: Vec<u16> = path.as_os_str().encode_wide().collect();
    if name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a pipe name cannot contain a NUL character",
        ));
    }
    name.push(0);
    Ok(name)
}

fn last_error() -> u32 {
    // SAFETY: reads the calling thread's last-error value; no preconditions.
    unsafe { GetLastError() }
}

/// Whether `e` says the other end has gone (closed its handle, or was disconnected).
fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(|code| code as u32),
        Some(ERROR_BROKEN_PIPE | ERROR_PIPE_NOT_CONNECTED | ERROR_NO_DATA)
    )
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// A finite wait in milliseconds: at least 1 (0 means "the pipe's default" to WaitNamedPipeW
/// and "do not wait" elsewhere), rounded up, below INFINITE.
fn wait_millis(d: Duration) -> u32 {
    let millis = d.as_nanos().div_ceil(1_000_000).max(1);
    u32::try_from(millis)
        .unwrap_or(INFINITE - 1)
        .min(INFINITE - 1)
}

/// How much of a buffer one ReadFile or WriteFile may take.
fn chunk_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{ErrorKind, Read as _, Write as _};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::thread;

    use license_ipc::ipc::{self, Reason, Request, Response, ValidAnswer};

    use windows_sys::Win32::System::Pipes::DisconnectNamedPipe;

    use super::super::{Listener, Stream};
    use super::*;
    use crate::{Client, ClientConfig, ClientError};

    /// A pipe name of its own for each test.
    fn pipe_name(test: &str) -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        PathBuf::from(format!(
            r"\\.\pipe\license-client-test-{}-{test}-{n}",
            std::process::id()
        ))
    }

    fn read_frame(stream: &mut Stream) -> Vec<u8> {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; ipc::frame_len(header).unwrap()];
        stream.read_exact(&mut payload).unwrap();
        payload
    }

    /// Answers every request on `stream` with a valid license echoing its nonce.
    fn serve_valid(mut stream: Stream) {
        loop {
            let mut header = [0u8; 4];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            let mut payload = vec![0u8; ipc::frame_len(header).unwrap()];
            stream.read_exact(&mut payload).unwrap();
            let Ok(Request::ValidateLicense { nonce, .. }) = ipc::parse_request(&payload) else {
                return;
            };
            let answer = Response::Valid(ValidAnswer {
                valid: true,
                expires_at: None,
                features: vec!["pos".into()],
                metadata: Default::default(),
                nonce: nonce.to_string(),
            });
            let frame = ipc::encode_frame(&serde_json::to_vec(&answer).unwrap());
            if stream.write_all(&frame).is_err() {
                return;
            }
        }
    }

    /// A server that accepts one client and holds its connection open, answering nothing, until
    /// dropped; it first reads one request when `read_request` says so.
    struct Silent {
        done: Option<mpsc::Sender<()>>,
        thread: Option<thread::JoinHandle<()>>,
    }

    fn silent_server(name: &Path, read_request: bool) -> Silent {
        let mut listener = Listener::bind(name).unwrap();
        let (done, done_rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            let mut stream = listener.accept().unwrap();
            if read_request {
                let _request = read_frame(&mut stream);
            }
            let _ = done_rx.recv();
        });
        Silent {
            done: Some(done),
            thread: Some(thread),
        }
    }

    impl Drop for Silent {
        fn drop(&mut self) {
            drop(self.done.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[test]
    fn frames_go_both_ways_and_the_client_validates() {
        let name = pipe_name("roundtrip");
        let mut listener = Listener::bind(&name).unwrap();
        let server = thread::spawn(move || {
            // First connection: echo one frame back, byte for byte.
            let mut stream = listener.accept().unwrap();
            let payload = read_frame(&mut stream);
            stream.write_all(&ipc::encode_frame(&payload)).unwrap();
            // Second: the protocol, through Client.
            serve_valid(listener.accept().unwrap());
        });

        let second = Duration::from_secs(5);
        let mut stream = Stream::connect(&name, second, second).unwrap();
        let big = vec![b'x'; ipc::MAX_FRAME_LEN];
        stream.write_all(&ipc::encode_frame(&big)).unwrap();
        assert_eq!(read_frame(&mut stream), big);
        drop(stream);

        let mut client = Client::connect(&name).unwrap();
        for _ in 0..3 {
            let v = client.validate_license("token").unwrap();
            assert!(v.is_valid() && v.has_feature("pos"));
        }
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_server_that_never_answers_times_out_within_the_timeout() {
        let name = pipe_name("silent");
        let _server = silent_server(&name, true);

        let timeout = Duration::from_millis(300);
        let mut stream = Stream::connect(&name, timeout, timeout).unwrap();
        stream.write_all(&ipc::encode_frame(b"{}")).unwrap();
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let err = stream.read(&mut byte).unwrap_err();
        let waited = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(
            waited >= Duration::from_millis(250),
            "gave up after {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");

        // The cancelled read left the stream usable: a write still goes through.
        stream.write_all(&ipc::encode_frame(b"{}")).unwrap();
    }

    #[test]
    fn the_client_reports_a_silent_agent_as_a_timeout() {
        let name = pipe_name("silent-client");
        let _server = silent_server(&name, true);
        let config = ClientConfig::new(&name).with_timeout(Duration::from_millis(200));
        let mut client = Client::connect_with(&config).unwrap();
        let started = Instant::now();
        assert!(matches!(
            client.validate_license("token"),
            Err(ClientError::Timeout)
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_server_that_closes_is_a_closed_connection() {
        let name = pipe_name("close");
        let mut listener = Listener::bind(&name).unwrap();
        let server = thread::spawn(move || {
            // Reads the request, then closes without answering.
            let mut stream = listener.accept().unwrap();
            let _request = read_frame(&mut stream);
            drop(stream);
            // Closes at once, before any request.
            drop(listener.accept().unwrap());
        });

        let mut client = Client::connect(&name).unwrap();
        assert!(matches!(
            client.validate_license("token"),
            Err(ClientError::Closed)
        ));
        // Later calls on the same client: closed too.
        assert!(matches!(
            client.validate_license("token"),
            Err(ClientError::Closed)
        ));

        let second = Duration::from_secs(5);
        let mut stream = Stream::connect(&name, second, second).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0, "end of stream");
        let err = stream.write_all(b"more").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BrokenPipe, "{err}");
        server.join().unwrap();
    }

    #[test]
    fn an_answer_written_before_the_close_is_still_read() {
        let name = pipe_name("answer-then-close");
        let mut listener = Listener::bind(&name).unwrap();
        let server = thread::spawn(move || {
            let mut stream = listener.accept().unwrap();
            let _request = read_frame(&mut stream);
            stream.write_all(&ipc::encode_frame(b"answer")).unwrap();
        });
        let second = Duration::from_secs(5);
        let mut stream = Stream::connect(&name, second, second).unwrap();
        stream.write_all(&ipc::encode_frame(b"{}")).unwrap();
        server.join().unwrap();
        assert_eq!(read_frame(&mut stream), b"answer");
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0);
    }

    #[test]
    fn a_refusal_sent_before_the_close_is_still_the_verdict() {
        // The agent refuses a client it does not allow as on Unix: `not_authorized`, no nonce,
        // as soon as it connects, then the pipe closes under the client's request.
        let name = pipe_name("refusal");
        let mut listener = Listener::bind(&name).unwrap();
        let server = thread::spawn(move || {
            let mut stream = listener.accept().unwrap();
            let refusal = Response::invalid(Reason::NotAuthorized, None);
            let frame = ipc::encode_frame(&serde_json::to_vec(&refusal).unwrap());
            stream.write_all(&frame).unwrap();
        });
        let mut client = Client::connect(&name).unwrap();
        server.join().unwrap();
        let v = client.validate_license("token").unwrap();
        assert!(!v.is_valid());
        assert_eq!(v.reason, Some(Reason::NotAuthorized));
    }

    #[test]
    fn a_missing_pipe_is_not_found() {
        let name = pipe_name("missing");
        let second = Duration::from_secs(1);
        let err = Stream::connect(&name, second, second).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
        assert!(matches!(
            Client::connect(&name),
            Err(ClientError::Connect { .. })
        ));
    }

    /// A pipe of one instance only, listening: a second client finds it busy.
    fn single_instance(name: &Path) -> (OwnedHandle, OwnedHandle) {
        let pipe = create_instance(&wide_name(name).unwrap(), FILE_FLAG_FIRST_PIPE_INSTANCE, 1);
        (pipe.unwrap(), new_event().unwrap())
    }

    #[test]
    fn a_busy_pipe_is_waited_for_until_an_instance_frees_up() {
        let name = pipe_name("busy");
        let (pipe, event) = single_instance(&name);
        let (first_tx, first_rx) = mpsc::channel::<()>();
        let server = thread::spawn(move || {
            wait_for_client(&pipe, &event).unwrap();
            first_rx.recv().unwrap();
            thread::sleep(Duration::from_millis(400));
            // Drops the first client: the instance listens again, for the one waiting.
            // SAFETY: `pipe` is a live, connected pipe instance.
            assert_ne!(unsafe { DisconnectNamedPipe(pipe.as_raw_handle()) }, FALSE);
            wait_for_client(&pipe, &event).unwrap();
            serve_valid(Stream {
                inner: super::Stream {
                    pipe,
                    event,
                    read_timeout: None,
                    write_timeout: None,
                },
            });
        });

        let second = Duration::from_secs(5);
        let _first = Stream::connect(&name, second, second).unwrap();
        first_tx.send(()).unwrap();
        let started = Instant::now();
        let mut client = Client::connect_with(&ClientConfig::new(&name)).unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "connected after {:?}: the pipe was not busy",
            started.elapsed()
        );
        assert!(client.validate_license("token").unwrap().is_valid());
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_pipe_that_stays_busy_times_out() {
        let name = pipe_name("busy-timeout");
        let (_pipe, _event) = single_instance(&name);
        let second = Duration::from_secs(5);
        let _first = Stream::connect(&name, second, second).unwrap();

        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = Stream::connect(&name, timeout, timeout).unwrap_err();
        let waited = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(
            waited >= Duration::from_millis(250),
            "gave up after {waited:?}"
        );
        assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    }

    #[test]
    fn the_listener_always_has_an_instance_listening() {
        // Between two accepts, and with every earlier connection closed, the name still exists.
        let name = pipe_name("always");
        let mut listener = Listener::bind(&name).unwrap();
        let second = Duration::from_secs(5);
        for _ in 0..3 {
            let client = Stream::connect(&name, second, second).unwrap();
            drop(listener.accept().unwrap());
            drop(client);
        }
    }

    #[test]
    fn a_write_the_server_never_reads_times_out() {
        let name = pipe_name("full");
        let _server = silent_server(&name, false);
        let timeout = Duration::from_millis(300);
        let mut stream = Stream::connect(&name, timeout, timeout).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let started = Instant::now();
        let err = loop {
            if let Err(e) = stream.write(&chunk) {
                break e;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "writes never blocked"
            );
        };
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
    }

    #[test]
    fn waits_are_finite_and_never_zero() {
        assert_eq!(wait_millis(Duration::ZERO), 1);
        assert_eq!(wait_millis(Duration::from_micros(1500)), 2);
        assert_eq!(wait_millis(Duration::from_secs(5)), 5000);
        assert_eq!(wait_millis(Duration::MAX), INFINITE - 1);
    }
}
