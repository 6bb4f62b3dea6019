//! A minimal pingora pass-through with a static `Authorization` header: the baseline the load
//! benchmark (`benches/load/run.py`) compares tokengate with. Not part of the product.
//!
//! `cargo run --release --example passthrough -- LISTEN ORIGIN [THREADS]`

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct PassThrough {
    origin: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.origin, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _s: &mut Session,
        req: &mut RequestHeader,
        _c: &mut (),
    ) -> Result<()> {
        req.insert_header("authorization", "Bearer static-benchmark-token")?;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(origin)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: passthrough LISTEN ORIGIN [THREADS]");
        std::process::exit(2);
    };
    let Ok(origin) = origin.parse() else {
        eprintln!("ORIGIN must be ip:port");
        std::process::exit(2);
    };
    let threads = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    let conf = ServerConf {
        threads,
        // A benchmark target: stop at once on SIGTERM (pingora's defaults wait minutes).
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, PassThrough { origin });
    svc.add_tcp(listen);
    server.add_service(svc);
    server.run_forever();
}
