//! One module per subcommand.

pub mod align;
pub mod assets;
pub mod backbones;
pub mod compare;
pub mod experiment;
pub mod plot;
pub mod report;
pub mod run;
pub mod scenario;
