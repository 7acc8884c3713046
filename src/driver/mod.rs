//! The thin I/O shell around the sans-IO core: one `mio` poll loop per mode
//! that owns the socket (and stdin and the terminal for the client), reads
//! the clock, feeds the state machine and flushes what it produces. No
//! protocol logic lives here.

pub mod client;
pub mod cluster;
pub mod commits;
pub mod keys;
pub mod postgres;
mod rows;
pub mod server;
pub mod sqlite;
pub mod term;

use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

/// Receive buffer: larger than any valid datagram, so an oversize one is
/// seen as oversize rather than silently truncated to a valid length.
const RECV_BUF: usize = 2048;
/// Datagrams read per loop turn before timers and output get their turn, so
/// a flood cannot starve them.
const READ_BURST: usize = 256;

/// The socket's readiness token in both loops.
pub(crate) const SOCKET: Token = Token(0);
/// SIGINT, SIGTERM and SIGHUP, in both loops.
pub(crate) const SIGNALS: Token = Token(1);

/// Makes a bound socket non-blocking and registers it, and the signals that
/// end a process (SIGINT, SIGTERM, SIGHUP), with a new poll.
pub(crate) fn listen(socket: UdpSocket) -> Result<(mio::net::UdpSocket, Poll, Signals), Fatal> {
    socket.set_nonblocking(true).map_err(io_fatal)?;
    let mut socket = mio::net::UdpSocket::from_std(socket);
    let poll = Poll::new().map_err(io_fatal)?;
    poll.registry()
        .register(&mut socket, SOCKET, Interest::READABLE)
        .map_err(io_fatal)?;
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(io_fatal)?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(io_fatal)?;
    Ok((socket, poll, signals))
}

/// Sleeps until something is ready or `deadline` passes (at once when
/// `busy`). A signal interrupting the wait counts as a wake-up.
pub(crate) fn wait(
    poll: &mut Poll,
    events: &mut Events,
    deadline: Option<Instant>,
    busy: bool,
) -> Result<(), Fatal> {
    let timeout = if busy {
        Some(Duration::ZERO)
    } else {
        deadline.map(|t| t.saturating_duration_since(Instant::now()))
    };
    match poll.poll(events, timeout) {
        Err(e) if e.kind() != io::ErrorKind::Interrupted => Err(io_fatal(e)),
        _ => Ok(()),
    }
}

/// Feeds up to [`READ_BURST`] datagrams to `handle` (mio is edge-triggered:
/// the socket must be read until `WouldBlock`, but a flood must not starve
/// timers and output). Returns whether more may be waiting.
pub(crate) fn read_burst(
    socket: &mio::net::UdpSocket,
    buf: &mut [u8],
    mut handle: impl FnMut(SocketAddr, &[u8]),
) -> bool {
    for _ in 0..READ_BURST {
        match socket.recv_from(buf) {
            Ok((n, from)) => handle(canonical(from), &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            // Interrupted, or an ICMP error from an earlier send surfacing
            // here on Linux: neither says anything about the next datagram.
            Err(_) => {}
        }
    }
    true
}

/// Datagrams handed to the kernel in one `sendmmsg` call, at most.
pub(crate) const SEND_BATCH: usize = 64;

/// Sends every datagram of `batch` (emptying it), [`SEND_BATCH`] per
/// `sendmmsg` call instead of a `sendto` each: the server's fan-outs and
/// page windows are bursts. A datagram the kernel refuses (a full buffer,
/// an unreachable address) is skipped: UDP is lossy anyway, and the
/// protocol's retries cover it.
pub(crate) fn send_all(socket: &impl std::os::fd::AsRawFd, batch: &mut Vec<crate::Transmit>) {
    let fd = socket.as_raw_fd();
    let v6 = family_is_v6(fd);
    let mut at = 0;
    while at < batch.len() {
        let chunk = &batch[at..batch.len().min(at + SEND_BATCH)];
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            chunk.iter().map(|t| sockaddr(&on_wire(t.to, v6))).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|t| libc::iovec {
                iov_base: t.payload.as_ptr() as *mut libc::c_void,
                iov_len: t.payload.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter_mut()
            .zip(iovs.iter_mut())
            .map(|((addr, len), iov)| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid
                // empty header, filled in below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (addr as *mut libc::sockaddr_storage).cast();
                m.msg_hdr.msg_namelen = *len;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` holds `msgs.len()` initialised headers whose name
        // and iovec pointers point into `addrs`, `iovs` and the payloads of
        // `batch`, all alive and unmoved until the call returns; the kernel
        // only reads them (and writes each header's `msg_len`).
        let sent = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
        // At least the first was not sent (an error): skip it, go on.
        at += usize::try_from(sent).unwrap_or(0).max(1);
    }
    batch.clear();
}

/// An IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:p`, how a dual-stack
/// socket reports an IPv4 peer) as the plain IPv4 address it is, so the
/// core — its table, logs, store and per-source limits — sees one spelling
/// per host (a mapped address would also put every IPv4 host in one IPv6
/// /64 bucket).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `addr` as a socket of the given family takes it: an IPv6 (dual-stack)
/// socket reaches an IPv4 host through its IPv4-mapped address.
pub(crate) fn on_wire(addr: SocketAddr, v6_socket: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
        }
        _ => addr,
    }
}

/// Whether the socket `fd` is an IPv6 one (read from the kernel).
fn family_is_v6(fd: libc::c_int) -> bool {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` are live locals; the kernel writes at
    // most `len` bytes into `storage`. A bad fd is an error return.
    let rc = unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &raw mut len) };
    rc == 0 && libc::c_int::from(storage.ss_family) == libc::AF_INET6
}

/// `addr` as a C socket address and its length.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in; the write stays inside `storage`.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// An I/O failure as the line the user sees.
pub(crate) fn io_fatal(e: io::Error) -> Fatal {
    Fatal(format!("error: {e}"))
}

/// What a driver failed at, as the one line the user sees.
#[derive(Debug)]
pub struct Fatal(pub String);

/// Binds a UDP socket, turning "address in use" into the exact message the
/// specification asks for. `[::]` is dual-stack: one socket for IPv6 and
/// IPv4 (whatever `net.ipv6.bindv6only` says), and where the host has no
/// IPv6 it falls back to `0.0.0.0`.
pub(crate) fn bind(addr: SocketAddr) -> Result<UdpSocket, Fatal> {
    let bound = if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        match bind_dual_stack(addr) {
            Err(e) if no_ipv6(&e) => UdpSocket::bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                addr.port(),
            )),
            other => other,
        }
    } else {
        UdpSocket::bind(addr)
    };
    match bound {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Fatal(format!(
            "error: port {} is already in use",
            addr.port()
        ))),
        Err(e) => Err(Fatal(format!("error: cannot bind {addr}: {e}"))),
    }
}

/// `[::]:port` with `IPV6_V6ONLY` cleared (it must be, before `bind`).
fn bind_dual_stack(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Whether a failed IPv6 bind says the host has no IPv6 (the kernel
/// without it, or `ipv6.disable=1`) rather than anything about the port.
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Socket buffer sizes asked of the kernel: (receive, send).
pub(crate) const SERVER_BUFFERS: (usize, usize) = (16 << 20, 4 << 20);

/// Asks for `want` bytes of receive and send buffer and returns what the
/// kernel granted, read back (Linux counts its bookkeeping in, so it
/// reports up to twice the request). `SO_RCVBUF` is capped by
/// `net.core.rmem_max` (`wmem_max` for sending); a process with
/// `CAP_NET_ADMIN` then gets the full size through the `…FORCE` options.
/// Best effort: a failure leaves the default.
pub(crate) fn size_buffers(
    socket: &impl std::os::fd::AsRawFd,
    want: (usize, usize),
) -> (usize, usize) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let one = |size: usize, plain: libc::c_int, force: libc::c_int| -> usize {
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        if sockopt(fd, plain) < i64::from(size) {
            set_sockopt(fd, plain, size);
        }
        if sockopt(fd, plain) < i64::from(size) {
            set_sockopt(fd, force, size);
        }
        usize::try_from(sockopt(fd, plain)).unwrap_or(0)
    };
    (
        one(want.0, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        one(want.1, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    )
}

/// `getsockopt(SOL_SOCKET, opt)` as an integer, or -1.
fn sockopt(fd: libc::c_int, opt: libc::c_int) -> i64 {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes passed; the
    // kernel writes at most `len` bytes into `value`. A bad fd or option is
    // an error return, not undefined behaviour.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { i64::from(value) } else { -1 }
}

/// `setsockopt(SOL_SOCKET, opt, value)`; failures (no permission for a
/// `…FORCE` option) leave the socket as it was.
fn set_sockopt(fd: libc::c_int, opt: libc::c_int, value: libc::c_int) {
    // SAFETY: the kernel reads `size_of::<c_int>()` bytes from `value`, a
    // live local of that size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// 32 bytes from the OS for tokens and ids.
pub(crate) fn random_seed() -> Result<[u8; 32], Fatal> {
    let mut seed = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| Fatal(format!("error: cannot read /dev/urandom: {e}")))?;
    Ok(seed)
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `at` as RFC 3339 in UTC to the millisecond: `2026-12-06T21:15:03.042Z`
/// (the server log's stamp; a time before 1970 is written as 1970).
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, day_secs) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's `civil_from_days`), for days
    // since 1970-01-01, which are never negative here.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60,
        since.subsec_millis()
    )
}

/// Renders a Unix time as local `YYYY-MM-DD HH:MM:SS`.
pub fn local_time(unix: i64) -> String {
    // SAFETY: `tm` is plain old data that localtime_r fills in; both pointers
    // are valid for the call. std has no local-time conversion, hence libc.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let t: libc::time_t = unix as libc::time_t;
        if libc::localtime_r(&t, &mut tm).is_null() {
            return format!("@{unix}");
        }
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        i64::from(tm.tm_year) + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn rfc3339_stamps_in_utc_to_the_millisecond() {
        let at = |secs: u64, millis: u64| {
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
        };
        assert_eq!(rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1700000000`: Tue Nov 14 22:13:20 UTC 2023.
        assert_eq!(rfc3339(at(1_700_000_000, 7)), "2023-11-14T22:13:20.007Z");
        // A leap day, and the last second of a leap year.
        assert_eq!(rfc3339(at(951_782_400, 999)), "2000-02-29T00:00:00.999Z");
        assert_eq!(rfc3339(at(1_735_689_599, 0)), "2024-12-31T23:59:59.000Z");
        assert_eq!(rfc3339(at(4_102_444_800, 0)), "2100-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn local_time_has_the_console_format() {
        let s = local_time(1_700_000_000);
        let b = s.as_bytes();
        assert_eq!(s.len(), 19, "{s}");
        for (i, c) in b.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*c, b'-'),
                10 => assert_eq!(*c, b' '),
                13 | 16 => assert_eq!(*c, b':'),
                _ => assert!(c.is_ascii_digit(), "{s}"),
            }
        }
    }

    #[test]
    fn socket_buffers_grow_to_what_the_kernel_allows() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = (sockopt(socket.as_raw_fd(), libc::SO_RCVBUF), 0);
        let want = (8 << 20, 2 << 20);
        let (recv, send) = size_buffers(&socket, want);
        assert_eq!(recv as i64, sockopt(socket.as_raw_fd(), libc::SO_RCVBUF));
        assert_eq!(send as i64, sockopt(socket.as_raw_fd(), libc::SO_SNDBUF));
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root may exceed net.core.rmem_max: the full size, doubled
            // for the kernel's bookkeeping.
            assert!(recv >= want.0 && send >= want.1, "{recv} {send}");
        } else {
            assert!(recv as i64 >= before.0, "{recv} < {before:?}");
        }
    }

    #[test]
    fn a_batch_reaches_every_address_in_order() {
        let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = UdpSocket::bind("[::1]:0").ok();
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let sender6 = UdpSocket::bind("[::1]:0").ok();
        let to4 = v4.local_addr().unwrap();
        // More than one call's worth, to both kinds of address.
        let mut batch: Vec<crate::Transmit> = (0..SEND_BATCH as u32 * 2 + 5)
            .map(|i| crate::Transmit {
                to: to4,
                payload: i.to_le_bytes().to_vec(),
                what: crate::wire::What::Delta,
            })
            .collect();
        send_all(&sender, &mut batch);
        assert!(batch.is_empty());
        v4.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        for i in 0..SEND_BATCH as u32 * 2 + 5 {
            let (n, from) = v4.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], i.to_le_bytes());
            assert_eq!(from, sender.local_addr().unwrap());
        }
        // IPv6, where the machine has it.
        if let (Some(v6), Some(sender6)) = (v6, sender6) {
            let to6 = v6.local_addr().unwrap();
            let mut batch = vec![crate::Transmit {
                to: to6,
                payload: b"six".to_vec(),
                what: crate::wire::What::Delta,
            }];
            send_all(&sender6, &mut batch);
            v6.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (n, _) = v6.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"six");
        }
    }

    #[test]
    fn binding_a_taken_port_gives_the_specified_message() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let Err(Fatal(msg)) = bind(addr) else {
            panic!("bound a taken port")
        };
        assert_eq!(
            msg,
            format!("error: port {} is already in use", addr.port())
        );
        // The dual-stack socket wants the IPv4 port too.
        let taken = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let Err(Fatal(msg)) = bind(SocketAddr::from(([0u16; 8], port))) else {
            panic!("bound [::] on a port taken on 0.0.0.0")
        };
        assert_eq!(msg, format!("error: port {port} is already in use"));
    }

    #[test]
    fn mapped_addresses_are_plain_ipv4_inside_and_mapped_on_the_wire() {
        let v4: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        assert_eq!(canonical(mapped), v4);
        assert_eq!(canonical(v4), v4);
        assert_eq!(canonical(v6), v6);
        assert_eq!(on_wire(v4, true), mapped);
        assert_eq!(on_wire(v4, false), v4);
        assert_eq!(on_wire(v6, true), v6);
    }

    #[test]
    fn the_dual_stack_socket_hears_and_answers_ipv4_as_plain_ipv4() {
        let socket = bind(SocketAddr::from(([0u16; 8], 0))).unwrap();
        let port = socket.local_addr().unwrap().port();
        let (socket, mut poll, _signals) = listen(socket).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"ping", ("127.0.0.1", port)).unwrap();
        let mut froms = Vec::new();
        let mut buf = [0u8; RECV_BUF];
        let mut events = Events::with_capacity(4);
        let deadline = Instant::now() + Duration::from_secs(10);
        while froms.is_empty() && Instant::now() < deadline {
            wait(&mut poll, &mut events, Some(deadline), false).unwrap();
            read_burst(&socket, &mut buf, |from, data| {
                froms.push((from, data.to_vec()));
            });
        }
        assert_eq!(froms, [(peer.local_addr().unwrap(), b"ping".to_vec())]);
        let mut batch = vec![crate::Transmit {
            to: peer.local_addr().unwrap(),
            payload: b"pong".to_vec(),
            what: crate::wire::What::Initial,
        }];
        send_all(&socket, &mut batch);
        peer.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 16];
        let (n, from) = peer.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], b"pong");
        assert_eq!(from.port(), port);
    }
}
