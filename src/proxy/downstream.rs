//! pingora-proxy's path as a serialiser of the policy: the client's head read again from the
//! bytes pingora received (so the policy sees the same fields, in the same order, as on the
//! fast path), and the upstream [`RequestHeader`] built from the policy's plan.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::Bytes;
use http::Method;
use pingora::http::RequestHeader;

use super::policy::response::ResponseFacts;
use super::policy::target::TargetForm;
use super::policy::{
    self, classify, Action, FieldName, Fields, Forwarding, GatewayError, Plan, RequestFacts,
    RequestScan,
};

/// Most fields in a request head: pingora's limit.
const MAX_FIELDS: usize = 256;

/// The client's request head as the policy reads it: the raw bytes and, for each field, its
/// name and value ranges and class.
pub struct DownstreamHead {
    raw: Bytes,
    fields: Vec<(Range<usize>, Range<usize>, FieldName)>,
    target: Range<usize>,
    /// The request's method.
    pub method: Method,
    /// HTTP/1.1 (`true`) or HTTP/1.0.
    pub http11: bool,
    /// What the policy's scan found.
    pub facts: RequestFacts,
    /// The request-target's form.
    pub form: TargetForm,
}

impl Fields for DownstreamHead {
    fn count(&self) -> usize {
        self.fields.len()
    }
    fn name(&self, i: usize) -> &[u8] {
        &self.raw[self.fields[i].0.clone()]
    }
    fn value(&self, i: usize) -> &[u8] {
        &self.raw[self.fields[i].1.clone()]
    }
    fn class(&self, i: usize) -> FieldName {
        self.fields[i].2
    }
}

impl DownstreamHead {
    /// Reads a request head (`raw`: request line and fields as received, up to and including
    /// the empty line) the way the fast path does, and asks the policy about it.
    ///
    /// # Errors
    /// The policy's refusal: 400 for a head a strict parser refuses or whose framing is
    /// invalid, 431 for too many fields, 501 for a transfer coding other than `chunked`.
    pub fn parse(raw: Bytes) -> Result<Self, GatewayError> {
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(&raw, &mut storage) {
            Ok(httparse::Status::Complete(n)) => n,
            Err(httparse::Error::TooManyHeaders) => return Err(GatewayError::HeaderTooLarge),
            _ => return Err(GatewayError::BadRequest("malformed request head")),
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version)
        else {
            return Err(GatewayError::BadRequest("incomplete request line"));
        };
        // From the method on: empty lines before the request line are ignored (RFC 9112 §2.2).
        let line_start = method.as_ptr() as usize - raw.as_ptr() as usize;
        if !policy::target::request_line_ok(&raw[line_start..]) {
            return Err(GatewayError::BadRequest("malformed request line"));
        }
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| GatewayError::BadRequest("invalid method"))?;
        let form = policy::target_form(&method, target.as_bytes())?;
        let offset = |s: &[u8]| {
            let start = s.as_ptr() as usize - raw.as_ptr() as usize;
            start..start + s.len()
        };
        let mut scan = RequestScan::default();
        let mut fields = Vec::with_capacity(req.headers.len());
        for (i, h) in req.headers.iter().enumerate() {
            let class = classify(h.name.as_bytes());
            scan.field(i, class, h.value);
            fields.push((offset(h.name.as_bytes()), offset(h.value), class));
        }
        // The head must end its lines in CRLF (httparse also takes a bare LF).
        if !policy::target::crlf_lines(
            &raw[..head_len],
            line_start,
            fields.iter().map(|f| f.0.start),
        ) {
            return Err(GatewayError::BadRequest("bare LF in the request head"));
        }
        let http11 = version == 1;
        let facts = scan.finish(if http11 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        })?;
        let target = offset(target.as_bytes());
        Ok(DownstreamHead {
            raw,
            fields,
            target,
            method,
            http11,
            facts,
            form,
        })
    }

    /// The request-target as received.
    pub fn target(&self) -> &[u8] {
        &self.raw[self.target.clone()]
    }

    /// The path of an origin-form or absolute-form target (without the query), for routing.
    pub fn path(&self) -> &[u8] {
        policy::target::path_and_query(self.form, self.target()).0
    }

    /// The `Host` field's value.
    pub fn host(&self) -> Option<&[u8]> {
        self.facts.host.map(|i| self.value(i))
    }

    /// The upstream request head for this request: the policy's plan (into `plan`) serialised
    /// as a pingora [`RequestHeader`] — HTTP/1.1, the planned target, the client's fields the
    /// plan keeps (in their received spelling), the gateway's fields in their place, then the
    /// ones it adds. pingora's header map groups repeated names when it writes the head.
    ///
    /// # Errors
    /// pingora's, if the target or a value cannot be stored (values come from a parsed head or
    /// are valid by construction).
    pub fn upstream_header(
        &self,
        fw: &Forwarding<'_>,
        plan: &mut Plan,
    ) -> pingora::Result<RequestHeader> {
        policy::plan_request(self, &self.facts, self.form, self.target(), fw, plan);
        let target = plan.target.as_deref().unwrap_or(self.target());
        let mut up = RequestHeader::build(self.method.clone(), target, Some(self.count() + 6))?;
        up.set_version(http::Version::HTTP_11);
        let mut value = Vec::with_capacity(64);
        for (i, action) in plan.actions.iter().enumerate() {
            match *action {
                Action::Keep => {
                    let name = Bytes::copy_from_slice(self.name(i));
                    up.append_header(name, self.value(i))?;
                }
                Action::Drop => {}
                Action::Put(set) => {
                    value.clear();
                    policy::write_value(set, self, &self.facts, fw, &mut value);
                    up.append_header(set.name(), value.as_slice())?;
                }
            }
        }
        for set in plan.added() {
            value.clear();
            policy::write_value(set, self, &self.facts, fw, &mut value);
            up.append_header(set.name(), value.as_slice())?;
        }
        Ok(up)
    }
}

/// Applies the policy's response plan to an upstream response head on pingora-proxy's path:
/// each field as [`ResponsePlanner`] decides (pingora's header map holds repeated names
/// together, so the first field of a name decides for it and later ones of that name go when
/// the plan drops them), then the request's `X-Request-Id` when the upstream sent none.
/// pingora writes `Date` and `Connection` itself. Returns what the head says of its framing.
///
/// # Errors
/// pingora's, if a value cannot be stored (they are valid by construction).
pub fn apply_response_policy(
    response: &mut pingora::http::ResponseHeader,
    request_id: Option<&http::HeaderValue>,
) -> pingora::Result<ResponseFacts> {
    use super::policy::response::{ResponseAction, ResponsePlanner};
    let minor = u8::from(response.version != http::Version::HTTP_10);
    let owned: Vec<(http::HeaderName, http::HeaderValue)> = response
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    let view: Vec<(&[u8], &[u8])> = owned
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect();
    let facts = ResponseFacts::of(minor, view.as_slice());
    let mut planner = ResponsePlanner::new(&facts, response.status.is_informational());
    // Per name: the first field's action, its value, and whether a later one is dropped.
    let mut decided: Vec<(usize, ResponseAction, bool)> = Vec::new();
    for (i, (name, _)) in view.iter().enumerate() {
        let action = planner.action(classify(name), name, view.as_slice());
        match decided.iter_mut().find(|d| owned[d.0].0 == owned[i].0) {
            Some(d) => d.2 |= action != ResponseAction::Keep,
            None => decided.push((i, action, false)),
        }
    }
    let id = || {
        request_id
            .cloned()
            .unwrap_or(http::HeaderValue::from_static("-"))
    };
    for (i, action, later_dropped) in decided {
        let (name, value) = &owned[i];
        match action {
            ResponseAction::Keep if later_dropped => {
                response.insert_header(name.clone(), value.clone())?
            }
            ResponseAction::Keep => {}
            ResponseAction::Drop => {
                response.remove_header(name);
            }
            ResponseAction::RequestId => response.insert_header(name.clone(), id())?,
            ResponseAction::ContentLength => {
                response.insert_header(name.clone(), facts.length.unwrap_or(0))?
            }
        }
    }
    if planner.add_request_id() && request_id.is_some() {
        response.insert_header("X-Request-Id", id())?;
    }
    Ok(facts)
}
