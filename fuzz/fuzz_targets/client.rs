//! Scripts of datagrams, time and typed lines driving a `Client`; see
//! `udpchat::fuzzing::client`.

#![no_main]

use libfuzzer_sys::fuzz_target;

// The fuzz binary reads the clock once per input; the library never does.
fuzz_target!(|data: &[u8]| udpchat::fuzzing::client(std::time::Instant::now(), data));
