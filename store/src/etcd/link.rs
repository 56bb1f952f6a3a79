//! How the store reaches etcd: its members over plaintext or TLS, and
//! etcd's username/password authentication.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use myriad_tls::{ClientTls, TlsIo};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use super::pb;
use super::pb::auth_client::AuthClient;
use crate::StoreError;

/// What reaching etcd needs beyond its endpoints.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// TLS to `https://` endpoints: the CA etcd's certificate chains to,
    /// and a client certificate where etcd requires one.
    pub tls: Option<ClientTls>,
    /// etcd's password authentication.
    pub credentials: Option<Credentials>,
}

/// An etcd user and its password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One channel over every member. Plaintext: tonic balances calls over
/// them. TLS: one connection at a time, to the first member that answers
/// from where the last one went away (as etcd's own client fails over).
pub(crate) fn channel(endpoints: &[String], tls: Option<&ClientTls>) -> Result<Channel, StoreError> {
    if endpoints.is_empty() {
        return Err(StoreError::Invalid("no etcd endpoints given".into()));
    }
    let urls: Vec<String> =
        endpoints.iter().map(|e| if e.contains("://") { e.clone() } else { format!("http://{e}") }).collect();
    let parsed = urls
        .iter()
        .map(|url| {
            Endpoint::from_shared(url.clone())
                .map(|ep| ep.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
                .map_err(|err| StoreError::Invalid(format!("bad etcd endpoint `{url}`: {err}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let secure = urls.iter().filter(|u| u.starts_with("https://")).count();
    match (tls, secure) {
        (None, 0) => Ok(Channel::balance_list(parsed.into_iter())),
        (None, _) => Err(StoreError::Invalid(
            "https:// etcd endpoints need TLS settings (--etcd-ca, and --etcd-cert/--etcd-key for client certificates)"
                .into(),
        )),
        (Some(_), n) if n < urls.len() => {
            Err(StoreError::Invalid("with TLS settings for etcd, every endpoint must be https://".into()))
        }
        (Some(tls), _) => {
            let members = parsed
                .iter()
                .map(|ep| {
                    let uri = ep.uri();
                    let host = uri.host().unwrap_or_default().to_string();
                    Ok((host, uri.port_u16().unwrap_or(2379)))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let failover = Failover { members: Arc::new(members), next: Arc::default(), tls: tls.clone() };
            Ok(parsed[0].clone().connect_with_connector_lazy(failover))
        }
    }
}

/// Dials the etcd members over TLS, in turn from the last that answered.
#[derive(Clone)]
struct Failover {
    members: Arc<Vec<(String, u16)>>,
    next: Arc<AtomicUsize>,
    tls: ClientTls,
}

impl tonic::codegen::Service<Uri> for Failover {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = std::io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let first = this.next.load(Ordering::Relaxed);
            let mut last = None;
            for i in 0..this.members.len() {
                let at = (first + i) % this.members.len();
                let (host, port) = &this.members[at];
                match tokio::time::timeout(CONNECT_TIMEOUT, this.tls.dial(host, *port)).await {
                    Ok(Ok(io)) => {
                        this.next.store(at, Ordering::Relaxed);
                        return Ok(io);
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => last = Some(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no etcd members")))
        })
    }
}

/// A channel whose calls carry the authentication token, if any.
pub(super) type Authed = InterceptedService<Channel, Token>;

/// The token of the authenticated user, as `token` metadata on every call.
#[derive(Clone, Default)]
pub(super) struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.0.read().unwrap_or_else(|e| e.into_inner()).clone() {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

/// Logs in as a user and keeps its token current.
pub(super) struct Auth {
    client: AuthClient<Channel>,
    credentials: Credentials,
    token: Token,
}

impl Auth {
    pub fn new(channel: Channel, credentials: Credentials, token: Token) -> Self {
        Auth { client: AuthClient::new(channel), credentials, token }
    }

    /// Logs in unless a token is held.
    pub async fn ensure(&self) -> Result<(), tonic::Status> {
        if self.token.0.read().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Ok(());
        }
        self.renew().await
    }

    /// Logs in again: etcd forgets tokens (after their TTL, or a restart).
    pub async fn renew(&self) -> Result<(), tonic::Status> {
        let request = pb::AuthenticateRequest {
            name: self.credentials.user.clone(),
            password: self.credentials.password.clone(),
        };
        let response = super::deadline(self.client.clone().authenticate(request)).await?.into_inner();
        let token = response
            .token
            .parse()
            .map_err(|_| tonic::Status::internal("etcd sent a token that is not valid metadata"))?;
        *self.token.0.write().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(())
    }

    /// Whether etcd refused a call for its token (expired or unknown).
    pub fn rejected(status: &tonic::Status) -> bool {
        status.code() == tonic::Code::Unauthenticated || status.message().contains("invalid auth token")
    }
}
