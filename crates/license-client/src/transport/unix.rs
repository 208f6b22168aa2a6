//! The transport on Unix: a stream socket (`AF_UNIX`, `SOCK_STREAM`) with the kernel's timeouts.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

#[derive(Debug)]
pub(super) struct Stream(UnixStream);

impl Stream {
    pub(super) fn connect(
        path: &Path,
        read_timeout: Duration,
        write_timeout: Duration,
    ) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(read_timeout))?;
        stream.set_write_timeout(Some(write_timeout))?;
        Ok(Self(stream))
    }

    pub(super) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }

    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
}

#[derive(Debug)]
pub(super) struct Listener(UnixListener);

impl Listener {
    pub(super) fn bind(path: &Path) -> io::Result<Self> {
        UnixListener::bind(path).map(Self)
    }

    pub(super) fn accept(&mut self) -> io::Result<Stream> {
        self.0.accept().map(|(stream, _)| Stream(stream))
    }
}
