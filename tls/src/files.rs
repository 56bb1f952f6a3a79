//! PEM files into rustls configurations, and configurations that follow
//! their files: [`Reloading`] polls the files and rebuilds on change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// How often the files are checked for a change.
const POLL: Duration = Duration::from_secs(1);

/// What a server reads.
#[derive(Clone, Debug)]
pub(crate) struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: clients must present a certificate that chains to it.
    pub client_ca: Option<PathBuf>,
}

/// What a client reads.
#[derive(Clone, Debug)]
pub(crate) struct ClientFiles {
    pub ca: PathBuf,
    /// Certificate and key presented to servers that ask.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Files that build one configuration.
pub(crate) trait Source: Send + Sync + 'static {
    type Config: Send + Sync + 'static;
    fn paths(&self) -> Vec<&Path>;
    fn build(&self) -> Result<Self::Config, TlsError>;
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Both sides speak HTTP/2 only (gRPC).
fn h2() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

impl Source for ServerFiles {
    type Config = ServerConfig;

    fn paths(&self) -> Vec<&Path> {
        [&self.cert, &self.key].into_iter().chain(&self.client_ca).map(PathBuf::as_path).collect()
    }

    fn build(&self) -> Result<ServerConfig, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let roots = Arc::new(roots(ca)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| file_error("CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certificates(&self.cert)?, private_key(&self.key)?)
            .map_err(|e| file_error("certificate", &self.cert, e))?;
        config.alpn_protocols = h2();
        Ok(config)
    }
}

impl Source for ClientFiles {
    type Config = ClientConfig;

    fn paths(&self) -> Vec<&Path> {
        let mut paths = vec![self.ca.as_path()];
        if let Some((c, k)) = &self.identity {
            paths.extend([c.as_path(), k.as_path()]);
        }
        paths
    }

    fn build(&self) -> Result<ClientConfig, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(&self.ca)?);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|e| file_error("certificate", cert, e))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = h2();
        Ok(config)
    }
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File { what, path: path.to_path_buf(), reason: reason.to_string() }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file_error("certificate", path, e))?;
    if certs.is_empty() {
        return Err(file_error("certificate", path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key", path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots.add(cert).map_err(|e| file_error("CA", path, e))?;
    }
    Ok(roots)
}

/// A configuration built from its files, rebuilt when they change. A
/// rebuild that fails (a file half-written mid-rotation) keeps the last
/// good configuration and tries again at the next change.
pub(crate) struct Reloading<S: Source> {
    current: Arc<RwLock<Arc<S::Config>>>,
}

impl<S: Source> Clone for Reloading<S> {
    fn clone(&self) -> Self {
        Self { current: self.current.clone() }
    }
}

impl<S: Source> Reloading<S> {
    /// Builds from `source` now (errors name the file); watches it from a
    /// task on the current Tokio runtime, if there is one, for as long as
    /// any clone of the result lives.
    pub fn new(source: S) -> Result<Self, TlsError> {
        let stamps = stamps(&source);
        let current = Arc::new(RwLock::new(Arc::new(source.build()?)));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch(source, stamps, Arc::downgrade(&current)));
        }
        Ok(Self { current })
    }

    pub fn get(&self) -> Arc<S::Config> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// When each file last changed, and its length (a rewrite within the
/// clock's resolution still changes one or the other, in practice).
fn stamps<S: Source>(source: &S) -> Vec<Option<(SystemTime, u64)>> {
    source
        .paths()
        .into_iter()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

async fn watch<S: Source>(source: S, mut seen: Vec<Option<(SystemTime, u64)>>, current: Weak<RwLock<Arc<S::Config>>>) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(current) = current.upgrade() else { return };
        let now = stamps(&source);
        if now == seen {
            continue;
        }
        seen = now;
        match source.build() {
            Ok(config) => {
                *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                tracing::info!(files = ?source.paths(), "TLS files changed: reloaded");
            }
            Err(e) => tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous ones"),
        }
    }
}
