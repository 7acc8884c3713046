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

use std::fs;
use std::path::{Path, PathBuf};

use std::time::Instant;

use udpchat::fuzzing;

/// A fuzz target: panics on a broken invariant.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 3] = [
    ("decode", fuzzing::decode),
    ("server", |data| fuzzing::server(Instant::now(), data)),
    ("client", |data| fuzzing::client(Instant::now(), data)),
];

/// A small deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

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

/// A seed with a few bytes changed, cut, duplicated or extended: the kind
/// of input a fuzzer tries first.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..=rng.below(6) {
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] = rng.next() as u8;
            }
            1 => d.truncate(rng.below(d.len() + 1)),
            2 => {
                let at = rng.below(d.len() + 1);
                let extra = rng.bytes(8);
                d.splice(at..at, extra);
            }
            3 if !d.is_empty() => {
                let from = rng.below(d.len());
                let to = from + rng.below(d.len() - from + 1);
                let copy = d[from..to].to_vec();
                d.extend(copy);
            }
            _ if !d.is_empty() => {
                let i = rng.below(d.len());
                d[i] ^= 1 << rng.below(8);
            }
            _ => {}
        }
    }
    d
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

#[test]
fn decode_target_on_random_and_mutated_datagrams() {
    let seeds = committed_seeds("decode");
    let mut rng = Rng(0x5eed_0001);
    for i in 0..200_000 {
        let data = if i % 4 == 0 {
            rng.bytes(1300)
        } else {
            let seed = &seeds[rng.below(seeds.len())].1;
            mutate(&mut rng, seed)
        };
        fuzzing::decode(&data);
    }
}

#[test]
fn server_target_on_random_and_mutated_scripts() {
    let seeds = committed_seeds("server");
    let mut rng = Rng(0x5eed_0002);
    for i in 0..10_000 {
        let data = if i % 3 == 0 {
            rng.bytes(2000)
        } else {
            let seed = &seeds[rng.below(seeds.len())].1;
            mutate(&mut rng, seed)
        };
        fuzzing::server(Instant::now(), &data);
    }
}

#[test]
fn client_target_on_random_and_mutated_scripts() {
    let seeds = committed_seeds("client");
    let mut rng = Rng(0x5eed_0003);
    for i in 0..10_000 {
        let data = if i % 3 == 0 {
            rng.bytes(2000)
        } else {
            let seed = &seeds[rng.below(seeds.len())].1;
            mutate(&mut rng, seed)
        };
        fuzzing::client(Instant::now(), &data);
    }
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
