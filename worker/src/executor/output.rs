//! Bounded capture of a guest's stdout or stderr: keeps the first bytes,
//! drops the rest and remembers that it did, so a chatty guest costs no memory.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

use wasmgrid_protocol::CapturedOutput;

#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    truncated: bool,
}

/// A stream handed to the guest; clones share one buffer.
#[derive(Debug, Clone)]
pub struct BoundedPipe {
    limit: usize,
    buffer: Arc<Mutex<Buffer>>,
}

impl BoundedPipe {
    pub fn new(limit: usize) -> Self {
        BoundedPipe {
            limit,
            buffer: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A poisoned buffer still holds valid bytes.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.lock();
        let room = self.limit.saturating_sub(buffer.bytes.len());
        if bytes.len() > room {
            buffer.truncated = true;
        }
        let kept = bytes.len().min(room);
        buffer.bytes.extend_from_slice(&bytes[..kept]);
    }

    /// What the guest wrote, up to the limit.
    pub fn captured(&self) -> CapturedOutput {
        let buffer = self.lock();
        CapturedOutput {
            text: String::from_utf8_lossy(&buffer.bytes).into_owned(),
            truncated: buffer.truncated,
        }
    }
}

impl IsTerminal for BoundedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for BoundedPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for BoundedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always accept: excess is counted as truncation rather than failing the guest.
        Ok(64 * 1024)
    }
}

impl AsyncWrite for BoundedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_marks_the_rest_dropped() {
        let pipe = BoundedPipe::new(5);
        pipe.append(b"abc");
        pipe.append(b"defgh");
        let out = pipe.captured();
        assert_eq!(out.text, "abcde");
        assert!(out.truncated);
    }

    #[test]
    fn output_within_the_limit_is_not_truncated() {
        let pipe = BoundedPipe::new(5);
        pipe.append(b"abcde");
        assert_eq!(
            pipe.captured(),
            CapturedOutput {
                text: "abcde".into(),
                truncated: false
            }
        );
    }
}
