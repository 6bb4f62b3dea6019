//! Criterion micro-benchmarks of tokengate's own per-request work (nothing slow or chatty on
//! the hot path): route lookup, credential stripping plus token insertion, the
//! `access_token` query rewrite, the lock-free token read, and all of them together as one
//! request's work (`per_request`). No network and no pingora server: only the functions the
//! proxy phases call for every request.
//!
//! The `fast_path` group runs the fast path's whole per-request work (`fast_path::own_work`)
//! and the request's copy into a buffer plus httparse on the same heads (`httparse_only`);
//! `-- --own-code-best` prints tokengate's part of it
//! as the best of 40 paired rounds.
//!
//! Run: `cargo bench --bench hot_path` (results and their reading: docs/benchmarks.md).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{criterion_group, BenchmarkId, Criterion};
use http::{HeaderName, HeaderValue};
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;
use tokengate::proxy::upstream_dns::UpstreamAddress;

use tokengate::config::Config;
use tokengate::metrics::{Metrics, TokenMetrics};
use tokengate::oauth::{AccessToken, FetchError};
use tokengate::proxy::downstream::DownstreamHead;
use tokengate::proxy::fast_path::{own_work, Scratch};
use tokengate::proxy::policy::target::strip_access_token;
use tokengate::proxy::policy::{Forwarding, Plan};
use tokengate::proxy::routes::{normalise_prefix, Route, RouteTable};
use tokengate::proxy::{client_allowed, RequestIds, SharedState};
use tokengate::token::{RenewalPolicy, TokenFetcher, TokenSource};

// The allocator the gateway binary runs with (src/main.rs), so allocations inside the measured
// functions cost what they cost in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A config with `n` routes on the shared listener: `routes[0]` is the `/` fallback, the others
/// have deep prefixes `/api/v1/tenant{i}/orders`. Built through the real loader.
fn config_with_routes(n: usize) -> Config {
    // A trusted network of the three private ranges; clients below come from the last one.
    let mut toml = String::from(
        "[server]\nlisten = \"127.0.0.1:8080\"\n\
         allowed_clients = [\"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\"]\n",
    );
    for i in 0..n {
        let prefix = if i == 0 {
            "/".to_string()
        } else {
            format!("/api/v1/tenant{i}/orders")
        };
        toml.push_str(&format!(
            r#"
[[routes]]
name = "r{i}"
path_prefix = "{prefix}"
upstream = "https://api.example.com"

[routes.auth]
grant = "client_credentials"
token_endpoint = "https://auth.example.com/oauth2/token"
client_id = "bench"
client_secret = "bench-secret"
"#
        ));
    }
    match Config::from_toml_str(&toml, None, &|_| None) {
        Ok(c) => c,
        Err(e) => panic!("generated bench config does not load:\n{e}"),
    }
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    let host: &[u8] = b"gateway.internal:8080";
    for n in [1usize, 100, 1000] {
        let config = config_with_routes(n);
        let table = RouteTable::shared(config.routes.iter().enumerate());
        if n > 1 {
            // The deepest route, requested with a longer path below it.
            let deep = format!("/api/v1/tenant{}/orders/12345/items", n - 1);
            assert_eq!(table.lookup(Some(host), &deep), Some(n - 1));
            group.bench_with_input(BenchmarkId::new("deep_match", n), &deep, |b, path| {
                b.iter(|| table.lookup(black_box(Some(host)), black_box(path)))
            });
        }
        let fallback = "/legacy/reports/2024/summary";
        assert_eq!(table.lookup(Some(host), fallback), Some(0));
        group.bench_with_input(BenchmarkId::new("fallback", n), &fallback, |b, path| {
            b.iter(|| table.lookup(black_box(Some(host)), black_box(path)))
        });
    }
    group.finish();
}

/// The three credential fields of [`request_with`]'s request.
const CREDENTIALS: [&str; 3] = ["Authorization", "Cookie", "X-Api-Key"];

/// The same request with only the credential fields named in `credentials`.
fn request_with(credentials: &[&str]) -> RequestHeader {
    let mut req = match RequestHeader::build("POST", b"/drillster/api/2.1.1/user?x=1", None) {
        Ok(r) => r,
        Err(e) => panic!("request header: {e}"),
    };
    for (name, value) in [
        ("Host", "gateway.internal:8080"),
        ("User-Agent", "LegacyERP/4.2 (Windows NT 6.1)"),
        ("Accept", "application/json"),
        ("Accept-Encoding", "gzip, deflate"),
        ("Accept-Language", "nl-NL,nl;q=0.9,en;q=0.8"),
        ("Content-Type", "application/json; charset=utf-8"),
        ("Content-Length", "87"),
        ("Authorization", "Basic bGVnYWN5OnBhc3N3b3Jk"),
        ("Cookie", "session=legacy-session; lang=nl"),
        ("X-Api-Key", "legacy-api-key-0123456789"),
        ("X-Request-Id", "6f1c2a9e8b7d4c3a2f1e0d9c8b7a6f5e"),
        ("X-Correlation-Id", "erp-batch-7731"),
    ] {
        if CREDENTIALS.contains(&name) && !credentials.contains(&name) {
            continue;
        }
        if let Err(e) = req.append_header(name, value) {
            panic!("{name}: {e}");
        }
    }
    req
}

/// A realistic access token header value (~850 bytes, like a JWT access token).
fn bearer_value() -> HeaderValue {
    let token = format!(
        "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.{}.sig",
        "x".repeat(800)
    );
    let mut v = match HeaderValue::try_from(format!("Bearer {token}")) {
        Ok(v) => v,
        Err(e) => panic!("header value: {e}"),
    };
    v.set_sensitive(true);
    v
}

/// The request's head as the client sent it: request line, fields, empty line.
fn raw_head(credentials: &[&str]) -> bytes::Bytes {
    let req = request_with(credentials);
    let mut raw = b"POST /drillster/api/2.1.1/user?x=1 HTTP/1.1\r\n".to_vec();
    req.header_to_h1_wire(&mut raw);
    raw.extend_from_slice(b"\r\n");
    bytes::Bytes::from(raw)
}

/// pingora-proxy's path through the policy: the head read again from pingora's bytes, planned,
/// and built as the upstream `RequestHeader`.
fn header_hygiene(c: &mut Criterion) {
    let config = config_with_routes(1);
    let route = bench_route(&config, 0);
    let authorization = bearer_value();
    let id = RequestIds::new().next();
    let mut plan = Plan::default();
    let mut group = c.benchmark_group("pingora_path_head");
    for (name, raw) in [
        ("with_inbound_credentials", raw_head(&CREDENTIALS)),
        ("with_authorization_only", raw_head(&["Authorization"])),
        ("without_inbound_credentials", raw_head(&[])),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let head = match DownstreamHead::parse(black_box(raw.clone())) {
                    Ok(h) => h,
                    Err(e) => panic!("refused: {e:?}"),
                };
                let fw = Forwarding {
                    route: &route,
                    client_ip: Some(b"192.168.30.40"),
                    forward_entries: None,
                    authorization: authorization.as_bytes(),
                    request_id: id.as_bytes(),
                };
                match head.upstream_header(&fw, &mut plan) {
                    Ok(h) => h,
                    Err(e) => panic!("upstream header: {e}"),
                }
            })
        });
    }
    group.finish();
}

fn request_id_and_metrics(c: &mut Criterion) {
    let ids = RequestIds::new();
    c.bench_function("request_id", |b| b.iter(|| ids.next()));
    let metrics = Metrics::new().route("r");
    c.bench_function("metrics_request", |b| {
        b.iter(|| metrics.request(black_box(200), black_box(Duration::from_micros(250))))
    });
    // Two threads counting requests of one route at once, as two worker threads do:
    // `RouteMetrics::request` (status counter, duration histogram kept per thread) against
    // what it was before, a status counter and prometheus' own `Histogram` with the same
    // buckets, whose sum and count every thread writes.
    let elapsed = Duration::from_micros(250);
    let mut group = c.benchmark_group("request_duration_two_threads");
    group.bench_function("per_thread_shards", |b| {
        b.iter_custom(|iters| on_two_threads(iters, || metrics.request(200, elapsed)))
    });
    let shared =
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("d", "d").buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0,
        ]))
        .expect("static histogram");
    let status = prometheus::IntCounter::new("c", "c").expect("static counter");
    group.bench_function("prometheus_histogram", |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, || {
                status.inc();
                shared.observe(elapsed.as_secs_f64())
            })
        })
    });
    group.finish();
}

/// Wall time of `iters` calls of `f` made on each of two threads at once.
fn on_two_threads(iters: u64, f: impl Fn() + Sync) -> Duration {
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        let run = || {
            start.wait();
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed()
        };
        let other = s.spawn(run);
        let mine = run();
        mine.max(other.join().unwrap_or(mine))
    })
}

fn query_rewrite(c: &mut Criterion) {
    let mut group = c.benchmark_group("strip_access_token");
    let without: &[u8] = b"page=2&per_page=50&sort=-created&filter=a%2Fb";
    let with: &[u8] =
        b"page=2&access_token=leaked-query-token&per_page=50&sort=-created&filter=a%2Fb";
    assert_eq!(strip_access_token(without), None);
    assert!(strip_access_token(with).is_some());
    group.bench_function("absent", |b| {
        b.iter(|| strip_access_token(black_box(without)))
    });
    group.bench_function("present", |b| {
        b.iter(|| strip_access_token(black_box(with)))
    });
    group.finish();
}

/// Answers every token request at once with a one-hour token.
struct InstantFetcher;

#[async_trait]
impl TokenFetcher for InstantFetcher {
    async fn fetch(&self, _now: std::time::SystemTime) -> Result<AccessToken, FetchError> {
        Ok(AccessToken {
            value: format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", "t".repeat(800)),
            lifetime: Duration::from_secs(3600),
        })
    }
}

/// A token source holding a token, with the runtime its refresher runs on.
fn token_source() -> (Arc<TokenSource>, tokio::runtime::Runtime) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let source: Arc<TokenSource> = TokenSource::new(
        "bench",
        Box::new(InstantFetcher),
        RenewalPolicy::default(),
        TokenMetrics::detached(),
    );
    // The refresher lives as long as the runtime.
    let _refresher = source.spawn_refresher(runtime.handle());
    let deadline = Instant::now() + Duration::from_secs(10);
    while source.usable_now(tokio::time::Instant::now()).is_none() {
        assert!(Instant::now() < deadline, "no token within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    (source, runtime)
}

fn token_lookup(c: &mut Criterion) {
    let (source, _runtime) = token_source();
    c.bench_function("token_usable_now", |b| {
        b.iter(|| source.usable_now(black_box(tokio::time::Instant::now())))
    });
}

/// Everything tokengate's own code does for one request on pingora-proxy's path, in the order
/// the proxy phases do it: request id, client allowlist, the head read and scanned by the
/// policy, route lookup (100 routes), token read, the planned upstream head, and the metrics
/// update at the end. pingora's own parsing, I/O and session work are not included.
fn per_request(c: &mut Criterion) {
    let config = config_with_routes(100);
    let table = RouteTable::shared(config.routes.iter().enumerate());
    let route = bench_route(&config, 99);
    let allowed = config.server.allowed_clients.clone();
    let client = IpAddr::V4(Ipv4Addr::new(192, 168, 30, 40));
    assert!(
        client_allowed(&allowed, client),
        "the allowlist admits 192.168/16"
    );
    let ids = RequestIds::new();
    let (source, _runtime) = token_source();
    let metrics = Metrics::new().route("r99");
    let mut plan = Plan::default();

    let mut group = c.benchmark_group("per_request");
    for (name, raw) in [
        ("without_inbound_credentials", raw_head_at(&[])),
        ("with_authorization_only", raw_head_at(&["Authorization"])),
        ("with_inbound_credentials", raw_head_at(&CREDENTIALS)),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let started = tokio::time::Instant::now();
                let id = ids.next();
                assert!(client_allowed(&allowed, black_box(client)));
                let head = match DownstreamHead::parse(black_box(raw.clone())) {
                    Ok(h) => h,
                    Err(e) => panic!("refused: {e:?}"),
                };
                let index = table.lookup(head.host(), head.path());
                assert_eq!(index, Some(99));
                let Some((authorization, _generation)) = source.usable_now(started) else {
                    panic!("token expired during the bench");
                };
                let fw = Forwarding {
                    route: &route,
                    client_ip: Some(b"192.168.30.40"),
                    forward_entries: None,
                    authorization: authorization.as_bytes(),
                    request_id: id.as_bytes(),
                };
                let up = match head.upstream_header(&fw, &mut plan) {
                    Ok(h) => h,
                    Err(e) => panic!("upstream header: {e}"),
                };
                metrics.request(200, started.elapsed());
                up
            })
        });
    }
    group.finish();
}

/// [`raw_head`] with the deep route's path.
fn raw_head_at(credentials: &[&str]) -> bytes::Bytes {
    let req = request_with(credentials);
    let mut raw =
        b"POST /api/v1/tenant99/orders/12345/items?page=2&per_page=50 HTTP/1.1\r\n".to_vec();
    req.header_to_h1_wire(&mut raw);
    raw.extend_from_slice(b"\r\n");
    bytes::Bytes::from(raw)
}

/// The same legacy request as raw bytes on the wire (head and its 87-byte body), with only the
/// credential fields named in `credentials`, for the fast path.
fn raw_request_with(credentials: &[&str]) -> Vec<u8> {
    let req = request_with(credentials);
    let mut raw =
        b"POST /api/v1/tenant99/orders/12345/items?page=2&per_page=50 HTTP/1.1\r\n".to_vec();
    req.header_to_h1_wire(&mut raw);
    raw.extend_from_slice(b"\r\n");
    raw.extend_from_slice(&[b'x'; 87]);
    raw
}

/// A typical API response head (the body is not part of the work: it is copied as received).
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\
    Date: Sun, 29 Nov 2026 17:00:00 GMT\r\nContent-Type: application/json; charset=utf-8\r\n\
    Content-Length: 512\r\nConnection: keep-alive\r\nCache-Control: no-store\r\n\
    ETag: \"5f3a-1c\"\r\nVary: Accept-Encoding\r\n\r\n";

/// Everything tokengate's own code does for one request on the fast path
/// (`fast_path::own_work`): parse the client's head, admit it (allowlist of three CIDRs, route
/// among 100, method, token), request id, write the upstream request (credentials stripped,
/// Bearer, Host, X-Forwarded-*, hop-by-hop removed) into one buffer, parse the upstream's
/// response head and write the client's version, count the request. No I/O.
/// The fast path's world for [`own_work`]: 100 routes on the shared listener, each with a
/// current token, the allowlist of three CIDRs, and a client inside it.
struct FastPathFixture {
    table: RouteTable,
    state: SharedState,
    client: IpAddr,
    /// Keeps the token source's refresher alive.
    _runtime: tokio::runtime::Runtime,
}

/// The bench's route for `routes[index]` of `config`: upstream `api.example.com`, strips
/// `X-Api-Key`, tokens from `source`.
fn route_of(
    index: usize,
    rc: &tokengate::config::RouteConfig,
    source: Arc<TokenSource>,
    metrics: &Metrics,
) -> Route {
    Route {
        index,
        name: rc.name.clone(),
        prefix: normalise_prefix(&rc.path_prefix),
        strip_prefix: false,
        base_path: String::new(),
        upstream: UpstreamAddress::fixed(HttpPeer::new(
            "127.0.0.1:443",
            true,
            "api.example.com".to_string(),
        )),
        host_header: HeaderValue::from_static("api.example.com"),
        allow_methods: None,
        allow_header: None,
        strip_headers: vec![HeaderName::from_static("x-api-key")],
        strip_folded: [tokengate::proxy::policy::fields::fold_name("x-api-key")]
            .into_iter()
            .collect(),
        forward_cookies: false,
        token: source,
        subjects: None,
        subject_header: None,
        metrics: metrics.route(&rc.name),
    }
}

/// [`route_of`] with a token source that is never asked (the planned head takes the token
/// value directly).
fn bench_route(config: &Config, index: usize) -> Route {
    let source = TokenSource::new(
        "bench",
        Box::new(InstantFetcher),
        RenewalPolicy::default(),
        TokenMetrics::detached(),
    );
    route_of(index, &config.routes[index], source, &Metrics::new())
}

fn fast_path_fixture() -> FastPathFixture {
    let config = config_with_routes(100);
    let table = RouteTable::shared(config.routes.iter().enumerate());
    let (source, runtime) = token_source();
    let metrics = Metrics::new();
    let routes: Vec<Route> = config
        .routes
        .iter()
        .enumerate()
        .map(|(index, rc)| route_of(index, rc, Arc::clone(&source), &metrics))
        .collect();
    let state = SharedState::new(
        routes,
        config.server.allowed_clients.clone(),
        65536,
        metrics,
    );
    let client = IpAddr::V4(Ipv4Addr::new(192, 168, 30, 40));

    FastPathFixture {
        table,
        state,
        client,
        _runtime: runtime,
    }
}

/// The three requests the fast-path benchmarks send.
fn fast_path_requests() -> [(&'static str, Vec<u8>); 3] {
    [
        ("without_inbound_credentials", raw_request_with(&[])),
        (
            "with_authorization_only",
            raw_request_with(&["Authorization"]),
        ),
        ("with_inbound_credentials", raw_request_with(&CREDENTIALS)),
    ]
}

fn fast_path_request(c: &mut Criterion) {
    let FastPathFixture {
        table,
        state,
        client,
        _runtime,
    } = fast_path_fixture();
    let mut group = c.benchmark_group("fast_path");
    for (name, request) in fast_path_requests() {
        let sent = bench_own_work(&mut group, name, &table, &state, client, &request);
        assert!(
            sent > 900,
            "{name}: upstream request of {sent} bytes has no token"
        );
        // The part of the above that is httparse's, not tokengate's: parsing the same request
        // and response heads, configured as the fast path does.
        let mut buf = Vec::with_capacity(4096);
        group.bench_function(format!("{name}/httparse_only"), |b| {
            b.iter(|| arrive_and_parse(&mut buf, black_box(&request), black_box(RESPONSE_HEAD)))
        });
    }
    group.finish();
}

/// Times [`own_work`] on `request` (from `client`) as `group/name`, after checking that the
/// fast path takes it. Returns the upstream request's length.
fn bench_own_work(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    table: &RouteTable,
    state: &SharedState,
    client: IpAddr,
    request: &[u8],
) -> usize {
    let mut scratch = Scratch::new(state, client);
    let Some((sent, _)) = own_work(table, state, request, RESPONSE_HEAD, &mut scratch) else {
        panic!("{name}: the fast path did not take the request");
    };
    group.bench_function(name, |b| {
        b.iter(|| {
            own_work(
                table,
                state,
                black_box(request),
                black_box(RESPONSE_HEAD),
                &mut scratch,
            )
        })
    });
    sent
}

/// A request for a managed user's cached token against one for the route's own token, on the
/// same route (`[routes.subjects]`, the demo's settings) through the same fast path: the
/// subject decision, the per-user cache lookup and the field's removal are the difference. The
/// user's token comes from a sandbox authorization server on loopback, obtained once before
/// the measurement; the route's own from the bench's instant fetcher.
fn per_user_request(c: &mut Criterion) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let sandbox = runtime
        .block_on(tokengate_sandbox::Sandbox::start())
        .unwrap_or_else(|e| panic!("sandbox: {e}"));
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/sandbox/src/keys/demo-key.json");
    // Listeners the config names but the bench never opens.
    let [listen, admin, token_listen] =
        [9, 10, 11].map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let toml =
        tokengate::demo::config_toml_with_subjects(&sandbox, listen, admin, token_listen, &key);
    let config = Config::from_toml_str(&toml, None, &|_| None)
        .unwrap_or_else(|e| panic!("demo config: {e}"));
    let rc = &config.routes[0];
    let Some(settings) = rc.subjects.clone() else {
        panic!("the demo's drillster route has [routes.subjects]");
    };
    let client = tokengate::oauth::TokenClient::new(
        rc.auth.clone(),
        None,
        rc.connect_timeout,
        rc.auth.token_timeout,
    )
    .unwrap_or_else(|e| panic!("token client: {e}"));
    let metrics = Metrics::new();
    let subjects = tokengate::token::subjects::SubjectTokens::new(
        rc.name.clone(),
        client,
        RenewalPolicy::default(),
        settings,
        TokenMetrics::detached(),
        metrics.subject_tokens(&rc.name),
        runtime.handle().clone(),
    );
    let user = tokengate::demo::DEMO_USERS[0];
    if let Err(e) = runtime.block_on(subjects.token(user, None)) {
        panic!("no token for {user}: {e:?}");
    }
    let (source, _refresher_runtime) = token_source();
    let mut route = route_of(0, rc, source, &metrics);
    let header = tokengate::proxy::policy::fields::fold_name("Tokengate-Subject");
    route.strip_folded = [fold("x-api-key"), header.clone()].into_iter().collect();
    route.subject_header = Some(header);
    route.subjects = Some(subjects);
    let table = RouteTable::shared(config.routes.iter().enumerate().take(1));
    let state = SharedState::new(
        vec![route],
        config.server.allowed_clients.clone(),
        65536,
        metrics,
    );
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let request = |subject: &str| {
        format!(
            "GET /drillster/api/2.1.1/user?x=1 HTTP/1.1\r\nHost: gw\r\nUser-Agent: legacy/1.0\r\n\
             Accept: application/json\r\n{subject}X-Request-Id: 7d9f2c\r\n\r\n"
        )
        .into_bytes()
    };
    let mut group = c.benchmark_group("per_user");
    let subject_field = format!("Tokengate-Subject: {user}\r\n");
    for (name, request) in [
        ("route_token", request("")),
        ("cached_user_token", request(&subject_field)),
    ] {
        bench_own_work(&mut group, name, &table, &state, client, &request);
    }
    group.finish();
    drop(state);
    let _ = runtime.block_on(sandbox.shutdown());
}

/// A field name folded as routes hold their strip lists.
fn fold(name: &str) -> Box<[u8]> {
    tokengate::proxy::policy::fields::fold_name(name)
}

/// The request's bytes arriving in the connection's buffer, then [`http1_parse`]: `own_work`
/// copies the request into its buffer where a socket read would have put it, and that copy is
/// the kernel's work in the gateway, not tokengate's code.
fn arrive_and_parse(buf: &mut Vec<u8>, request: &[u8], response: &[u8]) -> (usize, usize) {
    buf.clear();
    buf.extend_from_slice(request);
    http1_parse(buf, response)
}

/// httparse on a request and a response head as `fast_path` calls it (uninitialised field
/// storage; obs-fold and `Name :` accepted in responses). Returns the two head lengths.
fn http1_parse(request: &[u8], response: &[u8]) -> (usize, usize) {
    use std::mem::MaybeUninit;
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(a)) = req.parse_with_uninit_headers(request, &mut storage)
    else {
        panic!("request head did not parse");
    };
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut resp = httparse::Response::new(&mut []);
    let mut config = httparse::ParserConfig::default();
    config.allow_spaces_after_header_name_in_responses(true);
    config.allow_obsolete_multiline_headers_in_responses(true);
    let Ok(httparse::Status::Complete(b)) =
        config.parse_response_with_uninit_headers(&mut resp, response, &mut storage)
    else {
        panic!("response head did not parse");
    };
    (a, b)
}

criterion_group!(
    benches,
    route_lookup,
    header_hygiene,
    request_id_and_metrics,
    query_rewrite,
    token_lookup,
    per_request,
    fast_path_request,
    per_user_request
);
/// `cargo bench --bench hot_path -- --own-code-best`: tokengate's own code per request on the
/// fast path as the best of 40 paired rounds (5,000 requests through `own_work`, then the
/// request's copy into a buffer, which stands for the socket read, and the same two heads
/// through httparse; the difference of the two best rounds). Criterion's
/// estimates are means, and on a shared VM a mean carries every interruption from the
/// neighbours; the best round is the work itself. Prints one line per request kind, in ns.
fn own_code_best() {
    let FastPathFixture {
        table,
        state,
        client,
        _runtime,
    } = fast_path_fixture();
    const ROUNDS: usize = 40;
    const BATCH: u32 = 5000;
    for (name, request) in fast_path_requests() {
        let mut scratch = Scratch::new(&state, client);
        let mut buf = Vec::with_capacity(4096);
        let (mut whole, mut parse, mut parse_alone) = (Duration::MAX, Duration::MAX, Duration::MAX);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            for _ in 0..BATCH {
                black_box(own_work(
                    &table,
                    &state,
                    black_box(&request),
                    black_box(RESPONSE_HEAD),
                    &mut scratch,
                ));
            }
            whole = whole.min(t.elapsed() / BATCH);
            let t = Instant::now();
            for _ in 0..BATCH {
                black_box(arrive_and_parse(
                    &mut buf,
                    black_box(&request),
                    black_box(RESPONSE_HEAD),
                ));
            }
            parse = parse.min(t.elapsed() / BATCH);
            let t = Instant::now();
            for _ in 0..BATCH {
                black_box(http1_parse(black_box(&request), black_box(RESPONSE_HEAD)));
            }
            parse_alone = parse_alone.min(t.elapsed() / BATCH);
        }
        println!(
            "fast_path/{name}: best of {ROUNDS} rounds: whole {} ns, request copy + httparse {} ns \
             (httparse alone {} ns), tokengate's own code {} ns",
            whole.as_nanos(),
            parse.as_nanos(),
            parse_alone.as_nanos(),
            whole.saturating_sub(parse).as_nanos()
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--own-code-best") {
        own_code_best();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
