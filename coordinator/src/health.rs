//! The cluster's health as `myriad ctl status` reports it: a list of
//! problems derived from the records in the store, empty when healthy.
//!
//! Healthy means: a current placement exists; it places exactly the live,
//! uncordoned workers of this model at their addresses; every routed expert
//! has its configured number of copies on distinct live workers (fewer only
//! when fewer workers are live); every router dispatches with the current
//! version, has a live copy of every expert and has no worker marked down;
//! and no rollout is stuck.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use myriad_store::schema::{NodeId, NodeRecord, PlacementVersion, PlacementView, Role, Stalled};

use crate::leader::placeable;

/// How far the leader's rollout has come, as the admin API sees it.
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    /// The version being rolled out and for how long, if one is.
    pub running: Option<(PlacementVersion, Duration)>,
    /// Rollouts abandoned in a row since the last one that became current,
    /// with the last reason.
    pub abandoned: Option<(usize, String)>,
    /// Why the leader cannot place the experts on the live, uncordoned
    /// workers, while it cannot.
    pub unplaceable: Option<String>,
    /// The placement the leader kept although it leaves live workers
    /// (id, address) out, and the workers it was kept for.
    pub kept_for: Option<(PlacementVersion, Vec<(NodeId, String)>)>,
    /// Workers placement leaves out because a rollout waited for them in vain.
    pub stalled: Vec<Stalled>,
}

/// What the coordinator was asked for, as far as health depends on it.
#[derive(Debug, Clone)]
pub struct Asked<'a> {
    pub model_id: &'a str,
    /// Copies of every expert, on distinct workers.
    pub replicas: usize,
    /// Live workers the first placement waits for.
    pub min_workers: usize,
    /// How long a rollout waits for workers before it is abandoned.
    pub rollout_timeout: Duration,
}

/// Everything wrong with the cluster, one sentence each.
pub fn problems(
    asked: &Asked,
    nodes: &[NodeRecord],
    cordoned: &HashSet<NodeId>,
    view: &PlacementView,
    rollouts: &Rollouts,
) -> Vec<String> {
    let Asked { model_id, replicas, min_workers, rollout_timeout } = *asked;
    let mut problems = Vec::new();
    let ours = |n: &&NodeRecord| n.role == Role::Worker && n.model_id == model_id;
    for n in nodes.iter().filter(ours) {
        if let Some(f) = &n.load_failure {
            problems.push(format!(
                "worker {} could not load the experts of placement {}: {}; placement leaves it out until it loads \
                 them (it tries again, backing off to every 5 min)",
                n.id, f.version, f.error
            ));
        }
    }
    for s in &rollouts.stalled {
        problems.push(format!(
            "worker {} did not load placement {} within the rollout timeout ({:.0}s); placement leaves it out \
             until that load ends, it reports a failure or it restarts",
            s.node,
            s.version,
            rollout_timeout.as_secs_f64()
        ));
    }
    // The workers placement may use.
    let stalled = |n: &&NodeRecord| rollouts.stalled.iter().any(|s| s.node == n.id);
    let workers: Vec<&NodeRecord> =
        nodes.iter().filter(ours).filter(|n| placeable(n, cordoned) && !stalled(n)).collect();
    // Those left out only because their experts do not load (said above).
    let failed = nodes.iter().filter(ours).filter(|n| !cordoned.contains(&n.id)).count() - workers.len();
    let also_failed = match failed {
        0 => String::new(),
        1 => " (1 more cannot load its experts)".to_string(),
        n => format!(" ({n} more cannot load their experts)"),
    };
    if workers.is_empty() {
        let live = nodes.iter().filter(ours).count();
        problems.push(match live {
            0 => "no live worker".to_string(),
            n => format!("no worker may be placed: the live ones ({n}) are cordoned or cannot load their experts"),
        });
    }
    if let Some(why) = &rollouts.unplaceable {
        problems.push(format!("the leader cannot place the experts on the live, uncordoned workers: {why}"));
    }
    let Some(p) = view.current() else {
        problems.push(if workers.len() < min_workers {
            format!(
                "no current placement: the first waits for {min_workers} live, uncordoned workers \
                 (--min-workers); {} are{also_failed}",
                workers.len()
            )
        } else {
            "no current placement".to_string()
        });
        return problems;
    };
    // The placement against the live workers.
    let live: BTreeSet<(&NodeId, &str)> = workers.iter().map(|w| (&w.id, w.addr.as_str())).collect();
    for a in &p.assignments {
        match nodes.iter().find(|n| n.id == a.node && n.addr == a.addr) {
            None => {
                problems.push(format!("worker {} of placement {} is not registered at {}", a.node, p.version, a.addr))
            }
            Some(_) if cordoned.contains(&a.node) => {
                problems.push(format!("worker {} is cordoned but still placed in {}", a.node, p.version))
            }
            // Said above.
            Some(n) if n.load_failure.is_some() => {}
            // A worker restarted in place registers before it has loaded
            // its experts again.
            Some(n) if n.placement_version < Some(p.version) => {
                problems.push(format!("worker {} has not loaded placement {} (yet)", a.node, p.version))
            }
            Some(_) => {}
        }
    }
    for (id, addr) in &live {
        if p.assignments.iter().any(|a| &a.node == *id && a.addr == *addr) {
            continue;
        }
        let kept = rollouts.kept_for.as_ref().is_some_and(|(version, workers)| {
            *version == p.version && workers.iter().any(|(i, a)| i == *id && a == addr)
        });
        problems.push(if kept {
            format!(
                "worker {id} at {addr} holds no experts: the leader kept placement {} as it is (nothing worth \
                 moving to it within the move bound); `myriad ctl rebalance --max-move <bytes>` moves some to it",
                p.version
            )
        } else {
            format!("worker {id} at {addr} is live but not in placement {}", p.version)
        });
    }
    // Copies of each expert on distinct live workers.
    if !live.is_empty() && live.len() < replicas {
        problems.push(format!(
            "{} live worker(s), fewer than the {replicas} copies asked of each expert: one more failure loses experts",
            live.len()
        ));
    }
    let want = replicas.clamp(1, live.len().max(1));
    let mut short: BTreeMap<usize, Vec<(u32, u32)>> = BTreeMap::new();
    for l in 0..p.layers {
        for e in 0..p.experts {
            let holders: BTreeSet<&str> = p
                .assignments
                .iter()
                .filter(|a| a.experts.contains(l, e) && live.contains(&(&a.node, a.addr.as_str())))
                .map(|a| a.addr.as_str())
                .collect();
            if holders.len() < want {
                short.entry(holders.len()).or_default().push((l, e));
            }
        }
    }
    for (copies, experts) in short {
        let (l, e) = experts[0];
        problems.push(format!(
            "{} expert(s) have {copies} live cop{} on distinct workers, not {want} (first: layer {l} expert {e})",
            experts.len(),
            if copies == 1 { "y" } else { "ies" },
        ));
    }
    // Routers.
    for r in nodes.iter().filter(|n| n.role == Role::Router) {
        if r.placement_version != Some(p.version) {
            let serves = r.placement_version.map_or("no placement".to_string(), |v| v.to_string());
            problems.push(format!("router {} serves {serves}, not {}", r.id, p.version));
        }
        if let Some(d) = &r.dispatch {
            if !d.ready {
                problems.push(format!("router {} is not ready: some expert has no live copy in its pool", r.id));
            }
            if !d.down.is_empty() {
                problems.push(format!("router {} has marked worker(s) down: {}", r.id, d.down.join(", ")));
            }
        }
    }
    // Rollouts.
    if let Some((version, running)) = rollouts.running
        && running > rollout_timeout / 2
    {
        problems.push(format!(
            "the rollout of {version} has waited {:.1}s for workers to load it (abandoned after {:.0}s)",
            running.as_secs_f64(),
            rollout_timeout.as_secs_f64()
        ));
    }
    if let Some((count, why)) = &rollouts.abandoned
        && *count >= 2
    {
        problems.push(format!("the last {count} rollouts were abandoned; the last because {why}"));
    }
    problems
}

#[cfg(test)]
mod tests {
    use myriad_store::schema::{Assignment, Placement};

    use super::*;

    fn node(id: &str, role: Role, version: Option<u64>) -> NodeRecord {
        NodeRecord {
            placement_version: version.map(PlacementVersion),
            ..NodeRecord::new(id.parse().unwrap(), role, format!("{id}:1"), "m")
        }
    }

    /// A view whose current version 3 places `specs` (node, `--experts` spec).
    fn view(specs: &[(&str, &str)]) -> PlacementView {
        let assignments = specs
            .iter()
            .map(|(id, spec)| Assignment {
                node: id.parse().unwrap(),
                addr: format!("{id}:1"),
                experts: spec.parse().unwrap(),
            })
            .collect();
        let p = Placement { version: PlacementVersion(3), model_id: "m".into(), layers: 2, experts: 4, assignments };
        PlacementView { versions: [(p.version, p)].into_iter().collect(), current: Some(PlacementVersion(3)) }
    }

    fn asked(replicas: usize) -> Asked<'static> {
        Asked { model_id: "m", replicas, min_workers: 3, rollout_timeout: Duration::from_secs(60) }
    }

    fn check(nodes: &[NodeRecord], view: &PlacementView, replicas: usize) -> Vec<String> {
        problems(&asked(replicas), nodes, &HashSet::new(), view, &Rollouts::default())
    }

    /// `nodes` with node `i` reporting that it could not load `version`.
    fn failing(nodes: &[NodeRecord], i: usize, version: u64) -> Vec<NodeRecord> {
        let mut nodes = nodes.to_vec();
        let error = "disk gone".to_string();
        nodes[i].load_failure = Some(myriad_store::schema::LoadFailure { version: PlacementVersion(version), error });
        nodes
    }

    #[test]
    fn a_fully_replicated_cluster_is_healthy_and_each_fault_is_named() {
        let two_copies = view(&[("w1", "0-1:0-3"), ("w2", "0-1:0-3"), ("w3", "0-1:0-3")]);
        let mut nodes = vec![node("w1", Role::Worker, Some(3)), node("w2", Role::Worker, Some(3))];
        nodes.push(node("w3", Role::Worker, Some(3)));
        nodes.push(node("r1", Role::Router, Some(3)));
        assert_eq!(check(&nodes, &two_copies, 2), Vec::<String>::new());

        // Every expert on one worker while three are live and 2 copies are asked for.
        let one = view(&[("w1", "0-1:0-3")]);
        let p = check(&nodes, &one, 2);
        assert!(p.iter().any(|p| p.contains("8 expert(s) have 1 live copy") && p.contains("not 2")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("w2") && p.contains("not in placement")), "{p:?}");
        // The leader kept that placement for these workers: it says why w2
        // and w3 hold nothing. Kept for another version: not this one.
        let live = nodes[..3].iter().map(|n| (n.id.clone(), n.addr.clone())).collect::<Vec<_>>();
        for (version, kept) in [(one.current.unwrap(), true), (PlacementVersion(9), false)] {
            let rollouts = Rollouts { kept_for: Some((version, live.clone())), ..Default::default() };
            let p = problems(&asked(2), &nodes, &HashSet::new(), &one, &rollouts);
            let why = p.iter().filter(|p| p.contains("the leader kept placement") && p.contains("ctl rebalance"));
            assert_eq!(why.count(), if kept { 2 } else { 0 }, "{p:?}");
        }

        // A router that is not ready, or has a worker marked down.
        let mut sick = nodes.clone();
        sick[3].dispatch = Some(myriad_store::schema::DispatchHealth { ready: false, down: vec!["w2:1".into()] });
        let p = check(&sick, &two_copies, 2);
        assert!(p.iter().any(|p| p.contains("router r1 is not ready")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("marked worker(s) down: w2:1")), "{p:?}");

        // A placed worker that is gone, and a router behind.
        let mut gone = nodes.clone();
        gone.remove(1);
        gone[2].placement_version = Some(PlacementVersion(2));
        let p = check(&gone, &two_copies, 2);
        assert!(p.iter().any(|p| p.contains("w2 of placement v3 is not registered")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("router r1 serves v2, not v3")), "{p:?}");

        // A worker back in place that has not loaded its experts yet.
        let mut loading = nodes.clone();
        loading[0].placement_version = None;
        let p = check(&loading, &two_copies, 2);
        assert_eq!(p, vec!["worker w1 has not loaded placement v3 (yet)".to_string()]);

        // Fewer live workers than copies asked for.
        let alone = view(&[("w1", "0-1:0-3")]);
        let p = check(&nodes[..1], &alone, 2);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("1 live worker(s), fewer than the 2 copies"), "{p:?}");

        // A stuck rollout.
        let rollouts = Rollouts { running: Some((PlacementVersion(4), Duration::from_secs(40))), ..Default::default() };
        let p = problems(&asked(2), &nodes, &HashSet::new(), &two_copies, &rollouts);
        assert!(p.iter().any(|p| p.contains("rollout of v4 has waited 40.0s")), "{p:?}");

        // No plan fits the live workers: why, before the placement's symptoms.
        let rollouts = Rollouts { unplaceable: Some("it does not fit".into()), ..Default::default() };
        let p = problems(&asked(2), &gone, &HashSet::new(), &two_copies, &rollouts);
        assert_eq!(p[0], "the leader cannot place the experts on the live, uncordoned workers: it does not fit");

        // A worker that failed to load: named with why, not counted as
        // live, and not reported again as a placed worker behind.
        let failed = failing(&nodes, 1, 4);
        let p = check(&failed, &two_copies, 2);
        assert_eq!(
            p[0],
            "worker w2 could not load the experts of placement v4: disk gone; placement leaves it out until it loads \
             them (it tries again, backing off to every 5 min)"
        );
        assert!(p.iter().all(|p| !p.contains("w2 has not loaded")), "{p:?}");

        // A worker a rollout waited for in vain: named with why, and not
        // reported again as live but unplaced.
        let without_w2 = view(&[("w1", "0-1:0-3"), ("w3", "0-1:0-3")]);
        let stalled = Stalled { node: "w2".parse().unwrap(), version: PlacementVersion(4), revision: 7 };
        let rollouts = Rollouts { stalled: vec![stalled], ..Default::default() };
        let p = problems(&asked(2), &nodes, &HashSet::new(), &without_w2, &rollouts);
        assert_eq!(
            p,
            ["worker w2 did not load placement v4 within the rollout timeout (60s); placement leaves it out until \
              that load ends, it reports a failure or it restarts"]
        );

        // Before the first placement: how many workers it waits for.
        let none = PlacementView::default();
        let p = check(&nodes[..2], &none, 2);
        assert_eq!(p, ["no current placement: the first waits for 3 live, uncordoned workers (--min-workers); 2 are"]);
        assert_eq!(check(&nodes, &none, 2), ["no current placement"]);
        // One of three cannot load its experts: it does not count, and it
        // is said why.
        let one_failed = failing(&nodes, 2, 1);
        let p = check(&one_failed, &none, 2);
        assert_eq!(
            p[1],
            "no current placement: the first waits for 3 live, uncordoned workers (--min-workers); 2 are \
             (1 more cannot load its experts)"
        );
        let p = check(&one_failed[2..], &none, 2);
        assert!(
            p.contains(&"no worker may be placed: the live ones (1) are cordoned or cannot load their experts".into())
        );
    }
}
