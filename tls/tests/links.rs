//! Real TLS over real sockets: a tonic server (the standard health service)
//! behind [`myriad_tls::incoming`], clients through [`ClientTls`], and
//! certificates made here by a CA of the test's own (rcgen).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use myriad_tls::testing::Ca;
use myriad_tls::{TlsError, TlsOptions};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn options(cert: Option<&(PathBuf, PathBuf)>, ca: Option<&Path>) -> TlsOptions {
    TlsOptions {
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
        ca: ca.map(Path::to_path_buf),
        ..TlsOptions::default()
    }
}

/// Serves the health service on a free port with `tls`; returns its address.
async fn serve(tls: &TlsOptions) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = myriad_tls::incoming(listener, tls.server().unwrap());
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(tonic::transport::Server::builder().add_service(health).serve_with_incoming(incoming));
    addr.to_string()
}

/// One health check over a new connection, with `tls` (None: plaintext).
async fn check(addr: &str, tls: &TlsOptions) -> Result<(), String> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(5));
    let channel = match tls.client().map_err(|e| e.to_string())? {
        Some(tls) => tls.connect(endpoint).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| format!("connect: {e:?}"))?;
    let request = HealthCheckRequest { service: String::new() };
    HealthClient::new(channel).check(request).await.map(|_| ()).map_err(|e| format!("{e:?}"))
}

/// Retries `check` until it gives `want` or 10 s pass (reloads poll each second).
async fn eventually(addr: &str, tls: &TlsOptions, want: bool) {
    let start = Instant::now();
    loop {
        let got = check(addr, tls).await;
        if got.is_ok() == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still {got:?} after 10 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn mutual_tls_refuses_every_client_without_a_certificate_of_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("cluster"), Ca::new("elsewhere"));
    let ca_file = ca.write(dir.path(), "ca");
    let server = ca.sign(dir.path(), "server", &["127.0.0.1"]);
    let client = ca.sign(dir.path(), "client", &["router"]);
    let stranger = other.sign(dir.path(), "stranger", &["router"]);
    let mut server_tls = options(Some(&server), Some(&ca_file));
    server_tls.require_client_cert = true;
    let addr = serve(&server_tls).await;

    check(&addr, &options(Some(&client), Some(&ca_file))).await.expect("a client with the CA's certificate");
    for (who, tls) in [
        ("no certificate", options(None, Some(&ca_file))),
        ("another CA's certificate", options(Some(&stranger), Some(&ca_file))),
        ("plaintext", TlsOptions::default()),
    ] {
        assert!(check(&addr, &tls).await.is_err(), "a client with {who} got through");
    }
    // The server still serves after refusing them.
    check(&addr, &options(Some(&client), Some(&ca_file))).await.unwrap();
}

#[tokio::test]
async fn clients_check_the_server_certificate_and_the_name_it_carries() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("cluster"), Ca::new("elsewhere"));
    let (ca_file, other_file) = (ca.write(dir.path(), "ca"), other.write(dir.path(), "other"));
    // Pods are dialled by IP; their certificate names the service.
    let server = ca.sign(dir.path(), "server", &["myriad-worker"]);
    let addr = serve(&options(Some(&server), None)).await;

    let mut named = options(None, Some(&ca_file));
    assert!(check(&addr, &named).await.is_err(), "the IP is not in the certificate");
    named.server_name = Some("myriad-worker".into());
    check(&addr, &named).await.expect("the certificate names myriad-worker");
    let mut untrusted = options(None, Some(&other_file));
    untrusted.server_name = Some("myriad-worker".into());
    assert!(check(&addr, &untrusted).await.is_err(), "a server of another CA");
    assert!(check(&addr, &TlsOptions::default()).await.is_err(), "plaintext to a TLS port");
}

#[tokio::test]
async fn rotated_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Ca::new("old"), Ca::new("new"));
    let new_ca = new.write(dir.path(), "new-ca");
    // Server side: a certificate of the old CA, then of the new one, in
    // the same files; clients trusting only the new CA get in after.
    let server = old.sign(dir.path(), "server", &["127.0.0.1"]);
    let client = new.sign(dir.path(), "client", &["router"]);
    let mut server_tls = options(Some(&server), Some(&new_ca));
    server_tls.require_client_cert = true;
    let addr = serve(&server_tls).await;
    let client_tls = options(Some(&client), Some(&new_ca));
    assert!(check(&addr, &client_tls).await.is_err(), "the server's certificate is of the old CA");
    new.sign(dir.path(), "server", &["127.0.0.1"]);
    eventually(&addr, &client_tls, true).await;

    // Client side: one `ClientTls`, kept, presenting a certificate of the
    // old CA (refused), then, rotated in place, of the new one.
    let stale = old.sign(dir.path(), "client", &["router"]);
    assert_eq!(stale, client);
    let tls = options(Some(&client), Some(&new_ca)).client().unwrap().unwrap();
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(5));
    let once = |tls: myriad_tls::ClientTls, endpoint: Endpoint| async move {
        let channel = tls.connect(endpoint).await.map_err(|e| e.to_string())?;
        let request = HealthCheckRequest { service: String::new() };
        HealthClient::new(channel).check(request).await.map(|_| ()).map_err(|e| e.to_string())
    };
    assert!(once(tls.clone(), endpoint.clone()).await.is_err(), "the client's certificate is of the old CA");
    new.sign(dir.path(), "client", &["router"]);
    let start = Instant::now();
    while once(tls.clone(), endpoint.clone()).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "the rotated client certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn bad_settings_name_the_file_or_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster");
    let ca_file = ca.write(dir.path(), "ca");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let message = |r: Result<_, TlsError>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let no_key = TlsOptions { cert: Some(ca_file.clone()), ..TlsOptions::default() };
    assert!(message(no_key.server().map(|_| ())).contains("--tls-key"));
    let no_ca = TlsOptions { require_client_cert: true, ..options(Some(&(ca_file.clone(), garbage.clone())), None) };
    assert!(message(no_ca.server().map(|_| ())).contains("--tls-ca"));
    let client_without_ca = options(Some(&ca.sign(dir.path(), "c", &["x"])), None);
    assert!(message(client_without_ca.client().map(|_| ())).contains("--tls-ca"));
    let bad_ca = options(None, Some(&garbage));
    assert!(message(bad_ca.client().map(|_| ())).contains("garbage.pem"));
    // A setting alone is refused, not ignored.
    let alone = TlsOptions { require_client_cert: true, ..TlsOptions::default() };
    assert!(message(alone.server().map(|_| ())).contains("--tls-cert"));
    let alone = TlsOptions { server_name: Some("myriad".into()), ..TlsOptions::default() };
    assert!(message(alone.client().map(|_| ())).contains("--tls-ca"));
    let missing = options(None, Some(&dir.path().join("absent.pem")));
    assert!(message(missing.client().map(|_| ())).contains("absent.pem"));
}
