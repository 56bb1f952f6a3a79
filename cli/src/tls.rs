//! `--tls-*`: the TLS files of a role's gRPC links, the same flags for
//! every role (docs/operations.md, "TLS").

use std::path::PathBuf;

use anyhow::{Context, Result};
use myriad_tls::{ClientTls, ServerTls, TlsOptions};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate chain this process presents on its gRPC links (as
    /// server, and as client to servers that require one). With
    /// `--tls-key`; turns TLS on.
    #[arg(long, env = "MYRIAD_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "MYRIAD_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// PEM CA bundle the certificates of the servers this process calls
    /// must chain to (and clients' certificates, with
    /// `--tls-require-client-cert`).
    #[arg(long, env = "MYRIAD_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Refuse clients without a certificate of `--tls-ca` (mutual TLS).
    #[arg(long, env = "MYRIAD_TLS_REQUIRE_CLIENT_CERT")]
    tls_require_client_cert: bool,

    /// The name servers' certificates must carry, instead of the host
    /// dialled (workers are dialled by pod IP; their certificate names the
    /// service).
    #[arg(long, env = "MYRIAD_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    fn options(&self) -> TlsOptions {
        TlsOptions {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
            require_client_cert: self.tls_require_client_cert,
            server_name: self.tls_server_name.clone(),
        }
    }

    /// What a gRPC server of this process uses (None: plaintext).
    pub fn server(&self) -> Result<Option<ServerTls>> {
        self.options().server().context("TLS for the gRPC server")
    }

    /// What this process's gRPC clients use (None: plaintext).
    pub fn client(&self) -> Result<Option<ClientTls>> {
        self.options().client().context("TLS for gRPC clients")
    }
}
