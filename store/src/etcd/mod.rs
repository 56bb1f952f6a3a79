//! [`EtcdStore`]: the [`Store`] on an etcd v3 cluster, over its gRPC API
//! (the subset in `proto/etcd/rpc.proto`, compiled without protoc).
//!
//! Every unary call has a deadline, so an unreachable etcd turns into
//! `Unavailable` errors rather than hangs; the channel connects lazily and
//! reconnects by itself when etcd comes back.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

use crate::{Event, KeyValue, LeaseId, Listing, Revision, Store, StoreError, Watch};

pub(crate) mod link;

use link::{Auth, Authed, Token};
pub use link::{Credentials, EtcdOptions};

#[allow(clippy::all, clippy::pedantic)]
pub(crate) mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// `self.call` of one client method on a clone of `request`.
macro_rules! rpc {
    ($store:expr, $client:ident, $method:ident, $request:expr) => {
        $store.call(|| {
            let (mut client, request) = ($store.$client.clone(), $request.clone());
            async move { client.$method(request).await }
        })
    };
}

/// Deadline of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient<Authed>,
    lease: LeaseClient<Authed>,
    watch: WatchClient<Authed>,
    /// With credentials: the login whose token every call carries.
    auth: Option<Arc<Auth>>,
}

impl EtcdStore {
    /// A store on the etcd members at `endpoints` (`http://host:port` or
    /// `host:port`), in plaintext and without authentication.
    pub fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, &EtcdOptions::default())
    }

    /// A store on the etcd members at `endpoints`: `https://` ones over
    /// TLS through `options.tls`, as `options.credentials`' user when set.
    /// Connects (and logs in) lazily: an unreachable etcd shows up as
    /// `Unavailable` on the first call.
    pub fn connect_with(endpoints: &[String], options: &EtcdOptions) -> Result<Self, StoreError> {
        let channel = link::channel(endpoints, options.tls.as_ref())?;
        let token = Token::default();
        let authed = InterceptedService::new(channel.clone(), token.clone());
        Ok(EtcdStore {
            kv: KvClient::new(authed.clone()),
            lease: LeaseClient::new(authed.clone()),
            watch: WatchClient::new(authed),
            auth: options.credentials.clone().map(|c| Arc::new(Auth::new(channel, c, token))),
        })
    }

    /// One unary call, with its deadline and, when logged in, its token:
    /// a token etcd no longer knows is renewed and the call tried again.
    async fn call<T, F: Future<Output = Result<tonic::Response<T>, tonic::Status>>>(
        &self,
        call: impl Fn() -> F,
    ) -> Result<T, tonic::Status> {
        let Some(auth) = &self.auth else { return deadline(call()).await.map(tonic::Response::into_inner) };
        auth.ensure().await?;
        match deadline(call()).await {
            Err(status) if Auth::rejected(&status) => {
                auth.renew().await?;
                deadline(call()).await.map(tonic::Response::into_inner)
            }
            other => other.map(tonic::Response::into_inner),
        }
    }
}

fn unavailable(status: tonic::Status) -> StoreError {
    StoreError::Unavailable(format!("etcd: {:?}: {}", status.code(), status.message()))
}

/// A lease call's error: etcd says "requested lease not found" for leases
/// that expired or were revoked.
fn lease_error(status: tonic::Status, lease: LeaseId) -> StoreError {
    if status.code() == tonic::Code::NotFound || status.message().contains("lease not found") {
        StoreError::LeaseExpired(lease)
    } else {
        unavailable(status)
    }
}

/// A write's error: with a lease, a missing lease means it expired.
fn write_error(status: tonic::Status, lease: Option<LeaseId>) -> StoreError {
    match lease {
        Some(l) => lease_error(status, l),
        None => unavailable(status),
    }
}

async fn deadline<T>(call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("no answer within {CALL_TIMEOUT:?}"))))
}

/// The exclusive end of the range of keys starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix, or all 0xff bytes: everything from the key on.
    vec![0]
}

fn revision(header: Option<pb::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision.max(0) as Revision)
}

fn key_value(kv: pb::KeyValue) -> Result<KeyValue, StoreError> {
    let key = String::from_utf8(kv.key).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        why: "the key is not UTF-8".into(),
    })?;
    Ok(KeyValue {
        key,
        value: kv.value,
        mod_revision: kv.mod_revision.max(0) as Revision,
        lease: (kv.lease != 0).then_some(LeaseId(kv.lease)),
    })
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

fn put_request(key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> pb::PutRequest {
    pb::PutRequest { key: key.as_bytes().to_vec(), value, lease: lease.map_or(0, |l| l.0) }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let request = pb::RangeRequest { key: key.as_bytes().to_vec(), range_end: Vec::new() };
        let response = rpc!(self, kv, range, request).await.map_err(unavailable)?;
        response.kvs.into_iter().next().map(key_value).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let request = pb::RangeRequest { key: prefix.as_bytes().to_vec(), range_end: prefix_end(prefix.as_bytes()) };
        let response = rpc!(self, kv, range, request).await.map_err(unavailable)?;
        let kvs = response.kvs.into_iter().map(key_value).collect::<Result<Vec<_>, _>>()?;
        Ok(Listing { kvs, revision: revision(response.header) })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let request = put_request(key, value, lease);
        let response = rpc!(self, kv, put, request).await.map_err(|s| write_error(s, lease))?;
        Ok(revision(response.header))
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError> {
        check_key(key)?;
        // etcd compares a missing key's revisions as 0, which is our "absent".
        let compare = pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.as_bytes().to_vec(),
            target_union: Some(TargetUnion::ModRevision(expected as i64)),
        };
        let put = pb::RequestOp { request: Some(pb::request_op::Request::RequestPut(put_request(key, value, lease))) };
        let request = pb::TxnRequest { compare: vec![compare], success: vec![put], failure: Vec::new() };
        let response = rpc!(self, kv, txn, request).await.map_err(|s| write_error(s, lease))?;
        Ok(response.succeeded)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let request = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), range_end: Vec::new() };
        let response = rpc!(self, kv, delete_range, request).await.map_err(unavailable)?;
        Ok(response.deleted > 0)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        // etcd counts in whole seconds; round up so the lease never ends early.
        let seconds = ttl.as_secs() as i64 + i64::from(ttl.subsec_nanos() > 0);
        let request = pb::LeaseGrantRequest { ttl: seconds, id: 0 };
        let response = rpc!(self, lease, lease_grant, request).await.map_err(unavailable)?;
        if !response.error.is_empty() {
            return Err(StoreError::Unavailable(format!("etcd refused a lease: {}", response.error)));
        }
        Ok(LeaseId(response.id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let request = pb::LeaseKeepAliveRequest { id: lease.0 };
        let open = || {
            let mut lease = self.lease.clone();
            async move { lease.lease_keep_alive(tokio_stream::once(request)).await }
        };
        let mut responses = self.call(open).await.map_err(|s| lease_error(s, lease))?;
        let answer = deadline(responses.message()).await.map_err(|s| lease_error(s, lease))?;
        match answer {
            Some(r) if r.ttl > 0 => Ok(()),
            Some(_) => Err(StoreError::LeaseExpired(lease)),
            None => Err(StoreError::Unavailable("etcd closed the keep-alive stream".into())),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let request = pb::LeaseRevokeRequest { id: lease.0 };
        rpc!(self, lease, lease_revoke, request).await.map_err(|s| lease_error(s, lease))?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        let create = pb::WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            start_revision: from as i64,
        };
        // The request stream stays open as long as the watch: etcd ends a
        // watch stream whose client side closes.
        let (requests, request_rx) = mpsc::channel(1);
        let request = pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) };
        requests.send(request).await.map_err(|_| StoreError::Unavailable("watch request channel closed".into()))?;
        if let Some(auth) = &self.auth {
            auth.ensure().await.map_err(unavailable)?;
        }
        let opened = deadline(self.watch.clone().watch(tokio_stream::wrappers::ReceiverStream::new(request_rx))).await;
        let mut responses = match opened {
            Ok(responses) => responses.into_inner(),
            Err(status) => {
                // A stale token: log in again for the caller's next try.
                if let Some(auth) = self.auth.as_ref().filter(|_| Auth::rejected(&status)) {
                    let _ = auth.renew().await;
                }
                return Err(unavailable(status));
            }
        };
        // Wait for the creation, so events after this call are not missed.
        let created = deadline(responses.message()).await.map_err(unavailable)?;
        match created {
            Some(r) if r.compact_revision > 0 => {
                return Err(StoreError::Compacted { requested: from, oldest: r.compact_revision as Revision });
            }
            Some(r) if r.canceled => {
                return Err(StoreError::Unavailable(format!("watch refused: {}", r.cancel_reason)));
            }
            Some(r) if r.created => {}
            other => return Err(StoreError::Unavailable(format!("unexpected answer to a watch: {other:?}"))),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _keep_open = requests;
            while let Some(message) = responses.next().await {
                let response = match message {
                    Ok(r) => r,
                    Err(status) => {
                        let _ = tx.send(Err(unavailable(status)));
                        return;
                    }
                };
                if response.canceled {
                    let _ =
                        tx.send(Err(StoreError::Unavailable(format!("watch canceled: {}", response.cancel_reason))));
                    return;
                }
                for event in response.events {
                    let Some(kv) = event.kv else { continue };
                    let event = match key_value(kv) {
                        Ok(kv) if event.r#type == pb::event::EventType::Delete as i32 => {
                            Ok(Event::Delete { key: kv.key, mod_revision: kv.mod_revision })
                        }
                        Ok(kv) => Ok(Event::Put(kv)),
                        Err(e) => Err(e),
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends_increment_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
