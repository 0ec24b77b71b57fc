//! Fuzzing of every decoder fedcmp runs on bytes it did not write: GGUF,
//! safetensors, PyTorch pickles, LLaVA JSON, JSONL and CSV manifests,
//! scenario, settings and strategy TOML, and the round protocol's messages
//! in both directions. Runs on the stable toolchain: a mutational fuzzer
//! ([`engine`]) with structure-aware mutations ([`mutate`]) of valid seeds
//! ([`targets::Seeds`]), fed back by new verdicts; a short smoke run of
//! every target is part of the test suite, and `fedcmp-fuzz` runs longer
//! ones. The same targets build under cargo-fuzz (libFuzzer, coverage
//! guided, `--sanitizer none` on stable) from `fuzz/`.
//!
//! Linking this crate installs a capped global allocator: while a target
//! runs, it may allocate at most [`engine::Limits::alloc_bound`] bytes more
//! than before; past that the allocation fails and the process aborts, the
//! input left in the scratch folder.

pub mod engine;
pub mod harness;
pub mod mutate;
pub mod targets;

/// Counts live bytes; the engine sets a limit around each run.
#[global_allocator]
pub static ALLOCATOR: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);
