//! One module per subcommand, and the renderers they share.

pub mod align;
pub mod assets;
pub mod compare;
pub mod curves;
pub mod export;
pub mod harness;
pub mod plot;
pub mod report;
pub mod run;
pub mod scenario;
pub mod use_saved;
