//! The experiment library's integration tests, in one binary: settings
//! (layers, origins, the TOML round trip), typed tuning grids, and runs in
//! their folders on the generated tiny world (resume, failing clients), and
//! exporting what they trained.

mod export;
mod grid;
mod harness;
mod runs;
mod settings;
mod use_saved;
mod vision;
