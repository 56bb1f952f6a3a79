//! The admin gRPC API (`myriad ctl`). Reads come from the store; changes go
//! through it too (cordons) or through the leader's loop (rebalance). Only
//! the leader answers: a follower says who leads. With a token configured,
//! every call must carry `authorization: Bearer <token>`.

use std::sync::Arc;
use std::time::Duration;

use myriad_proto::admin::admin_server::{Admin, AdminServer};
use myriad_proto::admin::{
    self as pb, CordonRequest, CordonResponse, DrainRequest, DrainResponse, PlacementRequest, PlacementResponse,
    RebalanceRequest, RebalanceResponse, StatusRequest, StatusResponse, TopExpertsRequest, TopExpertsResponse,
};
use myriad_store::Store;
use myriad_store::schema::{self, Keys, Leader, NodeId, NodeRecord, Placement, PlacementView, Role};
use tonic::{Request, Response, Status};

use crate::health;
use crate::leader::{
    cordoned, live_workers, measured_load, plan, plan_over, planning_load, schedulable, stalled_now, without_stalled,
};
use crate::placement::{Load, Plan};
use crate::{CoordinatorConfig, Forced, Shared};

pub struct AdminService {
    store: Arc<dyn Store>,
    keys: Keys,
    config: CoordinatorConfig,
    shared: Arc<Shared>,
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("cluster store: {e}"))
}

/// Whether an `authorization` value is `Bearer <token>`; the scheme's case
/// does not matter (RFC 9110 §11.1). Compares in constant time: no early
/// exit on the first difference.
fn bears(authorization: &str, token: &str) -> bool {
    let given = authorization
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t.trim_start());
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The current placement as a [`Plan`] over its own assignment order.
fn as_plan(p: &Placement) -> Plan {
    let holders = (0..p.layers)
        .map(|l| {
            (0..p.experts)
                .map(|e| (0..p.assignments.len()).filter(|&w| p.assignments[w].experts.contains(l, e)).collect())
                .collect()
        })
        .collect();
    Plan { workers: p.assignments.len(), holders }
}

/// Per-worker load under `p`, an expert's load split over its copies.
fn worker_loads(p: &Placement, load: &Load) -> Vec<f64> {
    let plan = as_plan(p);
    let mut per = vec![0.0; p.assignments.len()];
    for (l, layer) in plan.holders.iter().enumerate() {
        for (e, holders) in layer.iter().enumerate() {
            for &w in holders {
                per[w] += load.tokens[l * load.experts + e] / holders.len() as f64;
            }
        }
    }
    per
}

impl AdminService {
    pub fn new(store: Arc<dyn Store>, keys: Keys, config: CoordinatorConfig, shared: Arc<Shared>) -> Self {
        AdminService { store, keys, config, shared }
    }

    /// A tonic service, checking `token` on every call when one is given.
    pub fn into_server(
        self,
        token: Option<String>,
    ) -> tonic::service::interceptor::InterceptedService<
        AdminServer<AdminService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            let Some(token) = &token else { return Ok(request) };
            let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            if bears(given, token) {
                Ok(request)
            } else {
                Err(Status::unauthenticated("a valid admin token is required"))
            }
        };
        AdminServer::with_interceptor(self, check)
    }

    /// Refuses unless this coordinator leads, naming the leader.
    async fn leading(&self) -> Result<(), Status> {
        if self.shared.lock().leading {
            return Ok(());
        }
        let leader = self.store.get(&self.keys.leader()).await.map_err(unavailable)?;
        let who = leader
            .and_then(|kv| schema::decode::<Leader>(&self.keys.leader(), &kv.value).ok())
            .map_or("nobody yet".to_string(), |l| format!("{} at {}", l.id, l.addr));
        Err(Status::failed_precondition(format!("this coordinator does not lead; the leader is {who}")))
    }

    async fn view(&self) -> Result<PlacementView, Status> {
        let listing = self.store.list(&self.keys.placements()).await.map_err(unavailable)?;
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        Ok(PlacementView::read(&self.keys, &snapshot))
    }

    async fn cordons(&self) -> Result<std::collections::HashSet<NodeId>, Status> {
        let listing = self.store.list(&self.keys.cordons()).await.map_err(unavailable)?;
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        Ok(cordoned(&self.keys, &snapshot))
    }

    /// The workers of this model placement may use (see [`schedulable`]
    /// and [`schema::Stalled`]).
    async fn schedulable(&self) -> Result<Vec<NodeRecord>, Status> {
        let listing = self.store.list(&self.keys.nodes(Role::Worker)).await.map_err(unavailable)?;
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        let live = schedulable(live_workers(&snapshot, &self.config.model_id), &self.cordons().await?);
        Ok(without_stalled(live, &stalled_now(&self.shared, &snapshot, &self.keys)))
    }

    fn node_id(id: &str) -> Result<NodeId, Status> {
        crate::parse_node(id).ok_or_else(|| Status::invalid_argument(format!("`{id}` is not a node id")))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.leading().await?;
        let listing = self.store.list(&self.keys.all_nodes()).await.map_err(unavailable)?;
        let snapshot = Arc::new(listing.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect());
        let nodes = schema::read_nodes(&snapshot);
        let cordons = self.cordons().await?;
        let view = self.view().await?;
        let stalled = stalled_now(&self.shared, &snapshot, &self.keys);
        let rollouts = health::Rollouts { stalled, ..self.shared.lock().rollouts() };
        let stalled_version = |id: &NodeId| rollouts.stalled.iter().find(|s| &s.node == id).map_or(0, |s| s.version.0);
        let asked = health::Asked {
            model_id: &self.config.model_id,
            replicas: self.config.replicas,
            min_workers: self.config.min_workers,
            rollout_timeout: self.config.rollout_timeout,
        };
        let problems = health::problems(&asked, &nodes, &cordons, &view, &rollouts);
        let nodes = nodes
            .into_iter()
            .map(|n| pb::Node {
                cordoned: cordons.contains(&n.id),
                stalled_version: stalled_version(&n.id),
                id: n.id.to_string(),
                role: n.role.as_str().to_string(),
                addr: n.addr,
                capacity_bytes: n.capacity_bytes.unwrap_or(0),
                placement_version: n.placement_version.map_or(0, |v| v.0),
                host: n.host.unwrap_or_default(),
                zone: n.zone.unwrap_or_default(),
                device: n.device.unwrap_or_default(),
                device_memory_bytes: n.device_memory_bytes.unwrap_or(0),
                load_failure: n
                    .load_failure
                    .map(|f| pb::LoadFailure { placement_version: f.version.0, error: f.error }),
            })
            .collect();
        Ok(Response::new(StatusResponse {
            leader: self.config.id.to_string(),
            placement_version: view.current.map_or(0, |v| v.0),
            nodes,
            problems,
        }))
    }

    async fn placement(&self, _: Request<PlacementRequest>) -> Result<Response<PlacementResponse>, Status> {
        self.leading().await?;
        let view = self.view().await?;
        let Some(p) = view.current() else { return Err(Status::not_found("no current placement yet")) };
        let load = self.shared.lock().load.clone();
        Ok(Response::new(PlacementResponse {
            version: p.version.0,
            layers: p.layers,
            experts: p.experts,
            assignments: p
                .assignments
                .iter()
                .map(|a| pb::Assignment {
                    node: a.node.to_string(),
                    addr: a.addr.clone(),
                    experts: a.experts.to_string(),
                })
                .collect(),
            load: load.map(|l| l.tokens).unwrap_or_default(),
        }))
    }

    async fn top_experts(&self, request: Request<TopExpertsRequest>) -> Result<Response<TopExpertsResponse>, Status> {
        self.leading().await?;
        // 0: every expert (the whole load matrix, `myriad ctl load`).
        let limit = match request.into_inner().limit {
            0 => usize::MAX,
            n => n as usize,
        };
        let view = self.view().await?;
        let Some(p) = view.current() else { return Err(Status::not_found("no current placement yet")) };
        let load = measured_load(&self.config, &self.shared);
        let plan = as_plan(p);
        let mut experts: Vec<pb::ExpertLoad> = (0..load.layers)
            .flat_map(|l| (0..load.experts).map(move |e| (l, e)))
            .map(|(l, e)| pb::ExpertLoad {
                layer: l as u32,
                expert: e as u32,
                tokens: load.tokens[l * load.experts + e],
                replicas: plan.holders[l][e].len() as u32,
            })
            .collect();
        experts.sort_by(|a, b| b.tokens.total_cmp(&a.tokens).then((a.layer, a.expert).cmp(&(b.layer, b.expert))));
        experts.truncate(limit);
        let workers = p
            .assignments
            .iter()
            .zip(worker_loads(p, &load))
            .map(|(a, tokens)| pb::WorkerLoad { node: a.node.to_string(), tokens })
            .collect();
        // As the gauge and `rebalance` measure it: over the workers placement
        // may use (one left idle lowers it), on the load placement plans for.
        let live = self.schedulable().await?;
        let balancedness = plan_over(p, &live).balancedness(&load.idle_layers_uniform());
        Ok(Response::new(TopExpertsResponse { experts, workers, balancedness }))
    }

    async fn rebalance(&self, request: Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
        self.leading().await?;
        let request = request.into_inner();
        let max_move = request.max_move_bytes.or(self.config.max_move);
        let view = self.view().await?;
        let live = self.schedulable().await?;
        let load = planning_load(&self.config, &self.shared);
        let next = plan(&self.config, schema::PlacementVersion(0), &live, &load, view.current(), max_move)
            .map_err(|e| Status::failed_precondition(format!("no placement for the schedulable workers: {e}")))?;
        // What each live worker holds now and would hold.
        let before =
            view.current().map_or_else(|| Plan { workers: live.len(), holders: Vec::new() }, |c| plan_over(c, &live));
        let after = plan_over(&next, &live);
        let current_balance = if view.current().is_some() { before.balancedness(&load) } else { 0.0 };
        let predicted = after.balancedness(&load);
        let loads = after.moved(&before);
        let (held, will_hold) = (before.copies(), after.copies());
        let bytes = |copies: usize| copies as u64 * self.config.expert_bytes;
        let workers = live
            .iter()
            .enumerate()
            .map(|(i, w)| pb::WorkerMove {
                node: w.id.to_string(),
                copies_before: held[i],
                copies_after: will_hold[i],
                loads: loads[i] as u64,
                bytes: bytes(loads[i]),
            })
            .collect();
        let moves: usize = loads.iter().sum();
        // Nothing to roll out when the plan is the current placement.
        let changes = view.current().is_none_or(|c| c.assignments != next.assignments);
        let started = !request.dry_run && changes;
        if started {
            self.shared.lock().rebalance = Some(Forced { max_move });
            self.shared.wake.notify_one();
        }
        Ok(Response::new(RebalanceResponse {
            current_balancedness: current_balance,
            predicted_balancedness: predicted,
            moves: moves as u64,
            started,
            bytes: bytes(moves),
            workers,
        }))
    }

    async fn cordon(&self, request: Request<CordonRequest>) -> Result<Response<CordonResponse>, Status> {
        self.leading().await?;
        let request = request.into_inner();
        let id = Self::node_id(&request.node)?;
        let key = self.keys.cordon(&id);
        let changed = if request.cordon {
            let was = self.store.get(&key).await.map_err(unavailable)?.is_some();
            self.store.put(&key, id.to_string().into_bytes(), None).await.map_err(unavailable)?;
            !was
        } else {
            self.store.delete(&key).await.map_err(unavailable)?
        };
        let registered = self.store.get(&self.keys.node(Role::Worker, &id)).await.map_err(unavailable)?.is_some();
        Ok(Response::new(CordonResponse { changed, registered }))
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.leading().await?;
        let id = Self::node_id(&request.into_inner().node)?;
        // Refuse, cordoning nothing, when the other workers cannot hold
        // the experts: the leader could never place them without it.
        let others: Vec<NodeRecord> = self.schedulable().await?.into_iter().filter(|w| w.id != id).collect();
        let (view, load) = (self.view().await?, planning_load(&self.config, &self.shared));
        if let Err(e) = plan(&self.config, schema::PlacementVersion(0), &others, &load, view.current(), None) {
            return Err(Status::failed_precondition(format!("{id} is left uncordoned: without it {e}")));
        }
        self.store.put(&self.keys.cordon(&id), id.to_string().into_bytes(), None).await.map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + self.config.rollout_timeout;
        loop {
            let view = self.view().await?;
            if let Some(p) = view.current().filter(|p| p.assignment(&id).is_none()) {
                return Ok(Response::new(DrainResponse { version: p.version.0 }));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::deadline_exceeded(format!("{id} is cordoned but still placed")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Serves the admin API on `listener`, over TLS through `tls` when set,
/// until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: AdminService,
    token: Option<String>,
    tls: Option<myriad_tls::ServerTls>,
) {
    let incoming = myriad_tls::incoming(listener, tls);
    let server = tonic::transport::Server::builder().add_service(service.into_server(token));
    if let Err(e) = server.serve_with_incoming(incoming).await {
        tracing::error!(error = %e, "the admin API stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::bears;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for ok in ["Bearer secret", "bearer secret", "BEARER secret"] {
            assert!(bears(ok, "secret"), "{ok}");
        }
        for bad in ["Bearer secre", "Bearer secrets", "Basic secret", "secret", "", "Bearer "] {
            assert!(!bears(bad, "secret"), "{bad}");
        }
    }
}
