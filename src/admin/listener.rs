//! The admin server's listener: a connection cap, an idle timeout per
//! connection, and an accept loop that pauses on resource errors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Client connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that neither sends nor receives for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error that is not about one connection (EMFILE...).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

/// A TCP listener that serves at most as many connections as it has permits,
/// and pauses (rather than spins) on accept errors that are not about one
/// connection, such as running out of file descriptors.
pub struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl CappedListener {
    pub fn new(inner: TcpListener) -> Self {
        CappedListener { inner, permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)) }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let mut errors_logged = 0u32;
        loop {
            // Waiting for a permit leaves further connections in the
            // kernel's backlog: nothing is accepted that cannot be served.
            let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
            match self.inner.accept().await {
                Ok((stream, addr)) => return (CappedStream::new(stream, permit), addr),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    if errors_logged < 3 {
                        tracing::warn!(error = %e, pause = ?ACCEPT_ERROR_PAUSE, "admin server cannot accept; pausing");
                        errors_logged += 1;
                    }
                    drop(permit);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// A served connection: holds its permit, and fails once it has been idle
/// (no byte read or written) for [`IDLE_TIMEOUT`], so that a client that
/// connects and says nothing cannot keep a permit forever.
pub struct CappedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
}

impl CappedStream {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit) -> Self {
        CappedStream { stream, _permit: permit, idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)) }
    }

    /// Passes an I/O result through, restarting the idle clock on progress
    /// and failing the connection once it has been idle too long.
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(r) => {
                self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(r)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "admin connection idle"))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.watch(cx, poll)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, poll)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
