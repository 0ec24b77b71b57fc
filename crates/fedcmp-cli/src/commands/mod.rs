//! One module per subcommand.

pub mod align;
pub mod assets;
