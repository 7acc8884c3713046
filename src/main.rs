//! `udpchat -s <port>` runs the server; `udpchat -c <name> <server-ip>
//! <server-port> <client-port>` runs a client.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use udpchat::driver::{self, Fatal};
use udpchat::wire::Name;

const USAGE: &str = "usage: udpchat -s <port> [options] | udpchat -c <name> <server-ip> <server-port> <client-port> [--key FILE] [--heartbeat SECS] [--timestamps] [--server IP:PORT]... | udpchat --release <name> [--data-dir DIR | --store URL]";

const HELP: &str = "
  -s <port>               run the registry server on <port> (1024-65535)
    --bind ADDR           listen on ADDR only (default [::], which takes IPv4 too;
                          0.0.0.0 where the host has no IPv6)
    --data-dir DIR        keep the registry and mailboxes in DIR (default ./udpchat-data)
    --store URL           keep them in PostgreSQL instead (postgres://user@host:port,host2:port/db,
                          every node of a replicated cluster); DIR then holds only server.key
    --advertise IP:PORT   with --store: one of several servers on it, reached by clients at
                          IP:PORT (names are spread over the live servers; give every one
                          the same server.key)
    --mailbox-messages N  most messages kept for one client (default 1000)
    --mailbox-bytes N     most bytes kept for one client (default 1048576)
    --store-bytes N       most bytes kept in all (default 268435456)
    --max-clients N       most names in the registry (default 100000)
    --names-per-source N  new names one IPv4 address or IPv6 /64 registers at once, then one per 10 s (default 64)
    --requests-per-source N
                          requests one IPv4 address or IPv6 /64 sends at once, then N/2 a second (default 2000)
    --mail-ttl AGE        delete mail undelivered after AGE: N with s, m, h or d, or 'never' (default 30d)
    --name-ttl AGE        forget names not online for AGE, with no mail to or from them (default 365d)
    --heartbeat SECS      the clients' heartbeat interval; 3 missed = offline (default 10)
    --summary-every AGE   log a summary line this often, or 'never' (default 60s)
  -c <name> <server-ip> <server-port> <client-port>
                          run a client named <name> on <client-port>
    --key FILE            the key that owns <name> (default $XDG_CONFIG_HOME/udpchat/<name>.key,
                          else ~/.config/udpchat/<name>.key; created on first start)
    --heartbeat SECS      tell the server every SECS seconds that you are here (default 10)
    --timestamps          start each line of what happens with the local time (HH:MM:SS)
    --server IP:PORT      another server of the same cluster: tried when the first is
                          silent (may be given more than once)
  --release <name>        (server stopped) free <name> in --data-dir (or --store URL): the
                          next key to register it owns it; its stored messages are deleted
  -h, --help              show this help
  -V, --version           show the version";

/// Flags only the server takes.
const SERVER_ONLY: [&str; 13] = [
    "advertise",
    "bind",
    "data-dir",
    "store",
    "mailbox-messages",
    "mailbox-bytes",
    "store-bytes",
    "max-clients",
    "mail-ttl",
    "name-ttl",
    "names-per-source",
    "requests-per-source",
    "summary-every",
];

enum Mode {
    Server(driver::server::Options),
    Client(driver::client::Options),
    Release {
        name: Name,
        data_dir: PathBuf,
        store: Option<String>,
    },
    Help,
    Version,
}

/// The arguments as text: one that is not UTF-8 (a name, a path) is a bad
/// argument like any other, said so, not a panic.
fn args() -> Result<Vec<String>, String> {
    let args = std::env::args_os().skip(1).enumerate();
    args.map(|(i, arg)| {
        arg.into_string().map_err(|arg| {
            let shown = arg.to_string_lossy();
            format!("argument {} ({shown:?}) is not valid UTF-8", i + 1)
        })
    })
    .collect()
}

fn main() -> ExitCode {
    let mode = match args().and_then(|args| parse(&args)) {
        Ok(mode) => mode,
        Err(why) => {
            eprintln!("error: {why}");
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match mode {
        Mode::Help => {
            println!("{USAGE}\n{HELP}");
            return ExitCode::SUCCESS;
        }
        Mode::Version => {
            println!("udpchat {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Mode::Server(options) => driver::server::run(options),
        Mode::Client(options) => driver::client::run(options),
        Mode::Release {
            name,
            data_dir,
            store,
        } => driver::server::release(&data_dir, store.as_deref(), &name),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(Fatal(line)) => {
            eprintln!("{line}");
            ExitCode::from(1)
        }
    }
}

fn parse(args: &[String]) -> Result<Mode, String> {
    let mut opts = getopts::Options::new();
    opts.optopt("s", "", "run the server", "PORT");
    opts.optopt("c", "", "run a client", "NAME");
    opts.optopt("", "bind", "server listen address", "ADDR");
    opts.optopt("", "data-dir", "server data directory", "DIR");
    opts.optopt("", "store", "PostgreSQL connection string", "URL");
    opts.optopt(
        "",
        "advertise",
        "this server's address among several",
        "IP:PORT",
    );
    opts.optmulti("", "server", "another server of the cluster", "IP:PORT");
    opts.optopt("", "mailbox-messages", "messages per mailbox", "N");
    opts.optopt("", "mailbox-bytes", "bytes per mailbox", "N");
    opts.optopt("", "store-bytes", "bytes stored in all", "N");
    opts.optopt("", "max-clients", "names in the registry", "N");
    opts.optopt("", "mail-ttl", "how long undelivered mail is kept", "AGE");
    opts.optopt("", "name-ttl", "how long a name not online is kept", "AGE");
    opts.optopt("", "names-per-source", "new names per address", "N");
    opts.optopt("", "requests-per-source", "requests per address", "N");
    opts.optopt("", "heartbeat", "heartbeat interval", "SECS");
    opts.optopt("", "summary-every", "how often the log sums up", "AGE");
    opts.optflag("", "timestamps", "live lines start with the time");
    opts.optopt("", "key", "client key file", "FILE");
    opts.optopt("", "release", "release a name", "NAME");
    opts.optflag("h", "help", "show help");
    opts.optflag("V", "version", "show the version");
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("h") {
        return Ok(Mode::Help);
    }
    if m.opt_present("V") {
        return Ok(Mode::Version);
    }
    let heartbeat = parse_heartbeat(m.opt_str("heartbeat"))?;
    let data_dir = match m.opt_str("data-dir") {
        Some(d) if d.is_empty() => return Err("--data-dir: an empty path".to_string()),
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("udpchat-data"),
    };
    if let Some(name) = m.opt_str("release") {
        if m.opt_present("s") || m.opt_present("c") {
            return Err("--release goes alone (with --data-dir or --store)".to_string());
        }
        if let Some(extra) = m.free.first() {
            return Err(format!("unexpected argument '{extra}'"));
        }
        let name = Name::new(&name).map_err(|e| format!("name '{name}': {e}"))?;
        let store = m.opt_str("store");
        return Ok(Mode::Release {
            name,
            data_dir,
            store,
        });
    }
    if m.opt_present("key") && !m.opt_present("c") {
        return Err("--key goes with -c".to_string());
    }
    if m.opt_present("timestamps") && !m.opt_present("c") {
        return Err("--timestamps goes with -c".to_string());
    }
    if m.opt_present("server") && !m.opt_present("c") {
        return Err("--server goes with -c".to_string());
    }
    match (m.opt_str("s"), m.opt_str("c")) {
        (Some(_), Some(_)) => Err("-s and -c cannot be combined".to_string()),
        (Some(port), None) => {
            if let Some(extra) = m.free.first() {
                return Err(format!("unexpected argument '{extra}'"));
            }
            let port = parse_port("port", &port)?;
            let ip = match m.opt_str("bind") {
                Some(ip) => parse_ip("--bind", &ip)?,
                None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let limit = |flag: &str, default: usize| match m.opt_str(flag) {
                Some(n) => parse_count(flag, &n),
                None => Ok(default),
            };
            let store = match m.opt_str("store") {
                Some(url) if url.trim().is_empty() => {
                    return Err("--store: an empty connection string".to_string());
                }
                Some(url) => Some(url),
                None => None,
            };
            let advertise = match m.opt_str("advertise") {
                Some(_) if store.is_none() => {
                    return Err(
                        "--advertise goes with --store (several servers share one database)"
                            .to_string(),
                    );
                }
                Some(a) => Some(parse_server_addr("--advertise", &a)?),
                None => None,
            };
            Ok(Mode::Server(driver::server::Options {
                addr: SocketAddr::new(ip, port),
                data_dir,
                store,
                advertise,
                heartbeat,
                mailbox_messages: limit("mailbox-messages", 1000)?,
                mailbox_bytes: limit("mailbox-bytes", 1 << 20)?,
                store_bytes: limit("store-bytes", 256 << 20)?,
                max_clients: limit("max-clients", 100_000)?,
                mail_ttl: parse_age("mail-ttl", m.opt_str("mail-ttl"), udpchat::server::MAIL_TTL)?,
                name_ttl: parse_age("name-ttl", m.opt_str("name-ttl"), udpchat::server::NAME_TTL)?,
                names_per_source: limit("names-per-source", 64)?,
                requests_per_source: limit("requests-per-source", 2000)?,
                summary_every: parse_age(
                    "summary-every",
                    m.opt_str("summary-every"),
                    Duration::from_secs(60),
                )?,
            }))
        }
        (None, Some(name)) => {
            if let Some(flag) = SERVER_ONLY.iter().find(|f| m.opt_present(f)) {
                return Err(format!("--{flag} goes with -s"));
            }
            let name = Name::new(&name)
                .map_err(|e| format!("name '{name}': {e}; a name is 1-32 bytes without spaces"))?;
            let [ip, server_port, client_port] = m.free.as_slice() else {
                return Err("-c takes <name> <server-ip> <server-port> <client-port>".to_string());
            };
            let server_port = parse_port("server-port", server_port)?;
            let (servers, server_text) = resolve(ip, server_port)?;
            let port = parse_port("client-port", client_port)?;
            let key = match m.opt_str("key") {
                Some(k) if k.is_empty() => return Err("--key: an empty path".to_string()),
                k => k.map(PathBuf::from),
            };
            let others = (m.opt_strs("server").iter())
                .map(|s| parse_server_addr("--server", s))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Mode::Client(driver::client::Options {
                name,
                servers,
                server_text,
                others,
                port,
                heartbeat,
                key,
                timestamps: m.opt_present("timestamps"),
            }))
        }
        (None, None) => Err("choose -s <port> (server) or -c ... (client)".to_string()),
    }
}

fn parse_port(what: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(p) if (1024..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("{what} {p}: must be between 1024 and 65535")),
        Err(_) => Err(format!("{what} '{s}': not a number")),
    }
}

/// A positive count for a `--<flag> N` limit.
fn parse_count(flag: &str, s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("--{flag} '{s}': must be a whole number above 0")),
    }
}

/// `--mail-ttl AGE`, `--name-ttl AGE`: a whole number of seconds, minutes,
/// hours or days (`90s`, `15m`, `12h`, `30d`; a bare number is seconds), or
/// `never`; `default` when not given.
fn parse_age(flag: &str, s: Option<String>, default: Duration) -> Result<Option<Duration>, String> {
    let Some(s) = s else {
        return Ok(Some(default));
    };
    if s == "never" {
        return Ok(None);
    }
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s.as_str(), 's'),
    };
    let scale: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 0,
    };
    match digits.parse::<u64>() {
        // Up to about 100 years: far enough, and no overflow downstream.
        Ok(n) if n > 0 && scale > 0 && n.saturating_mul(scale) <= 100 * 365 * 86_400 => {
            Ok(Some(Duration::from_secs(n * scale)))
        }
        _ => Err(format!(
            "--{flag} '{s}': a whole number above 0 with s, m, h or d (30d, 12h), or 'never'"
        )),
    }
}

/// `--heartbeat SECS`: 0.05 to 3600 seconds, 10 by default.
fn parse_heartbeat(s: Option<String>) -> Result<Duration, String> {
    let Some(s) = s else {
        return Ok(Duration::from_secs(10));
    };
    match s.parse::<f64>() {
        Ok(secs) if (0.05..=3600.0).contains(&secs) => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!(
            "--heartbeat '{s}': must be a number of seconds from 0.05 to 3600"
        )),
    }
}

/// A server's `IP:PORT` (`[v6]:port` for IPv6): a specific address,
/// since clients are sent there.
fn parse_server_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    let addr = s.parse::<SocketAddr>().map_err(|_| {
        format!("{what} '{s}': not IP:PORT (e.g. 192.0.2.7:2000, [2001:db8::7]:2000)")
    })?;
    if addr.ip().is_unspecified() {
        return Err(format!(
            "{what} '{s}': a specific address, not {}",
            addr.ip()
        ));
    }
    parse_port(what, &addr.port().to_string())?;
    Ok(driver::canonical(addr))
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map_err(|_| format!("{what} '{s}': not an IPv4 or IPv6 address"))
}

/// The server's addresses, to try in turn, and how `known_servers` names
/// it. A literal is itself; `localhost` is both loopbacks (RFC 6761 §6.3:
/// never asked of DNS, and `/etc/hosts` often lists only one); any other
/// name is what the resolver gives.
fn resolve(host: &str, port: u16) -> Result<(Vec<SocketAddr>, String), String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        return Ok((vec![addr], addr.to_string()));
    }
    let text = format!("{host}:{port}");
    if host == "localhost" {
        let both = [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        return Ok((both.map(|ip| SocketAddr::new(ip, port)).to_vec(), text));
    }
    let bad = |why: String| format!("server-ip '{host}': {why}");
    // Digits and dots, or a colon, meant an address (no host name is all
    // numeric, RFC 1123 §2.1): refused without asking DNS.
    if host.chars().all(|c| c.is_ascii_digit() || c == '.') || host.contains(':') {
        return Err(bad("not an IPv4 or IPv6 address".to_string()));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("not an address or a host name".to_string()));
    }
    let mut addrs = Vec::new();
    for addr in (host, port)
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
    {
        let addr = driver::canonical(addr);
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(bad("the name has no address".to_string()));
    }
    Ok((addrs, text))
}
