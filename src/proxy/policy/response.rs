//! What the client gets of the upstream's response head: decided here for both paths, field by
//! field, after [`ResponseFacts`] has seen the whole head.

use super::fields::{classify, names_match, FieldName};
use super::{content_length_list, list, parse_content_length, Fields, Upgrade};

/// What the upstream response head says about its framing and connection (RFC 9112 §6.3).
#[derive(Clone, Debug)]
pub struct ResponseFacts {
    /// The length from `Content-Length` (a repeated number counts as it).
    pub length: Option<u64>,
    /// `Transfer-Encoding` seen: whether its last coding is `chunked`.
    pub chunked: Option<bool>,
    /// The upstream closes the connection after this response.
    pub upstream_close: bool,
    /// A `Date` field is present.
    pub date: bool,
    /// An invalid or conflicting `Content-Length`: fatal unless the response is chunked.
    pub length_error: Option<&'static str>,
    /// `Connection` names fields besides `close`, `keep-alive` and `upgrade`.
    pub nominations: bool,
    /// One `Content-Length` field in canonical form.
    length_canonical: bool,
    length_fields: u8,
    /// Transfer codings named, across every `Transfer-Encoding` field.
    codings: u8,
}

impl ResponseFacts {
    /// Facts of a response in HTTP/1.`minor` (an HTTP/1.0 response closes unless it says
    /// keep-alive).
    pub fn new(minor: u8) -> Self {
        ResponseFacts {
            length: None,
            chunked: None,
            upstream_close: minor == 0,
            date: false,
            length_error: None,
            nominations: false,
            length_canonical: false,
            length_fields: 0,
            codings: 0,
        }
    }

    /// The facts of a whole head.
    pub fn of<F: Fields + ?Sized>(minor: u8, fields: &F) -> Self {
        let mut facts = ResponseFacts::new(minor);
        for i in 0..fields.count() {
            facts.observe(fields.class(i), fields.value(i), minor);
        }
        facts
    }

    /// Notes one field.
    #[inline]
    pub fn observe(&mut self, class: FieldName, value: &[u8], minor: u8) {
        match class {
            FieldName::ContentLength => {
                self.length_fields = self.length_fields.saturating_add(1);
                match content_length_list(value) {
                    None => self.length_error = Some("invalid Content-Length"),
                    Some(n) if self.length.is_some_and(|m| m != n) => {
                        self.length_error = Some("conflicting Content-Length")
                    }
                    Some(n) => {
                        self.length = Some(n);
                        self.length_canonical = self.length_fields == 1
                            && parse_content_length(value).is_some()
                            && (value.len() == 1 || value[0] != b'0');
                    }
                }
            }
            FieldName::TransferEncoding => {
                for coding in list(value) {
                    self.codings = self.codings.saturating_add(1);
                    self.chunked = Some(coding.eq_ignore_ascii_case(b"chunked"));
                }
                // A field with no coding at all still says the body is not length-delimited.
                self.chunked.get_or_insert(false);
            }
            FieldName::Connection => {
                for option in list(value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        self.upstream_close = true;
                    } else if option.eq_ignore_ascii_case(b"keep-alive") {
                        if minor == 0 {
                            self.upstream_close = false;
                        }
                    } else if !option.eq_ignore_ascii_case(b"upgrade") {
                        self.nominations = true;
                    }
                }
            }
            FieldName::Date => self.date = true,
            _ => {}
        }
    }

    /// The framing error that makes the response unusable, if any (a length error does not
    /// matter once `Transfer-Encoding` decides the framing).
    pub fn error(&self) -> Option<&'static str> {
        self.length_error.filter(|_| self.chunked.is_none())
    }
}

/// What happens to one upstream response field on its way to the client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ResponseAction {
    /// Sent as received.
    Keep,
    /// Not sent.
    Drop,
    /// The request's `X-Request-Id` sent in its place.
    RequestId,
    /// `Content-Length` sent in canonical form, the number the facts hold.
    ContentLength,
}

/// Decides response fields one by one, in order (the first of a name may differ from later
/// ones).
pub struct ResponsePlanner<'f> {
    facts: &'f ResponseFacts,
    informational: bool,
    id_done: bool,
    length_done: bool,
}

impl<'f> ResponsePlanner<'f> {
    /// A planner for a head with `facts`; `informational` for a 1xx head.
    pub fn new(facts: &'f ResponseFacts, informational: bool) -> Self {
        ResponsePlanner {
            facts,
            informational,
            id_done: false,
            length_done: false,
        }
    }

    /// The action for the next field (`name`, of `class`); `fields` is the whole head, for the
    /// fields `Connection` names. The rules: `Keep-Alive` and `Proxy-Connection` (hop-by-hop,
    /// RFC 9110 §7.6.1) are dropped, and in a final head `Connection` and the fields it names
    /// too (the gateway writes its own `Connection`); the first `X-Request-Id` becomes the
    /// request's, later ones go; `Content-Length` goes when `Transfer-Encoding` decides the
    /// framing and is sent once, canonical, otherwise (RFC 9110 §8.6, RFC 9112 §6.3). A 1xx
    /// head keeps its `Connection` and `Content-Length` fields as sent.
    #[inline]
    pub fn action<F: Fields + ?Sized>(
        &mut self,
        class: FieldName,
        name: &[u8],
        fields: &F,
    ) -> ResponseAction {
        match class {
            FieldName::KeepAlive | FieldName::ProxyConnection => ResponseAction::Drop,
            FieldName::Connection if !self.informational => ResponseAction::Drop,
            FieldName::XRequestId if self.id_done => ResponseAction::Drop,
            FieldName::XRequestId => {
                self.id_done = true;
                ResponseAction::RequestId
            }
            FieldName::ContentLength if self.informational => ResponseAction::Keep,
            FieldName::ContentLength if self.facts.chunked.is_some() || self.length_done => {
                ResponseAction::Drop
            }
            FieldName::ContentLength => {
                self.length_done = true;
                if self.facts.length_canonical {
                    ResponseAction::Keep
                } else {
                    ResponseAction::ContentLength
                }
            }
            FieldName::Other if self.facts.nominations && !self.informational => {
                if connection_names(fields, name) {
                    ResponseAction::Drop
                } else {
                    ResponseAction::Keep
                }
            }
            _ => ResponseAction::Keep,
        }
    }

    /// Whether the request's `X-Request-Id` must be added after the fields (none was replaced).
    pub fn add_request_id(&self) -> bool {
        !self.id_done
    }
}

/// Whether a `Connection` field of the head names `name`.
fn connection_names<F: Fields + ?Sized>(fields: &F, name: &[u8]) -> bool {
    (0..fields.count())
        .filter(|&i| classify(fields.name(i)) == FieldName::Connection)
        .any(|i| list(fields.value(i)).any(|o| names_match(o, name)))
}

/// Whether an upstream `101 Switching Protocols` may reach the client: only as the answer to a
/// WebSocket handshake the gateway forwarded (RFC 9110 §15.2.2: a server must not switch to a
/// protocol the client did not ask for). Anything else is a broken upstream: 502.
pub fn switch_allowed(upgrade: Upgrade) -> bool {
    upgrade == Upgrade::WebSocket
}

/// How a response body reaches an HTTP/1.0 client, which cannot read a transfer coding (RFC
/// 9112 §6.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Http10Body {
    /// No `Transfer-Encoding`: sent as framed.
    AsIs,
    /// Exactly `chunked`: sent without `Transfer-Encoding` and `Content-Length`, the body
    /// decoded, the connection's close ending it (RFC 9112 §6.3).
    Unchunked,
    /// Another coding (`gzip, chunked`): the gateway does not decode it and cannot hand over an
    /// unlabelled body, so the client gets 502.
    Refused,
}

/// [`Http10Body`] for a response with `facts`.
pub fn for_http10_client(facts: &ResponseFacts) -> Http10Body {
    match (facts.chunked, facts.codings) {
        (None, _) => Http10Body::AsIs,
        (Some(true), 1) => Http10Body::Unchunked,
        _ => Http10Body::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_1_0_client_gets_exactly_one_chunked_coding_undone() {
        let check = |fields: &[&str]| {
            let view: Vec<(&[u8], &[u8])> = fields
                .iter()
                .map(|v| (&b"Transfer-Encoding"[..], v.as_bytes()))
                .collect();
            for_http10_client(&ResponseFacts::of(1, view.as_slice()))
        };
        assert_eq!(check(&[]), Http10Body::AsIs);
        assert_eq!(check(&["chunked"]), Http10Body::Unchunked);
        assert_eq!(check(&["Chunked"]), Http10Body::Unchunked);
        assert_eq!(check(&[" chunked , "]), Http10Body::Unchunked);
        for refused in [
            &["gzip, chunked"][..],
            &["gzip", "chunked"],
            &["chunked", "chunked"],
            &["chunked, chunked"],
            &["xchunked"],
            &["identity"],
            &[""],
        ] {
            assert_eq!(check(refused), Http10Body::Refused, "{refused:?}");
        }
    }
}
