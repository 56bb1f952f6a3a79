//! A worker served over real gRPC on a loopback port.

use std::path::PathBuf;
use std::sync::Arc;

use myriad_model::{Model, moe};
use myriad_proto::expert::{ExpertBatch, ExpertId, LayerId};
use myriad_proto::pb::expert_worker_client::ExpertWorkerClient;
use myriad_proto::pb::{DescribeRequest, RunExpertsRequest, TakeLoadRequest};
use myriad_proto::spec::ExpertSpec;
use myriad_proto::{expert, tensor};
use myriad_worker::{CpuBackend, Device, ExpertBackend, Worker};
use tonic::Code;
use tonic::transport::Channel;

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")
}

async fn start(dir: &std::path::Path, spec: &str) -> ExpertWorkerClient<Channel> {
    let backend = CpuBackend::load(dir, &spec.parse::<ExpertSpec>().unwrap()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let worker = Arc::new(Worker::new(&addr.to_string(), Arc::new(backend)).unwrap());
    tokio::spawn(myriad_worker::serve(listener, worker, None, std::future::pending()));
    ExpertWorkerClient::connect(format!("http://{addr}")).await.unwrap()
}

/// Two tokens of layer 1 routed to hosted experts 0 and 3.
fn batch(hidden: usize) -> ExpertBatch {
    ExpertBatch {
        layer: LayerId(1),
        width: hidden,
        hidden: (0..2 * hidden).map(|i| ((i * 37) % 11) as f32 * 0.1 - 0.5).collect(),
        routes: vec![vec![(ExpertId(3), 0.75), (ExpertId(0), 0.5)], vec![(ExpertId(0), 1.25)]],
    }
}

#[tokio::test]
async fn serves_hosted_experts_bit_identical_to_the_model() {
    let model = Model::load(&tiny()).unwrap();
    let hidden = model.config.hidden_size;
    let mut client = start(&tiny(), "1:0-3,2:5").await;

    let described = client.describe(DescribeRequest {}).await.unwrap().into_inner();
    let hosted: Vec<(u32, u32)> = described.experts.iter().map(|e| (e.layer, e.expert)).collect();
    assert_eq!(hosted, vec![(1, 0), (1, 1), (1, 2), (1, 3), (2, 5)]);
    assert_eq!(described.hidden_size as usize, hidden);
    // Its device, and the bytes its five experts hold there.
    let one = CpuBackend::load(&tiny(), &"1:0".parse::<ExpertSpec>().unwrap()).unwrap().bytes() as u64;
    assert_eq!((described.device.as_str(), described.device_memory_bytes), ("cpu", 0));
    assert_eq!(described.expert_bytes, 5 * one);

    let b = batch(hidden);
    let routes: Vec<moe::Route> =
        b.routes.iter().map(|r| r.iter().map(|(e, w)| (e.0 as usize, *w)).collect()).collect();
    let local =
        moe::contributions(|e| model.weights.layers[1].moe.experts.get(e), &model.config, &b.hidden, &routes).unwrap();
    let response = client.run_experts(RunExpertsRequest::from(b)).await.unwrap().into_inner();
    let remote = expert::Contributions::try_from(response).unwrap();
    assert_eq!((remote.pairs, remote.width), (3, hidden));
    assert_eq!(remote.data, local, "remote contributions must be the same bits as local ones");

    let load = client.take_load(TakeLoadRequest {}).await.unwrap().into_inner();
    let counts: Vec<(u32, u32, u64)> = load.loads.iter().map(|l| (l.layer, l.expert, l.tokens)).collect();
    assert_eq!(counts, vec![(1, 0, 2), (1, 3, 1)]);
    let again = client.take_load(TakeLoadRequest {}).await.unwrap().into_inner();
    assert!(again.loads.is_empty(), "taking the load window starts a new one");
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let hidden = Model::load(&tiny()).unwrap().config.hidden_size;
    let mut client = start(&tiny(), "1:0-3").await;
    let good = RunExpertsRequest::from(batch(hidden));
    let cases: Vec<(&str, RunExpertsRequest)> = vec![
        ("truncated hidden bytes", {
            let mut m = good.clone();
            let t = m.hidden.as_mut().unwrap();
            t.data = t.data.slice(..t.data.len() - 4);
            m
        }),
        ("missing hidden", RunExpertsRequest { hidden: None, ..good.clone() }),
        (
            "wrong width",
            RunExpertsRequest { hidden: Some(tensor::encode(4, hidden / 2, vec![0.0; 2 * hidden])), ..good.clone() },
        ),
        ("unknown layer", RunExpertsRequest { layer: 99, ..good.clone() }),
        ("expert beyond the model", RunExpertsRequest { experts: vec![3, 0, 4000], ..good.clone() }),
        ("route counts disagree", RunExpertsRequest { route_counts: vec![2, 2], ..good.clone() }),
        ("too few route counts", RunExpertsRequest { route_counts: vec![3], ..good.clone() }),
        ("NaN weight", RunExpertsRequest { weights: vec![f32::NAN, 0.5, 1.0], ..good.clone() }),
        ("wrong dtype", {
            let mut m = good.clone();
            m.hidden.as_mut().unwrap().dtype = 7;
            m
        }),
    ];
    for (what, request) in cases {
        let status = client.run_experts(request).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
    }
    // A well-formed request for an expert hosted elsewhere is a placement
    // mismatch, not a bad request: another replica may serve it.
    let elsewhere = RunExpertsRequest { experts: vec![3, 0, 7], ..good.clone() };
    let status = client.run_experts(elsewhere).await.expect_err("expert 7 is not hosted");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    // The worker still serves good requests afterwards.
    client.run_experts(good).await.expect("a good request after bad ones");
}

/// A worker maps only the tensors of its experts: deleting another expert's
/// tensors from the checkpoint does not matter to it.
#[tokio::test]
async fn loads_only_the_tensors_of_its_experts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        parsed.tensors().into_iter().filter(|(name, _)| !name.contains("layers.2.ffn.experts.6.")).collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();

    let hidden = Model::load(&tiny()).unwrap().config.hidden_size;
    let mut client = start(dir.path(), "1:0-3,2:0-5").await;
    client.run_experts(RunExpertsRequest::from(batch(hidden))).await.expect("hosted experts are intact");

    let err = CpuBackend::load(dir.path(), &"2:6".parse::<ExpertSpec>().unwrap()).err().expect("expert 6 is gone");
    assert!(err.to_string().contains("layers.2.ffn.experts.6.w1.weight"), "{err}");
    let err = CpuBackend::load(dir.path(), &"40:0".parse::<ExpertSpec>().unwrap()).err().expect("no such layer");
    assert!(err.to_string().contains("names none"), "{err}");
}

async fn health(addr: std::net::SocketAddr) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let request = HealthCheckRequest { service: String::new() };
    HealthClient::new(channel).check(request).await.unwrap().into_inner().status
}

/// The standard gRPC health service (what Kubernetes' gRPC probe asks)
/// reports the worker's readiness: a static worker is ready at once, a
/// cluster worker only when its membership says so, and not again after.
#[tokio::test]
async fn the_health_service_reports_readiness() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let backend = CpuBackend::load(&tiny(), &"1:0-3".parse::<ExpertSpec>().unwrap()).unwrap();
    let ready = Arc::new(Worker::new("ready", Arc::new(backend)).unwrap());
    let shape = myriad_worker::backend::model_shape(&tiny()).unwrap();
    let idle = Arc::new(Worker::idle("idle", shape, Device::Cpu).unwrap());
    let mut addrs = Vec::new();
    for worker in [ready, idle.clone()] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        tokio::spawn(myriad_worker::serve(listener, worker, None, std::future::pending()));
    }
    assert_eq!(health(addrs[0]).await, ServingStatus::Serving as i32, "a static worker serves its experts");
    assert_eq!(health(addrs[1]).await, ServingStatus::NotServing as i32, "an idle worker serves nothing yet");
    idle.set_ready(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while health(addrs[1]).await != ServingStatus::Serving as i32 {
        assert!(std::time::Instant::now() < deadline, "the health service did not follow set_ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    idle.set_ready(false);
    while health(addrs[1]).await != ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < deadline, "the health service did not follow set_ready(false)");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
