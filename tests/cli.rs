//! The command line of the real binary: bad arguments, help, version, and a
//! port that is already taken (SPEC.md §1).

mod common;

use std::net::UdpSocket;

use common::{
    Client, PORT_RETRIES, Run, Server, TABLE, WELCOME, free_udp_port, run, run_in, run_os,
    scratch_dir,
};

/// Asserts the shape of every bad-argument failure: exit status 2, an
/// `error: ` first line on stderr that mentions one of `names` (which
/// argument is wrong), a `usage: ` line after it, nothing on stdout, no panic.
#[track_caller]
fn assert_usage_error(args: &[&str], names: &[&str]) {
    assert_refused(args, run(args), names);
}

/// [`assert_usage_error`] for the run `out` of `args`.
#[track_caller]
fn assert_refused(args: &[impl std::fmt::Debug], out: Run, names: &[&str]) {
    let context = || {
        format!(
            "udpchat {args:?}: {}\nstdout: {:#?}\nstderr: {:#?}",
            out.status, out.stdout, out.stderr
        )
    };
    assert_eq!(out.status.code(), Some(2), "{}", context());
    let first = out.stderr.first().map(String::as_str).unwrap_or("");
    assert!(first.starts_with("error: "), "{}", context());
    let lower = first.to_lowercase();
    assert!(
        names.iter().any(|n| lower.contains(&n.to_lowercase())),
        "the error line should name the argument (one of {names:?}); {}",
        context()
    );
    assert!(
        out.stderr.iter().skip(1).any(|l| l.starts_with("usage: ")),
        "no usage line after the error; {}",
        context()
    );
    assert!(out.stdout.is_empty(), "{}", context());
    assert!(out.no_panic(), "{}", context());
}

#[test]
fn server_port_below_1024_is_refused() {
    assert_usage_error(&["-s", "80"], &["80"]);
}

#[test]
fn server_port_above_65535_is_refused() {
    assert_usage_error(&["-s", "70000"], &["70000"]);
}

#[test]
fn server_port_not_a_number_is_refused() {
    assert_usage_error(&["-s", "abc"], &["abc"]);
}

#[test]
fn an_argument_that_is_not_utf8_is_refused_not_a_panic() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let bad = OsStr::from_bytes(b"Al\xffce");
    let client: Vec<&OsStr> = vec![
        "-c".as_ref(),
        bad,
        "127.0.0.1".as_ref(),
        "5000".as_ref(),
        "6000".as_ref(),
    ];
    let server: Vec<&OsStr> = vec!["-s".as_ref(), "5000".as_ref(), "--data-dir".as_ref(), bad];
    for (args, which) in [(client, "argument 2"), (server, "argument 4")] {
        assert_refused(&args, run_os(&args), &[which]);
    }
}

#[test]
fn empty_arguments_are_refused() {
    assert_usage_error(&["-c", "Alice", "", "5000", "6000"], &["server-ip"]);
    assert_usage_error(&["-c", "Alice", "127.0.0.1", "", "6000"], &["server-port"]);
    assert_usage_error(&["-s", "5000", "--data-dir", ""], &["data-dir"]);
    assert_usage_error(&["--release", ""], &["name"]);
}

#[test]
fn a_bad_summary_interval_is_refused() {
    assert_usage_error(&["-s", "5000", "--summary-every", "0"], &["summary-every"]);
    assert_usage_error(
        &["-s", "5000", "--summary-every", "soon"],
        &["summary-every"],
    );
    assert_usage_error(
        &[
            "-c",
            "Alice",
            "127.0.0.1",
            "5000",
            "6000",
            "--summary-every",
            "1m",
        ],
        &["summary-every"],
    );
}

#[test]
fn empty_name_is_refused() {
    assert_usage_error(&["-c", "", "127.0.0.1", "5000", "6000"], &["name"]);
}

#[test]
fn name_of_33_bytes_is_refused() {
    let ascii = "A".repeat(33);
    assert_usage_error(&["-c", &ascii, "127.0.0.1", "5000", "6000"], &["name"]);
    // 11 characters, but 33 bytes: the limit counts bytes.
    let wide = "名".repeat(11);
    assert_usage_error(&["-c", &wide, "127.0.0.1", "5000", "6000"], &["name"]);
}

#[test]
fn bad_server_address_is_refused() {
    assert_usage_error(
        &["-c", "Alice", "999.1.1.1", "5000", "6000"],
        &["999.1.1.1"],
    );
}

#[test]
fn missing_client_port_is_refused() {
    assert_usage_error(
        &["-c", "Alice", "127.0.0.1", "5000"],
        &["client-port", "client port", "client_port"],
    );
}

#[test]
fn no_arguments_is_refused() {
    assert_usage_error(&[], &["-s", "-c", "mode"]);
}

#[test]
fn unknown_option_is_refused() {
    assert_usage_error(&["-x"], &["x"]);
}

#[track_caller]
fn assert_help(flag: &str) {
    let out = run(&[flag]);
    assert!(out.status.success(), "udpchat {flag}: {}", out.status);
    assert!(
        out.stdout.iter().any(|l| l.starts_with("usage: ")),
        "udpchat {flag}: no usage on stdout: {:#?}",
        out.stdout
    );
    let text = out.stdout.join("\n");
    assert!(text.contains("-s") && text.contains("-c"), "{text}");
    assert!(out.stderr.is_empty(), "{:#?}", out.stderr);
}

#[test]
fn help_prints_usage() {
    assert_help("-h");
    assert_help("--help");
}

#[track_caller]
fn assert_version(flag: &str) {
    let out = run(&[flag]);
    assert!(out.status.success(), "udpchat {flag}: {}", out.status);
    let want = format!("udpchat {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(out.stdout, [want], "udpchat {flag}");
    assert!(out.stderr.is_empty(), "{:#?}", out.stderr);
}

#[test]
fn version_prints_the_crate_version() {
    assert_version("-V");
    assert_version("--version");
}

/// Holds a UDP port on 0.0.0.0 for the length of a test.
fn occupy_port() -> (UdpSocket, u16) {
    for _ in 0..PORT_RETRIES {
        let port = free_udp_port();
        if let Ok(socket) = UdpSocket::bind(("0.0.0.0", port)) {
            return (socket, port);
        }
    }
    panic!("could not hold any UDP port on 0.0.0.0");
}

#[track_caller]
fn assert_port_in_use(out: &Run, port: u16) {
    assert_eq!(out.status.code(), Some(1), "stderr: {:#?}", out.stderr);
    assert_eq!(
        out.stderr,
        [format!("error: port {port} is already in use")]
    );
    assert!(out.stdout.is_empty(), "{:#?}", out.stdout);
}

#[test]
fn server_port_in_use_exits_1() {
    let (_held, port) = occupy_port();
    // In a scratch directory: whatever the server would create stays there.
    let dir = scratch_dir();
    let out = run_in(dir.path(), &["-s", &port.to_string()]);
    assert_port_in_use(&out, port);
    assert!(
        !dir.path().join("udpchat-data").exists(),
        "a server that cannot listen created its data directory"
    );
}

#[test]
fn client_port_in_use_exits_1() {
    let (_held, port) = occupy_port();
    let server_port = free_udp_port().to_string();
    let out = run(&["-c", "Alice", "127.0.0.1", &server_port, &port.to_string()]);
    assert_port_in_use(&out, port);
}

#[test]
fn name_of_32_bytes_is_accepted() {
    let server = Server::start();
    // Ten 3-byte characters and two ASCII letters: 32 bytes exactly.
    let name = format!("{}ab", "名".repeat(10));
    assert_eq!(name.len(), 32);
    let mut client = Client::start(&name, server.port());
    client.expect_lines(&[WELCOME, TABLE]);
    client.finish();
}

#[test]
fn key_and_release_flags_are_checked() {
    assert_usage_error(&["-s", "5000", "--key", "k"], &["--key"]);
    assert_usage_error(
        &["-c", "Alice", "127.0.0.1", "5000", "6000", "--key", ""],
        &["--key"],
    );
    assert_usage_error(&["--release", "Alice", "-s", "5000"], &["--release"]);
    assert_usage_error(&["--release", "two words"], &["name"]);
    assert_usage_error(&["--release", "Alice", "extra"], &["extra"]);
    assert_usage_error(&["-s", "5000", "--data-dir", ""], &["--data-dir"]);
}

#[test]
fn cluster_flags_are_checked() {
    // --advertise needs the database the servers share.
    assert_usage_error(
        &["-s", "5000", "--advertise", "127.0.0.1:5000"],
        &["--advertise"],
    );
    let store = ["-s", "5000", "--store", "postgres://u@127.0.0.1/db"];
    for bad in [
        "127.0.0.1",
        "0.0.0.0:5000",
        "[::]:5000",
        "127.0.0.1:80",
        "host:5000",
        "",
    ] {
        let mut args = store.to_vec();
        args.extend(["--advertise", bad]);
        assert_usage_error(&args, &["--advertise"]);
    }
    let client = ["-c", "Alice", "127.0.0.1", "5000", "6000"];
    for bad in ["127.0.0.1", "0.0.0.0:5000", "127.0.0.1:70000", "x"] {
        let mut args = client.to_vec();
        args.extend(["--server", bad]);
        assert_usage_error(&args, &["--server"]);
    }
    assert_usage_error(&["-s", "5000", "--server", "127.0.0.1:5001"], &["--server"]);
    let mut args = client.to_vec();
    args.extend(["--advertise", "127.0.0.1:5001"]);
    assert_usage_error(&args, &["--advertise"]);
}

#[test]
fn release_without_a_database_is_a_clear_error() {
    let dir = scratch_dir();
    let out = run_in(
        dir.path(),
        &["--release", "Alice", "--data-dir", "nothing-here"],
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", out.stderr);
    assert_eq!(out.stderr.len(), 1, "{:?}", out.stderr);
    assert!(
        out.stderr[0].starts_with("error: data dir nothing-here:"),
        "{:?}",
        out.stderr
    );
    // Nothing was created.
    assert!(!dir.path().join("nothing-here").exists());
}

#[test]
fn a_bad_mail_or_name_ttl_is_refused() {
    for bad in ["0", "5w", "1.5h", "40000d"] {
        assert_usage_error(&["-s", "5000", "--name-ttl", bad], &["--name-ttl"]);
    }
    assert_usage_error(
        &["-c", "A", "127.0.0.1", "5000", "6000", "--name-ttl", "1d"],
        &["--name-ttl"],
    );
    for bad in [
        "0",
        "0d",
        "5w",
        "-1",
        "d",
        "1.5h",
        "40000d",
        "99999999999999999999",
    ] {
        assert_usage_error(&["-s", "5000", "--mail-ttl", bad], &["--mail-ttl"]);
    }
    assert_usage_error(
        &["-c", "A", "127.0.0.1", "5000", "6000", "--mail-ttl", "1d"],
        &["--mail-ttl"],
    );
    assert_usage_error(
        &["-c", "A", "127.0.0.1", "5000", "6000", "--max-clients", "3"],
        &["--max-clients"],
    );
}

#[test]
fn a_bad_request_ration_is_refused() {
    for bad in ["0", "-3", "x", "99999999999999999999999"] {
        assert_usage_error(
            &["-s", "5000", "--requests-per-source", bad],
            &["--requests-per-source"],
        );
    }
    assert_usage_error(
        &[
            "-c",
            "A",
            "127.0.0.1",
            "5000",
            "6000",
            "--requests-per-source",
            "10",
        ],
        &["--requests-per-source"],
    );
}

#[test]
fn timestamps_go_with_a_client() {
    assert_usage_error(&["-s", "5000", "--timestamps"], &["timestamps"]);
}
