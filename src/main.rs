//! `udpchat -s <port>` runs the server; `udpchat -c <name> <server-ip>
//! <server-port> <client-port>` runs a client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use udpchat::driver::{self, Fatal};
use udpchat::wire::Name;

const USAGE: &str = "usage: udpchat -s <port> [options] | udpchat -c <name> <server-ip> <server-port> <client-port> [--heartbeat SECS]";

const HELP: &str = "
  -s <port>               run the registry server on <port> (1024-65535)
    --bind ADDR           listen on ADDR instead of 0.0.0.0
    --data-dir DIR        keep the registry and mailboxes in DIR (default ./udpchat-data)
    --mailbox-messages N  most messages kept for one client (default 1000)
    --mailbox-bytes N     most bytes kept for one client (default 1048576)
    --store-bytes N       most bytes kept in all (default 268435456)
    --heartbeat SECS      the clients' heartbeat interval; 3 missed = offline (default 10)
  -c <name> <server-ip> <server-port> <client-port>
                          run a client named <name> on <client-port>
    --heartbeat SECS      tell the server every SECS seconds that you are here (default 10)
  -h, --help              show this help
  -V, --version           show the version";

/// Flags only the server takes.
const SERVER_ONLY: [&str; 5] = [
    "bind",
    "data-dir",
    "mailbox-messages",
    "mailbox-bytes",
    "store-bytes",
];

enum Mode {
    Server(driver::server::Options),
    Client {
        name: Name,
        server: SocketAddr,
        port: u16,
        heartbeat: Duration,
    },
    Help,
    Version,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match parse(&args) {
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
        Mode::Client {
            name,
            server,
            port,
            heartbeat,
        } => driver::client::run(name, server, port, heartbeat),
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
    opts.optopt("", "mailbox-messages", "messages per mailbox", "N");
    opts.optopt("", "mailbox-bytes", "bytes per mailbox", "N");
    opts.optopt("", "store-bytes", "bytes stored in all", "N");
    opts.optopt("", "heartbeat", "heartbeat interval", "SECS");
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
    match (m.opt_str("s"), m.opt_str("c")) {
        (Some(_), Some(_)) => Err("-s and -c cannot be combined".to_string()),
        (Some(port), None) => {
            if let Some(extra) = m.free.first() {
                return Err(format!("unexpected argument '{extra}'"));
            }
            let port = parse_port("port", &port)?;
            let ip = match m.opt_str("bind") {
                Some(ip) => parse_ip("--bind", &ip)?,
                None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let limit = |flag: &str, default: usize| match m.opt_str(flag) {
                Some(n) => parse_count(flag, &n),
                None => Ok(default),
            };
            Ok(Mode::Server(driver::server::Options {
                addr: SocketAddr::new(ip, port),
                data_dir: PathBuf::from(
                    m.opt_str("data-dir")
                        .unwrap_or_else(|| "udpchat-data".to_string()),
                ),
                heartbeat,
                mailbox_messages: limit("mailbox-messages", 1000)?,
                mailbox_bytes: limit("mailbox-bytes", 1 << 20)?,
                store_bytes: limit("store-bytes", 256 << 20)?,
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
            let ip = parse_ip("server-ip", ip)?;
            let server = SocketAddr::new(ip, parse_port("server-port", server_port)?);
            let port = parse_port("client-port", client_port)?;
            Ok(Mode::Client {
                name,
                server,
                port,
                heartbeat,
            })
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

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, String> {
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.parse::<IpAddr>()
        .map_err(|_| format!("{what} '{s}': not an IPv4 address (or IPv6, or localhost)"))
}
