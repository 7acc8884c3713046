//! Arbitrary datagrams into `wire::decode`; see `udpchat::fuzzing::decode`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| udpchat::fuzzing::decode(data));
