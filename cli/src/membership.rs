//! Joining a cluster from the command line: `--etcd`, `--cluster`,
//! `--node-id`, `--lease-ttl` and etcd's TLS and login (`--etcd-ca`,
//! `--etcd-cert`, `--etcd-key`, `--etcd-user`, `MYRIAD_ETCD_PASSWORD`),
//! shared by every role.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use myriad_store::etcd::{Credentials, EtcdOptions};
use myriad_store::schema::{Keys, NodeId, Role};
use myriad_store::{EtcdStore, Store};
use myriad_tls::TlsOptions;

#[derive(clap::Args, Clone)]
pub struct ClusterArgs {
    /// etcd endpoints (comma-separated) through which this node joins a cluster.
    #[arg(long, env = "MYRIAD_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,

    /// The cluster's name: its keys live under `/myriad/<cluster>/` in etcd.
    #[arg(long, env = "MYRIAD_CLUSTER", default_value = "default")]
    pub cluster: String,

    /// This node's id in the cluster (default: `<role>-<host>-<pid>`).
    #[arg(long, env = "MYRIAD_NODE_ID")]
    pub node_id: Option<String>,

    /// TTL of this node's lease: how long after it dies the cluster notices.
    #[arg(long, env = "MYRIAD_LEASE_TTL", default_value = "10s")]
    pub lease_ttl: humantime::Duration,

    /// PEM CA bundle etcd's certificate chains to (for `https://` endpoints).
    #[arg(long, env = "MYRIAD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// PEM client certificate for an etcd that requires one
    /// (`--client-cert-auth`), with `--etcd-key`.
    #[arg(long, env = "MYRIAD_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of `--etcd-cert`.
    #[arg(long, env = "MYRIAD_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, for an etcd with authentication on (with `--etcd-password`).
    #[arg(long, env = "MYRIAD_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// Password of `--etcd-user` (best from the environment: a flag shows
    /// in the process list).
    #[arg(long, env = "MYRIAD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl ClusterArgs {
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    pub fn store(&self) -> Result<Arc<dyn Store>> {
        Ok(Arc::new(EtcdStore::connect_with(&self.etcd, &self.etcd_options()?).context("set up the etcd client")?))
    }

    fn etcd_options(&self) -> Result<EtcdOptions> {
        let tls = TlsOptions {
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            ca: self.etcd_ca.clone(),
            ..TlsOptions::default()
        };
        let tls = tls.client().map_err(|e| {
            // The TLS crate names the gRPC flags; these are etcd's.
            anyhow::anyhow!("{}", e.to_string().replace("--tls-", "--etcd-"))
        })?;
        let credentials = match (&self.etcd_user, &self.etcd_password) {
            (Some(user), Some(password)) => Some(Credentials { user: user.clone(), password: password.clone() }),
            (None, None) => None,
            _ => bail!("--etcd-user and --etcd-password (MYRIAD_ETCD_PASSWORD) go together"),
        };
        Ok(EtcdOptions { tls, credentials })
    }

    pub fn keys(&self) -> Result<Keys> {
        // Cluster names follow the node id rules: they become key segments.
        let name: NodeId = self.cluster.parse().map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
        Ok(Keys::new(name.as_str()))
    }

    pub fn node_id(&self, role: Role) -> Result<NodeId> {
        let id = match &self.node_id {
            Some(id) => id.clone(),
            None => {
                let host = hostname().unwrap_or_default();
                let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                let host = if host.is_empty() { "node".to_string() } else { host };
                format!("{}-{host}-{}", role.as_str(), std::process::id())
            }
        };
        id.parse().map_err(|e| anyhow::anyhow!("--node-id: {e}"))
    }
}

/// This machine's name, if it has one.
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_string())
        .find(|name| !name.is_empty())
}

/// Parses sizes such as `24GiB`, `512MB`, `1.5TiB` or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size(text, 1.0)
}

/// [`parse_bytes`] for bounds, where zero is a size too.
pub fn parse_bound(text: &str) -> Result<u64, String> {
    parse_size(text, 0.0)
}

fn parse_size(text: &str, least: f64) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("`{text}` is not a size such as 24GiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown unit `{other}` in `{text}` (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < least || bytes > u64::MAX as f64 {
        return Err(format!("`{text}` is not a usable size"));
    }
    Ok(bytes as u64)
}

/// Fails unless exactly one of static workers and a cluster store is given.
pub fn require_one(static_given: bool, cluster: &ClusterArgs, what: &str) -> Result<()> {
    match (static_given, cluster.enabled()) {
        (true, true) => bail!("give either {what} or --etcd, not both"),
        (false, false) => bail!("give {what} or --etcd"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err() && parse_bytes("5XB").is_err() && parse_bytes("0").is_err());
    }
}
