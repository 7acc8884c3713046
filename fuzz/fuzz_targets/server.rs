//! Scripts of datagrams, time and commits driving a `Server`; see
//! `udpchat::fuzzing::server`.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The fuzz binary reads the clock once per input; the library never does.
fuzz_target!(|data: &[u8]| udpchat::fuzzing::server(std::time::Instant::now(), data));
