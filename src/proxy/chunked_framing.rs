//! Strict chunked request framing (RFC 9112 §7.1) for requests pingora-proxy serves.
//!
//! pingora-core's chunked body parser is lenient: it takes an empty chunk-size line or a
//! size-less extension (`;x`) for the last chunk and accepts a bare LF inside an extension, so
//! it can end a body where a strict server sees more of it (or a broken one). The gateway
//! therefore checks every byte of a chunked request body before pingora sees it:
//! [`ChunkedFraming`] wraps the client's stream for that one request, passes the request head
//! through, runs every later byte through a [`ChunkedBody`] validator, and on a framing error
//! fails the read with a [`FramingError`] instead of handing pingora any byte of it.
//! `Gateway::fail_to_proxy` finds that error in pingora's error chain ([`is_framing_error`])
//! and answers 400 `bad_request`; the connection is closed.
//!
//! Limits (docs/proxy-behaviour.md "Chunked request bodies"): at most [`MAX_SIZE_DIGITS`] hex
//! digits in a chunk size (leading zeros count), at most [`MAX_EXTENSION`] bytes of extensions
//! per chunk-size line, at most [`MAX_TRAILERS`] bytes of trailer section. The check streams:
//! chunk data is skipped over by length, nothing is buffered.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most hex digits in a chunk size, leading zeros included: 16 digits hold any `u64`, so a
/// size never overflows (pingora-core's parser, httparse's `parse_chunk_size`, stops there too).
pub const MAX_SIZE_DIGITS: u8 = 16;
/// Most bytes of chunk extensions (from the first `;` or whitespace after the size to the CR)
/// on one chunk-size line: 4 KiB.
pub const MAX_EXTENSION: usize = 4 * 1024;
/// Most bytes of trailer section after the last chunk (its field lines with their CRLFs, not
/// the final CRLF): 32 KiB, half of pingora-core's own cap.
pub const MAX_TRAILERS: usize = 32 * 1024;
/// Most bytes after the body's end kept for the fast path: pingora reads at most its body
/// buffer (64 KiB) and one idle read past a body; more means the connection is no longer a
/// plain HTTP/1.1 one (an upgrade's tunnel), and it is not reused.
const MAX_AFTER_BODY: usize = 128 * 1024;

/// Why a chunked request body is not framed as RFC 9112 §7.1 says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// A chunk-size line without hex digits (empty, or an extension without a size).
    EmptySize,
    /// A byte that is no hex digit, whitespace, `;` or CR where the chunk size is.
    NotHex,
    /// More than [`MAX_SIZE_DIGITS`] hex digits.
    SizeTooLong,
    /// An LF not preceded by CR, or a CR not followed by LF, in a chunk-size line or a
    /// trailer line.
    BareLf,
    /// A control character (other than HTAB) in a chunk extension or trailer line.
    ControlCharacter,
    /// A chunk-size line's extensions longer than [`MAX_EXTENSION`].
    ExtensionTooLong,
    /// Chunk data not followed by CRLF.
    MissingDataCrlf,
    /// A trailer section longer than [`MAX_TRAILERS`].
    TrailersTooLarge,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FramingError::EmptySize => "chunk size missing",
            FramingError::NotHex => "chunk size is not hexadecimal",
            FramingError::SizeTooLong => "chunk size has too many digits",
            FramingError::BareLf => "bare LF or CR in a chunk-size or trailer line",
            FramingError::ControlCharacter => "control character in a chunk extension or trailer",
            FramingError::ExtensionTooLong => "chunk extension too long",
            FramingError::MissingDataCrlf => "chunk data not followed by CRLF",
            FramingError::TrailersTooLarge => "trailer section too large",
        })
    }
}

impl std::error::Error for FramingError {}

/// Where the validator is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the chunk size's hex digits (the value is in [`ChunkedBody::size`]).
    Size { digits: u8 },
    /// After the size: whitespace, then extensions up to the CR (`ext` bytes so far; `semi`:
    /// the first `;` was seen; `quoted`/`escaped`: inside a quoted string, after a `\\`).
    Extension {
        ext: usize,
        semi: bool,
        quoted: bool,
        escaped: bool,
    },
    /// The CR of the chunk-size line was read; LF must follow.
    SizeLf { last: bool },
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Chunk data ended; CR must follow.
    DataCr,
    /// CR after chunk data; LF must follow.
    DataLf,
    /// At the start of a trailer line, or of the final CRLF.
    TrailerStart,
    /// Inside a trailer field line.
    TrailerLine,
    /// CR of a trailer line; LF must follow.
    TrailerLf,
    /// CR of the final line; LF must follow.
    FinalLf,
    /// The body ended (last chunk, trailers, final CRLF).
    Done,
    /// A framing error was found; nothing more is accepted.
    Failed(FramingError),
}

/// A streaming validator of one chunked body (RFC 9112 §7.1): feed it the body's bytes in any
/// pieces; the result does not depend on how they are split.
#[derive(Debug, Clone)]
pub struct ChunkedBody {
    state: State,
    /// The size of the chunk being read.
    size: u64,
    /// Trailer section bytes so far.
    trailers: usize,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        ChunkedBody {
            state: State::Size { digits: 0 },
            size: 0,
            trailers: 0,
        }
    }
}

/// Whether `b` may appear in an extension or trailer line: anything but control characters
/// (HTAB allowed), as field values (RFC 9110 §5.5) and quoted strings (§5.6.4).
fn line_byte_ok(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

impl ChunkedBody {
    /// Whether the whole body (last chunk, trailers, final CRLF) has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The framing error found, if any.
    pub fn failed(&self) -> Option<FramingError> {
        match self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Checks the next `bytes` of the body. `Ok(Some(n))`: the body ended after `bytes[..n]`
    /// (what follows is not the body's); `Ok(None)`: all of `bytes` is body and it goes on.
    ///
    /// # Errors
    /// The first framing error; every later call returns it again.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, FramingError> {
        match self.state {
            State::Done => return Ok(Some(0)),
            State::Failed(e) => return Err(e),
            _ => {}
        }
        let mut i = 0;
        while i < bytes.len() {
            if let State::Data(left) = self.state {
                // Chunk data is skipped by length, whatever it holds.
                let take = left.min((bytes.len() - i) as u64);
                i += take as usize;
                self.state = if take == left {
                    State::DataCr
                } else {
                    State::Data(left - take)
                };
                continue;
            }
            let b = bytes[i];
            i += 1;
            self.state = match self.step(b) {
                Ok(State::Done) => {
                    self.state = State::Done;
                    return Ok(Some(i));
                }
                Ok(next) => next,
                Err(e) => {
                    self.state = State::Failed(e);
                    return Err(e);
                }
            };
        }
        match self.state {
            State::Done => Ok(Some(0)),
            State::Failed(e) => Err(e),
            _ => Ok(None),
        }
    }

    /// The state after byte `b` (everything but chunk data).
    fn step(&mut self, b: u8) -> Result<State, FramingError> {
        Ok(match self.state {
            State::Size { digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits == MAX_SIZE_DIGITS {
                        return Err(FramingError::SizeTooLong);
                    }
                    let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                    // 16 digits at most: never overflows.
                    self.size = (self.size << 4) | d;
                    State::Size { digits: digits + 1 }
                }
                _ if digits == 0 => {
                    return Err(match b {
                        b'\r' | b';' | b'\n' | b' ' | b'\t' => FramingError::EmptySize,
                        _ => FramingError::NotHex,
                    })
                }
                b'\r' => State::SizeLf {
                    last: self.size == 0,
                },
                b'\n' => return Err(FramingError::BareLf),
                // BWS before the first `;` (RFC 9112 §7.1.1), then the extensions.
                b';' | b' ' | b'\t' => State::Extension {
                    ext: 1,
                    semi: b == b';',
                    quoted: false,
                    escaped: false,
                },
                _ => return Err(FramingError::NotHex),
            },
            State::Extension {
                ext,
                semi,
                quoted,
                escaped,
            } => {
                if b == b'\n' {
                    return Err(FramingError::BareLf);
                }
                if b == b'\r' {
                    // A CR inside a quoted string is no qdtext: the line ends here or never.
                    if quoted {
                        return Err(FramingError::ControlCharacter);
                    }
                    State::SizeLf {
                        last: self.size == 0,
                    }
                } else if !line_byte_ok(b) {
                    return Err(FramingError::ControlCharacter);
                } else if !semi && !matches!(b, b' ' | b'\t' | b';') {
                    // Only whitespace between the size and the first `;`: `5 6` is no size.
                    return Err(FramingError::NotHex);
                } else if ext >= MAX_EXTENSION {
                    return Err(FramingError::ExtensionTooLong);
                } else {
                    let (quoted, escaped) = match (quoted, escaped, b) {
                        (true, true, _) => (true, false),
                        (true, false, b'\\') => (true, true),
                        (true, false, b'"') => (false, false),
                        (false, _, b'"') => (true, false),
                        (q, _, _) => (q, false),
                    };
                    State::Extension {
                        ext: ext + 1,
                        semi: semi || b == b';',
                        quoted,
                        escaped,
                    }
                }
            }
            State::SizeLf { last } => match b {
                b'\n' if last => State::TrailerStart,
                b'\n' => State::Data(self.size),
                _ => return Err(FramingError::BareLf),
            },
            // Chunk data never gets here: `feed` skips it by length.
            State::Data(left) => State::Data(left),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(FramingError::MissingDataCrlf),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.size = 0;
                    State::Size { digits: 0 }
                }
                _ => return Err(FramingError::MissingDataCrlf),
            },
            State::TrailerStart => match b {
                b'\r' => State::FinalLf,
                b'\n' => return Err(FramingError::BareLf),
                _ => {
                    self.count_trailer()?;
                    if !line_byte_ok(b) {
                        return Err(FramingError::ControlCharacter);
                    }
                    State::TrailerLine
                }
            },
            State::TrailerLine => {
                self.count_trailer()?;
                match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(FramingError::BareLf),
                    _ if !line_byte_ok(b) => return Err(FramingError::ControlCharacter),
                    _ => State::TrailerLine,
                }
            }
            State::TrailerLf => {
                self.count_trailer()?;
                match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(FramingError::BareLf),
                }
            }
            State::FinalLf => match b {
                b'\n' => State::Done,
                _ => return Err(FramingError::BareLf),
            },
            State::Done | State::Failed(_) => self.state,
        })
    }

    fn count_trailer(&mut self) -> Result<(), FramingError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(FramingError::TrailersTooLarge);
        }
        Ok(())
    }
}

/// The client's stream for one chunked request on pingora-proxy's path: the request head
/// passes through, every body byte is checked by a [`ChunkedBody`] before pingora reads it,
/// and the bytes after the body (a pipelined next request) pass through and are remembered so
/// the fast path can read them again ([`unwrap`]).
#[derive(Debug)]
pub struct ChunkedFraming {
    inner: Box<L4Stream>,
    /// Head bytes still to pass through unchecked.
    head_left: usize,
    /// The body's validator; once it failed, every read fails.
    body: ChunkedBody,
    /// Bytes handed to pingora after the body's end: pingora keeps them as the next request's
    /// start where only its own sessions can take them. `None` once over [`MAX_AFTER_BODY`].
    after_body: Option<Vec<u8>>,
}

impl ChunkedFraming {
    /// Wraps `inner`, whose next `head_len` bytes are the request head (already put back in
    /// front of it) and whose body is chunked.
    pub fn new(inner: Box<L4Stream>, head_len: usize) -> Self {
        ChunkedFraming {
            inner,
            head_left: head_len,
            body: ChunkedBody::default(),
            after_body: Some(Vec::new()),
        }
    }

    /// The plain stream back, with the bytes after the body put in front again; `None` when the
    /// body did not end cleanly (the connection is not to be reused).
    pub fn into_inner(self) -> Option<Box<L4Stream>> {
        if !self.body.is_done() {
            return None;
        }
        let mut inner = self.inner;
        inner.rewind(&self.after_body?);
        Some(inner)
    }

    fn keep_after_body(&mut self, bytes: &[u8]) {
        if let Some(kept) = &mut self.after_body {
            if kept.len() + bytes.len() > MAX_AFTER_BODY {
                self.after_body = None;
            } else {
                kept.extend_from_slice(bytes);
            }
        }
    }

    /// Checks the bytes just read (`read`); how many of them pingora may have, or the error.
    fn check(&mut self, read: &[u8]) -> Result<usize, FramingError> {
        let head = self.head_left.min(read.len());
        self.head_left -= head;
        let body = &read[head..];
        if self.body.is_done() {
            self.keep_after_body(body);
            return Ok(read.len());
        }
        match self.body.feed(body) {
            Ok(None) => Ok(read.len()),
            Ok(Some(end)) => {
                self.keep_after_body(&body[end..]);
                Ok(read.len())
            }
            // The head goes on its own so pingora can answer the request; the error comes with
            // the next read.
            Err(_) if head > 0 => Ok(head),
            Err(e) => Err(e),
        }
    }
}

/// The stream pingora-proxy reads a request from: `l4` itself, or for a chunked body (the
/// head's length in `chunked_body`) a [`ChunkedFraming`] around it. Other requests pay nothing.
pub fn wrap(l4: Box<L4Stream>, chunked_body: Option<usize>) -> Stream {
    match chunked_body {
        Some(head_len) => Box::new(ChunkedFraming::new(l4, head_len)),
        None => l4,
    }
}

/// The stream pingora gave back after a request: a [`ChunkedFraming`] becomes its plain stream
/// again (`None` when the connection must close); any other stream is returned as it is.
pub fn unwrap(stream: Stream) -> Option<Stream> {
    if !stream.as_any().is::<ChunkedFraming>() {
        return Some(stream);
    }
    let framing = stream.into_any().downcast::<ChunkedFraming>().ok()?;
    Some(framing.into_inner()?)
}

/// Whether pingora's error `e` was caused by a [`FramingError`] (anywhere in its chain).
pub fn is_framing_error(e: &pingora::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        if c.is::<FramingError>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<FramingError>()) {
                return true;
            }
        }
        let pingora_error = c
            .downcast_ref::<pingora::Error>()
            .or_else(|| c.downcast_ref::<Box<pingora::Error>>().map(|b| &**b));
        cause = match pingora_error {
            Some(p) => p
                .cause
                .as_deref()
                .map(|c| c as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}

impl AsyncRead for ChunkedFraming {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.body.failed() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        let before = buf.filled().len();
        match Pin::new(&mut *this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        match this.check(&buf.filled()[before..]) {
            Ok(n) => {
                buf.set_filled(before + n);
                Poll::Ready(Ok(()))
            }
            Err(e) => {
                // None of this read reaches pingora.
                buf.set_filled(before);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
            }
        }
    }
}

impl AsyncWrite for ChunkedFraming {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for ChunkedFraming {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for ChunkedFraming {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ChunkedFraming {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ChunkedFraming {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ChunkedFraming {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for ChunkedFraming {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, socket_digest: SocketDigest) {
        self.inner.set_socket_digest(socket_digest);
    }
}

#[async_trait]
impl Peek for ChunkedFraming {
    /// Peeked bytes are put back in front of the inner stream and later read (and checked)
    /// through this one.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The validator's verdict on `body` fed in the pieces `cuts` splits it into: where the
    /// body ended (offset into `body`), `None` if it goes on, or the error.
    fn verdict(body: &[u8], cuts: &[usize]) -> Result<Option<usize>, FramingError> {
        let mut v = ChunkedBody::default();
        let mut start = 0;
        for &end in cuts.iter().chain([body.len()].iter()) {
            if let Some(n) = v.feed(&body[start..end])? {
                return Ok(Some(start + n));
            }
            start = end;
        }
        Ok(None)
    }

    /// Asserts `body` gets `expected` whole, split in two at every position, split in three at
    /// every pair of positions, and byte by byte.
    fn check(body: &[u8], expected: Result<Option<usize>, FramingError>) {
        let shown = String::from_utf8_lossy(body);
        assert_eq!(verdict(body, &[]), expected, "whole: {shown:?}");
        for i in 0..=body.len() {
            assert_eq!(verdict(body, &[i]), expected, "split at {i}: {shown:?}");
            for j in i..=body.len() {
                assert_eq!(
                    verdict(body, &[i, j]),
                    expected,
                    "split at {i},{j}: {shown:?}"
                );
            }
        }
        let every: Vec<usize> = (1..body.len()).collect();
        assert_eq!(verdict(body, &every), expected, "byte by byte: {shown:?}");
    }

    const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: gw\r\n\r\n";

    #[test]
    fn valid_bodies_end_exactly_at_their_final_crlf_however_split() {
        let bodies: [&[u8]; 11] = [
            b"0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
            b"A\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n",
            b"0005\r\nhello\r\n000\r\n\r\n",
            b"5;ext\r\nhello\r\n0;last\r\n\r\n",
            b"5;a=1;b=\"x;y\\\"z\"\r\nhello\r\n0\r\n\r\n",
            b"5 ;a = 1\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nX-Other: u\tv\r\n\r\n",
            b"5\r\n\r\n\n\r\n\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0\r\n\r\n",
        ];
        for body in bodies {
            check(body, Ok(Some(body.len())));
            // What follows the body is not looked at.
            let mut pipelined = body.to_vec();
            pipelined.extend_from_slice(NEXT);
            check(&pipelined, Ok(Some(body.len())));
            // A body cut anywhere before its end is not over yet.
            for end in 0..body.len() {
                assert_eq!(verdict(&body[..end], &[]), Ok(None), "{end}");
            }
        }
    }

    #[test]
    fn malformed_framing_is_an_error_however_split() {
        use FramingError::*;
        let cases: [(&[u8], FramingError); 17] = [
            (b"\r\n\r\n", EmptySize),
            (b";x\r\n0\r\n\r\n", EmptySize),
            (b" 5\r\nhello\r\n", EmptySize),
            (b"zz\r\n", NotHex),
            (b"5x\r\nhello\r\n", NotHex),
            (b"5 6\r\nhello!\r\n", NotHex),
            (b"0x5\r\nhello\r\n", NotHex),
            (b"5\nhello\r\n0\r\n\r\n", BareLf),
            (b"5;e\nx\r\nhello\r\n", BareLf),
            (b"5\r\rhello\r\n", BareLf),
            (b"5;e\x00\r\nhello\r\n", ControlCharacter),
            (b"5;e=\"a\r\n\"\r\nhello\r\n", ControlCharacter),
            (b"5\r\nhelloXX0\r\n\r\n", MissingDataCrlf),
            (b"5\r\nhello\n0\r\n\r\n", MissingDataCrlf),
            (b"00000000000000005\r\nhello\r\n", SizeTooLong),
            (b"0\r\nX-T: a\nb\r\n\r\n", BareLf),
            (b"0\r\n\r\r\n", BareLf),
        ];
        for (body, error) in cases {
            check(body, Err(error));
        }
    }

    #[test]
    fn a_finished_body_takes_nothing_more() {
        let mut v = ChunkedBody::default();
        assert_eq!(v.feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(v.feed(b"GET / HTTP/1.1\r\n"), Ok(Some(0)));
        assert!(v.is_done());
    }

    #[test]
    fn an_error_stays() {
        let mut v = ChunkedBody::default();
        assert_eq!(v.feed(b"zz"), Err(FramingError::NotHex));
        assert_eq!(v.feed(b"0\r\n\r\n"), Err(FramingError::NotHex));
        assert_eq!(v.failed(), Some(FramingError::NotHex));
        assert!(!v.is_done());
    }

    #[test]
    fn sixteen_hex_digits_are_the_most_a_size_takes() {
        // The largest size there is: its data goes on.
        assert_eq!(verdict(b"ffffffffffffffff\r\nabc", &[]), Ok(None));
        assert_eq!(verdict(b"FFFFFFFFFFFFFFFF\r\n", &[]), Ok(None));
        assert_eq!(
            verdict(b"1ffffffffffffffff\r\n", &[]),
            Err(FramingError::SizeTooLong)
        );
        assert_eq!(verdict(b"0000000000000000\r\n\r\n", &[]), Ok(Some(20)));
    }

    #[test]
    fn extensions_are_bounded_per_line() {
        let line = |ext_len: usize| {
            let mut b = b"1;".to_vec();
            b.resize(1 + ext_len, b'e');
            b.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
            b
        };
        let ok = line(MAX_EXTENSION);
        assert_eq!(verdict(&ok, &[]), Ok(Some(ok.len())));
        assert_eq!(
            verdict(&line(MAX_EXTENSION + 1), &[]),
            Err(FramingError::ExtensionTooLong)
        );
        // The bound is per line: many lines at the limit are fine.
        let mut many = Vec::new();
        for _ in 0..4 {
            many.extend_from_slice(&line(MAX_EXTENSION)[..MAX_EXTENSION + 6]);
        }
        many.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(verdict(&many, &[]), Ok(Some(many.len())));
    }

    #[test]
    fn trailers_are_bounded() {
        let body = |trailer_len: usize| {
            let mut b = b"0\r\n".to_vec();
            let field = b"X-T: ";
            b.extend_from_slice(field);
            b.resize(3 + trailer_len - 2, b'v');
            b.extend_from_slice(b"\r\n\r\n");
            b
        };
        let ok = body(MAX_TRAILERS);
        assert_eq!(verdict(&ok, &[]), Ok(Some(ok.len())));
        assert_eq!(
            verdict(&body(MAX_TRAILERS + 1), &[]),
            Err(FramingError::TrailersTooLarge)
        );
    }

    /// Large chunks are skipped by length: a 64 MiB chunk fed in 16 KiB reads is checked
    /// without holding any of it.
    #[test]
    fn chunk_data_streams() {
        let mut v = ChunkedBody::default();
        assert_eq!(v.feed(b"4000000\r\n"), Ok(None));
        let piece = vec![b'\n'; 16 * 1024];
        for _ in 0..(64 * 1024 / 16) {
            assert_eq!(v.feed(&piece), Ok(None));
        }
        assert_eq!(v.feed(b"\r\n0\r\n\r\nGET"), Ok(Some(7)));
        assert!(v.is_done());
    }

    /// Bytes from the alphabet framing is made of, so random inputs reach every state.
    fn framing_bytes() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::prelude::*;
        let alphabet: &[u8] = b"0159aAfFgz;= \t\r\n\"\\x:\x00";
        prop::collection::vec(prop::sample::select(alphabet.to_vec()), 0..64)
    }

    /// A valid chunked body: chunks of the given sizes (with an extension on every other line),
    /// the last chunk, the trailer lines.
    fn valid_body(sizes: &[usize], trailers: usize, upper: bool) -> Vec<u8> {
        let mut b = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let size = if upper {
                format!("{n:X}")
            } else {
                format!("{n:x}")
            };
            b.extend_from_slice(size.as_bytes());
            if i % 2 == 1 {
                b.extend_from_slice(b";e=\"a;b\"");
            }
            b.extend_from_slice(b"\r\n");
            b.extend((0..n).map(|k| b"\r\n0;x"[k % 5]));
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"0\r\n");
        for t in 0..trailers {
            b.extend_from_slice(format!("X-T{t}: v\r\n").as_bytes());
        }
        b.extend_from_slice(b"\r\n");
        b
    }

    proptest::proptest! {
        /// However reads split any input, the verdict is the same.
        #[test]
        fn any_input_gets_one_verdict_however_split(
            body in framing_bytes(),
            cuts in proptest::collection::vec(0usize..64, 0..4),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(body.len())).collect();
            cuts.sort_unstable();
            proptest::prop_assert_eq!(verdict(&body, &cuts), verdict(&body, &[]));
        }

        /// A valid body ends exactly at its end, whatever follows and however it is split,
        /// and is not over one byte before.
        #[test]
        fn valid_bodies_end_at_their_end(
            sizes in proptest::collection::vec(1usize..40, 0..5),
            trailers in 0usize..3,
            upper in proptest::bool::ANY,
            cut in 0usize..400,
        ) {
            let body = valid_body(&sizes, trailers, upper);
            let mut with_next = body.clone();
            with_next.extend_from_slice(NEXT);
            let cut = cut.min(with_next.len());
            proptest::prop_assert_eq!(verdict(&with_next, &[cut]), Ok(Some(body.len())));
            proptest::prop_assert_eq!(verdict(&body[..body.len() - 1], &[]), Ok(None));
        }
    }

    #[test]
    fn the_cause_is_found_in_pingoras_error_chain() {
        let io = io::Error::new(io::ErrorKind::InvalidData, FramingError::EmptySize);
        let e = pingora::Error::because(pingora::ErrorType::ReadError, "reading body", io);
        assert!(is_framing_error(&e));
        let wrapped = pingora::Error::because(pingora::ErrorType::ReadError, "outer", e);
        assert!(is_framing_error(&wrapped));
        let other = io::Error::new(io::ErrorKind::InvalidData, "something else");
        let e = pingora::Error::because(pingora::ErrorType::ReadError, "reading body", other);
        assert!(!is_framing_error(&e));
        assert!(!is_framing_error(&pingora::Error::new(
            pingora::ErrorType::ReadError
        )));
    }
}
