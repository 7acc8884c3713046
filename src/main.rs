//! `udpchat -s <port>` runs the server; `udpchat -c <name> <server-ip>
//! <server-port> <client-port>` runs a client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;

use udpchat::driver::{self, Fatal};
use udpchat::wire::Name;

const USAGE: &str = "usage: udpchat -s <port> [--bind ADDR] | udpchat -c <name> <server-ip> <server-port> <client-port>";

enum Mode {
    Server(SocketAddr),
    Client {
        name: Name,
        server: SocketAddr,
        port: u16,
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
            println!("{USAGE}");
            println!();
            println!("  -s <port>           run the registry server on <port> (1024-65535)");
            println!("  --bind ADDR         with -s: listen on ADDR instead of 0.0.0.0");
            println!("  -c <name> <server-ip> <server-port> <client-port>");
            println!("                      run a client named <name> on <client-port>");
            println!("  -h, --help          show this help");
            println!("  -V, --version       show the version");
            return ExitCode::SUCCESS;
        }
        Mode::Version => {
            println!("udpchat {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Mode::Server(addr) => driver::server::run(addr),
        Mode::Client { name, server, port } => driver::client::run(name, server, port),
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
    opts.optflag("h", "help", "show help");
    opts.optflag("V", "version", "show the version");
    let m = opts.parse(args).map_err(|e| e.to_string())?;
    if m.opt_present("h") {
        return Ok(Mode::Help);
    }
    if m.opt_present("V") {
        return Ok(Mode::Version);
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
                None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            Ok(Mode::Server(SocketAddr::new(ip, port)))
        }
        (None, Some(name)) => {
            if m.opt_present("bind") {
                return Err("--bind goes with -s".to_string());
            }
            let name = Name::new(&name)
                .map_err(|e| format!("name '{name}': {e}; a name is 1-32 bytes without spaces"))?;
            let [ip, server_port, client_port] = m.free.as_slice() else {
                return Err("-c takes <name> <server-ip> <server-port> <client-port>".to_string());
            };
            let ip = parse_ip("server-ip", ip)?;
            let server = SocketAddr::new(ip, parse_port("server-port", server_port)?);
            let port = parse_port("client-port", client_port)?;
            Ok(Mode::Client { name, server, port })
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

fn parse_ip(what: &str, s: &str) -> Result<IpAddr, String> {
    if s == "localhost" {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.parse::<IpAddr>()
        .map_err(|_| format!("{what} '{s}': not an IPv4 address (or IPv6, or localhost)"))
}
