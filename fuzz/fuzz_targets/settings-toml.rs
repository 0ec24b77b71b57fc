//! libFuzzer target `settings-toml`: see fedcmp_fuzz::targets.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedcmp_fuzz::harness::run_once("settings-toml", data));
