//! Several servers on one store: which of them is a name's home.
//!
//! Every live server of a cluster knows the same list of live servers (the
//! driver reads it from the store, where each server holds a lease) and
//! picks a name's home by rendezvous (highest random weight) hashing: each
//! server scores `hash(server, name)`, the highest score wins. A server that
//! joins or leaves moves only the names it wins or won, and every server
//! computes the same answer without talking to the others. A server
//! redirects only to a server that scores the name higher than itself, so
//! redirects never go round in a cycle, even while servers disagree on who
//! is live (a lease just ran out): at worst they lead to a dead server,
//! whose silence sends the client round the others again.

use super::*;

/// The servers of a cluster as this one knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cluster {
    /// The address clients reach this server at (as the others list it).
    pub(super) me: SocketAddr,
    /// Every live server, this one included, as clients reach them.
    pub(super) live: Vec<SocketAddr>,
}

impl Cluster {
    /// The home of `name` ([`home`]); never empty: this server is live.
    pub(super) fn home(&self, name: &Name) -> SocketAddr {
        home(name, &self.live).unwrap_or(self.me)
    }
}

/// The home of `name` among the servers `live` (as clients reach them):
/// the one with the highest score, what every server of a cluster that
/// knows the same live servers answers. Ties (two equal 64-bit scores) go
/// to the lower address, so every server still agrees. `None` for no
/// servers.
pub fn home(name: &Name, live: &[SocketAddr]) -> Option<SocketAddr> {
    (live.iter())
        .map(|addr| (score(addr, name), std::cmp::Reverse(*addr)))
        .max()
        .map(|(_, std::cmp::Reverse(addr))| addr)
}

/// A server's weight for a name. Not a secret and not a defence (a user
/// may pick a name that lands anywhere), but it must be the same in every
/// process and every build, so it is spelled out (FNV-1a, then
/// SplitMix64's finaliser to spread FNV's weak low bits) instead of
/// std's `Hasher`, whose output may change between releases.
fn score(server: &SocketAddr, name: &Name) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match server.ip() {
        std::net::IpAddr::V4(ip) => eat(&ip.to_ipv6_mapped().octets()),
        std::net::IpAddr::V6(ip) => eat(&ip.octets()),
    }
    eat(&server.port().to_be_bytes());
    // The name's length first: ("ab", "c") and ("a", "bc") differ.
    eat(&[name.as_str().len() as u8]);
    eat(name.as_str().as_bytes());
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Server {
    /// Joins this server to a cluster of servers sharing its store (the
    /// same static key, too: clients pin it), or updates who is live:
    /// `me` is the address clients reach this server at, `live` every
    /// server whose lease in the store is current (`me` is counted in
    /// whether listed or not). From then on a registration for a name
    /// whose home is another server is answered [`Message::Redirect`].
    /// Clients already online here stay until they register again.
    pub fn set_servers(&mut self, me: SocketAddr, live: &[SocketAddr]) {
        let mut live = live.to_vec();
        live.push(me);
        live.sort_unstable();
        live.dedup();
        self.cluster = Some(Cluster { me, live });
        self.drop_dead_servers();
        self.schedule_deltas(self.now);
    }

    /// How many servers are live in the cluster, this one included (1
    /// alone).
    pub fn cluster_size(&self) -> usize {
        self.cluster.as_ref().map_or(1, |c| c.live.len())
    }

    /// Where `name` registers: this server's address when it is its home
    /// (or when this server is on its own).
    pub fn home_of(&self, name: &Name) -> Option<SocketAddr> {
        self.cluster.as_ref().map(|c| c.home(name))
    }

    /// The server `name` belongs on, when it is not this one.
    pub(super) fn elsewhere(&self, name: &Name) -> Option<SocketAddr> {
        let cluster = self.cluster.as_ref()?;
        let home = cluster.home(name);
        (home != cluster.me).then_some(home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(me: u16, live: &[u16]) -> Cluster {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Cluster {
            me: addr(me),
            live: live.iter().map(|&p| addr(p)).collect(),
        }
    }

    fn names(n: usize) -> Vec<Name> {
        (0..n)
            .map(|i| Name::new(&format!("user{i}")).unwrap())
            .collect()
    }

    #[test]
    fn names_spread_over_the_servers_and_every_server_agrees() {
        let a = cluster(2000, &[2000, 2001, 2002]);
        let b = cluster(2001, &[2002, 2000, 2001]);
        let mut counts = HashMap::new();
        for name in names(3000) {
            assert_eq!(a.home(&name), b.home(&name));
            *counts.entry(a.home(&name)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        // 1000 each expected; a broken hash puts most on one.
        assert!(
            counts.values().all(|&n| (800..1200).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_server_that_leaves_moves_only_its_own_names() {
        let three = cluster(2000, &[2000, 2001, 2002]);
        let two = cluster(2000, &[2000, 2001]);
        let gone = SocketAddr::from(([127, 0, 0, 1], 2002));
        let mut moved = 0;
        for name in names(1000) {
            let before = three.home(&name);
            if before == gone {
                moved += 1;
            } else {
                assert_eq!(two.home(&name), before, "{name} moved needlessly");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn the_score_is_the_same_in_every_build() {
        // Servers of different builds must agree on every home: these are
        // the algorithm above worked out apart from this code (a Python
        // rendering of FNV-1a and SplitMix64's finaliser).
        let a = SocketAddr::from(([127, 0, 0, 1], 2000));
        let b = SocketAddr::from(([192, 0, 2, 7], 4000));
        assert_eq!(
            score(&a, &Name::new("alice").unwrap()),
            0xe427_aa1f_596e_5f6d
        );
        assert_eq!(score(&b, &Name::new("Bob").unwrap()), 0x9200_98c3_6369_9f63);
    }
}
