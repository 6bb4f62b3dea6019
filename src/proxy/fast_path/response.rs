//! The upstream's response on the fast path: its head parsed and rewritten for the client
//! ([`parse_response`]), and where a chunked body ends ([`ChunkedEnd`]).

use std::mem::MaybeUninit;
use std::ops::Range;

use super::{MAX_RESPONSE_FIELDS, MAX_RESPONSE_HEAD};
use crate::proxy::policy::response::{ResponseAction, ResponseFacts, ResponsePlanner};
use crate::proxy::policy::{classify, FieldName, Fields};

/// How the upstream response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Framing {
    /// No body (a `HEAD` request's response, 1xx, 204, 304).
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked: [`ChunkedEnd`] finds its end.
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// The parts of an upstream response head the fast path acts on.
pub(super) struct ResponseHead {
    pub(super) head_len: usize,
    pub(super) status: u16,
    pub(super) framing: Framing,
    pub(super) upstream_close: bool,
}

/// The upstream response's fields as the policy reads them, classified once.
struct ResponseFields<'h, 'b> {
    headers: &'h [httparse::Header<'b>],
    classes: &'h [FieldName],
}

impl Fields for ResponseFields<'_, '_> {
    #[inline]
    fn count(&self) -> usize {
        self.headers.len()
    }
    #[inline]
    fn name(&self, i: usize) -> &[u8] {
        self.headers[i].name.as_bytes()
    }
    #[inline]
    fn value(&self, i: usize) -> &[u8] {
        self.headers[i].value
    }
    #[inline]
    fn class(&self, i: usize) -> FieldName {
        self.classes[i]
    }
}

/// Parses the response head at the start of `ubuf` and writes the downstream head into `out`:
/// each field as the policy's [`ResponsePlanner`] decides, then `Date` when missing (what
/// pingora's HTTP/1 server does), the gateway's own `Connection` and the request's
/// `X-Request-Id` when the upstream sent none. `Ok(None)`: incomplete.
pub(super) fn parse_response(
    ubuf: &[u8],
    head_request: bool,
    request_id: &[u8],
    keepalive: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
    // Uninitialised: zeroing the field storage (8 KiB) per response cost more than parsing it.
    let mut storage =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_FIELDS];
    let mut resp = httparse::Response::new(&mut []);
    // As lenient as pingora's HTTP/1 client: `Name : value` is accepted (and sent on as
    // `Name: value`).
    let mut parser = httparse::ParserConfig::default();
    parser.allow_spaces_after_header_name_in_responses(true);
    // And like it, obsolete line folding is accepted; the fold is replaced by one space.
    parser.allow_obsolete_multiline_headers_in_responses(true);
    let head_len = match parser.parse_response_with_uninit_headers(&mut resp, ubuf, &mut storage) {
        Ok(httparse::Status::Complete(n)) => n,
        // pingora's client gives up only past its limit, so does this.
        Ok(httparse::Status::Partial) if ubuf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head too large"),
        Err(_) => return Err("malformed response head"),
    };
    let status = resp.code.unwrap_or(0);
    let version = resp.version.unwrap_or(0);
    let informational = (100..200).contains(&status);
    let headers: &[httparse::Header<'_>] = resp.headers;
    let mut classes = [FieldName::Other; MAX_RESPONSE_FIELDS];
    let mut facts = ResponseFacts::new(version);
    for (h, class) in headers.iter().zip(classes.iter_mut()) {
        *class = classify(h.name.as_bytes());
        facts.observe(*class, h.value, version);
    }
    if let Some(error) = facts.error() {
        return Err(error);
    }
    let fields = ResponseFields {
        headers,
        classes: &classes[..headers.len()],
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse guarantees three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // A head without obsolete line folding has one LF per field line, one after the status
    // line and one for the empty line; leading empty lines httparse skipped only add to the
    // count. One vectorised count instead of a search through every value.
    let may_fold = count_lf(&ubuf[..head_len]) != headers.len() + 2;
    let mut planner = ResponsePlanner::new(&facts, informational);
    let mut w = FieldWriter::new(out, ubuf);
    for (i, h) in headers.iter().enumerate() {
        let name = h.name.as_bytes();
        match planner.action(fields.classes[i], name, &fields) {
            ResponseAction::Drop => {}
            ResponseAction::RequestId => w.push(b"X-Request-Id", request_id),
            ResponseAction::ContentLength => {
                w.push(name, facts.length.unwrap_or(0).to_string().as_bytes())
            }
            ResponseAction::Keep if may_fold && h.value.contains(&b'\n') => {
                w.push(name, &unfold(h.value))
            }
            ResponseAction::Keep => w.keep(offset_in(ubuf, name), offset_in(ubuf, h.value)),
        }
    }
    let framing = if head_request || informational || status == 204 || status == 304 {
        Framing::None
    } else {
        match (facts.chunked, facts.length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    let keepalive = keepalive && framing != Framing::UntilClose;
    if !informational {
        if !facts.date {
            let now = pingora::protocols::http::date::get_cached_date();
            w.push(b"Date", now.as_bytes());
        }
        let connection: &[u8] = if keepalive { b"keep-alive" } else { b"close" };
        w.push(b"Connection", connection);
    }
    if planner.add_request_id() {
        w.push(b"X-Request-Id", request_id);
    }
    let out = w.out();
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        head_len,
        status,
        framing,
        upstream_close: facts.upstream_close,
    }))
}

/// How many LF bytes `bytes` holds: counted in blocks of 255 into a byte-wide counter, which
/// the compiler vectorises (a `usize` count per byte it does not: ~2 instructions a byte).
fn count_lf(bytes: &[u8]) -> usize {
    bytes
        .chunks(255)
        .map(|block| {
            let n = block
                .iter()
                .fold(0u8, |n, &b| n.wrapping_add(u8::from(b == b'\n')));
            usize::from(n)
        })
        .sum()
}

/// `value` with every obsolete line fold (CRLF or LF followed by spaces or tabs, with the spaces
/// or tabs before it) replaced by one space: a proxy must not forward obs-fold (RFC 9112 §5.2).
fn unfold(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut folding = false;
    for &b in value {
        match b {
            b'\r' | b'\n' => {
                // The whitespace before the fold is part of it too: `a  CRLF  b` is `a b`.
                while out.last().is_some_and(|&c| c == b' ' || c == b'\t') {
                    out.pop();
                }
                folding = true;
            }
            b' ' | b'\t' if folding => {}
            _ => {
                if folding {
                    out.push(b' ');
                    folding = false;
                }
                out.push(b);
            }
        }
    }
    out
}

/// Writes field lines into `out`: a field passed on unchanged and already spelled
/// `name: value` CRLF in `src` is copied from there, consecutive ones with one copy; every
/// other field is written as `name: value` CRLF.
pub(super) struct FieldWriter<'a> {
    out: &'a mut Vec<u8>,
    src: &'a [u8],
    /// Unchanged lines of `src` not yet copied.
    run: Range<usize>,
}

impl<'a> FieldWriter<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>, src: &'a [u8]) -> Self {
        FieldWriter {
            out,
            src,
            run: 0..0,
        }
    }

    /// Passes on the field at `name`/`value` (offsets into `src`) unchanged.
    #[inline(always)]
    pub(super) fn keep(&mut self, name: Range<usize>, value: Range<usize>) {
        let src = self.src;
        let canonical = value.start == name.end + 2
            && src[name.end..value.start] == *b": "
            && src.get(value.end..value.end + 2) == Some(b"\r\n");
        if !canonical {
            return self.push(&src[name], &src[value]);
        }
        if self.run.end != name.start || self.run.is_empty() {
            self.flush();
            self.run.start = name.start;
        }
        self.run.end = value.end + 2;
    }

    /// Writes the field `name: value`.
    #[inline(always)]
    pub(super) fn push(&mut self, name: &[u8], value: &[u8]) {
        push_field(self.out(), name, value);
    }

    /// The output, everything kept so far copied into it.
    #[inline]
    pub(super) fn out(&mut self) -> &mut Vec<u8> {
        self.flush();
        self.out
    }

    #[inline]
    fn flush(&mut self) {
        if !self.run.is_empty() {
            self.out.extend_from_slice(&self.src[self.run.clone()]);
            self.run = 0..0;
        }
    }
}

/// Where `part` (a slice of `src`) lies in `src`.
#[inline]
pub(super) fn offset_in(src: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - src.as_ptr() as usize;
    start..start + part.len()
}

// Inlined everywhere: the names are constants at nearly every call, so their copies become a
// few moves instead of a call to `memcpy` each (~14 calls per request before).
#[inline(always)]
pub(super) fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // One capacity check that can grow, not four.
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Longest chunk-size line (size, extensions and CRLF) read, bytes: pingora's HTTP/1 client's
/// limit on an incomplete one (`PARTIAL_CHUNK_HEAD_LIMIT`), applied to every line so that where
/// the reads split the body never changes the answer.
pub(super) const MAX_CHUNK_LINE: usize = 8 * 1024;

/// Most hex digits in a chunk size: 15 (60 bits), so any size fits a `u64` with room to add.
const MAX_CHUNK_DIGITS: usize = 15;

/// How much of a chunk-size line whose LF has not arrived yet httparse reads before the LF:
/// the size and the start of an extension, where a body that is not chunked shows. A fixed
/// amount, checked until it has arrived, keeps a line that arrives in many pieces linear to
/// check (the whole line is read once its LF arrives).
pub(super) const EARLY_CHECK: usize = 64;

/// Finds the end of a chunked body (RFC 9112 §7.1) in bytes fed to it piece by piece.
#[derive(Debug, Default)]
pub(super) struct ChunkedEnd {
    state: ChunkState,
    /// The start of a chunk-size line whose LF has not arrived yet (at most
    /// [`MAX_CHUNK_LINE`] bytes).
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerCr,
    FinalLf,
    Done,
}

impl ChunkedEnd {
    /// Feeds `bytes`; `Ok(Some(n))` when the body ends after `bytes[..n]`.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, &'static str> {
        use ChunkState::*;
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                Size => {
                    let rest = &bytes[i..];
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        // The line goes on in the next piece: kept, and its start checked
                        // (once), so a malformed one is refused in the piece that shows it.
                        if self.line.len() + rest.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long");
                        }
                        let checked = self.line.len() >= EARLY_CHECK;
                        self.line.extend_from_slice(rest);
                        if !checked {
                            chunk_size_prefix(&self.line)?;
                        }
                        return Ok(None);
                    };
                    let size = if self.line.is_empty() {
                        chunk_size(&rest[..=lf])?
                    } else {
                        if self.line.len() + lf + 1 > MAX_CHUNK_LINE {
                            return Err("chunk size line too long");
                        }
                        self.line.extend_from_slice(&rest[..=lf]);
                        let size = chunk_size(&self.line);
                        self.line.clear();
                        size?
                    };
                    i += lf + 1;
                    self.state = if size == 0 { TrailerStart } else { Data(size) };
                    continue;
                }
                Data(rem) => {
                    let take = rem.min((bytes.len() - i) as u64);
                    i += take as usize;
                    let rem = rem - take;
                    self.state = if rem == 0 { DataCr } else { Data(rem) };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size,
                DataCr | DataLf => return Err("malformed chunk end"),
                TrailerStart if b == b'\r' => FinalLf,
                // RFC 9112 §7.1.2, §2.2: a trailer line ends in CRLF; a bare LF, or a CR
                // anywhere else, makes the body unreadable (pingora-proxy's path refuses it too).
                TrailerStart | TrailerLine if b == b'\n' => return Err("malformed trailer"),
                TrailerStart | TrailerLine if b == b'\r' => TrailerCr,
                TrailerStart | TrailerLine => TrailerLine,
                TrailerCr if b == b'\n' => TrailerStart,
                TrailerCr => return Err("malformed trailer"),
                FinalLf if b == b'\n' => Done,
                FinalLf => return Err("malformed last chunk"),
                Done => Done,
            };
            i += 1;
            if self.state == Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// The chunk size of `line`, a chunk-size line up to and including its LF.
///
/// `httparse::parse_chunk_size` reads it (`chunk-size [ chunk-ext ] CRLF`, RFC 9112 §7.1,
/// §7.1.1: whitespace only before a `;`, any octet in an extension but a CR without its LF),
/// as pingora's HTTP/1 client does. Stricter than it, checked first ([`size_line_start`]): the
/// line starts with a hex digit and has at most [`MAX_CHUNK_DIGITS`] of them, and it ends in
/// CRLF with no other LF (httparse reads a bare LF in an extension as part of the extension).
fn chunk_size(line: &[u8]) -> Result<u64, &'static str> {
    size_line_start(line)?;
    if !line.ends_with(b"\r\n") {
        return Err("malformed chunk size line");
    }
    match httparse::parse_chunk_size(line) {
        Ok(httparse::Status::Complete((n, size))) if n == line.len() => Ok(size),
        _ => Err("malformed chunk size line"),
    }
}

/// Whether `start`, the start of a chunk-size line (no LF yet), may still become a valid one,
/// as far as its first [`EARLY_CHECK`] bytes tell.
fn chunk_size_prefix(start: &[u8]) -> Result<(), &'static str> {
    size_line_start(start)?;
    match httparse::parse_chunk_size(&start[..start.len().min(EARLY_CHECK)]) {
        Ok(httparse::Status::Partial) => Ok(()),
        _ => Err("malformed chunk size line"),
    }
}

/// The checks before httparse reads a chunk-size line, or its start: a hex digit first
/// (httparse reads an empty size as 0), at most [`MAX_CHUNK_DIGITS`] of them (it takes 16),
/// at most [`MAX_CHUNK_LINE`] bytes.
fn size_line_start(line: &[u8]) -> Result<(), &'static str> {
    let digits = line
        .iter()
        .take(MAX_CHUNK_DIGITS + 1)
        .take_while(|b| b.is_ascii_hexdigit())
        .count();
    if digits > MAX_CHUNK_DIGITS {
        return Err("chunk size too large");
    }
    if digits == 0 {
        return Err("malformed chunk size");
    }
    if line.len() > MAX_CHUNK_LINE {
        return Err("chunk size line too long");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` in pieces of `step` bytes; the end offset found, if any.
    fn chunked_end(body: &[u8], step: usize) -> Result<Option<usize>, &'static str> {
        let mut scanner = ChunkedEnd::default();
        let mut offset = 0;
        for piece in body.chunks(step) {
            if let Some(end) = scanner.feed(piece)? {
                return Ok(Some(offset + end));
            }
            offset += piece.len();
        }
        Ok(None)
    }

    #[test]
    fn chunked_end_is_found_whatever_the_pieces() {
        let body = b"5\r\nhello\r\n1A;ext=\"x\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nT: 1\r\nU: 2\r\n\r\nNEXT";
        let end = body.len() - 4;
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(chunked_end(body, step), Ok(Some(end)), "step {step}");
        }
        assert_eq!(chunked_end(b"0\r\n\r\n", 1), Ok(Some(5)));
        assert_eq!(chunked_end(b"5\r\nhel", 3), Ok(None));
        assert_eq!(chunked_end(b"0\r\nTrailer: x\r\n", 4), Ok(None));
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"1234567890abcdef0\r\n",
            b"0\r\n\n",
        ] {
            assert!(
                chunked_end(bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Chunk-size lines as `httparse::parse_chunk_size` reads them (RFC 9112 §7.1.1:
    /// whitespace only before a `;`, any octet in an extension), with the stricter checks before
    /// it: a hex digit first, at most 15 of them, CRLF and no other LF.
    #[test]
    fn chunk_size_lines_are_read_by_httparse_and_checked_first() {
        let ten = "0123456789";
        for ok in [
            "5 ;a=b\r\nhello\r\n0\r\n\r\n".to_string(),
            "5\t \t;x;y=\"q\"\r\nhello\r\n0\r\n\r\n".to_string(),
            "5 \r\nhello\r\n0 \r\n\r\n".to_string(),
            format!("00000000000000A\r\n{ten}\r\n0\r\n\r\n"),
            format!("a\r\n{ten}\r\nA\r\n{ten}\r\n000000000000000\r\n\r\n"),
        ] {
            for step in 1..=ok.len() {
                assert_eq!(
                    chunked_end(ok.as_bytes(), step),
                    Ok(Some(ok.len())),
                    "{ok:?}"
                );
            }
        }
        let odd = b"5;\x01\x7f\xff\tz\r\nhello\r\n0\r\n\r\n";
        assert_eq!(chunked_end(odd, 1), Ok(Some(odd.len())));
        for bad in [
            // Whitespace not followed by `;`, digits after whitespace.
            &b"5 x\r\nhello\r\n"[..],
            b"5 6\r\nhello\r\n",
            // A bare LF or a lone CR in an extension.
            b"5;a\nb\r\nhello\r\n",
            b"5;a\rb\r\nhello\r\n",
            // 16 hex digits (httparse takes them).
            b"0000000000000000\r\n\r\n",
            // No size (httparse reads these as 0).
            b";a\r\n\r\n",
            b" 5\r\nhello\r\n",
            b"\t\r\n\r\n",
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
        ] {
            for step in 1..=bad.len() {
                assert!(
                    chunked_end(bad, step).is_err(),
                    "{:?} in pieces of {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
    }

    /// A chunk-size line is at most `MAX_CHUNK_LINE` bytes, however the reads split it.
    #[test]
    fn chunk_size_lines_are_bounded() {
        let line = |len: usize| {
            let mut body = b"1;".to_vec();
            body.resize(len - 2, b'x');
            body.extend_from_slice(b"\r\nz\r\n0\r\n\r\n");
            body
        };
        let longest = line(MAX_CHUNK_LINE);
        for step in [1, 7, 4096, longest.len()] {
            assert_eq!(chunked_end(&longest, step), Ok(Some(longest.len())));
            assert!(chunked_end(&line(MAX_CHUNK_LINE + 1), step).is_err());
        }
        // Without its LF too: refused as soon as it is longer.
        let mut scanner = ChunkedEnd::default();
        assert_eq!(scanner.feed(&longest[..MAX_CHUNK_LINE - 2]), Ok(None));
        assert_eq!(scanner.feed(b"xx"), Ok(None));
        assert!(scanner.feed(b"x").is_err());
    }

    /// A size line split across reads has its start checked as it arrives: a malformed one is
    /// refused in the piece that shows it, not when its LF comes.
    #[test]
    fn partial_chunk_size_lines_are_refused_early() {
        for (pieces, bad) in [
            (&["5x"][..], 0),
            (&["5", "x"][..], 1),
            (&["5;ext", "\r", "x"][..], 2),
            (&["1234567890", "abcdef"][..], 1),
            (&["5 ", "6"][..], 1),
            (&["g"][..], 0),
        ] {
            let mut scanner = ChunkedEnd::default();
            for (i, piece) in pieces.iter().enumerate() {
                let got = scanner.feed(piece.as_bytes());
                assert_eq!(got.is_err(), i == bad, "{pieces:?}: piece {i}: {got:?}");
            }
        }
        // Past its first `EARLY_CHECK` bytes, a line is read when its LF comes.
        let mut late = b"5".to_vec();
        late.resize(EARLY_CHECK, b' ');
        late.push(b'x');
        let mut scanner = ChunkedEnd::default();
        for piece in late.chunks(1) {
            assert_eq!(scanner.feed(piece), Ok(None));
        }
        assert!(scanner.feed(b"\r\n").is_err());
        let mut scanner = ChunkedEnd::default();
        for piece in [&b"1"[..], b"0", b" ", b";", b"e=1", b"\r"] {
            assert_eq!(scanner.feed(piece), Ok(None));
        }
        assert_eq!(scanner.feed(b"\n"), Ok(None));
        assert_eq!(scanner.feed(&[b'.'; 16]), Ok(None));
        assert_eq!(scanner.feed(b"\r\n0\r\n\r\nNEXT"), Ok(Some(7)));
    }

    /// Odd spacing and obsolete folding reach the client as plain `Name: value` lines; lines
    /// already in that form are copied as they are.
    #[test]
    fn response_field_lines_are_normalised() {
        let id: &[u8] = b"req-1";
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 OK\r\nA:x\r\nB:  y  \r\nC: z\r\nD: one  \r\n  two\t\r\n\tthree\r\nE : w\nF: \r\nDate: d\r\nContent-Length: 0\r\n\r\n";
        parse_response(raw, false, id, true, &mut out)
            .expect("valid")
            .expect("complete");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nA: x\r\nB: y\r\nC: z\r\nD: one two three\r\nE: w\r\nF: \r\n\
             Date: d\r\nContent-Length: 0\r\nConnection: keep-alive\r\nX-Request-Id: req-1\r\n\r\n"
        );
    }

    #[test]
    fn response_heads_as_large_as_pingora_accepts_are_forwarded() {
        // pingora's HTTP/1 client takes up to 256 fields and a head under 1 MiB; the fast path
        // has sent the request by then, so it must take them too.
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..250 {
            raw.extend_from_slice(format!("X-F{i}: {i}\r\n").as_bytes());
        }
        raw.extend_from_slice(format!("X-Big: {}\r\n", "v".repeat(200 * 1024)).as_bytes());
        raw.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        let mut out = Vec::new();
        let head = parse_response(&raw, false, b"id", true, &mut out)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.head_len, raw.len());
        assert!(out.windows(9).any(|w| w == b"X-F249: 2"));
        let mut too_many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..300 {
            too_many.extend_from_slice(format!("X-F{i}: {i}\r\n").as_bytes());
        }
        too_many.extend_from_slice(b"\r\n");
        assert!(parse_response(&too_many, false, b"id", true, &mut out).is_err());
        // An incomplete head is read on while it is at most pingora's limit, and not past it.
        let mut partial = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        partial.resize(MAX_RESPONSE_HEAD, b'v');
        assert!(matches!(
            parse_response(&partial, false, b"id", true, &mut out),
            Ok(None)
        ));
        partial.push(b'v');
        assert!(parse_response(&partial, false, b"id", true, &mut out).is_err());
    }

    #[test]
    fn response_heads_are_copied_with_the_gateways_fields() {
        let id: &[u8] = b"req-1";
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 200 Fine\r\nX-Request-Id: theirs\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length : 2\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\n\r\nok";
        let head = parse_response(raw, false, id, true, &mut out)
            .expect("valid")
            .expect("complete");
        assert_eq!(head.status, 200);
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.upstream_close);
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 Fine\r\nX-Request-Id: req-1\r\nContent-Length: 2\r\n\
             Date: Sun, 29 Nov 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n\r\n"
        );

        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n";
        let head = parse_response(raw, false, id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!String::from_utf8_lossy(&out).contains("Content-Length"));

        let raw = b"HTTP/1.1 200 OK\r\n\r\nbody until close";
        let head = parse_response(raw, false, id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(String::from_utf8_lossy(&out).contains("Connection: close\r\n"));

        let raw = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n";
        let head = parse_response(raw, false, id, true, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::None);

        // A list of one number, or the field repeated: one `Content-Length` goes to the client.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\nX-A: a\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: a\r\ncontent-length: 2,2\r\n\r\nok",
        ] {
            let head = parse_response(raw, false, id, true, &mut out)
                .unwrap()
                .unwrap();
            assert_eq!(head.framing, Framing::Length(2));
            let text = String::from_utf8_lossy(&out);
            assert!(text.contains("Content-Length: 2\r\nX-A: a\r\n"), "{text}");
            assert_eq!(
                text.to_ascii_lowercase().matches("content-length").count(),
                1
            );
        }

        // With `Transfer-Encoding`, any `Content-Length` is dropped, even an invalid one.
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2, 3\r\n\r\n",
        ] {
            let head = parse_response(raw, false, id, true, &mut out)
                .unwrap()
                .unwrap();
            assert_eq!(head.framing, Framing::Chunked);
            let text = String::from_utf8_lossy(&out);
            assert!(!text.to_ascii_lowercase().contains("content-length"), "{text}");
        }

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"SMTP 220 hello\r\n\r\n",
        ] {
            assert!(parse_response(bad, false, id, true, &mut out).is_err());
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nDa", false, id, true, &mut out),
            Ok(None)
        ));
    }
}
