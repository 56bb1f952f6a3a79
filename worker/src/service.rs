//! The gRPC adapter: decode and validate, call [`Worker`], encode.

use std::future::Future;
use std::sync::Arc;

use myriad_proto::MAX_MESSAGE_BYTES;
use myriad_proto::expert::ExpertBatch;
use myriad_proto::pb::expert_worker_server::{ExpertWorker, ExpertWorkerServer};
use myriad_proto::pb::{
    DescribeRequest, DescribeResponse, ExpertLoad, ExpertRef, RunExpertsRequest, RunExpertsResponse, TakeLoadRequest,
    TakeLoadResponse,
};
use myriad_tls::ServerTls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::worker::Worker;

struct Service {
    worker: Arc<Worker>,
}

#[tonic::async_trait]
impl ExpertWorker for Service {
    async fn run_experts(&self, request: Request<RunExpertsRequest>) -> Result<Response<RunExpertsResponse>, Status> {
        let batch = ExpertBatch::try_from(request.into_inner())?;
        let layer = batch.layer.0;
        let contributions = self.worker.run(batch).await.inspect_err(|e| {
            tracing::warn!(layer, error = %e, "run experts failed");
        })?;
        Ok(Response::new(contributions.into()))
    }

    async fn describe(&self, _: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        let h = self.worker.hosted();
        let (device, device_memory_bytes) = self.worker.device();
        Ok(Response::new(DescribeResponse {
            model_id: h.model_id.clone(),
            hidden_size: h.hidden_size as u32,
            num_layers: h.num_layers as u32,
            num_experts: h.num_experts as u32,
            experts: h.experts.iter().map(|(l, e)| ExpertRef { layer: l.0, expert: e.0 }).collect(),
            device: device.to_string(),
            device_memory_bytes,
            expert_bytes: self.worker.expert_bytes() as u64,
        }))
    }

    async fn take_load(&self, _: Request<TakeLoadRequest>) -> Result<Response<TakeLoadResponse>, Status> {
        let loads = self
            .worker
            .take_load()
            .into_iter()
            .map(|((l, e), tokens)| ExpertLoad { layer: l.0, expert: e.0, tokens })
            .collect();
        Ok(Response::new(TakeLoadResponse { loads }))
    }
}

/// Serves `worker` on `listener`, over TLS through `tls` when set, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    worker: Arc<Worker>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(report_readiness(worker.readiness(), reporter));
    let service = ExpertWorkerServer::new(Service { worker })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = myriad_tls::incoming(listener, tls);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Publishes the worker's readiness as the server's overall status (service
/// name "") in the standard `grpc.health.v1` service, which Kubernetes'
/// gRPC probes ask.
async fn report_readiness(mut ready: watch::Receiver<bool>, reporter: HealthReporter) {
    loop {
        let status = if *ready.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status("", status).await;
        if ready.changed().await.is_err() {
            return;
        }
    }
}
