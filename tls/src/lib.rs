//! TLS for Myriad's gRPC links (router → worker, router → KV-cache,
//! coordinator → worker, `ctl` → coordinator, every role → etcd).
//!
//! One set of PEM files per process ([`TlsOptions`]): its certificate and
//! key, presented as a server and, for mutual TLS, as a client; and the CA
//! bundle that peers' certificates must chain to. Servers take connections
//! through [`incoming`], clients dial through [`ClientTls`]. Both re-read
//! their files when they change (cert-manager rotates certificates in
//! place), so a rotation needs no restart: connections made after it use
//! the new files, open ones keep theirs.
//!
//! rustls with the `ring` provider, built here rather than through tonic's
//! TLS features, because tonic's configurations cannot be swapped while a
//! server runs.

mod client;
mod files;
mod server;

use std::path::PathBuf;

pub use client::{ClientTls, TlsIo, connect, lazy_channel};
pub use server::{Conn, ServerTls, incoming};

/// A process's TLS material, as its flags name it. Nothing set: plaintext.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM certificate chain this process presents (as server, and as
    /// client where servers ask for one).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA bundle: servers' certificates must chain to it, and with
    /// `require_client_cert` so must clients'.
    pub ca: Option<PathBuf>,
    /// Servers refuse clients without a certificate that chains to `ca`.
    pub require_client_cert: bool,
    /// The name servers' certificates must carry, instead of the host a
    /// client dials (pods are dialled by IP; their certificates name the
    /// service).
    pub server_name: Option<String>,
}

/// A TLS setting that cannot work, naming the file or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File { what: &'static str, path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
}

impl TlsOptions {
    /// Whether any TLS setting is given (one alone is an error, not
    /// ignored).
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
            || self.key.is_some()
            || self.ca.is_some()
            || self.require_client_cert
            || self.server_name.is_some()
    }

    /// The server side: `None` when TLS is off. Needs a certificate and
    /// key, and a CA when client certificates are required.
    pub fn server(&self) -> Result<Option<ServerTls>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let (cert, key) = self.identity()?.ok_or_else(|| {
            TlsError::Config("serving TLS needs a certificate and key (--tls-cert, --tls-key)".into())
        })?;
        let client_ca = match (&self.ca, self.require_client_cert) {
            (Some(ca), true) => Some(ca.clone()),
            (None, true) => {
                return Err(TlsError::Config("requiring client certificates needs a CA (--tls-ca)".into()));
            }
            (_, false) => None,
        };
        ServerTls::new(files::ServerFiles { cert, key, client_ca }).map(Some)
    }

    /// The client side: `None` when TLS is off. Needs the CA that servers'
    /// certificates chain to; presents the certificate when one is set.
    pub fn client(&self) -> Result<Option<ClientTls>, TlsError> {
        if !self.enabled() {
            return Ok(None);
        }
        let ca = self.ca.clone().ok_or_else(|| {
            TlsError::Config("connecting over TLS needs the CA that servers' certificates chain to (--tls-ca)".into())
        })?;
        let files = files::ClientFiles { ca, identity: self.identity()? };
        ClientTls::new(files, self.server_name.clone()).map(Some)
    }

    fn identity(&self) -> Result<Option<(PathBuf, PathBuf)>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Ok(Some((c.clone(), k.clone()))),
            (None, None) => Ok(None),
            _ => Err(TlsError::Config("--tls-cert and --tls-key go together".into())),
        }
    }
}
#[cfg(feature = "testing")]
pub mod testing;
