//! Helpers shared by the multi-process tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use myriad_store::Store;
use myriad_store::schema::{self, Keys, Leader};
use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// A `myriad` process, SIGKILLed when dropped.
pub struct Proc {
    child: Child,
    banner: String,
}

impl Proc {
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_myriad")).args(args))
    }

    /// [`Proc::start`] of a command set up by the caller (environment).
    pub fn spawn(command: &mut Command) -> Self {
        let mut child =
            command.current_dir(root()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start myriad");
        let mut banner = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut banner).unwrap();
        assert!(!banner.is_empty(), "{:?} exited before its banner", command.get_args().collect::<Vec<_>>());
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
        self.wait(limit)
    }

    /// Whether it has not exited yet.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("wait for myriad").is_none()
    }

    /// Waits at most `limit` for it to exit (after a signal sent earlier).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for myriad") {
                return status;
            }
            assert!(Instant::now() < deadline, "myriad did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, ...) without waiting.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        assert!(sent.expect("run kill").success(), "kill -{signal} failed");
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

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A non-streaming completion of the tiny model; `fields` are the body's
/// other JSON fields. The text, or what went wrong (status and body).
pub async fn complete(base: &str, fields: &str) -> Result<String, String> {
    let body = format!(r#"{{"model": "tiny-v4", {fields}}}"#);
    let response = reqwest::Client::new()
        .post(format!("{base}/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| format!("read: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    let answer: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{e}"))?;
    answer["choices"][0]["text"].as_str().map(str::to_string).ok_or_else(|| format!("no text in {answer}"))
}

/// Streams a completion, calling `during` once on chunk number `at` (from 1).
pub async fn stream(base: &str, fields: &str, at: usize, during: impl FnOnce()) -> String {
    let body = format!(r#"{{"model": "tiny-v4", "stream": true, {fields}}}"#);
    let mut response = reqwest::Client::new()
        .post(format!("{base}/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    let (mut raw, mut text, mut chunks) = (String::new(), String::new(), 0);
    let mut during = Some(during);
    while let Some(bytes) = response.chunk().await.expect("read the stream") {
        raw.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = raw.find("\n\n") {
            let event: String = raw.drain(..end + 2).collect();
            let data = event.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                return text;
            }
            let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            assert!(v.get("error").is_none(), "the stream failed: {v}");
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            chunks += 1;
            if chunks == at {
                (during.take().unwrap())();
            }
        }
    }
    panic!("the stream ended without [DONE]: {text:?}");
}

/// `myriad ctl` against `cluster`; its stdout, or its stderr on failure.
pub fn ctl(etcd: &str, cluster: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["ctl", "--etcd", etcd, "--cluster", cluster])
        .args(args)
        .current_dir(root())
        .output()
        .expect("run myriad ctl");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
}

/// `myriad ctl --json` with the tests' admin token `secret`.
pub fn ctl_json(etcd: &str, cluster: &str, args: &[&str]) -> Value {
    let out = ctl(etcd, cluster, &[&["--token", "secret", "--json"], args].concat())
        .unwrap_or_else(|e| panic!("ctl {args:?}: {e}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?} printed `{out}`: {e}"))
}

/// A worker's `grpc.health.v1` status, when it answers.
pub async fn health(addr: &str) -> Option<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
    let request = HealthCheckRequest { service: String::new() };
    Some(HealthClient::new(channel).check(request).await.ok()?.into_inner().status)
}

/// A free loopback port for a process started next, or restarted on the
/// same address: one no outgoing connection can take in between.
#[allow(unused_imports)] // like the helpers above: not every test uses it
pub use myriad_store::etcd_server::free_port;
