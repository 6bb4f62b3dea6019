//! A TLS upstream with a private CA: the route's `ca_file` is trusted, and the upstream sees TLS
//! SNI and `Host` naming itself (`localhost`), never the client's Host. Without the `ca_file` the
//! same upstream is refused (502), so verification is really on.

use crate::proxy_support;

use std::net::ToSocketAddrs;

use proxy_support::{client_credentials_route, send, Rig};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokengate_sandbox::{RawApi, Sandbox};

/// A CA certificate (PEM) and a `localhost` leaf (chain PEM, key PEM) it signed.
fn private_ca() -> (String, String, String) {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tokengate test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.use_authority_key_identifier_extension = true;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (ca_cert.pem(), leaf_cert.pem(), leaf_key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_with_ca_file_gets_its_own_sni_and_host() {
    let (ca_pem, leaf_pem, key_pem) = private_ca();
    let ca_path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("tls-upstream-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, &ca_pem).unwrap();

    let sandbox = Sandbox::start().await.unwrap();
    // Listen where `localhost` resolves first, so the gateway reaches it by that name.
    let localhost = ("localhost", 0)
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
        .ip();
    let tls = RawApi::builder(sandbox.registry.clone())
        .tls(leaf_pem.as_bytes(), key_pem.as_bytes())
        .bind(localhost)
        .start()
        .await
        .unwrap();
    let plain = RawApi::start(sandbox.registry.clone()).await.unwrap();
    let tls_url = tls.base_url();
    let port = tls.addr().port();
    let rig = Rig::start_with(sandbox, plain, |t, sandbox, _| {
        let trusted = client_credentials_route(
            sandbox,
            "secure",
            "/secure",
            &format!("{tls_url}/base/"),
            &format!("ca_file = \"{}\"", ca_path.display()),
        );
        let untrusted = client_credentials_route(sandbox, "untrusted", "/untrusted", &tls_url, "");
        format!("{t}{trusted}{untrusted}")
    })
    .await;

    let r = send(
        rig.gw.addr(),
        b"GET /secure/v1/x%2Fy?q=1 HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        r.head,
        String::from_utf8_lossy(&r.body)
    );
    let seen = tls.last().expect("the TLS upstream got the request");
    assert_eq!(
        seen.sni.as_deref(),
        Some("localhost"),
        "TLS SNI is the upstream's name"
    );
    assert_eq!(seen.header("host"), Some(format!("localhost:{port}")));
    assert_eq!(
        seen.header("x-forwarded-host").as_deref(),
        Some("client.example")
    );
    assert_eq!(seen.target, "/base/v1/x%2Fy?q=1");
    assert!(seen.subject.is_some(), "token accepted over TLS");

    // The same upstream without the private CA: certificate refused, 502, nothing served.
    let before = tls.request_count();
    let r = send(
        rig.gw.addr(),
        b"GET /untrusted/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert_eq!(
        r.header("tokengate-error").as_deref(),
        Some("upstream_unreachable")
    );
    assert_eq!(tls.request_count(), before);
    rig.stop().await;
    tls.shutdown().await;
}
