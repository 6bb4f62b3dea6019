//! The request policy: the one place that decides what the upstream and the client get.
//!
//! tokengate's promise is that inbound credentials never leave it and exactly one gateway
//! token does. Both proxy paths — the fast path (`proxy::fast_path`) and pingora-proxy's path
//! (`proxy::Gateway`) — ask this module and only serialise its answers:
//!
//! ```text
//!  client fields ──► RequestScan (framing facts, refusals: 400 / 431 / 501)
//!        │                  │
//!        ▼                  ▼
//!  admission: client (403) → framing → route (404) → method (405)      [admit]
//!        │
//!        ▼
//!  plan_request: the target, and for every client field keep / drop / put, then the
//!  gateway's fields in their order                                     [Plan]
//!        │
//!        ▼  fast path: bytes into its buffer   pingora: a RequestHeader built from the plan
//!  upstream response ──► ResponseFacts + response_action per field
//!  gateway errors ─────► errors::ErrorResponse (status, fields, JSON body)
//! ```
//!
//! Everything here is pure: no I/O, no clock, no shared state; it is tested without a network
//! (`tests/proxy/request_policy.rs` runs both serialisers over generated requests).

pub mod client;
pub mod errors;
pub mod fields;
pub mod response;
pub mod target;

use std::io::Write as _;

use http::Method;

pub use errors::{ErrorResponse, GatewayError};
pub use fields::{classify, FieldName};
use target::TargetForm;

use crate::proxy::routes::Route;

/// Read access to a request's fields in received order, for both paths' storage: the fast
/// path's byte ranges into its buffer, pingora's header map.
pub trait Fields {
    /// How many fields.
    fn count(&self) -> usize;
    /// The `i`-th field's name, as received.
    fn name(&self, i: usize) -> &[u8];
    /// The `i`-th field's value, as received (surrounding whitespace trimmed).
    fn value(&self, i: usize) -> &[u8];
    /// The `i`-th field's class; storage that classified the names already says so.
    fn class(&self, i: usize) -> FieldName {
        classify(self.name(i))
    }
}

impl Fields for [(&[u8], &[u8])] {
    fn count(&self) -> usize {
        self.len()
    }
    fn name(&self, i: usize) -> &[u8] {
        self[i].0
    }
    fn value(&self, i: usize) -> &[u8] {
        self[i].1
    }
}

/// Most `Connection` options a request may carry: more is refused (400), as Envoy and
/// pingora refuse it, so a request cannot make the gateway do unbounded work.
const MAX_CONNECTION_OPTIONS: u8 = 9;

/// The WebSocket handshake fields of a request (RFC 6455 §4.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Upgrade {
    /// No `Upgrade` field.
    #[default]
    None,
    /// HTTP/1.1, one `Upgrade: websocket` and `Connection: upgrade`: forwarded.
    WebSocket,
    /// Any other upgrade: its fields are removed and the request is a plain one.
    Other,
}

/// What a request's fields say about its framing and connection, gathered field by field
/// ([`RequestScan`]); refusals are decided here, for both paths.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts {
    /// Index of the `Host` field (at most one is accepted).
    pub host: Option<usize>,
    /// Index of the first `X-Request-Id` field.
    pub request_id: Option<usize>,
    /// An `X-Forwarded-For` field is present (its values lead the gateway's).
    pub forwarded_for: bool,
    /// The body length from `Content-Length` (a list of one number repeated counts as it).
    pub content_length: Option<u64>,
    /// One `Content-Length` field in canonical form (digits, no leading zero): sent as it came.
    pub length_canonical: bool,
    /// `Transfer-Encoding: chunked`.
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection` options other than `close`, `keep-alive` and `upgrade`: fields to remove.
    pub nominations: u8,
    /// The WebSocket handshake.
    pub upgrade: Upgrade,
    /// `Expect` present.
    pub expect: bool,
    /// `TE`, `Trailer` or `HTTP2-Settings` present (hop-by-hop fields, removed).
    pub hop_by_hop: bool,
    connection_upgrade: bool,
    upgrade_fields: u8,
    upgrade_websocket: bool,
    transfer_codings: u8,
    transfer_encoding_fields: u8,
    transfer_coding_empty: bool,
    content_length_fields: u8,
}

/// Gathers [`RequestFacts`] one field at a time, refusing a request whose framing or fields
/// a server must refuse. One scan serves both paths: the fast path feeds it while it parses,
/// pingora's path from the parsed header.
#[derive(Default)]
pub struct RequestScan {
    facts: RequestFacts,
    error: Option<GatewayError>,
}

impl RequestScan {
    /// Notes the `i`-th field (`class` as [`classify`] gives it). The first refusal is kept.
    #[inline(always)]
    pub fn field(&mut self, i: usize, class: FieldName, value: &[u8]) {
        let f = &mut self.facts;
        let refuse = |why| Some(GatewayError::BadRequest(why));
        let error = match class {
            FieldName::Other => None,
            FieldName::Host if f.host.is_some() => refuse("more than one Host field"),
            // RFC 9112 §3.2: a server must answer 400 to a Host that is not a valid authority.
            FieldName::Host if !valid_host(value) => refuse("invalid Host"),
            FieldName::Host => {
                f.host = Some(i);
                None
            }
            FieldName::XRequestId => {
                f.request_id.get_or_insert(i);
                None
            }
            FieldName::XForwardedFor => {
                f.forwarded_for = true;
                None
            }
            FieldName::ContentLength => {
                f.content_length_fields = f.content_length_fields.saturating_add(1);
                match content_length_list(value) {
                    // RFC 9112 §6.3: an invalid length, or lengths that differ, are fatal.
                    None => refuse("invalid Content-Length"),
                    Some(n) if f.content_length.is_some_and(|m| m != n) => {
                        refuse("conflicting Content-Length fields")
                    }
                    Some(n) => {
                        f.length_canonical = f.content_length_fields == 1
                            && parse_content_length(value).is_some()
                            && (value.len() == 1 || value[0] != b'0');
                        f.content_length = Some(n);
                        None
                    }
                }
            }
            FieldName::TransferEncoding => {
                f.transfer_encoding_fields = f.transfer_encoding_fields.saturating_add(1);
                // Every element counts, empty ones too: a `Transfer-Encoding` that names no
                // coding (`""`, `,`, `chunked,`) is refused, never taken as absent.
                for coding in value.split(|b| *b == b',').map(|e| e.trim_ascii()) {
                    f.transfer_coding_empty |= coding.is_empty();
                    f.transfer_codings = f.transfer_codings.saturating_add(1);
                    f.chunked = coding.eq_ignore_ascii_case(b"chunked");
                }
                None
            }
            FieldName::Connection => self.connection(value),
            FieldName::Upgrade => {
                f.upgrade_fields = f.upgrade_fields.saturating_add(1);
                f.upgrade_websocket = value.eq_ignore_ascii_case(b"websocket");
                None
            }
            FieldName::Expect => {
                f.expect = true;
                None
            }
            FieldName::Te | FieldName::Trailer | FieldName::Http2Settings => {
                f.hop_by_hop = true;
                None
            }
            _ => None,
        };
        // Most fields refuse nothing: no store for them.
        if let Some(e) = error {
            self.error.get_or_insert(e);
        }
    }

    fn connection(&mut self, value: &[u8]) -> Option<GatewayError> {
        let f = &mut self.facts;
        for option in list(value) {
            if option.eq_ignore_ascii_case(b"close") {
                f.close = true;
            } else if option.eq_ignore_ascii_case(b"upgrade") {
                f.connection_upgrade = true;
            } else if !option.eq_ignore_ascii_case(b"keep-alive") {
                f.nominations = f.nominations.saturating_add(1);
                if f.nominations > MAX_CONNECTION_OPTIONS {
                    return Some(GatewayError::BadRequest("too many Connection options"));
                }
                if !option.iter().all(|&b| target::is_tchar(b)) {
                    return Some(GatewayError::BadRequest("invalid Connection option"));
                }
                // RFC 9110 §7.6.1: a field the gateway sets or that frames the message cannot
                // be made hop-by-hop by the client.
                let class = classify(option);
                if class == FieldName::Underscored || class.protected_from_connection() {
                    return Some(GatewayError::BadRequest(
                        "Connection names a field the gateway sets",
                    ));
                }
            }
        }
        None
    }

    /// The facts, or the refusal: RFC 9112 §3.2 (an HTTP/1.1 request without `Host`), §6.1
    /// (a transfer coding other than `chunked`: 501; `Transfer-Encoding` with
    /// `Content-Length`: 400).
    pub fn finish(self, version: http::Version) -> Result<RequestFacts, GatewayError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut f = self.facts;
        if f.host.is_none() && version == http::Version::HTTP_11 {
            return Err(GatewayError::BadRequest("HTTP/1.1 request without Host"));
        }
        if f.transfer_encoding_fields > 0 {
            // RFC 9112 §6.1: HTTP/1.0 has no transfer codings; a request carrying one is a
            // smuggling attempt as often as not.
            if version != http::Version::HTTP_11 {
                return Err(GatewayError::BadRequest("Transfer-Encoding in HTTP/1.0"));
            }
            if f.transfer_coding_empty {
                return Err(GatewayError::BadRequest("empty transfer coding"));
            }
            if f.transfer_encoding_fields != 1 || f.transfer_codings != 1 || !f.chunked {
                return Err(GatewayError::NotImplemented);
            }
            if f.content_length_fields > 0 {
                return Err(GatewayError::BadRequest(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
        }
        f.upgrade = match f.upgrade_fields {
            0 => Upgrade::None,
            1 if f.upgrade_websocket
                && f.connection_upgrade
                && version == http::Version::HTTP_11 =>
            {
                Upgrade::WebSocket
            }
            _ => Upgrade::Other,
        };
        Ok(f)
    }
}

/// The request line's part of admission: the method and the target form. TRACE (the upstream
/// could echo the gateway's token back, RFC 9110 §9.3.8) and CONNECT are refused with 405
/// unless the route's `allow_methods` names TRACE; a target in a form the method does not take
/// is 400 (RFC 9112 §3.2).
pub fn target_form(method: &Method, target: &[u8]) -> Result<TargetForm, GatewayError> {
    target::target_form(method, target).ok_or(GatewayError::BadRequest(
        "request-target not allowed for the method",
    ))
}

/// Admission in the order both paths apply it: the client (403), the request's framing, the
/// route (404), the method (405). `framing` is the outcome of [`RequestScan::finish`] and
/// [`target_form`]; `route` the route table's answer.
pub fn admit<'r>(
    client_allowed: bool,
    framing: Result<(), GatewayError>,
    route: Option<&'r Route>,
    method: &Method,
) -> Result<&'r Route, GatewayError> {
    if !client_allowed {
        return Err(GatewayError::ClientNotAllowed);
    }
    framing?;
    let route = route.ok_or(GatewayError::NoRoute)?;
    if !route.allows(method) {
        return Err(GatewayError::MethodNotAllowed);
    }
    Ok(route)
}

/// Which account's token a request carries (docs/per-user-tokens.md): decided here once for
/// both proxy paths ([`subject`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Subject<'a> {
    /// The route's own token (its configured `sub`, or the client credentials grant's).
    Route,
    /// A token for this managed user (RFC 7523 §3 `sub`): the value of the route's subject
    /// field, allowed by `[routes.subjects]` `allow`, from a client in `header_clients`.
    User(&'a [u8]),
    /// 403 `subject_not_allowed`: the subject field from a client outside `header_clients`,
    /// more than once, empty, or naming a subject outside `allow`. Never the route's token.
    Refused,
}

/// The subject decision for an admitted request on `route` from the client at `client`:
/// [`Subject::Route`] at once when the route reads no subject field (no pass over the
/// fields), else one pass comparing names with the route's `header` (any case, `_` as `-`,
/// as the plan's strip list compares it: the plan drops the field).
pub fn subject<'f, F: Fields + ?Sized>(
    fields: &'f F,
    route: &Route,
    client: Option<std::net::IpAddr>,
) -> Subject<'f> {
    let (Some(header), Some(subjects)) = (route.subject_header.as_deref(), &route.subjects) else {
        return Subject::Route;
    };
    let mut found: Option<&[u8]> = None;
    for i in 0..fields.count() {
        let name = fields.name(i);
        if name.len() == header.len() && fields::names_match(name, header) {
            if found.is_some() {
                return Subject::Refused;
            }
            found = Some(fields.value(i));
        }
    }
    let Some(value) = found else {
        return Subject::Route;
    };
    let trusted = client.is_some_and(|ip| subjects.header_client(ip));
    if trusted && subjects.allows(value) {
        Subject::User(value)
    } else {
        Subject::Refused
    }
}

/// What happens to one client field on its way upstream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Sent as received (name spelling and value bytes).
    Keep,
    /// Not sent.
    Drop,
    /// The gateway's field sent in its place.
    Put(Set),
}

/// A field the gateway sets on the upstream request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Set {
    /// `Authorization: Bearer <access token>`: exactly one.
    Authorization,
    /// `X-Forwarded-Host`: the client's `Host`.
    ForwardedHost,
    /// `Host`: the upstream's authority (TLS SNI uses it too).
    Host,
    /// `X-Forwarded-Proto: http`.
    ForwardedProto,
    /// `X-Forwarded-For`: the client's list, then the client's address (RFC 7239 §5.2 order).
    ForwardedFor,
    /// `X-Request-Id`.
    RequestId,
    /// `Content-Length` in canonical form (RFC 9110 §8.6).
    ContentLength,
    /// `Transfer-Encoding: chunked`.
    TransferEncoding,
    /// `Connection: Upgrade`, for a WebSocket handshake.
    ConnectionUpgrade,
    /// `Upgrade: websocket`.
    UpgradeWebSocket,
}

impl Set {
    /// The field name as the gateway spells it.
    pub fn name(self) -> &'static str {
        let line = self.line_start();
        &line[..line.len() - 2]
    }

    /// The start of the field line in HTTP/1.1: the name, `:` and one space.
    #[inline]
    pub const fn line_start(self) -> &'static str {
        match self {
            Set::Authorization => "Authorization: ",
            Set::ForwardedHost => "X-Forwarded-Host: ",
            Set::Host => "Host: ",
            Set::ForwardedProto => "X-Forwarded-Proto: ",
            Set::ForwardedFor => "X-Forwarded-For: ",
            Set::RequestId => "X-Request-Id: ",
            Set::ContentLength => "Content-Length: ",
            Set::TransferEncoding => "Transfer-Encoding: ",
            Set::ConnectionUpgrade => "Connection: ",
            Set::UpgradeWebSocket => "Upgrade: ",
        }
    }

    /// [`Set::line_start`] of every field, zero-padded to [`LINE_START_WIDTH`] bytes, with its
    /// length: [`write_line`] copies a fixed width (a few register moves, where a copy of
    /// unknown length is a call) and cuts the padding off again.
    const PADDED_LINE_STARTS: [([u8; LINE_START_WIDTH], usize); 10] = {
        let all = Set::ALL;
        let mut table = [([0u8; LINE_START_WIDTH], 0); 10];
        let mut i = 0;
        while i < all.len() {
            let line = all[i].line_start().as_bytes();
            let mut j = 0;
            while j < line.len() {
                table[all[i] as usize].0[j] = line[j];
                j += 1;
            }
            table[all[i] as usize].1 = line.len();
            i += 1;
        }
        table
    };

    /// Every field the gateway sets.
    pub const ALL: [Set; 10] = [
        Set::Authorization,
        Set::ForwardedHost,
        Set::Host,
        Set::ForwardedProto,
        Set::ForwardedFor,
        Set::RequestId,
        Set::ContentLength,
        Set::TransferEncoding,
        Set::ConnectionUpgrade,
        Set::UpgradeWebSocket,
    ];

    /// Order of the gateway's fields that take no client field's place.
    const APPENDED: [Set; 8] = [
        Set::Authorization,
        Set::ForwardedHost,
        Set::Host,
        Set::ForwardedProto,
        Set::ForwardedFor,
        Set::RequestId,
        Set::ConnectionUpgrade,
        Set::UpgradeWebSocket,
    ];

    fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// What the gateway sends besides the client's fields: the inputs of the values it sets.
pub struct Forwarding<'a> {
    /// The route (strip list, cookie policy, upstream `Host`, path rewriting).
    pub route: &'a Route,
    /// The client's address as `X-Forwarded-For` shows it (IPv4-mapped IPv6 as IPv4); `None`
    /// when the peer has no IP address.
    pub client_ip: Option<&'a [u8]>,
    /// How many entries of the client's `X-Forwarded-For` list come before `client_ip`
    /// ([`client::ClientAddress::forward_entries`]): `None`, all of them.
    pub forward_entries: Option<usize>,
    /// `Bearer <access token>`.
    pub authorization: &'a [u8],
    /// The request id (the client's when usable, else generated).
    pub request_id: &'a [u8],
}

/// The upstream request head: the target, what happens to each client field (in received
/// order), and the gateway's fields added after them, in order. Reused across requests.
#[derive(Default, Debug)]
pub struct Plan {
    /// The rewritten request-target; `None`: the client's, byte for byte.
    pub target: Option<Vec<u8>>,
    /// One action per client field.
    pub actions: Vec<Action>,
    added: u16,
}

impl Plan {
    /// The gateway's fields sent after the client's, in order.
    pub fn added(&self) -> impl Iterator<Item = Set> + '_ {
        Set::APPENDED
            .into_iter()
            .filter(move |s| self.added & s.bit() != 0)
    }
}

/// Plans the upstream request head for an admitted request (fields `fields`, facts from its
/// scan, target in `form`) into `plan`. The rules (RFC 9110 §7.6.1, §11.6.2, §11.7.2; RFC 6750
/// §2.3):
///
/// - every `Authorization` goes; the gateway's one takes the first one's place (or comes last);
/// - `Proxy-Authorization`, `Proxy`, hop-by-hop fields, fields `Connection` names, the route's
///   `strip_headers`, `Cookie` unless the route forwards cookies, and any `_` spelling of a
///   name in the table are dropped;
/// - `Host`, `X-Forwarded-*` and `X-Request-Id` are the gateway's, in the place of the
///   client's first one of that name (or last, in a fixed order); a gateway-set name the route
///   strips or `Connection` names loses its place and comes last;
/// - `Content-Length` is sent once, canonical; a WebSocket handshake keeps its two fields;
/// - the target loses `access_token`, the stripped prefix, and gains the upstream base path.
pub fn plan_request<F: Fields + ?Sized>(
    fields: &F,
    facts: &RequestFacts,
    form: TargetForm,
    target: &[u8],
    fw: &Forwarding<'_>,
    plan: &mut Plan,
) {
    let route = fw.route;
    plan.target = match form {
        TargetForm::Asterisk => None,
        _ => {
            let (path, query) = target::path_and_query(form, target);
            match (form, target::rewritten_target(path, query, route)) {
                (_, Some(t)) => Some(t),
                (TargetForm::Origin, None) => None,
                // Absolute-form is never forwarded as such: only the route's upstream is reached.
                (_, None) => Some(origin_form(path, query)),
            }
        }
    };
    plan.actions.clear();
    // Gateway fields already placed; the rest are appended.
    let mut placed = 0u16;
    let place = |set: Set, placed: &mut u16| {
        if *placed & set.bit() != 0 {
            Action::Drop
        } else {
            *placed |= set.bit();
            Action::Put(set)
        }
    };
    let removed = |i: usize| removed(fields, i, route, facts);
    let websocket = facts.upgrade == Upgrade::WebSocket;
    for i in 0..fields.count() {
        let action = match fields.class(i) {
            FieldName::Other | FieldName::Expect | FieldName::Date => {
                if removed(i) {
                    Action::Drop
                } else {
                    Action::Keep
                }
            }
            FieldName::Cookie => {
                if route.forward_cookies && !removed(i) {
                    Action::Keep
                } else {
                    Action::Drop
                }
            }
            FieldName::ProxyAuthorization
            | FieldName::Proxy
            | FieldName::Underscored
            | FieldName::KeepAlive
            | FieldName::ProxyConnection
            | FieldName::ProxyAuthenticate
            | FieldName::Te
            | FieldName::Trailer
            | FieldName::Http2Settings => Action::Drop,
            FieldName::Connection if websocket => place(Set::ConnectionUpgrade, &mut placed),
            FieldName::Upgrade if websocket => place(Set::UpgradeWebSocket, &mut placed),
            FieldName::Connection | FieldName::Upgrade => Action::Drop,
            FieldName::Host => place(Set::Host, &mut placed),
            FieldName::ContentLength if facts.length_canonical => Action::Keep,
            FieldName::ContentLength => place(Set::ContentLength, &mut placed),
            FieldName::TransferEncoding => place(Set::TransferEncoding, &mut placed),
            FieldName::XForwardedFor if fw.client_ip.is_none() && !removed(i) => Action::Keep,
            class => {
                let set = match class {
                    FieldName::Authorization => Set::Authorization,
                    FieldName::XForwardedHost if facts.host.is_none() => {
                        plan.actions.push(Action::Drop);
                        continue;
                    }
                    FieldName::XForwardedHost => Set::ForwardedHost,
                    FieldName::XForwardedProto => Set::ForwardedProto,
                    FieldName::XForwardedFor => Set::ForwardedFor,
                    _ => Set::RequestId,
                };
                if removed(i) {
                    Action::Drop
                } else {
                    place(set, &mut placed)
                }
            }
        };
        plan.actions.push(action);
    }
    let mut wanted = Set::Authorization.bit()
        | Set::Host.bit()
        | Set::ForwardedProto.bit()
        | Set::RequestId.bit();
    if facts.host.is_some() {
        wanted |= Set::ForwardedHost.bit();
    }
    if fw.client_ip.is_some() {
        wanted |= Set::ForwardedFor.bit();
    }
    if websocket {
        wanted |= Set::ConnectionUpgrade.bit() | Set::UpgradeWebSocket.bit();
    }
    plan.added = wanted & !placed;
}

/// Whether the route strips the `i`-th field or a `Connection` names it.
#[inline(always)]
fn removed<F: Fields + ?Sized>(fields: &F, i: usize, route: &Route, facts: &RequestFacts) -> bool {
    if route.strip_folded.is_empty() && facts.nominations == 0 {
        return false;
    }
    let name = fields.name(i);
    route.strip_folded.contains(name) || (facts.nominations > 0 && nominated(fields, name))
}

/// `path?query` of an absolute-form target.
fn origin_form(path: &[u8], query: Option<&[u8]>) -> Vec<u8> {
    let mut t = path.to_vec();
    if let Some(q) = query {
        t.push(b'?');
        t.extend_from_slice(q);
    }
    t
}

/// Whether a `Connection` field of the request names `name`.
fn nominated<F: Fields + ?Sized>(fields: &F, name: &[u8]) -> bool {
    (0..fields.count())
        .filter(|&i| fields.class(i) == FieldName::Connection)
        .any(|i| list(fields.value(i)).any(|o| fields::names_match(o, name)))
}

/// Room for the longest [`Set::line_start`] (`Transfer-Encoding: `, 19 bytes).
const LINE_START_WIDTH: usize = 24;

/// Writes the gateway's field `set` as an HTTP/1.1 field line (`Name: value` CRLF) into `out`.
#[inline(always)]
pub fn write_line<F: Fields + ?Sized>(
    set: Set,
    fields: &F,
    facts: &RequestFacts,
    fw: &Forwarding<'_>,
    out: &mut Vec<u8>,
) {
    let (padded, len) = &Set::PADDED_LINE_STARTS[set as usize];
    let start = out.len();
    out.extend_from_slice(padded);
    out.truncate(start + len);
    write_value(set, fields, facts, fw, out);
    out.extend_from_slice(b"\r\n");
}

/// Writes the value of the gateway's field `set` into `out`.
#[inline(always)]
pub fn write_value<F: Fields + ?Sized>(
    set: Set,
    fields: &F,
    facts: &RequestFacts,
    fw: &Forwarding<'_>,
    out: &mut Vec<u8>,
) {
    match set {
        Set::Authorization => out.extend_from_slice(fw.authorization),
        Set::ForwardedHost => {
            if let Some(h) = facts.host {
                out.extend_from_slice(fields.value(h));
            }
        }
        Set::Host => out.extend_from_slice(fw.route.host_header.as_bytes()),
        Set::ForwardedProto => out.extend_from_slice(b"http"),
        Set::ForwardedFor => {
            // The client's fields as one list (RFC 9110 §5.3), unless the route strips them.
            if facts.forwarded_for && !fw.route.strip_folded.contains(b"x-forwarded-for") {
                match fw.forward_entries {
                    None => {
                        for i in 0..fields.count() {
                            if fields.class(i) == FieldName::XForwardedFor {
                                out.extend_from_slice(fields.value(i));
                                out.extend_from_slice(b", ");
                            }
                        }
                    }
                    // From a trusted proxy: the entries up to the client's (docs/proxy-behaviour.md
                    // "Client address").
                    Some(n) => client::write_entries(fields, n, out),
                }
            }
            out.extend_from_slice(fw.client_ip.unwrap_or_default());
        }
        Set::RequestId => out.extend_from_slice(fw.request_id),
        Set::ContentLength => {
            let _ = write!(out, "{}", facts.content_length.unwrap_or(0));
        }
        Set::TransferEncoding => out.extend_from_slice(b"chunked"),
        Set::ConnectionUpgrade => out.extend_from_slice(b"Upgrade"),
        Set::UpgradeWebSocket => out.extend_from_slice(b"websocket"),
    }
}

/// Whether a request whose upstream attempt failed before any response byte arrived may be
/// sent again: idempotent methods only (RFC 9110 §9.2.2), and only while its body is still
/// whole. Which failures are worth a second attempt (a reused connection the upstream had
/// closed) is the transport's to say.
pub fn may_resend(method: &Method, body_whole: bool) -> bool {
    body_whole && method.is_idempotent()
}

/// The elements of a list-valued field value (RFC 9110 §5.6.1), trimmed, empty ones skipped.
pub fn list(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(|e| e.trim_ascii())
        .filter(|e| !e.is_empty())
}

/// A `Content-Length` value: ASCII digits only (no sign, no list, no spaces), `None` for
/// anything else or a number past `u64`.
pub fn parse_content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    // One pass, no UTF-8 check and no second validation inside `str::parse`.
    value.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// A `Content-Length` value that is a list of one number repeated (`5, 5`; RFC 9110 §8.6: a
/// recipient may take it as that one number): the number, or `None` for anything else.
pub fn content_length_list(value: &[u8]) -> Option<u64> {
    if let Some(n) = parse_content_length(value) {
        return Some(n);
    }
    let mut elements = value.split(|b| *b == b',').map(|e| e.trim_ascii());
    let n = parse_content_length(elements.next()?)?;
    elements
        .all(|e| parse_content_length(e) == Some(n))
        .then_some(n)
}

/// A byte table of URI characters (RFC 3986 §2.2, §2.3): unreserved and sub-delims, plus the
/// bytes in `extra`.
pub(crate) const fn uri_bytes(extra: &[u8]) -> [bool; 256] {
    const SUB_DELIMS_AND_MARKS: &[u8] = b"-._~!$&'()*+,;=";
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < SUB_DELIMS_AND_MARKS.len() {
        t[SUB_DELIMS_AND_MARKS[i] as usize] = true;
        i += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// Bytes of a registered name or IPv4 address besides percent-encoding: unreserved and
/// sub-delims (RFC 3986 §3.2.2).
const REG_NAME_BYTE: [bool; 256] = uri_bytes(b"");

/// Whether `value` is a valid `Host` field value (RFC 9112 §3.2; RFC 3986 §3.2.2, §3.2.3):
/// empty, or `uri-host [ ":" port ]` where uri-host is an IPv6 literal in brackets or a
/// registered name / IPv4 address of unreserved, sub-delims and percent-encoded bytes, and port
/// is digits. No userinfo (`@`), no spaces, no second colon, no empty host before a port.
pub fn valid_host(value: &[u8]) -> bool {
    let (host, port) = match value.first() {
        None => return true,
        Some(b'[') => {
            let Some(close) = value.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&value[1..close]).ok();
            if literal
                .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                .is_none()
            {
                return false;
            }
            (&value[..0], &value[close + 1..])
        }
        Some(_) => match memchr::memchr(b':', value) {
            Some(i) => (&value[..i], &value[i..]),
            None => (value, &value[value.len()..]),
        },
    };
    // `:80` has an empty host: no http URI can be built from it (RFC 9110 §4.2.1).
    if host.is_empty() && !port.is_empty() && value[0] != b'[' {
        return false;
    }
    // The common name: one branch-free table pass (this runs on the fast path per request).
    let plain = host
        .iter()
        .fold(true, |plain, &b| plain & REG_NAME_BYTE[b as usize]);
    let mut i = if plain { host.len() } else { 0 };
    while i < host.len() {
        match host[i] {
            b'%' if host
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
            {
                i += 3;
                continue;
            }
            b if REG_NAME_BYTE[b as usize] => {}
            _ => return false,
        }
        i += 1;
    }
    match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().fold(true, |d, b| d & b.is_ascii_digit()),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests;
