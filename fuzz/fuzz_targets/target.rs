//! The request-target's readers in `policy::target` on arbitrary bytes from a client:
//! `strip_access_token` (the query sent upstream), `target_form`, `path_and_query` and
//! `request_line_ok`.
//!
//! Checked besides "no panic":
//! - `strip_access_token` removes exactly the parameters that are `access_token` in some
//!   spelling (each parameter alone, `&` and `;` separating them), keeps the others in order,
//!   never lengthens the query, and finds nothing left to remove in its own output;
//! - `target_form` gives origin-form exactly to a target starting with `/` (not for CONNECT);
//!   `path_and_query` returns parts of the target, a path never empty;
//! - an exact request line (`request_line_ok`) has three parts separated by single spaces,
//!   `HTTP/1.0` or `HTTP/1.1` last, and ends in CRLF.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use tokengate::proxy::policy::target::{self, TargetForm};

fuzz_target!(|data: &[u8]| {
    query(data);
    for method in [Method::GET, Method::OPTIONS, Method::CONNECT] {
        let form = target::target_form(&method, data);
        let origin = method != Method::CONNECT && data.first() == Some(&b'/');
        assert_eq!(form == Some(TargetForm::Origin), origin, "{method}");
        if let Some(form) = form {
            let (path, query) = target::path_and_query(form, data);
            assert!(!path.is_empty());
            assert!(path == b"/" || within(path, data));
            assert!(query.is_none_or(|q| within(q, data)));
        }
    }
    if target::request_line_ok(data) {
        let end = data.iter().position(|&b| b == b'\n').expect("a line end");
        let line = &data[..end];
        assert_eq!(line.last(), Some(&b'\r'));
        let parts: Vec<&[u8]> = line[..end - 1].split(|&b| b == b' ').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| !p.is_empty()));
        assert!(parts[2] == b"HTTP/1.1" || parts[2] == b"HTTP/1.0");
    }
});

/// Whether `part` is a slice of `whole`.
fn within(part: &[u8], whole: &[u8]) -> bool {
    let (p, w) = (part.as_ptr() as usize, whole.as_ptr() as usize);
    p >= w && p + part.len() <= w + whole.len()
}

fn query(q: &[u8]) {
    let separator = |b: &u8| *b == b'&' || *b == b';';
    // One parameter alone is `access_token` when stripping it leaves nothing.
    let is_token = |p: &[u8]| !p.iter().any(separator) && target::strip_access_token(p).is_some();
    let kept: Vec<&[u8]> = q.split(separator).filter(|p| !is_token(p)).collect();
    match target::strip_access_token(q) {
        None => assert_eq!(kept.len(), q.split(separator).count()),
        Some(out) => {
            assert!(out.len() < q.len() || q.is_empty());
            assert_eq!(target::strip_access_token(&out), None, "{out:?}");
            let got: Vec<&[u8]> = if out.is_empty() && kept.is_empty() {
                Vec::new()
            } else {
                out.split(separator).collect()
            };
            assert_eq!(got, kept);
        }
    }
    for p in q.split(separator) {
        if let Some(rest) = target::strip_access_token(p) {
            assert!(rest.is_empty(), "one parameter {p:?} left {rest:?}");
        }
    }
}
