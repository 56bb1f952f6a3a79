//! A real `etcd` server for tests (Debian package `etcd-server`): its own
//! data directory and free loopback ports, killed when dropped, and able
//! to be killed and restarted on the same ports and data.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::etcd::pb::auth_client::AuthClient;
use crate::etcd::{Credentials, EtcdOptions, pb};
use crate::{EtcdStore, Store};

pub struct EtcdServer {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT` (`https://` with TLS), for clients.
    pub endpoint: String,
    peer: String,
    dir: tempfile::TempDir,
    /// etcd's own flags beyond ports and data.
    flags: Vec<String>,
    /// What the harness's own client uses (root's login once auth is on).
    options: EtcdOptions,
}

/// A TLS etcd: its certificate and key, and the CA that clients'
/// certificates must chain to (`--client-cert-auth`).
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A loopback port that nothing listens on, for a server that a test
/// starts next, or kills and starts again on the same address.
///
/// Not one the kernel picks (port 0): those come from the ephemeral range
/// that outgoing connections take their local ports from, so between this
/// check and the server's bind, or while the server is down for a restart,
/// any connection could take the port, even one to itself (a TCP
/// self-connect), and the server fail with "address in use". The port is
/// from below that range (or above it), found free by binding it, and
/// handed out once per process; processes start at different places.
pub fn free_port() -> u16 {
    static HANDED_OUT: AtomicU32 = AtomicU32::new(0);
    if let Some((first, count)) = outside_ephemeral_range() {
        // Reduced first: a sum that wrapped past u32::MAX would jump back to
        // ports already handed out.
        let start = std::process::id().wrapping_mul(7919) % count;
        for _ in 0..count {
            let n = HANDED_OUT.fetch_add(1, Ordering::Relaxed) % count;
            let port = (first + (start + n) % count) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("read the bound port").port()
}

/// The ports outside Linux's `ip_local_port_range` (32768-60999 unless
/// configured) that [`free_port`] takes from: `(first, count)`, or `None`
/// when that range leaves too few.
fn outside_ephemeral_range() -> Option<(u32, u32)> {
    const FLOOR: u32 = 10_000;
    const ENOUGH: u32 = 1_000;
    let configured = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| {
        let mut bounds = text.split_whitespace().map(|v| v.parse::<u32>().ok());
        Some((bounds.next()??, bounds.next()??))
    });
    let (low, high) = configured.unwrap_or((32_768, 60_999));
    if low >= FLOOR + ENOUGH {
        Some((FLOOR, low - FLOOR))
    } else if high + ENOUGH < 65_536 {
        Some((high + 1, 65_535 - high))
    } else {
        None
    }
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with a hint when the
    /// `etcd` binary is missing (scripts/test.sh installs it).
    pub async fn start() -> Self {
        Self::start_with(None, EtcdOptions::default(), &[]).await
    }

    /// [`EtcdServer::start`] serving clients over TLS with `tls`, checked
    /// by the harness with `client` (its TLS: the CA of the server's
    /// certificate, and a client certificate); `extra` are more of etcd's
    /// flags.
    pub async fn start_tls(tls: ServerTls, client: EtcdOptions, extra: &[&str]) -> Self {
        Self::start_with(Some(tls), client, extra).await
    }

    async fn start_with(tls: Option<ServerTls>, options: EtcdOptions, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("create etcd's data dir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let flags = match tls {
            Some(t) => vec![
                "--cert-file".into(),
                t.cert.display().to_string(),
                "--key-file".into(),
                t.key.display().to_string(),
                "--trusted-ca-file".into(),
                t.client_ca.display().to_string(),
                "--client-cert-auth".into(),
            ],
            None => Vec::new(),
        };
        let flags = flags.into_iter().chain(extra.iter().map(|f| f.to_string())).collect();
        let mut server = EtcdServer {
            child: None,
            endpoint: format!("{scheme}://127.0.0.1:{}", free_port()),
            peer: format!("http://127.0.0.1:{}", free_port()),
            dir,
            flags,
            options,
        };
        server.restart().await;
        server
    }

    /// Turns on etcd's password authentication: a `root` user (password
    /// `root_password`), and `user` with `password`, allowed to read and
    /// write the keys under `prefix` only. The harness logs in as root.
    pub async fn enable_auth(&mut self, root_password: &str, user: &str, password: &str, prefix: &str) {
        let channel = crate::etcd::link::channel(std::slice::from_ref(&self.endpoint), self.options.tls.as_ref())
            .expect("endpoint");
        let mut auth = AuthClient::new(channel);
        let add = |name: &str, password: &str| pb::AuthUserAddRequest { name: name.into(), password: password.into() };
        let grant = |user: &str, role: &str| pb::AuthUserGrantRoleRequest { user: user.into(), role: role.into() };
        auth.user_add(add("root", root_password)).await.expect("add root");
        auth.user_grant_role(grant("root", "root")).await.expect("make root root");
        auth.role_add(pb::AuthRoleAddRequest { name: user.into() }).await.expect("add a role");
        let perm = pb::Permission {
            perm_type: pb::permission::Type::Readwrite as i32,
            key: prefix.as_bytes().to_vec(),
            range_end: crate::etcd::prefix_end(prefix.as_bytes()),
        };
        let permit = pb::AuthRoleGrantPermissionRequest { name: user.into(), perm: Some(perm) };
        auth.role_grant_permission(permit).await.expect("grant the prefix");
        auth.user_add(add(user, password)).await.expect("add the user");
        auth.user_grant_role(grant(user, user)).await.expect("grant the role");
        auth.auth_enable(pb::AuthEnableRequest {}).await.expect("enable auth");
        self.options.credentials = Some(Credentials { user: "root".into(), password: root_password.into() });
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
            .args(&self.flags)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}); install it with `apt-get install etcd-server`"));
        self.child = Some(child);
        let store = self.store();
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

    /// A client as the harness connects (root, once auth is on).
    pub fn store(&self) -> EtcdStore {
        EtcdStore::connect_with(std::slice::from_ref(&self.endpoint), &self.options).expect("endpoint")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_not_ephemeral() {
        let (first, count) = outside_ephemeral_range().expect("this machine's ephemeral range leaves room");
        let ports: Vec<u16> = (0..64).map(|_| free_port()).collect();
        for (i, &port) in ports.iter().enumerate() {
            assert!((first..first + count).contains(&u32::from(port)), "{port} is in the ephemeral range");
            assert!(!ports[..i].contains(&port), "{port} handed out twice");
            TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("bind {port}: {e}"));
        }
    }
}
