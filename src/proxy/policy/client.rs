//! Who the client is: the connection's peer, or — when the peer is a trusted load balancer
//! (`server.trusted_proxies`) — the address its `X-Forwarded-For` names
//! (docs/proxy-behaviour.md "Client address"). Both proxy paths call [`client_address`] and use
//! its answer for `allowed_clients`, `header_clients` and the `X-Forwarded-For` they send.
//!
//! The walk: start at the peer; while the current hop is trusted, step to the entry it
//! appended (the rightmost entry not yet read of the fields combined in order, RFC 9110 §5.3).
//! The first entry that is not a trusted proxy is the client. An entry that is not an IP
//! address (`unknown`, a host name, garbage) stops the walk: nothing left of it can be
//! believed, so the client is the trusted hop that reported it. A list made only of trusted
//! proxies names its leftmost entry. A peer outside `trusted_proxies` is the client, whatever
//! the request claims.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::{list, FieldName, Fields};

/// The client address decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress {
    /// The client's address (an IPv4-mapped IPv6 address as its IPv4 address).
    pub ip: IpAddr,
    /// How many entries of the received `X-Forwarded-For` list (all fields combined) to forward
    /// before `ip`: `None` (the peer is not trusted) forwards them all, then the peer; `Some(n)`
    /// forwards the first `n`, then the client, so the list the upstream gets ends with the
    /// client and carries none of the trusted hops after it.
    pub forward_entries: Option<usize>,
}

impl ClientAddress {
    /// The peer itself, not a trusted proxy.
    pub fn peer(ip: IpAddr) -> Self {
        ClientAddress {
            ip: ip.to_canonical(),
            forward_entries: None,
        }
    }
}

/// Whether `ip` is inside one of `trusted` (an IPv4-mapped IPv6 address counts as its IPv4
/// address).
#[inline]
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client address of a request from `peer` whose `X-Forwarded-For` fields are among
/// `fields`, with `trusted` the CIDRs of `server.trusted_proxies`. Reads the fields only when
/// the peer is trusted.
pub fn client_address<F: Fields + ?Sized>(
    peer: IpAddr,
    trusted: &[IpNet],
    fields: &F,
) -> ClientAddress {
    if trusted.is_empty() || !is_trusted(trusted, peer) {
        return ClientAddress::peer(peer);
    }
    let values = (0..fields.count())
        .filter(|&i| fields.class(i) == FieldName::XForwardedFor)
        .map(|i| fields.value(i));
    from_forwarded_for(peer, trusted, values)
}

/// [`client_address`] for a trusted `peer` and the `X-Forwarded-For` field values `values`, in
/// received order.
pub fn from_forwarded_for<'a>(
    peer: IpAddr,
    trusted: &[IpNet],
    values: impl DoubleEndedIterator<Item = &'a [u8]> + Clone,
) -> ClientAddress {
    // Walked from the right without collecting the entries: no allocation per request.
    let total = values.clone().flat_map(list).count();
    let mut current = peer.to_canonical();
    let from_right = values.rev().flat_map(|v| list(v).rev());
    for (index, entry) in (0..total).rev().zip(from_right) {
        let Some(ip) = parse_entry(entry) else {
            // The trusted hop `current` reported something that is no address.
            return ClientAddress {
                ip: current,
                forward_entries: Some(index + 1),
            };
        };
        if !is_trusted(trusted, ip) {
            return ClientAddress {
                ip,
                forward_entries: Some(index),
            };
        }
        current = ip;
    }
    ClientAddress {
        ip: current,
        forward_entries: Some(0),
    }
}

/// One `X-Forwarded-For` entry as an address: `192.0.2.7`, `2001:db8::1`, and the forms with a
/// port some balancers write (`192.0.2.7:5310`, `[2001:db8::1]:5310`, `[2001:db8::1]`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    text.strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok())
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

/// Writes the first `n` entries of the `X-Forwarded-For` fields among `fields` (combined in
/// order, RFC 9110 §5.3) into `out`, each followed by `, `.
pub fn write_entries<F: Fields + ?Sized>(fields: &F, n: usize, out: &mut Vec<u8>) {
    let entries = (0..fields.count())
        .filter(|&i| fields.class(i) == FieldName::XForwardedFor)
        .flat_map(|i| list(fields.value(i)))
        .take(n);
    for entry in entries {
        out.extend_from_slice(entry);
        out.extend_from_slice(b", ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The decision for a request from `peer` with these `X-Forwarded-For` fields.
    fn decide(peer: &str, trusted: &[&str], xff: &[&str]) -> ClientAddress {
        let fields: Vec<(&[u8], &[u8])> = xff
            .iter()
            .map(|v| (&b"X-Forwarded-For"[..], v.as_bytes()))
            .chain(std::iter::once((&b"Host"[..], &b"gw"[..])))
            .collect();
        client_address(ip(peer), &nets(trusted), &fields[..])
    }

    /// What the upstream's `X-Forwarded-For` says for `decide(…)`.
    fn forwarded(peer: &str, trusted: &[&str], xff: &[&str]) -> String {
        let fields: Vec<(&[u8], &[u8])> = xff
            .iter()
            .map(|v| (&b"x-forwarded-for"[..], v.as_bytes()))
            .collect();
        let decided = client_address(ip(peer), &nets(trusted), &fields[..]);
        let mut out = Vec::new();
        let n = decided.forward_entries.unwrap_or(usize::MAX);
        write_entries(&fields[..], n, &mut out);
        out.extend_from_slice(decided.ip.to_string().as_bytes());
        String::from_utf8(out).unwrap()
    }

    const LB: &[&str] = &["10.0.0.0/8"];

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let d = decide("192.0.2.9", LB, &["127.0.0.1"]);
        assert_eq!(d, ClientAddress::peer(ip("192.0.2.9")));
        assert_eq!(decide("10.0.0.5", &[], &["127.0.0.1"]).ip, ip("10.0.0.5"));
        assert_eq!(
            forwarded("192.0.2.9", LB, &["127.0.0.1"]),
            "127.0.0.1, 192.0.2.9"
        );
    }

    #[test]
    fn a_trusted_peer_names_the_rightmost_untrusted_entry() {
        let d = decide("10.0.0.5", LB, &["198.51.100.1, 203.0.113.7"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        assert_eq!(d.forward_entries, Some(1));
        assert_eq!(
            forwarded("10.0.0.5", LB, &["198.51.100.1, 203.0.113.7"]),
            "198.51.100.1, 203.0.113.7"
        );
    }

    #[test]
    fn a_trusted_peer_without_the_field_is_the_client() {
        assert_eq!(decide("10.0.0.5", LB, &[]).ip, ip("10.0.0.5"));
        assert_eq!(forwarded("10.0.0.5", LB, &[]), "10.0.0.5");
        assert_eq!(decide("10.0.0.5", LB, &[" , "]).ip, ip("10.0.0.5"));
    }

    #[test]
    fn a_spoofed_entry_left_of_the_balancers_entry_is_not_believed() {
        // The client at 203.0.113.7 claimed 127.0.0.1; the balancer appended its address.
        let d = decide("10.0.0.5", LB, &["127.0.0.1, 203.0.113.7"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        // Claiming a trusted proxy's address does not help either.
        let d = decide("10.0.0.5", LB, &["10.9.9.9, 203.0.113.7"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
    }

    #[test]
    fn several_fields_are_one_list_in_order() {
        // RFC 9110 §5.3: the same as "198.51.100.1, 203.0.113.7, 10.0.0.6".
        let d = decide("10.0.0.5", LB, &["198.51.100.1", "203.0.113.7, 10.0.0.6"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        assert_eq!(d.forward_entries, Some(1));
        assert_eq!(
            forwarded("10.0.0.5", LB, &["198.51.100.1", "203.0.113.7, 10.0.0.6"]),
            "198.51.100.1, 203.0.113.7"
        );
        // A second field does not restart the list: its last entry is the rightmost.
        let d = decide("10.0.0.5", LB, &["203.0.113.7", "198.51.100.1"]);
        assert_eq!(d.ip, ip("198.51.100.1"));
    }

    #[test]
    fn a_chain_of_trusted_proxies_is_walked_through() {
        let trusted = &["10.0.0.0/8", "172.16.0.0/12"];
        let d = decide("10.0.0.5", trusted, &["203.0.113.7, 172.16.3.4, 10.1.1.1"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        assert_eq!(d.forward_entries, Some(0));
        assert_eq!(
            forwarded("10.0.0.5", trusted, &["203.0.113.7, 172.16.3.4, 10.1.1.1"]),
            "203.0.113.7"
        );
        // Only trusted hops: the leftmost is as far as the list goes.
        let d = decide("10.0.0.5", trusted, &["172.16.3.4, 10.1.1.1"]);
        assert_eq!(d.ip, ip("172.16.3.4"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_trusted_hop_that_reported_it() {
        // The balancer (peer) appended garbage: the balancer is the client.
        let d = decide("10.0.0.5", LB, &["203.0.113.7, not-an-address"]);
        assert_eq!(d.ip, ip("10.0.0.5"));
        assert_eq!(
            forwarded("10.0.0.5", LB, &["203.0.113.7, not-an-address"]),
            "203.0.113.7, not-an-address, 10.0.0.5"
        );
        // A second trusted hop reported `unknown`: judged as that hop.
        let d = decide("10.0.0.5", LB, &["203.0.113.7, unknown, 10.2.2.2"]);
        assert_eq!(d.ip, ip("10.2.2.2"));
        // Nothing left of the garbage is believed, an allowed-looking address included.
        let d = decide("10.0.0.5", LB, &["127.0.0.1, 1.2.3.4.5"]);
        assert_eq!(d.ip, ip("10.0.0.5"));
        for junk in ["\u{0}", "127.0.0.1/8", "::ffff:zz", "[::1", "1.2.3.4:", "-"] {
            assert_eq!(
                decide("10.0.0.5", LB, &[&format!("127.0.0.1, {junk}")]).ip,
                ip("10.0.0.5"),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn non_utf8_bytes_are_garbage() {
        let fields: Vec<(&[u8], &[u8])> = vec![(b"X-Forwarded-For", b"127.0.0.1, \xff\xfe")];
        let d = client_address(ip("10.0.0.5"), &nets(LB), &fields[..]);
        assert_eq!(d.ip, ip("10.0.0.5"));
    }

    #[test]
    fn ipv6_and_addresses_with_ports() {
        let trusted = &["fd00::/8", "10.0.0.0/8"];
        let d = decide("fd00::1", trusted, &["2001:db8::7"]);
        assert_eq!(d.ip, ip("2001:db8::7"));
        let d = decide("fd00::1", trusted, &["[2001:db8::7]:4711, fd00::2"]);
        assert_eq!(d.ip, ip("2001:db8::7"));
        let d = decide("fd00::1", trusted, &["[2001:db8::8]"]);
        assert_eq!(d.ip, ip("2001:db8::8"));
        let d = decide("10.0.0.5", trusted, &["203.0.113.7:5310"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        // An IPv4-mapped peer and entry count as IPv4.
        let d = decide("::ffff:10.0.0.5", trusted, &["::ffff:203.0.113.7"]);
        assert_eq!(d.ip, ip("203.0.113.7"));
        let d = decide("::ffff:10.0.0.5", trusted, &["::ffff:10.3.3.3"]);
        assert_eq!(d.ip, ip("10.3.3.3"));
    }
}
