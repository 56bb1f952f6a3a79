//! The store on a real etcd that serves TLS, requires client certificates
//! (`--client-cert-auth`) and password authentication, with certificates
//! made by the test.

use std::path::Path;
use std::time::Duration;

use myriad_store::etcd::{Credentials, EtcdOptions};
use myriad_store::etcd_server::{EtcdServer, ServerTls};
use myriad_store::{EtcdStore, Store, StoreError};
use myriad_tls::TlsOptions;
use myriad_tls::testing::Ca;

fn tls(ca: &Path, cert: Option<&(std::path::PathBuf, std::path::PathBuf)>) -> myriad_tls::ClientTls {
    let options = TlsOptions {
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
        ca: Some(ca.to_path_buf()),
        ..TlsOptions::default()
    };
    options.client().unwrap().unwrap()
}

fn as_user(endpoint: &str, tls: myriad_tls::ClientTls, user: &str, password: &str) -> EtcdStore {
    let credentials = Some(Credentials { user: user.into(), password: password.into() });
    EtcdStore::connect_with(&[endpoint.to_string()], &EtcdOptions { tls: Some(tls), credentials }).unwrap()
}

#[tokio::test]
async fn a_tls_etcd_with_client_certificates_and_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("etcd");
    let ca_file = ca.write(dir.path(), "ca");
    let server = ca.sign(dir.path(), "etcd", &["127.0.0.1"]);
    let client = ca.sign(dir.path(), "client", &["myriad"]);
    let harness = EtcdOptions { tls: Some(tls(&ca_file, Some(&client))), credentials: None };
    let tls_server = ServerTls { cert: server.0, key: server.1, client_ca: ca_file.clone() };
    // Tokens idle for a second are forgotten: the store must log in again.
    let mut etcd = EtcdServer::start_tls(tls_server, harness, &["--auth-token-ttl", "1"]).await;
    etcd.enable_auth("root-secret", "myriad", "secret", "/myriad/").await;

    let store = as_user(&etcd.endpoint, tls(&ca_file, Some(&client)), "myriad", "secret");
    let lease = store.grant(Duration::from_secs(5)).await.unwrap();
    store.put("/myriad/a", b"1".to_vec(), Some(lease)).await.unwrap();
    let mut watch = store.watch("/myriad/", 0).await.unwrap();
    assert!(store.put_if("/myriad/b", b"2".to_vec(), None, 0).await.unwrap());
    assert_eq!(store.list("/myriad/").await.unwrap().kvs.len(), 2);
    assert!(watch.recv().await.unwrap().is_ok(), "a watch event over TLS and auth");
    store.keep_alive(lease).await.unwrap();
    // Past the token's TTL: renewed on the way, the caller sees nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.get("/myriad/b").await.unwrap().unwrap().value, b"2");
    store.revoke(lease).await.unwrap();
    assert!(store.get("/myriad/a").await.unwrap().is_none(), "revoking the lease deleted its key");

    // The user's role covers its prefix only: auth is in force.
    assert!(store.put("/elsewhere", b"x".to_vec(), None).await.is_err(), "wrote outside its prefix");
    let wrong = as_user(&etcd.endpoint, tls(&ca_file, Some(&client)), "myriad", "wrong");
    match wrong.get("/myriad/b").await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("authentication failed"), "{m}"),
        other => panic!("a wrong password got {other:?}"),
    }
    // No client certificate, or plaintext: refused.
    let anonymous = as_user(&etcd.endpoint, tls(&ca_file, None), "myriad", "secret");
    assert!(anonymous.get("/myriad/b").await.is_err(), "no client certificate");
    let plain = EtcdStore::connect(&[etcd.endpoint.replace("https://", "http://")]).unwrap();
    assert!(plain.get("/myriad/b").await.is_err(), "plaintext to a TLS etcd");
    // https:// without TLS settings is a clear error up front.
    match EtcdStore::connect(std::slice::from_ref(&etcd.endpoint)) {
        Err(StoreError::Invalid(m)) => assert!(m.contains("--etcd-ca"), "{m}"),
        other => panic!("https without TLS settings: {:?}", other.err()),
    }

    // Restarted in place (same files, same users): the store carries on.
    etcd.kill();
    etcd.restart().await;
    assert_eq!(store.get("/myriad/b").await.unwrap().unwrap().value, b"2");
}
