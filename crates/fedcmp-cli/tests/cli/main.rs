//! The `fedcmp` binary end to end on a tiny generated decoder (a GGUF file
//! written here) and tiny generated images: `compare` runs its matrix,
//! writes the report, and resumes without rerunning finished cells;
//! `show-config` and `--config` agree.

mod compare;
mod errors;
mod export;
mod settings;
