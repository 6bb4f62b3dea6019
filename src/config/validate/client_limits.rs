//! `[server]` bounds on client connections: `max_request_head`, `request_head_timeout`,
//! `idle_timeout`, `body_timeout`, `send_timeout`, `max_connections`.

use std::time::Duration;

use super::Validator;
use crate::config::defaults::{
    MAX_CLIENT_TIMEOUT, MAX_MAX_CONNECTIONS, MAX_MAX_REQUEST_HEAD, MIN_CLIENT_TIMEOUT,
    MIN_MAX_REQUEST_HEAD,
};
use crate::config::file::{ByteSizeValue, DurationValue, ServerFile};
use crate::config::ClientLimits;

impl Validator<'_> {
    /// The client bounds of `s`, each defaulted when left out and held within its range.
    pub(super) fn client_limits(&mut self, s: &ServerFile) -> ClientLimits {
        let d = ClientLimits::default();
        ClientLimits {
            max_request_head: self
                .request_head_size(s.max_request_head.as_ref(), d.max_request_head),
            request_head_timeout: self.client_timeout(
                "server.request_head_timeout",
                s.request_head_timeout.as_ref(),
                d.request_head_timeout,
            ),
            idle_timeout: self.client_timeout(
                "server.idle_timeout",
                s.idle_timeout.as_ref(),
                d.idle_timeout,
            ),
            body_timeout: self.client_timeout(
                "server.body_timeout",
                s.body_timeout.as_ref(),
                d.body_timeout,
            ),
            send_timeout: self.client_timeout(
                "server.send_timeout",
                s.send_timeout.as_ref(),
                d.send_timeout,
            ),
            max_connections: match s.max_connections {
                None => d.max_connections,
                Some(n) if (1..=MAX_MAX_CONNECTIONS as i64).contains(&n) => n as usize,
                Some(n) => {
                    self.r.push(
                        "server.max_connections",
                        format!(
                            "{n} is out of range; use 1 to {MAX_MAX_CONNECTIONS} client \
                             connections, or remove the key for {}",
                            d.max_connections
                        ),
                    );
                    d.max_connections
                }
            },
        }
    }

    fn request_head_size(&mut self, value: Option<&ByteSizeValue>, default: usize) -> usize {
        match value {
            None => default,
            Some(b)
                if (MIN_MAX_REQUEST_HEAD as u64..=MAX_MAX_REQUEST_HEAD as u64).contains(&b.0) =>
            {
                b.0 as usize
            }
            Some(b) => {
                self.r.push(
                    "server.max_request_head",
                    format!(
                        "{} bytes is out of range; use \"1KiB\" to \"1MiB\" (pingora's HTTP/1 \
                         server reads at most 1 MiB of head), or remove the key for \"32KiB\"",
                        b.0
                    ),
                );
                default
            }
        }
    }

    fn client_timeout(
        &mut self,
        key: &str,
        value: Option<&DurationValue>,
        default: Duration,
    ) -> Duration {
        let Some(v) = value.map(|d| d.0) else {
            return default;
        };
        if v < MIN_CLIENT_TIMEOUT {
            self.r.push(
                key,
                format!(
                    "\"{}\" is shorter than the least it may be, \"100ms\" (a client on a slow \
                     network would be cut off); use a longer duration",
                    humantime::format_duration(v)
                ),
            );
            return default;
        }
        self.at_most(key, v, MAX_CLIENT_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::test_support::{cc_route, errors, has, load};
    use crate::config::ClientLimits;

    #[test]
    fn defaults_need_no_tuning() {
        let c = load(&cc_route("")).unwrap();
        let l = c.server.limits;
        assert_eq!(l, ClientLimits::default());
        assert_eq!(l.max_request_head, 32 * 1024);
        assert_eq!(l.request_head_timeout, Duration::from_secs(10));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.body_timeout, Duration::from_secs(60));
        assert_eq!(l.send_timeout, Duration::from_secs(60));
        assert_eq!(l.max_connections, 10_000);
    }

    #[test]
    fn values_are_read() {
        let text = format!(
            "[server]\nmax_request_head = \"16KiB\"\nrequest_head_timeout = \"3s\"\n\
             idle_timeout = \"5s\"\nbody_timeout = \"7s\"\nsend_timeout = \"9s\"\n\
             max_connections = 50\n{}",
            cc_route("")
        );
        let l = load(&text).unwrap().server.limits;
        assert_eq!(
            l,
            ClientLimits {
                max_request_head: 16 * 1024,
                request_head_timeout: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(5),
                body_timeout: Duration::from_secs(7),
                send_timeout: Duration::from_secs(9),
                max_connections: 50,
            }
        );
    }

    #[test]
    fn out_of_range_values_name_the_key() {
        let text = format!(
            "[server]\nmax_request_head = \"100B\"\nrequest_head_timeout = \"0s\"\n\
             idle_timeout = \"2h\"\nbody_timeout = \"10ms\"\nsend_timeout = \"1day\"\n\
             max_connections = 0\n{}",
            cc_route("")
        );
        let errs = errors(&text);
        for needle in [
            "server.max_request_head: 100 bytes is out of range",
            "server.request_head_timeout: \"0s\" is shorter than the least it may be",
            "server.idle_timeout: 7200 s is more than the most it may be",
            "server.body_timeout: \"10ms\" is shorter",
            "server.send_timeout: 86400 s is more than the most it may be",
            "server.max_connections: 0 is out of range",
        ] {
            assert!(has(&errs, needle), "{needle} not in {errs:?}");
        }
        let errs = errors(&format!(
            "[server]\nmax_request_head = \"2MiB\"\nmax_connections = -3\n{}",
            cc_route("")
        ));
        assert!(
            has(&errs, "server.max_request_head: 2097152 bytes"),
            "{errs:?}"
        );
        assert!(
            has(&errs, "server.max_connections: -3 is out of range"),
            "{errs:?}"
        );
    }
}
