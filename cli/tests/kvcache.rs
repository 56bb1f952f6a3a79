//! Conversations survive routers: a KV-cache service, one expert worker and
//! two routers as separate processes. The router that served turn 1 is
//! SIGKILLed; turn 2 on the other router restores turn 1's state, prefills
//! only the new tokens and answers exactly like a run from scratch. Then the
//! service restarts on its disk tier, and a corrupt block costs recomputation,
//! never a wrong answer.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use myriad_model::{Model, Sampling};
use serde_json::{Value, json};

mod common;
use common::Proc;

fn model() -> Model {
    Model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4")).unwrap()
}

fn router(worker: &str, kvcache: &str) -> Proc {
    Proc::start(&["router", "--listen", "127.0.0.1:0", "--worker-addr", worker, "--kvcache", kvcache])
}

/// `http://ADDR/v1` from a router's banner.
fn base(router: &Proc) -> String {
    router.word(3)
}

async fn complete(base: &str, prompt: &[u32], max_tokens: usize) -> Value {
    let body =
        json!({"model": "tiny-v4", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let response = reqwest::Client::new()
        .post(format!("{base}/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let ok = response.status().is_success();
    let text = response.text().await.unwrap();
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn cached(answer: &Value) -> usize {
    answer["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize
}

/// A counter from a router's /metrics (0 when absent).
async fn metric(base: &str, name: &str) -> u64 {
    let url = base.trim_end_matches("/v1").to_string() + "/metrics";
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok()).map_or(0, |v| v as u64)
}

async fn wait_for_saves(base: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(base, "myriad_router_kvcache_saves_total{result=\"ok\"}").await < n {
        assert!(Instant::now() < deadline, "the router did not store {n} states");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kvcache_stats(addr: &str) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_myriad"))
        .args(["ctl", "--json", "kvcache", "--kvcache", addr])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_moves_to_another_router_through_the_kvcache() {
    let model = model();
    let disk = tempfile::tempdir().unwrap();
    let dir = disk.path().to_str().unwrap();
    let mut kvcache = Proc::start(&["kvcache", "--listen", "127.0.0.1:0", "--disk", dir, "--memory", "64MiB"]);
    let kv = kvcache.word(3);
    let worker = Proc::start(&["worker", "--listen", "127.0.0.1:0", "--experts", "*:*"]);
    let w = worker.word(3);
    let mut first = router(&w, &kv);
    let second = router(&w, &kv);
    let (a, b) = (base(&first), base(&second));

    // Turn 1 on router A: 600 prompt tokens (two full 256-token blocks).
    let turn1: Vec<u32> = (0..600u32).map(|i| i * 7919 % 500 + 2).collect();
    let answer1 = complete(&a, &turn1, 12).await;
    assert_eq!(cached(&answer1), 0);
    let reply = myriad_model::generate(&model, &turn1, 12, &Sampling::greedy(), true).unwrap().generated;
    wait_for_saves(&a, 2).await;
    first.kill();

    // Turn 2 on router B extends turn 1 (its prompt, the reply, a new message).
    let mut turn2 = [&turn1[..], &reply[..]].concat();
    turn2.extend((0..20u32).map(|i| i * 31 % 500 + 2));
    let scratch = myriad_model::generate(&model, &turn2, 16, &Sampling::greedy(), true).unwrap().generated;
    let scratch_text = model_text(&scratch);
    let answer2 = complete(&b, &turn2, 16).await;
    // Turn 1's state covers its prompt and all but the last reply token.
    let restored = turn1.len() + reply.len() - 1;
    assert_eq!(cached(&answer2), restored);
    assert_eq!(answer2["choices"][0]["text"], scratch_text, "restoring changed the answer");
    assert_eq!(metric(&b, "myriad_router_tokens_total{kind=\"prompt\"}").await, (turn2.len() - restored) as u64);
    assert_eq!(metric(&b, "myriad_router_tokens_total{kind=\"prompt_cached\"}").await, restored as u64);
    let stats = kvcache_stats(&kv);
    assert_eq!(stats["memory"]["hits"], 1, "{stats}");
    assert_eq!(stats["disk"]["bytes"], stats["memory"]["bytes"], "write-through: {stats}");

    // The service restarts on its disk tier: turn 2 again, restored from disk.
    wait_for_saves(&b, 2).await;
    kvcache.kill();
    let kvcache = Proc::start(&["kvcache", "--listen", "127.0.0.1:0", "--disk", dir, "--memory", "64MiB"]);
    let kv = kvcache.word(3);
    let third = router(&w, &kv);
    let c = base(&third);
    let again = complete(&c, &turn2, 16).await;
    assert_eq!(cached(&again), turn2.len() - 1, "the same prompt restores all but its last token");
    assert_eq!(again["choices"][0]["text"], scratch_text);
    assert_eq!(kvcache_stats(&kv)["disk"]["hits"], 1);

    // Flip a byte in every stored block: the next lookups must recompute.
    let mut flipped = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "blk") {
            let mut bytes = std::fs::read(&path).unwrap();
            let n = bytes.len();
            bytes[n / 2] ^= 0x10;
            std::fs::write(&path, bytes).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped >= 2);
    drop(kvcache);
    let kvcache = Proc::start(&["kvcache", "--listen", "127.0.0.1:0", "--disk", dir, "--memory", "64MiB"]);
    let kv = kvcache.word(3);
    let fourth = router(&w, &kv);
    let d = base(&fourth);
    let recomputed = complete(&d, &turn2, 16).await;
    assert!(cached(&recomputed) < 512, "a state over corrupt blocks was used: {}", cached(&recomputed));
    assert_eq!(recomputed["choices"][0]["text"], scratch_text, "corruption changed the answer");
    assert!(kvcache_stats(&kv)["corrupt"].as_u64().unwrap() >= 1);
}

fn model_text(ids: &[u32]) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-v4");
    myriad_model::text::TextTokenizer::load(&dir).unwrap().decode(ids).unwrap()
}

/// Three KV-cache instances registered in etcd, a router that spreads
/// conversations over them with two copies each. One instance is SIGKILLed
/// between turns: every second turn still restores its first turn (from
/// the other copy) and answers exactly as from scratch; once its lease
/// expires the router stops asking it, and the conversations it was home to
/// move to the survivors, recomputed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_spread_over_instances_and_survive_one_of_them() {
    let model = model();
    let etcd = myriad_store::etcd_server::EtcdServer::start().await;
    let e = etcd.endpoint.clone();
    let member = |role: &str, id: &str| -> Vec<String> {
        let args = [role, "--etcd", &e, "--cluster", "kv", "--node-id", id, "--lease-ttl", "2s"];
        args.iter().map(|a| a.to_string()).collect()
    };
    let start = |args: Vec<String>, extra: &[&str]| {
        let all: Vec<&str> = args.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        Proc::start(&all)
    };
    let listen = ["--listen", "127.0.0.1:0"];
    let metrics: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", common::free_port())).collect();
    let mut instances: Vec<Proc> = ["kv-1", "kv-2", "kv-3"]
        .iter()
        .zip(&metrics)
        .map(|(id, m)| {
            start(member("kvcache", id), &[&listen[..], &["--memory", "64MiB", "--metrics-listen", m]].concat())
        })
        .collect();
    let addrs: Vec<String> = instances.iter().map(|p| p.word(3)).collect();
    let _coordinator = start(member("coordinator", "c1"), &["--admin-listen", "127.0.0.1:0", "--settle", "200ms"]);
    let _worker = start(member("worker", "w1"), &listen);
    let router =
        start(member("router", "r1"), &[&listen[..], &["--kvcache-from-store", "--kvcache-replicas", "2"]].concat());
    let b = base(&router);
    let ready = format!("{}/ready", b.trim_end_matches("/v1"));
    common::until("router ready", Duration::from_secs(60), async || {
        reqwest::get(&ready).await.ok()?.status().is_success().then_some(())
    })
    .await;

    // Six conversations, each with a first block of its own.
    let firsts: Vec<Vec<u32>> =
        (0..6u32).map(|c| (0..300u32).map(|i| (i * 7919 + c * 131) % 500 + 2).collect()).collect();
    let mut replies = Vec::new();
    for (n, turn1) in firsts.iter().enumerate() {
        complete(&b, turn1, 8).await;
        // At the first block's end, before the prompt's last token and
        // after the turn, each to two instances.
        wait_for_saves(&b, 6 * (n as u64 + 1)).await;
        replies.push(myriad_model::generate(&model, turn1, 8, &Sampling::greedy(), true).unwrap().generated);
    }
    // Each instance serves its own metrics: the bytes it holds.
    for (m, addr) in metrics.iter().zip(&addrs) {
        let text = reqwest::get(format!("http://{m}/metrics")).await.unwrap().text().await.unwrap();
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("myriad_kvcache_bytes{tier=\"memory\"}")?.trim().parse::<u64>().ok());
        assert_eq!(bytes, kvcache_stats(addr)["memory"]["bytes"].as_u64(), "{text}");
    }
    // Two copies of each of the eighteen states, on more than one instance.
    let held: Vec<u64> = addrs.iter().map(|a| kvcache_stats(a)["snapshots"].as_u64().unwrap()).collect();
    assert_eq!(held.iter().sum::<u64>(), 36, "{held:?}");
    assert!(held.iter().filter(|&&n| n > 0).count() >= 2, "all on one instance: {held:?}");

    // SIGKILL one instance that holds some; then each conversation's turn 2.
    let victim = held.iter().position(|&n| n > 0).unwrap();
    instances[victim].kill();
    let turn2 = |c: usize| -> Vec<u32> {
        let mut t = [&firsts[c][..], &replies[c][..]].concat();
        t.extend((0..10u32).map(|i| (i * 31 + c as u32) % 500 + 2));
        t
    };
    for c in 0..firsts.len() {
        let prompt = turn2(c);
        let scratch = myriad_model::generate(&model, &prompt, 8, &Sampling::greedy(), true).unwrap().generated;
        let answer = complete(&b, &prompt, 8).await;
        assert_eq!(answer["choices"][0]["text"], model_text(&scratch), "conversation {c} changed");
        assert_eq!(cached(&answer), firsts[c].len() + replies[c].len() - 1, "conversation {c} lost its state");
    }

    // After its lease expires the ring has two instances; new states go there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let survivors: Vec<&String> = addrs.iter().enumerate().filter(|&(i, _)| i != victim).map(|(_, a)| a).collect();
    let before: u64 = survivors.iter().map(|a| kvcache_stats(a)["snapshots"].as_u64().unwrap()).sum();
    let fresh: Vec<u32> = (0..300u32).map(|i| (i * 17 + 5) % 500 + 2).collect();
    let saves = metric(&b, "myriad_router_kvcache_saves_total{result=\"ok\"}").await;
    let failed = metric(&b, "myriad_router_kvcache_saves_total{result=\"error\"}").await;
    assert!(failed > 0, "saves to the dead instance before its lease expired fail");
    let answer = complete(&b, &fresh, 8).await;
    let scratch = myriad_model::generate(&model, &fresh, 8, &Sampling::greedy(), true).unwrap().generated;
    assert_eq!(answer["choices"][0]["text"], model_text(&scratch));
    wait_for_saves(&b, saves + 6).await;
    let after: u64 = survivors.iter().map(|a| kvcache_stats(a)["snapshots"].as_u64().unwrap()).sum();
    assert_eq!(after, before + 6, "both copies of its three states on the survivors");
    // `ctl kvcache` lists the registered instances: the two survivors.
    let listed = common::ctl_json(&e, "kv", &["kvcache"]);
    let ids: Vec<&str> = listed["instances"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{listed}");
    assert!(listed["instances"].as_array().unwrap().iter().all(|i| i["snapshots"].as_u64().unwrap() > 0), "{listed}");
    let now_failed = metric(&b, "myriad_router_kvcache_saves_total{result=\"error\"}").await;
    assert_eq!(now_failed, failed, "a save went to the dead instance after its lease expired");
}
