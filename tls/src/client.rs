//! The client side: tonic channels whose connections are made over TLS.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::TlsError;
use crate::files::{ClientFiles, Reloading};

/// The CA servers must chain to, this process's certificate for servers
/// that ask for one, and the name to expect in servers' certificates
/// (default: the host dialled). Re-read when the files change: each new
/// connection uses the files as they are.
#[derive(Clone)]
pub struct ClientTls {
    config: Reloading<ClientFiles>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl ClientTls {
    pub(crate) fn new(files: ClientFiles, server_name: Option<String>) -> Result<Self, TlsError> {
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.clone())
                    .map_err(|e| TlsError::Config(format!("--tls-server-name `{n}` is not a DNS name or IP: {e}")))
            })
            .transpose()?;
        Ok(Self { config: Reloading::new(files)?, server_name })
    }

    /// A TLS connection to `host:port`, checked against the CA and the
    /// server name (default: `host`).
    pub async fn dial(&self, host: &str, port: u16) -> io::Result<TlsIo> {
        // `[::1]` in a URI is `::1` to a resolver and a certificate.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_string()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{host}` names no server to check a certificate of"),
                )
            })?,
        };
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        Ok(TokioIo::new(TlsConnector::from(self.config.get()).connect(name, stream).await?))
    }

    /// A channel on `endpoint` that connects when first used.
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(self.clone())
    }

    /// A channel on `endpoint`, connected now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        endpoint.connect_with_connector(self.clone()).await
    }
}

/// A channel on `endpoint` that connects when first used: over TLS
/// through `tls` when set, else plaintext.
pub fn lazy_channel(endpoint: Endpoint, tls: Option<&ClientTls>) -> Channel {
    match tls {
        Some(tls) => tls.channel(endpoint),
        None => endpoint.connect_lazy(),
    }
}

/// [`lazy_channel`], connected now.
pub async fn connect(endpoint: Endpoint, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(tls) => tls.connect(endpoint).await,
        None => endpoint.connect().await,
    }
}

/// A client's TLS connection, as tonic's connectors hand it over.
pub type TlsIo = TokioIo<TlsStream<TcpStream>>;

impl tower::Service<Uri> for ClientTls {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.clone();
        Box::pin(async move {
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} in `{uri}`"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            tls.dial(host, port).await
        })
    }
}
