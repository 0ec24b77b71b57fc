//! One module per subcommand.

pub mod align;
pub mod assets;
pub mod backbones;
pub mod plot;
pub mod run;
pub mod scenario;
