//! The one table of field names the gateway acts on, for requests and responses alike, and the
//! name comparison it is built on.
//!
//! Names are compared ignoring ASCII case (RFC 9110 §5.1) and with `_` and `-` taken as the same
//! byte: CGI and WSGI servers turn both into `_` (RFC 3875 §4.1.18), so `X_Api_Key` reaches such
//! a server as the very variable `X-Api-Key` sets. A spelling with `_` of a name the gateway acts
//! on is [`FieldName::Underscored`] and never reaches the upstream: framing is decided by the
//! exact names only, as every HTTP/1.1 parser frames messages.

/// What a field name is to the gateway. One table for both proxy paths and both directions.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum FieldName {
    /// Any other name: forwarded unless the route strips it or `Connection` names it.
    Other,
    /// `Authorization`: an inbound credential, replaced by the gateway's (RFC 9110 §11.6.2).
    Authorization,
    /// `Proxy-Authorization`: an inbound credential (RFC 9110 §11.7.2).
    ProxyAuthorization,
    /// `Cookie`: an inbound credential unless the route forwards cookies (RFC 6265 §5.4).
    Cookie,
    /// `Proxy`: no such field exists; CGI servers read it as `HTTP_PROXY` ("httpoxy",
    /// CVE-2016-5385), so it is always removed.
    Proxy,
    /// `Host`: the upstream's authority is sent instead (RFC 9110 §7.2).
    Host,
    /// `X-Forwarded-For`: the client's list with the client's address appended.
    XForwardedFor,
    /// `X-Forwarded-Host`: the client's `Host`.
    XForwardedHost,
    /// `X-Forwarded-Proto`: `http`.
    XForwardedProto,
    /// `X-Request-Id`: kept when usable, else generated; returned to the client.
    XRequestId,
    /// `Content-Length` (RFC 9110 §8.6).
    ContentLength,
    /// `Transfer-Encoding` (RFC 9112 §6.1).
    TransferEncoding,
    /// `Connection` (RFC 9110 §7.6.1): hop-by-hop, and names more hop-by-hop fields.
    Connection,
    /// `Keep-Alive`: hop-by-hop (RFC 9110 §7.6.1).
    KeepAlive,
    /// `Proxy-Connection`: hop-by-hop in practice (RFC 9110 §7.6.1).
    ProxyConnection,
    /// `Proxy-Authenticate`: hop-by-hop (RFC 9110 §11.7.1).
    ProxyAuthenticate,
    /// `TE`: hop-by-hop (RFC 9110 §10.1.4).
    Te,
    /// `Trailer`: hop-by-hop here (the gateway forwards no request trailers).
    Trailer,
    /// `Upgrade`: hop-by-hop except for a WebSocket upgrade (RFC 9110 §7.8).
    Upgrade,
    /// `HTTP2-Settings`: hop-by-hop (RFC 7540 §3.2.1).
    Http2Settings,
    /// `Expect` (RFC 9110 §10.1.1).
    Expect,
    /// `Date` (RFC 9110 §6.6.1): a response without one gets the gateway's.
    Date,
    /// A spelling with `_` of one of the names above (`Proxy_Authorization`, `X_Forwarded_For`,
    /// `Content_Length`): removed from requests, passed on in responses.
    Underscored,
}

impl FieldName {
    /// The name in its usual spelling, for fields the gateway writes itself.
    pub fn canonical(self) -> &'static str {
        match self {
            FieldName::Other | FieldName::Underscored => "",
            FieldName::Authorization => "Authorization",
            FieldName::ProxyAuthorization => "Proxy-Authorization",
            FieldName::Cookie => "Cookie",
            FieldName::Proxy => "Proxy",
            FieldName::Host => "Host",
            FieldName::XForwardedFor => "X-Forwarded-For",
            FieldName::XForwardedHost => "X-Forwarded-Host",
            FieldName::XForwardedProto => "X-Forwarded-Proto",
            FieldName::XRequestId => "X-Request-Id",
            FieldName::ContentLength => "Content-Length",
            FieldName::TransferEncoding => "Transfer-Encoding",
            FieldName::Connection => "Connection",
            FieldName::KeepAlive => "Keep-Alive",
            FieldName::ProxyConnection => "Proxy-Connection",
            FieldName::ProxyAuthenticate => "Proxy-Authenticate",
            FieldName::Te => "TE",
            FieldName::Trailer => "Trailer",
            FieldName::Upgrade => "Upgrade",
            FieldName::Http2Settings => "HTTP2-Settings",
            FieldName::Expect => "Expect",
            FieldName::Date => "Date",
        }
    }

    /// Whether the gateway sets this field on the upstream request itself (the client's values
    /// never pass as they came).
    pub fn gateway_set(self) -> bool {
        matches!(
            self,
            FieldName::Authorization
                | FieldName::Host
                | FieldName::XForwardedFor
                | FieldName::XForwardedHost
                | FieldName::XForwardedProto
                | FieldName::XRequestId
        )
    }

    /// Whether a `Connection` field may not name this field: the gateway sets it, or it frames
    /// the message (a proxy that removed it would forward a different message).
    pub fn protected_from_connection(self) -> bool {
        self.gateway_set()
            || matches!(
                self,
                FieldName::ContentLength | FieldName::TransferEncoding | FieldName::Connection
            )
    }
}

/// The class of a field name: its length and first letter pick the one name of the table it
/// could be (no two names share both), then one word-wise compare (see [`name_match`]). Most
/// fields are none of these and leave at the first step.
#[inline(always)]
pub fn classify(name: &[u8]) -> FieldName {
    use FieldName::*;
    // `| 0x20` folds the case of a letter; no name in the table starts with anything else.
    let first = name.first().map_or(0, |b| b | 0x20);
    let (class, lower): (FieldName, &str) = match (name.len(), first) {
        (2, b't') => (Te, "te"),
        (4, b'h') => (Host, "host"),
        (4, b'd') => (Date, "date"),
        (5, b'p') => (Proxy, "proxy"),
        (6, b'c') => (Cookie, "cookie"),
        (6, b'e') => (Expect, "expect"),
        (7, b'u') => (Upgrade, "upgrade"),
        (7, b't') => (Trailer, "trailer"),
        (10, b'c') => (Connection, "connection"),
        (10, b'k') => (KeepAlive, "keep-alive"),
        (12, b'x') => (XRequestId, "x-request-id"),
        (13, b'a') => (Authorization, "authorization"),
        (14, b'c') => (ContentLength, "content-length"),
        (14, b'h') => (Http2Settings, "http2-settings"),
        (15, b'x') => (XForwardedFor, "x-forwarded-for"),
        (16, b'x') => (XForwardedHost, "x-forwarded-host"),
        (16, b'p') => (ProxyConnection, "proxy-connection"),
        (17, b'x') => (XForwardedProto, "x-forwarded-proto"),
        (17, b't') => (TransferEncoding, "transfer-encoding"),
        (18, b'p') => (ProxyAuthenticate, "proxy-authenticate"),
        (19, b'p') => (ProxyAuthorization, "proxy-authorization"),
        _ => return Other,
    };
    match name_match(name, lower.as_bytes()) {
        Match::Exact => class,
        // Framing is decided by the exact names only.
        Match::Underscored => Underscored,
        Match::No => Other,
    }
}

/// How a name compares with a folded one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Match {
    No,
    /// The same ignoring case.
    Exact,
    /// The same once `_` is taken for `-`.
    Underscored,
}

/// `0x20` in every byte: ORed into a token byte, it lower-cases a letter and leaves digits, `-`
/// and every other token byte that could be mistaken for one of those as it is (RFC 9110
/// §5.6.2); `_` becomes `0x7f`.
const CASE8: u64 = u64::from_ne_bytes([0x20; 8]);
const CASE4: u32 = u32::from_ne_bytes([0x20; 4]);
const DEL8: u64 = u64::from_ne_bytes([0x7f; 8]);
const LOW7: u64 = u64::from_ne_bytes([0x7f; 8]);
const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
/// `0x7f - b'-'` in one byte.
const UNDERSCORE_TO_DASH: u64 = 0x7f - b'-' as u64;

/// Eight name bytes, `0x20` already ORed in, with every `0x7f` byte (from `_`: DEL is no
/// token byte) turned into `-`. Bytes equal to 0x7f are the zero bytes of `y`; this finds them
/// exactly (no borrow crosses a byte: each sum is at most 0xfe).
#[inline(always)]
fn underscores_to_dashes(x: u64) -> u64 {
    let y = x ^ DEL8;
    let zero = !(((y & LOW7) + LOW7) | y) & HIGH;
    x - (zero >> 7) * UNDERSCORE_TO_DASH
}

/// [`underscores_to_dashes`] on four bytes.
#[inline(always)]
fn underscores_to_dashes4(x: u32) -> u32 {
    const DEL4: u32 = u32::from_ne_bytes([0x7f; 4]);
    const LOW4: u32 = u32::from_ne_bytes([0x7f; 4]);
    const HIGH4: u32 = u32::from_ne_bytes([0x80; 4]);
    let y = x ^ DEL4;
    let zero = !(((y & LOW4) + LOW4) | y) & HIGH4;
    x - (zero >> 7) * UNDERSCORE_TO_DASH as u32
}

/// Compares `name` with `lower` (same length; lower case, `a-z`, `0-9`, `-` and other token
/// bytes ORed with `0x20`), eight or four bytes at a time: for a token byte `b`, `b | 0x20`
/// equals such a byte exactly when `b` equals it ignoring case (no other token byte maps onto
/// a letter, digit or `-`), and `_ | 0x20` is `0x7f`, which only `_` gives.
#[inline(always)]
fn name_match(name: &[u8], lower: &[u8]) -> Match {
    let n = lower.len();
    if name.len() != n {
        return Match::No;
    }
    let mut underscored = false;
    if n >= 8 {
        let word =
            |s: &[u8], i: usize| u64::from_ne_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
        // Overlapping words cover every length from 8 on.
        let mut i = 0;
        loop {
            let at = if i + 8 < n { i } else { n - 8 };
            let (x, l) = (word(name, at) | CASE8, word(lower, at));
            if x != l {
                if underscores_to_dashes(x) != l {
                    return Match::No;
                }
                underscored = true;
            }
            if at == n - 8 {
                break;
            }
            i += 8;
        }
    } else if n >= 4 {
        let word =
            |s: &[u8], i: usize| u32::from_ne_bytes(s[i..i + 4].try_into().unwrap_or([0; 4]));
        for at in [0, n - 4] {
            let (x, l) = (word(name, at) | CASE4, word(lower, at));
            if x != l {
                if underscores_to_dashes4(x) != l {
                    return Match::No;
                }
                underscored = true;
            }
        }
    } else {
        for (&a, &b) in name.iter().zip(lower) {
            match a | 0x20 {
                x if x == b => {}
                0x7f if b == b'-' => underscored = true,
                _ => return Match::No,
            }
        }
    }
    if underscored {
        Match::Underscored
    } else {
        Match::Exact
    }
}

/// Whether the field name `name` is `lower`, ignoring ASCII case and taking `_` for `-`.
/// `lower` is spelled in lower case from `a-z`, `0-9` and `-`; `name` is a token (RFC 9110
/// §5.6.2: every parser on either path refuses other names). Compared eight bytes at a time
/// (byte-wise `eq_ignore_ascii_case` costs ~35 instructions a name).
#[inline(always)]
pub fn name_eq(name: &[u8], lower: &str) -> bool {
    name_match(name, lower.as_bytes()) != Match::No
}

/// `name` folded byte by byte as [`name_eq`] folds a name: `0x20` ORed in, `_` as `-`. For
/// names from the configuration (a route's `strip_headers`), folded once.
pub fn fold_name(name: &str) -> Box<[u8]> {
    name.bytes()
        .map(|b| match b | 0x20 {
            0x7f => b'-',
            b => b,
        })
        .collect()
}

/// Whether two names are the same as [`name_eq`] compares them (for two names from a request:
/// a field and a `Connection` option).
pub fn names_match(a: &[u8], b: &[u8]) -> bool {
    let fold = |c: u8| match c | 0x20 {
        0x7f => b'-',
        c => c,
    };
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| fold(*x) == fold(*y))
}

/// Names from the configuration (a route's `strip_headers`), each folded by [`fold_name`],
/// with the set of their lengths: most request fields are ruled out by one bit test, before
/// any name is compared. Built with `collect()` from folded names.
#[derive(Clone, Debug, Default)]
pub struct FoldedNames {
    names: Vec<Box<[u8]>>,
    /// Bit `n` set: a name of `n` bytes is in the list (bit 63: 63 or more).
    lengths: u64,
}

impl FoldedNames {
    /// Whether the list is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Whether `name` is in the list, ignoring case and `_`/`-` (as [`names_match`]).
    #[inline(always)]
    pub fn contains(&self, name: &[u8]) -> bool {
        self.lengths & length_bit(name.len()) != 0 && self.compare(name)
    }

    /// The names of `name`'s length compared (most fields never get here).
    #[inline(never)]
    fn compare(&self, name: &[u8]) -> bool {
        self.names
            .iter()
            .any(|f| f.len() == name.len() && name_match(name, f) != Match::No)
    }
}

#[inline(always)]
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl FromIterator<Box<[u8]>> for FoldedNames {
    fn from_iter<I: IntoIterator<Item = Box<[u8]>>>(folded: I) -> Self {
        let names: Vec<Box<[u8]>> = folded.into_iter().collect();
        let lengths = names.iter().fold(0, |bits, n| bits | length_bit(n.len()));
        FoldedNames { names, lengths }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~0123456789\
        abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

    fn loose_eq(a: &[u8], b: &[u8]) -> bool {
        let f = |c: u8| {
            if c == b'_' {
                b'-'
            } else {
                c.to_ascii_lowercase()
            }
        };
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| f(*x) == f(*y))
    }

    /// The word-wise comparison agrees with a byte-wise one (case and `_`/`-` folded) for every
    /// name in the table, against every token spelling of the same length: each byte position
    /// tried with every token byte.
    #[test]
    fn name_eq_folds_case_and_underscore_only() {
        let names = [
            "te",
            "date",
            "host",
            "proxy",
            "cookie",
            "expect",
            "upgrade",
            "trailer",
            "connection",
            "keep-alive",
            "x-request-id",
            "authorization",
            "content-length",
            "http2-settings",
            "x-forwarded-for",
            "x-forwarded-host",
            "proxy-connection",
            "x-forwarded-proto",
            "transfer-encoding",
            "proxy-authenticate",
            "proxy-authorization",
            "a-twenty-five-byte-name-x",
        ];
        for lower in names {
            assert!(name_eq(lower.as_bytes(), lower));
            assert!(name_eq(lower.to_ascii_uppercase().as_bytes(), lower));
            assert!(name_eq(lower.replace('-', "_").as_bytes(), lower));
            assert!(!name_eq(&lower.as_bytes()[1..], lower));
            for i in 0..lower.len() {
                let mut name = lower.as_bytes().to_vec();
                for &b in TCHAR {
                    name[i] = b;
                    assert_eq!(
                        name_eq(&name, lower),
                        loose_eq(&name, lower.as_bytes()),
                        "{:?} vs {lower}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
        }
    }

    /// The dispatch by length and first letter finds what a comparison against every name of
    /// the table finds, for each name with every token byte tried at every position.
    #[test]
    fn classify_agrees_with_a_comparison_against_every_name() {
        use FieldName::*;
        let table = [
            (Te, "te"),
            (Host, "host"),
            (Date, "date"),
            (Proxy, "proxy"),
            (Cookie, "cookie"),
            (Expect, "expect"),
            (Upgrade, "upgrade"),
            (Trailer, "trailer"),
            (Connection, "connection"),
            (KeepAlive, "keep-alive"),
            (XRequestId, "x-request-id"),
            (Authorization, "authorization"),
            (ContentLength, "content-length"),
            (Http2Settings, "http2-settings"),
            (XForwardedFor, "x-forwarded-for"),
            (XForwardedHost, "x-forwarded-host"),
            (ProxyConnection, "proxy-connection"),
            (XForwardedProto, "x-forwarded-proto"),
            (TransferEncoding, "transfer-encoding"),
            (ProxyAuthenticate, "proxy-authenticate"),
            (ProxyAuthorization, "proxy-authorization"),
        ];
        let reference = |name: &[u8]| {
            for (class, lower) in table {
                if name.eq_ignore_ascii_case(lower.as_bytes()) {
                    return class;
                }
                if loose_eq(name, lower.as_bytes()) {
                    return Underscored;
                }
            }
            Other
        };
        for (_, lower) in table {
            for i in 0..lower.len() {
                let mut name = lower.as_bytes().to_vec();
                for &b in TCHAR {
                    name[i] = b;
                    assert_eq!(
                        classify(&name),
                        reference(&name),
                        "{}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
        }
    }

    #[test]
    fn underscore_spellings_are_their_own_class() {
        assert_eq!(
            classify(b"Proxy-Authorization"),
            FieldName::ProxyAuthorization
        );
        assert_eq!(classify(b"Proxy_Authorization"), FieldName::Underscored);
        assert_eq!(classify(b"X_Forwarded_For"), FieldName::Underscored);
        assert_eq!(classify(b"content_length"), FieldName::Underscored);
        assert_eq!(classify(b"PROXY"), FieldName::Proxy);
        assert_eq!(classify(b"X_Custom"), FieldName::Other);
        assert_eq!(classify(b"Accept"), FieldName::Other);
    }

    #[test]
    fn configured_names_match_any_spelling() {
        let strip: FoldedNames = [fold_name("X-Api-Key"), fold_name("x_secret")]
            .into_iter()
            .collect();
        for name in [
            "x-api-key",
            "X_Api_Key",
            "X-API_KEY",
            "X-Secret",
            "x_SECRET",
        ] {
            assert!(strip.contains(name.as_bytes()), "{name}");
        }
        let long = "X-A-Header-Name-Longer-Than-Sixty-Three-Bytes-Which-Shares-Bit-63-Set";
        for name in ["X-Api-Keys", "X-Api", "Accept", "X-Secrets", long] {
            assert!(!strip.contains(name.as_bytes()), "{name}");
        }
    }
}
