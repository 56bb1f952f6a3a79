//! The behaviour every [`Store`] backend must show. Backends' tests call
//! [`run`]; it works on a shared server because it writes only under a
//! prefix of its own.

use std::time::Duration;

use crate::{Event, Store, StoreError};

/// Longest wait for an event that must come (lease expiry included).
const PATIENCE: Duration = Duration::from_secs(15);

async fn next_event(watch: &mut crate::Watch) -> Event {
    match tokio::time::timeout(PATIENCE, watch.recv()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Runs every check against `store`.
pub async fn run(store: &dyn Store) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let root = format!("/suite/{}-{nanos}/", std::process::id());
    keys_and_revisions(store, &root).await;
    conditional_writes(store, &root).await;
    watches(store, &root).await;
    leases(store, &root).await;
}

async fn keys_and_revisions(store: &dyn Store, root: &str) {
    let p = format!("{root}kv/");
    let r1 = store.put(&format!("{p}b"), b"2".to_vec(), None).await.unwrap();
    let r2 = store.put(&format!("{p}a"), b"1".to_vec(), None).await.unwrap();
    store.put(&format!("{root}kvx"), b"outside".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revisions increase");
    let a = store.get(&format!("{p}a")).await.unwrap().expect("a was written");
    assert_eq!((a.value.as_slice(), a.mod_revision, a.lease), (&b"1"[..], r2, None));
    assert_eq!(store.get(&format!("{p}missing")).await.unwrap(), None);
    let listing = store.list(&p).await.unwrap();
    let keys: Vec<&str> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, [format!("{p}a"), format!("{p}b")], "sorted, only under the prefix");
    assert!(listing.revision >= r2);
    let r3 = store.put(&format!("{p}a"), b"one".to_vec(), None).await.unwrap();
    assert_eq!(store.get(&format!("{p}a")).await.unwrap().unwrap().mod_revision, r3);
    assert!(store.delete(&format!("{p}a")).await.unwrap());
    assert!(!store.delete(&format!("{p}a")).await.unwrap(), "second delete finds nothing");
    assert!(matches!(store.put("", vec![], None).await, Err(StoreError::Invalid(_))));
}

async fn conditional_writes(store: &dyn Store, root: &str) {
    let key = format!("{root}cas");
    assert!(store.put_if(&key, b"first".to_vec(), None, 0).await.unwrap(), "creates an absent key");
    assert!(!store.put_if(&key, b"second".to_vec(), None, 0).await.unwrap(), "refuses: the key exists");
    let rev = store.get(&key).await.unwrap().unwrap().mod_revision;
    assert!(!store.put_if(&key, b"stale".to_vec(), None, rev + 1000).await.unwrap(), "refuses a wrong revision");
    assert!(store.put_if(&key, b"third".to_vec(), None, rev).await.unwrap(), "accepts the current revision");
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"third");
}

async fn watches(store: &dyn Store, root: &str) {
    let p = format!("{root}watch/");
    let start = store.list(&p).await.unwrap().revision;
    let mut live = store.watch(&p, start + 1).await.unwrap();
    let mut fresh = store.watch(&p, 0).await.unwrap();
    let r1 = store.put(&format!("{p}x"), b"1".to_vec(), None).await.unwrap();
    store.put(&format!("{root}elsewhere"), b"no".to_vec(), None).await.unwrap();
    store.put(&format!("{p}y"), b"2".to_vec(), None).await.unwrap();
    store.delete(&format!("{p}x")).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_event(&mut live).await);
    }
    assert!(
        matches!(&seen[0], Event::Put(kv) if kv.key == format!("{p}x") && kv.value == b"1" && kv.mod_revision == r1)
    );
    assert!(matches!(&seen[1], Event::Put(kv) if kv.key == format!("{p}y")));
    assert!(matches!(&seen[2], Event::Delete { key, .. } if *key == format!("{p}x")));
    assert!(seen.windows(2).all(|w| w[0].revision() < w[1].revision()), "in revision order");
    assert_eq!(next_event(&mut fresh).await, seen[0], "a watch from 0 sees what follows it");
    // A watch from a past revision replays history first.
    let mut replay = store.watch(&p, r1).await.unwrap();
    for event in &seen {
        assert_eq!(&next_event(&mut replay).await, event);
    }
}

async fn leases(store: &dyn Store, root: &str) {
    let p = format!("{root}lease/");
    let mut watch = store.watch(&p, 0).await.unwrap();

    // Revoking deletes the lease's keys, with events.
    let lease = store.grant(Duration::from_secs(5)).await.unwrap();
    store.put(&format!("{p}revoked"), b"v".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(store.get(&format!("{p}revoked")).await.unwrap().unwrap().lease, Some(lease));
    next_event(&mut watch).await;
    store.revoke(lease).await.unwrap();
    assert!(matches!(next_event(&mut watch).await, Event::Delete { key, .. } if key == format!("{p}revoked")));
    assert!(store.get(&format!("{p}revoked")).await.unwrap().is_none());
    assert!(matches!(store.keep_alive(lease).await, Err(StoreError::LeaseExpired(_))));
    assert!(matches!(store.put(&format!("{p}late"), vec![], Some(lease)).await, Err(StoreError::LeaseExpired(_))));

    // Keep-alives hold a key past its TTL; without them it goes.
    let kept = store.grant(Duration::from_secs(2)).await.unwrap();
    let dropped = store.grant(Duration::from_secs(2)).await.unwrap();
    store.put(&format!("{p}kept"), b"k".to_vec(), Some(kept)).await.unwrap();
    store.put(&format!("{p}dropped"), b"d".to_vec(), Some(dropped)).await.unwrap();
    next_event(&mut watch).await;
    next_event(&mut watch).await;
    let gone = next_event_while(&mut watch, store, kept).await;
    assert!(matches!(&gone, Event::Delete { key, .. } if *key == format!("{p}dropped")), "{gone:?}");
    assert!(store.get(&format!("{p}kept")).await.unwrap().is_some(), "a kept-alive lease keeps its key");
    assert!(matches!(store.keep_alive(dropped).await, Err(StoreError::LeaseExpired(_))));
    store.revoke(kept).await.unwrap();
}

/// The next event on `watch`, keeping `lease` alive while waiting.
async fn next_event_while(watch: &mut crate::Watch, store: &dyn Store, lease: crate::LeaseId) -> Event {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        store.keep_alive(lease).await.unwrap();
        match tokio::time::timeout(Duration::from_millis(500), watch.recv()).await {
            Ok(Some(Ok(event))) => return event,
            Ok(other) => panic!("watch ended: {other:?}"),
            Err(_) if tokio::time::Instant::now() < deadline => continue,
            Err(_) => panic!("no event within {PATIENCE:?}"),
        }
    }
}
