//! The fast path's chunked-body tracker (`fast_path::wire::chunked_body`, RFC 9112 §7.1) on
//! arbitrary bytes from an upstream, fed whole and in pieces.
//!
//! Checked besides "no panic":
//! - the answer (where the body ends, not yet, or malformed) is the same fed in one piece, in
//!   pieces of 1 to 7 bytes, and in pieces of uneven sizes: where the reads split a body never
//!   changes it;
//! - it is the answer of a reference reader that sees the whole input at once (the same rules:
//!   a chunk-size line read by `httparse::parse_chunk_size` after the stricter checks, one not
//!   ended yet as far as its start, chunk data then CRLF, trailer lines ending in CRLF with no
//!   bare CR or LF, an empty line last);
//! - a body that ends, ends in CRLF CRLF, and ends at the same place fed only up to its end;
//!   one byte less is "not yet".
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::proxy::fast_path::wire::{self, CHUNK_LINE_EARLY_CHECK, MAX_CHUNK_LINE};

/// The answer without the error's wording: a split can show an error earlier, in other words.
fn answer(r: Result<Option<usize>, &str>) -> Result<Option<usize>, ()> {
    r.map_err(|_| ())
}

fuzz_target!(|data: &[u8]| {
    let whole = answer(wire::chunked_body(&[data]));
    assert_eq!(whole, reference(data), "reference");
    for step in 1..=7 {
        let pieces: Vec<&[u8]> = data.chunks(step).collect();
        assert_eq!(
            answer(wire::chunked_body(&pieces)),
            whole,
            "pieces of {step}"
        );
    }
    // Uneven pieces: sizes 1 to 64 from a small generator seeded by the input.
    let mut seed = data.iter().fold(0x9e37_79b9_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let mut pieces = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((seed >> 16) as usize % 64 + 1).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    assert_eq!(answer(wire::chunked_body(&pieces)), whole, "uneven pieces");

    if let Ok(Some(end)) = whole {
        assert!(end <= data.len());
        assert!(data[..end].ends_with(b"\r\n\r\n"));
        assert_eq!(wire::chunked_body(&[&data[..end]]), Ok(Some(end)));
        assert_eq!(wire::chunked_body(&[&data[..end - 1]]), Ok(None));
    }
});

/// The whole-input reading of a chunked body: `Ok(Some(end))`, `Ok(None)` (not ended, nothing
/// wrong so far) or `Err(())`.
fn reference(data: &[u8]) -> Result<Option<usize>, ()> {
    let mut i = 0;
    loop {
        // chunk-size [ chunk-ext ] CRLF
        let rest = &data[i..];
        if rest.is_empty() {
            return Ok(None);
        }
        let lf = rest.iter().position(|&b| b == b'\n');
        let line = lf.map_or(rest, |lf| &rest[..=lf]);
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 15 || line.len() > MAX_CHUNK_LINE {
            return Err(());
        }
        // A line not ended yet is read as far as its start.
        let read = match lf {
            Some(_) => line,
            None => &line[..line.len().min(CHUNK_LINE_EARLY_CHECK)],
        };
        let size = match (lf, httparse::parse_chunk_size(read)) {
            (None, Ok(httparse::Status::Partial)) => return Ok(None),
            (Some(_), Ok(httparse::Status::Complete((n, size))))
                if n == line.len() && line.ends_with(b"\r\n") =>
            {
                size
            }
            _ => return Err(()),
        };
        i += line.len();
        if size == 0 {
            break;
        }
        // chunk-data CRLF
        if ((data.len() - i) as u64) < size {
            return Ok(None);
        }
        i += size as usize;
        match &data[i..] {
            [] | [b'\r'] => return Ok(None),
            [b'\r', b'\n', ..] => i += 2,
            _ => return Err(()),
        }
    }
    // *( field-line CRLF ) CRLF
    loop {
        let rest = &data[i..];
        let Some(p) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
            return Ok(None);
        };
        if rest[p] == b'\n' {
            return Err(());
        }
        match rest.get(p + 1) {
            None => return Ok(None),
            Some(b'\n') if p == 0 => return Ok(Some(i + 2)),
            Some(b'\n') => i += p + 2,
            Some(_) => return Err(()),
        }
    }
}
