//! Durable saves per second through [`SqliteStore`] (WAL, `synchronous=FULL`,
//! so every commit waits for the disk): one commit per message against group
//! commit, on the same run and the same disk. `cargo bench --bench durable`.
//!
//! Each mode commits until it has spent about `UDPCHAT_BENCH_SECS` (default
//! 1.5) seconds in `commit`, and at least 500 times, so the figures hold on a
//! fast SSD and on a slow disk alike. `UDPCHAT_BENCH_DIR` picks the directory
//! (default: the system temp dir; on a tmpfs it measures nothing durable).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use udpchat::crypto::PublicKey;
use udpchat::driver::sqlite::SqliteStore;
use udpchat::store::{Body, Store, StoreOp, StoredMail};
use udpchat::wire::{MailId, MsgId, Name};

/// Mail per commit: 1 is the naive driver; 16 and 64 are what one loop
/// iteration gathers under load.
const MODES: [(&str, usize); 3] = [
    ("one commit per message", 1),
    ("group commit, 16 per batch", 16),
    ("group commit, 64 per batch", 64),
];

/// A typical chat line, not the 1000-byte maximum.
const TEXT_BYTES: usize = 120;

/// Fewest commits per mode, however fast the disk.
const MIN_COMMITS: usize = 500;

fn main() {
    let base = std::env::var_os("UDPCHAT_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("udpchat-durable-bench-{}", std::process::id()));
    let budget = std::env::var("UDPCHAT_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::from_millis(1500));
    println!(
        "SQLite {} (WAL, synchronous=FULL) in {}",
        rusqlite::version(),
        base.display()
    );
    println!("mode, messages, seconds, saves/s");
    let result = MODES
        .iter()
        .try_for_each(|&(label, batch)| run(&base, label, batch, budget));
    let _ = std::fs::remove_dir_all(&base);
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Stores messages in commits of `batch`, in a fresh database, until
/// `budget` is spent in `commit`; prints one line.
fn run(base: &Path, label: &str, batch: usize, budget: Duration) -> Result<(), String> {
    let dir = base.join(format!("batch-{batch}"));
    let mut store = SqliteStore::open(&dir).map_err(|e| e.to_string())?;
    let mut spent = Duration::ZERO;
    let mut commits = 0;
    let mut n = 0;
    while spent < budget || commits < MIN_COMMITS {
        // Built outside the timed part: only the store is measured.
        let ops: Vec<StoreOp> = (n..n + batch).map(message).collect::<Result<_, _>>()?;
        let start = Instant::now();
        store.commit(&ops).map_err(|e| e.to_string())?;
        spent += start.elapsed();
        commits += 1;
        n += batch;
    }
    let secs = spent.as_secs_f64();
    println!("{label}, {n}, {secs:.3}, {:.0}", n as f64 / secs);
    Ok(())
}

/// The `i`th save: 64 recipients, 64 senders, unique message ids.
fn message(i: usize) -> Result<StoreOp, String> {
    let name = |prefix: &str, k: usize| {
        Name::new(&format!("{prefix}{}", k % 64)).map_err(|e| format!("bench name: {e}"))
    };
    let i = i as u64;
    Ok(StoreOp::Put(StoredMail {
        mail: MailId(i + 1),
        to: name("user", i as usize)?,
        from: name("peer", (i / 64) as usize)?,
        channel: false,
        stored_at: 1_700_000_000,
        id: MsgId(i),
        // A sealed message of this many text bytes is this long: what the
        // store writes is the seal, not the text.
        body: Body::Sealed {
            key: PublicKey([7; 32]),
            sealed: vec![0x5a; TEXT_BYTES + 11 + udpchat::crypto::SEALED_OVERHEAD],
        },
    }))
}
