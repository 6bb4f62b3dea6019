//! The fast path's request-head classifier (`fast_path::wire::request_head`: httparse, the
//! request line and target checks, the policy's field scan) and pingora-proxy's path's reading
//! of the same head (`DownstreamHead::parse`) on arbitrary bytes from a client.
//!
//! Checked besides "no panic":
//! - a head the fast path takes (`Plain`) has every range inside the head, an origin-form
//!   target whose path ends at its first `?`, an exact request line, and reads the same on
//!   pingora-proxy's path (method, target, fields, Host, framing);
//! - every read boundary before the head's end gives `Partial`, and the head alone gives the
//!   same answer as the head with whatever follows it;
//! - a refusal is 400 or 431, and pingora-proxy's path refuses the same head with the same
//!   status; `DownstreamHead::parse` refuses only with 400, 431 or 501.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokengate::proxy::downstream::DownstreamHead;
use tokengate::proxy::fast_path::wire::{self, PlainRequest, RequestHead, MAX_HEAD};
use tokengate::proxy::policy::target::{self, TargetForm};
use tokengate::proxy::policy::{Fields, Upgrade};

fuzz_target!(|data: &[u8]| {
    let down = DownstreamHead::parse(Bytes::copy_from_slice(data));
    if let Err(e) = &down {
        assert!(matches!(e.status(), 400 | 431 | 501), "{e:?}");
    }
    match wire::request_head(data) {
        RequestHead::Plain(p) => plain(data, &p),
        RequestHead::Partial => {
            assert!(data.len() < MAX_HEAD);
            assert!(
                down.is_err(),
                "pingora-proxy's path read an incomplete head"
            );
        }
        RequestHead::Delegate => {}
        RequestHead::Refuse(e) => {
            assert!(matches!(e.status(), 400 | 431), "{e:?}");
            if data.len() < MAX_HEAD {
                match &down {
                    Err(d) => assert_eq!(d.status(), e.status(), "{e:?} / {d:?}"),
                    Ok(_) => panic!("the fast path refuses ({e:?}), pingora-proxy's path not"),
                }
            }
        }
    }
});

fn plain(data: &[u8], p: &PlainRequest) {
    let head = &data[..p.head_len];
    assert!(p.head_len <= MAX_HEAD);
    assert!(head.ends_with(b"\n"));
    let inside = |r: &std::ops::Range<usize>| r.start <= r.end && r.end <= p.head_len;
    assert!(inside(&p.target) && inside(&p.host));
    assert!(p.request_id.as_ref().is_none_or(inside));
    assert!(p
        .fields
        .iter()
        .all(|(n, v)| inside(n) && inside(v) && n.end <= v.start));
    let target = &data[p.target.clone()];
    assert_eq!(target.first(), Some(&b'/'));
    let path_len = target
        .iter()
        .position(|&b| b == b'?')
        .unwrap_or(target.len());
    assert_eq!(p.path_end, p.target.start + path_len);
    assert!(target::request_line_ok(data));
    assert_eq!(
        target::target_form(&p.method, target),
        Some(TargetForm::Origin)
    );
    let (path, query) = target::path_and_query(TargetForm::Origin, target);
    assert_eq!(path, &target[..path_len]);
    assert_eq!(query, target.get(path_len + 1..));

    // pingora-proxy's path reads the same request from the same head.
    let down = DownstreamHead::parse(Bytes::copy_from_slice(head))
        .unwrap_or_else(|e| panic!("the fast path takes it, pingora-proxy's path: {e:?}"));
    assert_eq!(down.method, p.method);
    assert!(down.http11);
    assert_eq!(down.form, TargetForm::Origin);
    assert_eq!(down.target(), target);
    assert_eq!(down.host(), Some(&data[p.host.clone()]));
    assert_eq!(down.facts.close, p.close);
    assert_eq!(down.facts.content_length.unwrap_or(0), p.body_len as u64);
    assert_eq!(down.count(), p.fields.len());
    for (i, (name, value)) in p.fields.iter().enumerate() {
        assert_eq!(down.name(i), &data[name.clone()]);
        assert_eq!(down.value(i), &data[value.clone()]);
    }
    let fast = !(down.facts.chunked
        || down.facts.expect
        || down.facts.upgrade != Upgrade::None
        || down.facts.nominations > 0
        || down.facts.hop_by_hop);
    assert_eq!(fast, p.fast);

    // The head alone reads the same; a read that ends before it is incomplete.
    match wire::request_head(head) {
        RequestHead::Plain(q) => {
            assert_eq!(
                (q.head_len, q.target, q.host),
                (p.head_len, p.target.clone(), p.host.clone())
            );
        }
        other => panic!("the head alone: {other:?}"),
    }
    let step = (p.head_len / 16).max(1);
    let splits = (0..p.head_len)
        .step_by(step)
        .chain(p.head_len.saturating_sub(2)..p.head_len);
    for k in splits {
        match wire::request_head(&data[..k]) {
            RequestHead::Partial => {}
            other => panic!(
                "the first {k} bytes of a {}-byte head: {other:?}",
                p.head_len
            ),
        }
    }
}
