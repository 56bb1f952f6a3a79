//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use myriad_store::Store;
use myriad_store::schema::{self, Keys, Leader};

/// A `myriad` process, SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    banner: String,
}

impl Proc {
    pub fn start(args: &[&str]) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut child = Command::new(env!("CARGO_BIN_EXE_myriad"))
            .args(args)
            .current_dir(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start myriad");
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        assert!(!banner.is_empty(), "{args:?} exited before its banner");
        Proc { child, banner }
    }

    pub fn word(&self, n: usize) -> String {
        self.banner.split_whitespace().nth(n).unwrap_or_else(|| panic!("banner `{}`", self.banner)).to_string()
    }

    /// Sends SIGTERM (as Kubernetes does before deleting a pod) and waits
    /// at most `limit` for the process to exit.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for myriad") {
                return status;
            }
            assert!(Instant::now() < deadline, "myriad did not exit within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 50 ms until it gives a value; fails the test if it
/// has not within `limit`.
pub async fn until<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the cluster's leading coordinator, when the store answers and has one.
pub async fn leader(store: &dyn Store, keys: &Keys) -> Option<String> {
    let kv = store.get(&keys.leader()).await.ok()??;
    let leader: Leader = schema::decode(&keys.leader(), &kv.value).ok()?;
    Some(leader.id.to_string())
}
