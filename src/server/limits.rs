//! Per-source token buckets: how many new names one address may register.
//!
//! A source is an IPv4 address or an IPv6 prefix: a /64 (one subscriber's
//! prefix, so rotating through its 2^64 addresses buys nothing), and, with
//! a second set of buckets, a /48 (one site's, so rotating through its
//! 65,536 /64s buys little more). Each has a bucket of
//! `burst` tokens refilled at one per `every`; a new name costs one.
//!
//! Only sources that spent tokens lately are remembered: a bucket that has
//! refilled to the burst is just what a forgotten source starts with, so
//! it is dropped at the next sweep (then an idle client costs nothing
//! here). Past `capacity` sources the ones whose clocks are oldest are
//! forgotten too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Which sources a set of buckets counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    /// IPv4 addresses and IPv6 /64s.
    Host,
    /// IPv6 /48s only (IPv4 is not counted: a /24 is often one NAT pool).
    Site,
}

/// Marks an IPv4 source among the /64s: `ff00::/8` is multicast, never a
/// source address, so no IPv6 prefix shares these keys.
const V4_KEY: u64 = 0xff00_0000_0000_0000;

/// The key a source is counted under, if this set counts it.
fn source(prefix: Prefix, addr: SocketAddr) -> Option<u64> {
    let v4 = match addr.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    };
    match (v4, addr.ip(), prefix) {
        (Some(ip), _, Prefix::Host) => Some(V4_KEY | u64::from(u32::from(ip))),
        (Some(_), _, Prefix::Site) => None,
        (None, IpAddr::V6(ip), Prefix::Host) => Some((u128::from(ip) >> 64) as u64),
        (None, IpAddr::V6(ip), Prefix::Site) => Some((u128::from(ip) >> 80) as u64),
        (None, IpAddr::V4(_), _) => None,
    }
}

/// 16 bytes: times are nanoseconds since the set's first `take`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When the bucket last gained (or was last full).
    at: u64,
}

/// Longest between sweeps of the full buckets.
const SWEEP: Duration = Duration::from_secs(60);

/// Token buckets per source.
#[derive(Debug)]
pub struct Buckets {
    prefix: Prefix,
    burst: u32,
    /// Nanoseconds per token.
    every: u64,
    capacity: usize,
    /// What bucket times count from.
    epoch: Option<Instant>,
    buckets: HashMap<u64, Bucket>,
    /// When the full buckets are next dropped.
    next_sweep: u64,
}

impl Buckets {
    /// `burst` tokens per source, one more per `every`, at most `capacity`
    /// sources remembered.
    pub fn new(prefix: Prefix, burst: u32, every: Duration, capacity: usize) -> Self {
        let every = every.max(Duration::from_millis(1));
        Buckets {
            prefix,
            burst: burst.max(1),
            every: u64::try_from(every.as_nanos()).unwrap_or(u64::MAX),
            capacity: capacity.max(1),
            epoch: None,
            buckets: HashMap::new(),
            next_sweep: 0,
        }
    }

    /// Takes a token for `addr` at `now`; `false` if it has none left
    /// (always `true` for a source this set does not count).
    pub fn take(&mut self, now: Instant, addr: SocketAddr) -> bool {
        let Some(key) = source(self.prefix, addr) else {
            return true;
        };
        let epoch = *self.epoch.get_or_insert(now);
        let now =
            u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
        if now >= self.next_sweep
            || (self.buckets.len() >= self.capacity && !self.buckets.contains_key(&key))
        {
            self.sweep(now);
        }
        let (burst, every) = (self.burst, self.every);
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        if bucket.tokens == burst {
            // A full bucket earns nothing while it waits: its next token
            // comes a whole interval after this one is taken.
            bucket.at = bucket.at.max(now);
        }
        // Refill: whole tokens since `at`, keeping the remainder's time.
        let gained = now.saturating_sub(bucket.at) / every;
        if gained > 0 {
            let gained = u32::try_from(gained).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(gained).min(burst);
            bucket.at = if bucket.tokens == burst {
                now
            } else {
                bucket.at + every * u64::from(gained)
            };
        }
        let granted = bucket.tokens > 0;
        if granted {
            bucket.tokens -= 1;
        }
        granted
    }

    /// Drops the buckets full again at `now`; when the table is still at
    /// its capacity, also those with the oldest clocks (down to three
    /// quarters, so a sweep is paid for by many inserts).
    fn sweep(&mut self, now: u64) {
        let (burst, every) = (self.burst, self.every);
        self.buckets.retain(|_, b| {
            let gained = now.saturating_sub(b.at) / every;
            u64::from(b.tokens).saturating_add(gained) < u64::from(burst)
        });
        let keep = self.capacity * 3 / 4;
        if self.buckets.len() >= self.capacity && keep == 0 {
            self.buckets.clear();
        } else if self.buckets.len() >= self.capacity {
            let mut ats: Vec<u64> = self.buckets.values().map(|b| b.at).collect();
            let cut = ats.len() - keep;
            let (_, &mut oldest_kept, _) = ats.select_nth_unstable(cut);
            // Those tied with the oldest kept fill what is left of `keep`
            // (a flood within one instant is still cut down).
            let newer = ats.iter().filter(|&&at| at > oldest_kept).count();
            let mut ties = keep - newer;
            self.buckets.retain(|_, b| {
                let tie = b.at == oldest_kept && ties > 0;
                ties -= usize::from(tie);
                b.at > oldest_kept || tie
            });
        }
        if self.buckets.len() * 4 < self.buckets.capacity() {
            self.buckets.shrink_to_fit();
        }
        // Every bucket left is full within the whole burst's refill time.
        let refill = every.saturating_mul(u64::from(burst));
        self.next_sweep = now.saturating_add(refill.clamp(1_000_000_000, SWEEP.as_nanos() as u64));
    }

    /// Sources remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, a], port))
    }

    #[test]
    fn a_burst_then_one_per_interval() {
        let t = Instant::now();
        let mut b = Buckets::new(Prefix::Host, 3, Duration::from_secs(1), 16);
        for port in 1..=3 {
            assert!(b.take(t, v4(1, port)), "burst token {port}");
        }
        // Another port of the same address is the same source.
        assert!(!b.take(t, v4(1, 9)));
        assert!(!b.take(t + Duration::from_millis(999), v4(1, 9)));
        assert!(b.take(t + Duration::from_secs(1), v4(1, 9)));
        assert!(!b.take(t + Duration::from_millis(1500), v4(1, 9)));
        assert!(b.take(t + Duration::from_secs(2), v4(1, 9)));
        // Other addresses have their own.
        assert!(b.take(t, v4(2, 1)));
        // A long pause refills to the burst, not beyond.
        let later = t + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.take(later, v4(1, 1)));
        }
        assert!(!b.take(later, v4(1, 1)));
    }

    #[test]
    fn an_ipv6_prefix_is_one_source_and_mapped_v4_is_v4() {
        let t = Instant::now();
        let mut b = Buckets::new(Prefix::Host, 1, Duration::from_secs(60), 16);
        let a: SocketAddr = "[2001:db8:1:2::1]:5000".parse().unwrap();
        let same_64: SocketAddr = "[2001:db8:1:2:ffff::9]:5001".parse().unwrap();
        let other_64: SocketAddr = "[2001:db8:1:3::1]:5000".parse().unwrap();
        assert!(b.take(t, a));
        assert!(!b.take(t, same_64));
        assert!(b.take(t, other_64));
        let mapped: SocketAddr = "[::ffff:198.51.100.7]:1".parse().unwrap();
        assert!(b.take(t, mapped));
        assert!(!b.take(t, v4(7, 2)));
        // A site's buckets: one /48 across its /64s, IPv4 not counted.
        let mut site = Buckets::new(Prefix::Site, 2, Duration::from_secs(60), 16);
        assert!(site.take(t, a));
        assert!(site.take(t, other_64));
        let same_48: SocketAddr = "[2001:db8:1:ffff::1]:1".parse().unwrap();
        assert!(!site.take(t, same_48));
        let other_48: SocketAddr = "[2001:db8:2::1]:1".parse().unwrap();
        assert!(site.take(t, other_48));
        for port in 0..10 {
            assert!(site.take(t, v4(9, port)));
        }
        assert!(site.is_empty() || site.len() == 2);
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_the_idlest() {
        let t = Instant::now();
        let mut b = Buckets::new(Prefix::Host, 1, Duration::from_secs(60), 4);
        for a in 0..100u8 {
            b.take(t + Duration::from_millis(u64::from(a)), v4(a, 1));
            assert!(b.len() <= 4);
        }
        // The most recent ones are still counted, so still empty.
        assert!(!b.take(t + Duration::from_secs(1), v4(99, 1)));
        // The first was forgotten: full again.
        assert!(b.take(t + Duration::from_secs(1), v4(0, 1)));
        // A flood within one instant is bounded too, also at capacity 1.
        for capacity in [1, 4] {
            let mut b = Buckets::new(Prefix::Host, 1, Duration::from_secs(60), capacity);
            for a in 0..100u8 {
                b.take(t, v4(a, 1));
                assert!(b.len() <= capacity);
            }
        }
    }

    #[test]
    fn a_bucket_full_again_is_forgotten_and_starts_full() {
        let t = Instant::now();
        let mut b = Buckets::new(Prefix::Host, 2, Duration::from_secs(40), 1000);
        for a in 0..100u8 {
            assert!(b.take(t, v4(a, 1)));
        }
        // Two spent tokens: not full after one interval, so not forgotten.
        assert!(b.take(t, v4(0, 1)));
        assert!(!b.take(t, v4(0, 1)));
        assert_eq!(b.len(), 100);
        // At the sweep (60 s) the buckets with one token spent have
        // refilled and are dropped; the drained one has one of its two
        // back and keeps counting.
        let later = t + SWEEP;
        assert!(b.take(later, v4(200, 1)));
        assert_eq!(b.len(), 2, "the new source and the one still refilling");
        assert!(b.take(later, v4(0, 1)));
        assert!(!b.take(later, v4(0, 1)));
        // A forgotten source starts full.
        assert!(b.take(later, v4(1, 1)) && b.take(later, v4(1, 1)));
    }
}
