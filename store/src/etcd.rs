//! [`EtcdStore`]: the [`Store`] on an etcd v3 cluster, over its gRPC API
//! (the subset in `proto/etcd/rpc.proto`, compiled without protoc).
//!
//! Every unary call has a deadline, so an unreachable etcd turns into
//! `Unavailable` errors rather than hangs; the channel connects lazily and
//! reconnects by itself when etcd comes back.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::{Event, KeyValue, LeaseId, Listing, Revision, Store, StoreError, Watch};

#[allow(clippy::all, clippy::pedantic)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// Deadline of every unary call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
}

impl EtcdStore {
    /// A store on the etcd members at `endpoints` (`http://host:port` or
    /// `host:port`). Connects lazily: an unreachable etcd shows up as
    /// `Unavailable` on the first call.
    pub fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let url = if e.contains("://") { e.clone() } else { format!("http://{e}") };
                Endpoint::from_shared(url.clone())
                    .map(|ep| ep.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true))
                    .map_err(|err| StoreError::Invalid(format!("bad etcd endpoint `{url}`: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        Ok(EtcdStore {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            watch: WatchClient::new(channel),
        })
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
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
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
        let response = deadline(self.kv.clone().range(request)).await.map_err(unavailable)?.into_inner();
        response.kvs.into_iter().next().map(key_value).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let request = pb::RangeRequest { key: prefix.as_bytes().to_vec(), range_end: prefix_end(prefix.as_bytes()) };
        let response = deadline(self.kv.clone().range(request)).await.map_err(unavailable)?.into_inner();
        let kvs = response.kvs.into_iter().map(key_value).collect::<Result<Vec<_>, _>>()?;
        Ok(Listing { kvs, revision: revision(response.header) })
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let call = deadline(self.kv.clone().put(put_request(key, value, lease))).await;
        let response = call.map_err(|s| write_error(s, lease))?;
        Ok(revision(response.into_inner().header))
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
        let call = deadline(self.kv.clone().txn(request)).await;
        let response = call.map_err(|s| write_error(s, lease))?;
        Ok(response.into_inner().succeeded)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let request = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), range_end: Vec::new() };
        let response = deadline(self.kv.clone().delete_range(request)).await.map_err(unavailable)?;
        Ok(response.into_inner().deleted > 0)
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        // etcd counts in whole seconds; round up so the lease never ends early.
        let seconds = ttl.as_secs() as i64 + i64::from(ttl.subsec_nanos() > 0);
        let request = pb::LeaseGrantRequest { ttl: seconds, id: 0 };
        let response = deadline(self.lease.clone().lease_grant(request)).await.map_err(unavailable)?.into_inner();
        if !response.error.is_empty() {
            return Err(StoreError::Unavailable(format!("etcd refused a lease: {}", response.error)));
        }
        Ok(LeaseId(response.id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let requests = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease.0 });
        let answer = deadline(async {
            let mut responses = self.lease.clone().lease_keep_alive(requests).await?.into_inner();
            responses.message().await
        })
        .await
        .map_err(|s| lease_error(s, lease))?;
        match answer {
            Some(r) if r.ttl > 0 => Ok(()),
            Some(_) => Err(StoreError::LeaseExpired(lease)),
            None => Err(StoreError::Unavailable("etcd closed the keep-alive stream".into())),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let request = pb::LeaseRevokeRequest { id: lease.0 };
        deadline(self.lease.clone().lease_revoke(request)).await.map_err(|s| lease_error(s, lease))?;
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
        let mut responses = deadline(self.watch.clone().watch(tokio_stream::wrappers::ReceiverStream::new(request_rx)))
            .await
            .map_err(unavailable)?
            .into_inner();
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
