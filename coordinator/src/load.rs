//! The leader's view of expert load: every `load_interval` it takes each
//! live worker's load window (`TakeLoad`) and folds it into a decayed
//! per-(layer, expert) token count, which placement balances on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use myriad_proto::pb::TakeLoadRequest;
use myriad_proto::pb::expert_worker_client::ExpertWorkerClient;
use myriad_store::mirror::Snapshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::leader::live_workers;
use crate::placement::Load;
use crate::{CoordinatorConfig, Shared};

/// Weight of the past at each collection: the load halves every interval
/// unless renewed.
const DECAY: f64 = 0.5;

/// Stops collecting when dropped.
pub(crate) struct Collector(JoinHandle<()>);

impl Drop for Collector {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn collect(
    workers: watch::Receiver<Snapshot>,
    config: &CoordinatorConfig,
    shared: Arc<Shared>,
) -> Collector {
    let config = config.clone();
    Collector(tokio::spawn(async move {
        let mut clients: HashMap<String, ExpertWorkerClient<Channel>> = HashMap::new();
        let mut tick = tokio::time::interval(config.load_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let live = live_workers(&workers.borrow(), &config.model_id);
            let mut window = vec![0.0; config.layers * config.experts];
            for w in &live {
                let mut client = match clients.get(&w.addr) {
                    Some(c) => c.clone(),
                    None => match Endpoint::from_shared(format!("http://{}", w.addr)) {
                        Ok(e) => {
                            let endpoint = e.connect_timeout(Duration::from_secs(2));
                            let c = ExpertWorkerClient::new(myriad_tls::lazy_channel(endpoint, config.tls.as_ref()));
                            clients.insert(w.addr.clone(), c.clone());
                            c
                        }
                        Err(_) => continue,
                    },
                };
                let call = tokio::time::timeout(Duration::from_secs(5), client.take_load(TakeLoadRequest {}));
                match call.await {
                    Ok(Ok(response)) => {
                        for l in response.into_inner().loads {
                            let (layer, expert) = (l.layer as usize, l.expert as usize);
                            if layer < config.layers && expert < config.experts {
                                window[layer * config.experts + expert] += l.tokens as f64;
                            }
                        }
                    }
                    _ => tracing::debug!(worker = %w.id, "no load window from this worker"),
                }
            }
            let mut state = shared.lock();
            let load = state.load.get_or_insert_with(|| Load {
                layers: config.layers,
                experts: config.experts,
                tokens: vec![0.0; config.layers * config.experts],
            });
            for (old, new) in load.tokens.iter_mut().zip(window) {
                *old = *old * DECAY + new;
            }
        }
    }))
}
