//! Every gRPC link over mutual TLS, as separate processes: a coordinator,
//! two workers, a KV-cache instance and a router on etcd, each with its own
//! certificate of a CA the test makes. The cluster forms and answers, state
//! goes to the KV-cache, `ctl` works with a certificate; and each gRPC port
//! refuses plaintext, clients without a certificate and clients of another
//! CA.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use myriad_store::etcd_server::EtcdServer;
use myriad_tls::TlsOptions;
use myriad_tls::testing::Ca;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

mod common;
use common::{Proc, until};

/// The name every server certificate carries; clients expect it
/// (`--tls-server-name`) whatever address they dial.
const NAME: &str = "myriad-internal";

/// `--tls-*` flags for a certificate and the CA.
fn flags(cert: &(PathBuf, PathBuf), ca: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    [
        "--tls-cert".into(),
        path(&cert.0),
        "--tls-key".into(),
        path(&cert.1),
        "--tls-ca".into(),
        path(ca),
        "--tls-require-client-cert".into(),
        "--tls-server-name".into(),
        NAME.into(),
    ]
    .into()
}

fn start(args: &[&str], tls: &[String]) -> Proc {
    let all: Vec<&str> = args.iter().copied().chain(tls.iter().map(String::as_str)).collect();
    Proc::start(&all)
}

/// Whether a client with `tls` gets an answer from the gRPC server at
/// `addr`: any answer, `Unimplemented` included (the port may not serve
/// the health service), means the connection was accepted.
async fn reaches(addr: &str, tls: &TlsOptions) -> bool {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap().timeout(Duration::from_secs(5));
    let channel = match myriad_tls::connect(endpoint, tls.client().unwrap().as_ref()).await {
        Ok(channel) => channel,
        Err(_) => return false,
    };
    match HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await {
        Ok(_) => true,
        Err(status) => status.code() == tonic::Code::Unimplemented,
    }
}

fn options(cert: Option<&(PathBuf, PathBuf)>, ca: &Path) -> TlsOptions {
    TlsOptions {
        cert: cert.map(|c| c.0.clone()),
        key: cert.map(|c| c.1.clone()),
        ca: Some(ca.to_path_buf()),
        server_name: Some(NAME.into()),
        ..TlsOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_mutual_tls_serves_and_every_port_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("myriad"), Ca::new("elsewhere"));
    let ca_file = ca.write(dir.path(), "ca");
    let cert = |role: &str| flags(&ca.sign(dir.path(), role, &[NAME]), &ca_file);
    let etcd = EtcdServer::start().await;
    let member = |role: &'static str, id: &'static str| -> Vec<&str> {
        vec![role, "--etcd", &etcd.endpoint, "--cluster", "tls", "--node-id", id, "--lease-ttl", "3s"]
    };
    let listen = ["--listen", "127.0.0.1:0"];
    let coordinator = start(
        &[
            member("coordinator", "c1"),
            vec!["--admin-listen", "127.0.0.1:0", "--min-workers", "2", "--settle", "300ms"],
        ]
        .concat(),
        &cert("coordinator"),
    );
    let workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|id| start(&[member("worker", id), listen.to_vec()].concat(), &cert("worker")))
        .collect();
    let disk = dir.path().join("kv");
    let kvcache = start(
        &[member("kvcache", "kv1"), listen.to_vec(), vec!["--disk", disk.to_str().unwrap(), "--memory", "64MiB"]]
            .concat(),
        &cert("kvcache"),
    );
    let router =
        start(&[member("router", "r1"), listen.to_vec(), vec!["--kvcache-from-store"]].concat(), &cert("router"));

    let base = router.word(3);
    let ready = format!("{}/ready", base.trim_end_matches("/v1"));
    until("router ready over TLS", Duration::from_secs(60), async || {
        reqwest::get(&ready).await.ok()?.status().is_success().then_some(())
    })
    .await;
    let prompt = r#""prompt": "Over TLS", "max_tokens": 8, "temperature": 0, "ignore_eos": true"#;
    common::complete(&base, prompt).await.expect("a completion through workers over mutual TLS");
    let metrics = base.trim_end_matches("/v1").to_string() + "/metrics";
    until("the state stored in the KV-cache over TLS", Duration::from_secs(20), async || {
        let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
        let saved = text.lines().find_map(|l| l.strip_prefix("myriad_router_kvcache_saves_total{result=\"ok\"} "));
        (saved?.trim().parse::<f64>().ok()? >= 1.0).then_some(())
    })
    .await;

    // `ctl` reaches the coordinator with a certificate, not without.
    let ctl = |tls: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_myriad"))
            .args(["ctl", "--etcd", &etcd.endpoint, "--cluster", "tls"])
            .args(tls)
            .arg("status")
            .output()
            .unwrap()
    };
    let ok = ctl(&cert("operator"));
    assert!(ok.status.success(), "ctl with a certificate: {}", String::from_utf8_lossy(&ok.stderr));
    let refused = ctl(&[]);
    assert!(!refused.status.success(), "ctl in plaintext got through");

    // Every gRPC port: the cluster's certificates in, strangers out.
    let stranger = other.sign(dir.path(), "stranger", &[NAME]);
    let ports = [("coordinator", coordinator.word(9)), ("worker", workers[0].word(3)), ("KV-cache", kvcache.word(3))];
    for (what, addr) in &ports {
        assert!(reaches(addr, &options(Some(&ca.sign(dir.path(), "client", &[NAME])), &ca_file)).await, "{what}");
        assert!(!reaches(addr, &options(None, &ca_file)).await, "{what} let in a client without a certificate");
        assert!(!reaches(addr, &options(Some(&stranger), &ca_file)).await, "{what} let in another CA's client");
        assert!(!reaches(addr, &TlsOptions::default()).await, "{what} let in a plaintext client");
    }

    // A router whose certificate is of another CA cannot use the workers.
    let out = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["router", "--listen", "127.0.0.1:0", "--worker-addr", &workers[0].word(3)])
        .args(flags(&stranger, &ca_file))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("connect to the expert workers"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_on_a_tls_etcd_with_authentication_forms_and_serves() {
    use myriad_store::etcd::EtcdOptions;
    use myriad_store::etcd_server::{EtcdServer, ServerTls};

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("etcd");
    let ca_file = ca.write(dir.path(), "ca");
    let server = ca.sign(dir.path(), "etcd", &["127.0.0.1"]);
    let client = ca.sign(dir.path(), "client", &["myriad"]);
    let etcd_tls = TlsOptions { server_name: None, ..options(Some(&client), &ca_file) };
    let harness = EtcdOptions { tls: etcd_tls.client().unwrap(), credentials: None };
    let tls = ServerTls { cert: server.0, key: server.1, client_ca: ca_file.clone() };
    let mut etcd = EtcdServer::start_tls(tls, harness, &[]).await;
    etcd.enable_auth("root-secret", "myriad", "secret", "/myriad/").await;

    let path = |p: &Path| p.to_string_lossy().into_owned();
    let secure = [
        "--etcd-ca".to_string(),
        path(&ca_file),
        "--etcd-cert".into(),
        path(&client.0),
        "--etcd-key".into(),
        path(&client.1),
        "--etcd-user".into(),
        "myriad".into(),
    ];
    let member = |role: &'static str, id: &'static str| -> Vec<&str> {
        vec![role, "--etcd", &etcd.endpoint, "--cluster", "sealed", "--node-id", id, "--lease-ttl", "3s"]
    };
    let start = |args: Vec<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_myriad"));
        command.args(args).args(&secure).env("MYRIAD_ETCD_PASSWORD", "secret");
        command
    };
    let spawn = |mut command: Command| Proc::spawn(&mut command);
    let _coordinator = spawn(start(
        [member("coordinator", "c1"), vec!["--admin-listen", "127.0.0.1:0", "--min-workers", "1", "--settle", "300ms"]]
            .concat(),
    ));
    let _worker = spawn(start([member("worker", "w1"), vec!["--listen", "127.0.0.1:0"]].concat()));
    let router = spawn(start([member("router", "r1"), vec!["--listen", "127.0.0.1:0"]].concat()));
    let base = router.word(3);
    let ready = format!("{}/ready", base.trim_end_matches("/v1"));
    until("router ready on a TLS etcd with auth", Duration::from_secs(60), async || {
        reqwest::get(&ready).await.ok()?.status().is_success().then_some(())
    })
    .await;
    let prompt = r#""prompt": "Sealed", "max_tokens": 8, "temperature": 0, "ignore_eos": true"#;
    common::complete(&base, prompt).await.expect("a completion on a TLS etcd with auth");

    // ctl reads the cluster with the same settings; a wrong password is refused.
    let ctl = |password: &str| {
        let mut command = start(vec!["ctl", "--etcd", &etcd.endpoint, "--cluster", "sealed"]);
        command.env("MYRIAD_ETCD_PASSWORD", password).arg("status").current_dir(dir.path()).output().unwrap()
    };
    let ok = ctl("secret");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let refused = ctl("wrong");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("authentication failed"), "{stderr}");
}
