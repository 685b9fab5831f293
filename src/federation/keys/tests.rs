// Test-only: declared `#[cfg(test)]` by its parent module (its unwraps are test code).
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::federation::testkit::TestKey;

/// Fetches of the test issuer so far, as metrics count them.
fn fetches(counter: &FetchCounter) -> u64 {
    ["ok", "failed"]
        .iter()
        .map(|o| {
            counter
                .get_or_create(&vec![
                    ("issuer".to_owned(), "test".to_owned()),
                    ("outcome".to_owned(), (*o).to_owned()),
                ])
                .get()
        })
        .sum()
}

fn file_cache(
    dir: &tempfile::TempDir,
    keys: &[&TestKey],
) -> (Arc<KeyCache>, std::path::PathBuf, FetchCounter) {
    let path = dir.path().join("jwks.json");
    let set = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    std::fs::write(&path, set.to_string()).unwrap();
    let counter = FetchCounter::default();
    let cache = KeyCache::new("test", Source::File(path.clone()), counter.clone());
    (Arc::new(cache), path, counter)
}

/// Issue 24: random unknown `kid`s cost at most one fetch per 30 s, however
/// many arrive, and concurrent misses share one fetch.
#[tokio::test(start_paused = true)]
async fn random_unknown_kids_cause_at_most_one_fetch_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new("known");
    let (cache, _, counter) = file_cache(&dir, &[&key]);
    let mut misses = Vec::new();
    for i in 0..10_000u32 {
        let c = cache.clone();
        misses.push(tokio::spawn(
            async move { c.key(&format!("random-{i}")).await },
        ));
    }
    for m in misses {
        assert!(m.await.unwrap().is_none());
    }
    assert_eq!(fetches(&counter), 1, "10,000 concurrent misses");
    assert!(cache.key("known").await.is_some());
    for i in 0..10_000u32 {
        assert!(cache.key(&format!("again-{i}")).await.is_none());
    }
    assert_eq!(fetches(&counter), 1, "inside the interval");
    tokio::time::advance(MISS_INTERVAL).await;
    for i in 0..10_000u32 {
        assert!(cache.key(&format!("later-{i}")).await.is_none());
    }
    assert_eq!(fetches(&counter), 2, "one more after 30 s");
}

#[tokio::test(start_paused = true)]
async fn a_new_key_is_found_once_the_interval_allows_and_a_failed_fetch_keeps_the_last_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (TestKey::new("old"), TestKey::new("new"));
    let (cache, path, _) = file_cache(&dir, &[&old]);
    assert!(cache.key("old").await.is_some());
    std::fs::write(&path, json!({"keys": [old.jwk(), new.jwk()]}).to_string()).unwrap();
    assert!(
        cache.key("new").await.is_none(),
        "fetched less than 30 s ago"
    );
    tokio::time::advance(MISS_INTERVAL).await;
    assert!(cache.key("new").await.is_some());
    std::fs::write(&path, "not json").unwrap();
    cache.refresh().await;
    assert!(cache.key("old").await.is_some(), "the last good keys stay");
    assert!(cache.has_keys());
    tokio::time::advance(STALE).await;
    assert!(
        cache.key("old").await.is_none(),
        "a day without a good fetch"
    );
    assert!(!cache.has_keys());
}
