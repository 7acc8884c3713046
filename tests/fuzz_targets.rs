//! The cargo-fuzz targets (`udpchat::fuzzing`), run inside `cargo test`: on
//! every committed seed, and on a bounded number of inputs from a fixed
//! generator (random bytes and mutated seeds), so CI exercises them without
//! cargo-fuzz or a nightly toolchain.
//!
//! The seeds in fuzz/corpus/<target>/seed-* come from
//! `udpchat::fuzzing::seeds`; after changing the script format, regenerate
//! them with
//!
//! ```text
//! cargo test --test fuzz_targets -- --ignored regenerate_seed_corpus
//! ```

mod inputs;

use std::fs;
use std::path::{Path, PathBuf};

use std::time::Instant;

use inputs::{Rng, mutate};
use udpchat::fuzzing;

/// A fuzz target: panics on a broken invariant.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("decode", fuzzing::decode),
    ("server", |data| fuzzing::server(Instant::now(), data)),
    ("client", |data| fuzzing::client(Instant::now(), data)),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed seeds of a target (`seed-*`; whatever else a local fuzzing
/// run left in the directory is not ours to judge).
fn committed_seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = fs::read_dir(corpus_dir(target))
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with("seed-")
                .then(|| (name, fs::read(e.path()).unwrap()))
        })
        .collect();
    seeds.sort();
    seeds
}

#[test]
fn every_committed_seed_passes() {
    for (target, run) in TARGETS {
        let seeds = committed_seeds(target);
        assert!(!seeds.is_empty(), "no seeds for {target}");
        for (name, data) in seeds {
            eprintln!("{target}/{name}");
            run(&data);
        }
    }
}

#[test]
fn committed_seeds_match_the_generator() {
    for (target, _) in TARGETS {
        let generated: Vec<(String, Vec<u8>)> = {
            let mut v: Vec<_> = fuzzing::seeds()
                .into_iter()
                .filter(|(t, _, _)| *t == target)
                .map(|(_, name, data)| (name, data))
                .collect();
            v.sort();
            v
        };
        assert!(
            committed_seeds(target) == generated,
            "fuzz/corpus/{target} is stale: run \
             cargo test --test fuzz_targets -- --ignored regenerate_seed_corpus"
        );
    }
}

/// Feeds `target` `runs` generated inputs: every `random_every`-th is random
/// bytes (up to `max_len`), the rest mutated committed seeds.
fn generated(
    target: &str,
    rng_seed: u64,
    runs: usize,
    random_every: usize,
    max_len: usize,
    f: Target,
) {
    let seeds = committed_seeds(target);
    let mut rng = Rng(rng_seed);
    for i in 0..runs {
        let data = if i % random_every == 0 {
            rng.bytes(max_len)
        } else {
            let seed = &seeds[rng.below(seeds.len())].1;
            mutate(&mut rng, seed)
        };
        f(&data);
    }
}

#[test]
fn decode_target_on_random_and_mutated_datagrams() {
    generated("decode", 0x5eed_0001, 200_000, 4, 1300, TARGETS[0].1);
}

#[test]
fn server_target_on_random_and_mutated_scripts() {
    generated("server", 0x5eed_0002, 2_000, 3, 2000, TARGETS[1].1);
}

#[test]
fn client_target_on_random_and_mutated_scripts() {
    generated("client", 0x5eed_0003, 2_000, 3, 2000, TARGETS[2].1);
}

/// Rewrites fuzz/corpus/<target>/seed-* from `fuzzing::seeds` (removing
/// seeds it no longer produces).
#[test]
#[ignore = "writes the seed corpus; run by hand after changing the script format"]
fn regenerate_seed_corpus() {
    for (target, _) in TARGETS {
        let dir = corpus_dir(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, _) in committed_seeds(target) {
            fs::remove_file(dir.join(name)).unwrap();
        }
    }
    for (target, name, data) in fuzzing::seeds() {
        fs::write(corpus_dir(target).join(name), data).unwrap();
    }
}
