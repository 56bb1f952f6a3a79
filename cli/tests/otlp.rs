//! `myriad up` exports its traces over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a real OTLP/gRPC trace receiver
//! here, a real `myriad up` process, a real HTTP request.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

struct Receiver {
    spans: mpsc::UnboundedSender<Span>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.spans.send(span);
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(s) => Some(s.clone()),
        AnyValue::IntValue(i) => Some(i.to_string()),
        _ => None,
    })
}

/// Kills the child at the end of the test, whatever happens.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_step_spans_reach_the_collector() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let (tx, mut spans) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver { spans: tx }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["up", "--listen", "127.0.0.1:0", "--workers", "2"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start myriad up");
    let stdout = child.stdout.take().unwrap();
    let _up = Up(child);
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let base = line.split_whitespace().nth(3).unwrap_or_else(|| panic!("unexpected banner `{line}`")).to_string();

    let body = r#"{"model": "tiny-v4", "prompt": "hello", "max_tokens": 4}"#;
    let response = reqwest::Client::new()
        .post(format!("{base}/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let answer: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    let id = answer["id"].as_str().unwrap().to_string();

    // The request's span carries its id; the engine steps that ran it link to it.
    let mut request_span = None;
    let mut steps = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while request_span.is_none()
        || !steps.iter().any(|s: &Span| {
            s.links.iter().any(|l| Some(&l.span_id) == request_span.as_ref().map(|r: &Span| &r.span_id))
        })
    {
        let span = tokio::time::timeout_at(deadline, spans.recv()).await.expect("spans within 30 s").unwrap();
        match span.name.as_str() {
            "request" if attribute(&span, "request_id").as_deref() == Some(&id) => {
                assert_eq!(attribute(&span, "endpoint").as_deref(), Some("completions"));
                request_span = Some(span);
            }
            "step" => steps.push(span),
            _ => {}
        }
    }
}
