//! Where a lone durable grant's time goes below the engine: one grant's
//! four sled inserts (lease, two indexes, audit record), sled's `flush()`
//! (it seals its IO buffer, writes it on its own thread pool and waits for
//! `sync_file_range`), then the `fdatasync` the store adds, and a bare
//! 4 KiB write + `fdatasync` on the same disk for the floor.
//! `cargo bench --bench sync_path -- [rounds]` (default 3000).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark driver")]

use std::io::{Seek as _, Write as _};
use std::time::Instant;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    let rounds: usize = std::env::args()
        .filter_map(|a| a.parse().ok())
        .next()
        .unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).open().unwrap();
    let trees: Vec<_> = ["leases", "lease_expiry", "leases_by_subject", "audit"]
        .iter()
        .map(|t| db.open_tree(t).unwrap())
        .collect();
    let data = std::fs::File::open(dir.path().join("db")).unwrap();
    let mut probe = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.path().join("probe"))
        .unwrap();
    let (value, block) = (vec![7u8; 250], [0x5au8; 4096]);
    let (mut ins, mut flush, mut sync, mut floor) = (vec![], vec![], vec![], vec![]);
    for i in 0..rounds {
        let key = format!("l_{i:016x}");
        let t0 = Instant::now();
        for t in &trees {
            t.insert(key.as_bytes(), value.as_slice()).unwrap();
        }
        let t1 = Instant::now();
        db.flush().unwrap();
        let t2 = Instant::now();
        data.sync_data().unwrap();
        let t3 = Instant::now();
        probe.seek(std::io::SeekFrom::Start(0)).unwrap();
        probe.write_all(&block).unwrap();
        probe.sync_data().unwrap();
        let t4 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        ins.push(ms(t0, t1));
        flush.push(ms(t1, t2));
        sync.push(ms(t2, t3));
        floor.push(ms(t3, t4));
    }
    for (name, v) in [
        ("4 sled inserts", &mut ins),
        ("sled flush()", &mut flush),
        ("fdatasync of sled's file", &mut sync),
        ("disk floor: 4 KiB write + fdatasync", &mut floor),
    ] {
        println!(
            "{name:38} p50 {:.3} ms  p99 {:.3} ms",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
}
