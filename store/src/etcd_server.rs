//! A real `etcd` server for tests (Debian package `etcd-server`): its own
//! data directory and free loopback ports, killed when dropped, and able
//! to be killed and restarted on the same ports and data.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{EtcdStore, Store};

pub struct EtcdServer {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`, for clients.
    pub endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("read the bound port").port()
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with a hint when the
    /// `etcd` binary is missing (scripts/test.sh installs it).
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("create etcd's data dir");
        let mut server = EtcdServer {
            child: None,
            endpoint: format!("http://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir,
        };
        server.restart().await;
        server
    }

    fn binary() -> PathBuf {
        std::env::var_os("ETCD_BIN").map(PathBuf::from).unwrap_or_else(|| "etcd".into())
    }

    /// Starts it again on the same ports and data (after [`EtcdServer::kill`]).
    pub async fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("create etcd's log");
        let child = Command::new(Self::binary())
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint, "--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &self.peer, "--initial-advertise-peer-urls", &self.peer])
            .args(["--initial-cluster", &format!("test={}", self.peer)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}); install it with `apt-get install etcd-server`"));
        self.child = Some(child);
        let store = EtcdStore::connect(std::slice::from_ref(&self.endpoint)).expect("endpoint");
        for _ in 0..200 {
            if store.list("/").await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        panic!("etcd did not answer within 10 s; its log:\n{log}");
    }

    /// SIGKILLs it (its data stays for [`EtcdServer::restart`]).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn store(&self) -> EtcdStore {
        EtcdStore::connect(std::slice::from_ref(&self.endpoint)).expect("endpoint")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
