//! Per-source token buckets: how many new names one address may register.
//!
//! A source is an IPv4 address or an IPv6 prefix: a /64 (one subscriber's
//! prefix, so rotating through its 2^64 addresses buys nothing), and, with
//! a second set of buckets, a /48 (one site's, so rotating through its
//! 65,536 /64s buys little more). Each has a bucket of
//! `burst` tokens refilled at one per `every`; a new name costs one. The
//! table of buckets is bounded: past `capacity` sources the one idle longest
//! is forgotten (a forgotten source starts full again, which is what it
//! would have refilled to anyway once idle long enough).

use std::collections::{BTreeSet, HashMap};
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

/// The key a source is counted under, if this set counts it.
fn source(prefix: Prefix, addr: SocketAddr) -> Option<(u128, u8)> {
    let v4 = match addr.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    };
    match (v4, addr.ip(), prefix) {
        (Some(ip), _, Prefix::Host) => Some((u128::from(u32::from(ip)), 32)),
        (Some(_), _, Prefix::Site) => None,
        (None, IpAddr::V6(ip), Prefix::Host) => Some((u128::from(ip) >> 64, 64)),
        (None, IpAddr::V6(ip), Prefix::Site) => Some((u128::from(ip) >> 80, 48)),
        (None, IpAddr::V4(_), _) => None,
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: u32,
    /// When the bucket last gained (or was last full).
    at: Instant,
    /// When a token was last asked for.
    used: Instant,
}

/// Token buckets per source.
#[derive(Debug)]
pub struct Buckets {
    prefix: Prefix,
    burst: u32,
    every: Duration,
    capacity: usize,
    buckets: HashMap<(u128, u8), Bucket>,
    /// (last use, source): the order to forget in.
    by_use: BTreeSet<(Instant, (u128, u8))>,
}

impl Buckets {
    /// `burst` tokens per source, one more per `every`, at most `capacity`
    /// sources remembered.
    pub fn new(prefix: Prefix, burst: u32, every: Duration, capacity: usize) -> Self {
        Buckets {
            prefix,
            burst: burst.max(1),
            every: every.max(Duration::from_millis(1)),
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            by_use: BTreeSet::new(),
        }
    }

    /// Takes a token for `addr` at `now`; `false` if it has none left
    /// (always `true` for a source this set does not count).
    pub fn take(&mut self, now: Instant, addr: SocketAddr) -> bool {
        let Some(key) = source(self.prefix, addr) else {
            return true;
        };
        let mut bucket = match self.buckets.get(&key) {
            Some(b) => {
                self.by_use.remove(&(b.used, key));
                *b
            }
            None => {
                if self.buckets.len() >= self.capacity
                    && let Some((_, idlest)) = self.by_use.pop_first()
                {
                    self.buckets.remove(&idlest);
                }
                Bucket {
                    tokens: self.burst,
                    at: now,
                    used: now,
                }
            }
        };
        bucket.used = bucket.used.max(now);
        if bucket.tokens == self.burst {
            // A full bucket earns nothing while it waits: its next token
            // comes a whole interval after this one is taken.
            bucket.at = bucket.at.max(now);
        }
        // Refill: whole tokens since `at`, keeping the remainder's time.
        let elapsed = now.saturating_duration_since(bucket.at);
        let gained = elapsed.as_nanos() / self.every.as_nanos();
        if gained > 0 {
            let gained = u32::try_from(gained).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(gained).min(self.burst);
            bucket.at = if bucket.tokens == self.burst {
                now
            } else {
                bucket.at + self.every * gained
            };
        }
        let granted = bucket.tokens > 0;
        if granted {
            bucket.tokens -= 1;
        }
        self.by_use.insert((bucket.used, key));
        self.buckets.insert(key, bucket);
        granted
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
    }
}
