//! The cluster's keys and records. One prefix per cluster:
//!
//! ```text
//! /myriad/<cluster>/nodes/<role>/<id>     NodeRecord, under the node's lease
//! /myriad/<cluster>/placement/v/<version> Placement (zero-padded, so keys sort by version)
//! /myriad/<cluster>/placement/current     Current: the version routers serve
//! /myriad/<cluster>/leader                Leader, under the leading coordinator's lease
//! /myriad/<cluster>/cordoned/<id>         a worker placement must not use (no lease)
//! /myriad/<cluster>/stalled/<id>          Stalled: a worker a rollout timed out on (no lease)
//! ```
//!
//! Values are JSON with a `schema` number, checked on every read: a value
//! written by an incompatible version is an error, not a guess.

use std::fmt;

use myriad_proto::spec::ExpertSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// The record format this build reads and writes.
pub const SCHEMA: u32 = 1;

/// A node's name in the cluster: letters, digits, `.`, `_`, `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = String;

    fn try_from(id: String) -> Result<Self, String> {
        let ok = !id.is_empty()
            && id.len() <= 128
            && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok { Ok(NodeId(id)) } else { Err(format!("bad node id `{id}`: use 1-128 letters, digits, `.`, `_`, `-`")) }
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        NodeId::try_from(s.to_string())
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Worker,
    Router,
    /// A KV-cache instance: routers spread conversations over those
    /// registered.
    Kvcache,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Worker => "worker",
            Role::Router => "router",
            Role::Kvcache => "kvcache",
        }
    }
}

/// A placement's number; a newer placement has a larger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PlacementVersion(pub u64);

impl fmt::Display for PlacementVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// What a node publishes about itself while its lease lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub role: Role,
    /// Where its gRPC service listens (workers: the expert service).
    pub addr: String,
    /// The model fingerprint it serves: the coordinator places only nodes of its model.
    pub model_id: String,
    /// Memory for experts, for memory-aware placement (workers).
    pub capacity_bytes: Option<u64>,
    /// The newest placement it has applied: a worker has loaded its experts,
    /// a router dispatches with it. The coordinator's two-phase rollout waits
    /// on these.
    pub placement_version: Option<PlacementVersion>,
    /// Routers: how their data plane stands, for `ctl status`. Absent in
    /// records of other roles and of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch: Option<DispatchHealth>,
    /// The machine it runs on (workers: `--node`, the hostname or the
    /// Kubernetes node), and its failure zone: placement spreads each
    /// expert's copies over them. Absent in records of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Workers: where their experts live (`cpu`, `cuda:0`) and that device's
    /// memory in bytes (GPUs only). Absent in records of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_memory_bytes: Option<u64>,
    /// Workers: a placement version whose experts it could not load, and
    /// why; cleared once they load (a retry, or a later placement's).
    /// Placement leaves such a worker out.
    /// Absent in records of older builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_failure: Option<LoadFailure>,
}

/// A worker's failure to load the experts a placement version gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadFailure {
    pub version: PlacementVersion,
    pub error: String,
}

impl NodeRecord {
    /// A node's first record: what it is and where, nothing applied yet,
    /// no capacity, machine or zone (set those where the role has them).
    pub fn new(id: NodeId, role: Role, addr: String, model_id: &str) -> Self {
        NodeRecord {
            id,
            role,
            addr,
            model_id: model_id.to_string(),
            capacity_bytes: None,
            placement_version: None,
            dispatch: None,
            host: None,
            zone: None,
            device: None,
            device_memory_bytes: None,
            load_failure: None,
        }
    }
}

/// What a router reports of the workers it dispatches to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DispatchHealth {
    /// Every routed expert has a live copy in the pool it dispatches with.
    pub ready: bool,
    /// Workers of that pool it has marked down after a failed call, by
    /// address (it probes them and puts them back when they answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down: Vec<String>,
}

/// Which worker hosts which experts, as one numbered version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub version: PlacementVersion,
    pub model_id: String,
    pub layers: u32,
    pub experts: u32,
    pub assignments: Vec<Assignment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub node: NodeId,
    pub addr: String,
    #[serde(with = "spec_text")]
    pub experts: ExpertSpec,
}

impl Placement {
    pub fn assignment(&self, node: &NodeId) -> Option<&Assignment> {
        self.assignments.iter().find(|a| &a.node == node)
    }

    /// Fails unless every `(layer, expert)` has at least one worker and no
    /// worker appears twice.
    pub fn check(&self) -> Result<(), String> {
        let mut nodes: Vec<&NodeId> = self.assignments.iter().map(|a| &a.node).collect();
        nodes.sort();
        if nodes.windows(2).any(|w| w[0] == w[1]) {
            return Err("a worker appears twice".into());
        }
        for l in 0..self.layers {
            for e in 0..self.experts {
                if !self.assignments.iter().any(|a| a.experts.contains(l, e)) {
                    return Err(format!("expert {e} of layer {l} has no worker"));
                }
            }
        }
        Ok(())
    }
}

/// The placement routers serve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Current {
    pub version: PlacementVersion,
}

/// Who leads the coordinators.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leader {
    pub id: NodeId,
    /// Its admin API, for `myriad ctl` discovery.
    pub addr: String,
}

mod spec_text {
    use myriad_proto::spec::ExpertSpec;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(spec: &ExpertSpec, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(spec)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ExpertSpec, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    schema: u32,
    #[serde(flatten)]
    body: T,
}

/// Encodes a record with the current schema number.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain structs of strings and numbers: serialising cannot fail.
    serde_json::to_vec(&Envelope { schema: SCHEMA, body: record }).unwrap_or_default()
}

/// Decodes the value at `key`, checking its schema number.
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { key: key.to_string(), why };
    let head: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    match head.get("schema").and_then(|s| s.as_u64()) {
        Some(s) if s == SCHEMA as u64 => {}
        Some(s) => return Err(corrupt(format!("schema {s}, this build reads {SCHEMA}"))),
        None => return Err(corrupt("no schema number".into())),
    }
    let envelope: Envelope<T> = serde_json::from_value(head).map_err(|e| corrupt(e.to_string()))?;
    Ok(envelope.body)
}

/// The keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Self {
        Keys { root: format!("/myriad/{cluster}/") }
    }

    /// Prefix of every node record, whatever its role.
    pub fn all_nodes(&self) -> String {
        format!("{}nodes/", self.root)
    }

    pub fn nodes(&self, role: Role) -> String {
        format!("{}nodes/{}/", self.root, role.as_str())
    }

    pub fn node(&self, role: Role, id: &NodeId) -> String {
        format!("{}{id}", self.nodes(role))
    }

    /// Prefix of the placement versions and the current pointer.
    pub fn placements(&self) -> String {
        format!("{}placement/", self.root)
    }

    pub fn placement(&self, version: PlacementVersion) -> String {
        format!("{}placement/v/{:020}", self.root, version.0)
    }

    pub fn current(&self) -> String {
        format!("{}placement/current", self.root)
    }

    pub fn leader(&self) -> String {
        format!("{}leader", self.root)
    }

    /// Prefix of the cordoned (unschedulable) nodes, written by the admin API.
    pub fn cordons(&self) -> String {
        format!("{}cordoned/", self.root)
    }

    pub fn cordon(&self, id: &NodeId) -> String {
        format!("{}{id}", self.cordons())
    }

    /// Prefix of the workers a rollout timed out on, written by the leader
    /// so that its successor leaves them out too.
    pub fn stalled(&self) -> String {
        format!("{}stalled/", self.root)
    }

    pub fn stalled_worker(&self, id: &NodeId) -> String {
        format!("{}{id}", self.stalled())
    }
}

/// A worker that did not load a placement version within the rollout
/// timeout (its load hangs, or is slower than the timeout allows). Every
/// later plan that named it would wait for it in vain too, so placement
/// leaves it out while its record stays as it was then: a load that ends,
/// a failure it reports, or a restart rewrites it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stalled {
    pub node: NodeId,
    /// The version it did not load.
    pub version: PlacementVersion,
    /// Its record's `mod_revision` when the rollout gave up on it.
    pub revision: crate::Revision,
}

/// The placement versions and the current pointer, read from a snapshot of
/// [`Keys::placements`]. Values that fail their schema check are skipped
/// with a warning (a router keeps what it has rather than apply junk).
#[derive(Debug, Default, Clone)]
pub struct PlacementView {
    pub versions: std::collections::BTreeMap<PlacementVersion, Placement>,
    pub current: Option<PlacementVersion>,
}

impl PlacementView {
    pub fn read(keys: &Keys, snapshot: &crate::mirror::Snapshot) -> Self {
        let mut view = PlacementView::default();
        for (key, kv) in snapshot.iter() {
            if *key == keys.current() {
                match decode::<Current>(key, &kv.value) {
                    Ok(c) => view.current = Some(c.version),
                    Err(e) => tracing::warn!(error = %e, "ignoring the current-placement pointer"),
                }
            } else {
                match decode::<Placement>(key, &kv.value).and_then(|p| {
                    p.check().map_err(|why| StoreError::Corrupt { key: key.clone(), why })?;
                    Ok(p)
                }) {
                    Ok(p) => {
                        view.versions.insert(p.version, p);
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a placement"),
                }
            }
        }
        view
    }

    /// The placement routers serve, when it is present and valid.
    pub fn current(&self) -> Option<&Placement> {
        self.current.and_then(|v| self.versions.get(&v))
    }
}

/// Node records under a snapshot of [`Keys::nodes`], skipping bad values.
pub fn read_nodes(snapshot: &crate::mirror::Snapshot) -> Vec<NodeRecord> {
    snapshot
        .iter()
        .filter_map(|(key, kv)| {
            decode::<NodeRecord>(key, &kv.value).inspect_err(|e| tracing::warn!(error = %e, "ignoring a node")).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_values_are_refused() {
        let placement = Placement {
            version: PlacementVersion(3),
            model_id: "m".into(),
            layers: 2,
            experts: 4,
            assignments: vec![
                Assignment { node: "w-0".parse().unwrap(), addr: "a:1".into(), experts: "*:0-1".parse().unwrap() },
                Assignment { node: "w-1".parse().unwrap(), addr: "a:2".into(), experts: "*:2-3".parse().unwrap() },
            ],
        };
        let bytes = encode(&placement);
        assert_eq!(decode::<Placement>("k", &bytes).unwrap(), placement);
        assert!(placement.check().is_ok());
        let mut partial = placement.clone();
        partial.assignments.pop();
        assert_eq!(partial.check().unwrap_err(), "expert 2 of layer 0 has no worker");

        let future = String::from_utf8(bytes).unwrap().replace("\"schema\":1", "\"schema\":2");
        assert!(decode::<Placement>("k", future.as_bytes()).unwrap_err().to_string().contains("schema 2"));
        assert!(decode::<Placement>("k", b"{\"schema\":1}").is_err());
        assert!(decode::<Placement>("k", b"not json").is_err());
        assert!("bad/id".parse::<NodeId>().is_err() && "".parse::<NodeId>().is_err());
        assert!(decode::<NodeRecord>("k", br#"{"schema":1,"id":"a/b","role":"worker","addr":"x","model_id":"m","capacity_bytes":null,"placement_version":null}"#).is_err());
    }

    #[test]
    fn placement_keys_sort_by_version() {
        let keys = Keys::new("c");
        assert!(keys.placement(PlacementVersion(9)) < keys.placement(PlacementVersion(10)));
        assert!(keys.current().starts_with(&keys.placements()));
        assert!(keys.placement(PlacementVersion(1)).starts_with(&keys.placements()));
    }
}
