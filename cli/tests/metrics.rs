//! A router given `--metrics-listen` serves `/metrics` there and not on
//! the API's port, which an Ingress may expose to the world.

use std::time::Duration;

mod common;
use common::{Proc, free_port, until};

#[tokio::test]
async fn a_router_with_a_metrics_port_keeps_metrics_off_the_api() {
    let worker = Proc::start(&["worker", "--listen", "127.0.0.1:0", "--experts", "*:*"]);
    let metrics = format!("127.0.0.1:{}", free_port());
    let router = Proc::start(&[
        "router",
        "--listen",
        "127.0.0.1:0",
        "--worker-addr",
        &worker.word(3),
        "--metrics-listen",
        &metrics,
    ]);
    let base = router.word(3);
    let api = base.trim_end_matches("/v1").to_string();
    let prompt = r#""prompt": "Counted", "max_tokens": 4, "temperature": 0"#;
    common::complete(&base, prompt).await.expect("a completion");
    let scraped = until("the metrics port", Duration::from_secs(10), async || {
        let response = reqwest::get(format!("http://{metrics}/metrics")).await.ok()?;
        response.status().is_success().then_some(response.text().await.ok()?)
    })
    .await;
    assert!(scraped.contains("myriad_router_requests_total"), "{scraped}");
    assert_eq!(reqwest::get(format!("{api}/metrics")).await.unwrap().status(), 404, "/metrics on the API port");
    assert!(reqwest::get(format!("{api}/health")).await.unwrap().status().is_success());
}
