//! How `fedcmp` ends on an error: the message chain on one line (never a
//! backtrace: that is for bugs, and panics keep theirs), and an exit code
//! that says whose move it is. The codes follow BSD sysexits, so scripts
//! and schedulers can tell a bad file from a bad flag from a bug:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the command's own check failed (`align`: the held-out loss did not fall) |
//! | 2 | the command line does not parse (clap's own code) |
//! | 65 | bad input: a data, model or weights file that is missing, malformed or inconsistent |
//! | 70 | internal error: a failure of fedcmp itself (please report it) |
//! | 74 | the system: a file that cannot be written, a tool or network that fails |
//! | 78 | bad configuration: a setting, flag value, scenario or strategy that is invalid or conflicts |
//! | 101 | a panic: a bug (please report it with the command) |
//!
//! The class comes from the outermost error in the chain that fedcmp
//! knows; each library error says which class it is, delegating through
//! wrappers to the error it wraps.

use std::process::ExitCode;

use fedcmp_assets::AssetError;
use fedcmp_data::partition::PartitionError;
use fedcmp_data::DataError;
use fedcmp_experiment::ExperimentError;
use fedcmp_model::ModelError;
use fedcmp_runtime::RuntimeError;
use fedcmp_strategy::StrategyError;

/// Whose move it is after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    CheckFailed,
    BadInput,
    BadConfig,
    System,
    Internal,
}

impl ErrorClass {
    pub fn code(self) -> u8 {
        match self {
            Self::CheckFailed => 1,
            Self::BadInput => 65,
            Self::Internal => 70,
            Self::System => 74,
            Self::BadConfig => 78,
        }
    }
}

/// The command ran, and the check it exists for failed (`align`: the
/// held-out loss did not fall): exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CheckFailed(pub String);

/// A problem with the command's flags found after parsing (a value out of
/// range, flags that conflict): exit code 78.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadFlags(pub String);

/// Keeps error backtraces out of user-facing messages: candle attaches one
/// to its errors (and its Display prints it) whenever RUST_BACKTRACE is set.
/// RUST_LIB_BACKTRACE takes precedence over RUST_BACKTRACE for errors only,
/// so panics still get theirs; a developer who sets RUST_LIB_BACKTRACE
/// explicitly keeps the choice.
pub fn quiet_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Called first thing in main, before any thread exists.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
}

/// Prints the error and gives the exit code of its class.
pub fn report(err: &anyhow::Error) -> ExitCode {
    let class = classify(err);
    eprintln!("error: {}", message_chain(err));
    if class == ErrorClass::Internal {
        eprintln!(
            "(this is a failure of fedcmp itself; please report it with the command you ran)"
        );
    }
    ExitCode::from(class.code())
}

/// The error and its causes on one line, each text once.
pub fn message_chain(err: &anyhow::Error) -> String {
    fedcmp_core::error_chain(err.as_ref())
}

/// The class of the outermost error in the chain that fedcmp knows.
pub fn classify(err: &anyhow::Error) -> ErrorClass {
    err.chain()
        .find_map(known_class)
        .unwrap_or(ErrorClass::Internal)
}

fn known_class(e: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
    if let Some(e) = e.downcast_ref::<ExperimentError>() {
        return Some(experiment(e));
    }
    if let Some(e) = e.downcast_ref::<RuntimeError>() {
        return Some(runtime(e));
    }
    if let Some(e) = e.downcast_ref::<DataError>() {
        return Some(data(e));
    }
    if let Some(e) = e.downcast_ref::<ModelError>() {
        return Some(model(e));
    }
    if let Some(e) = e.downcast_ref::<StrategyError>() {
        return Some(strategy(e));
    }
    if let Some(e) = e.downcast_ref::<AssetError>() {
        return Some(asset(e));
    }
    if e.downcast_ref::<CheckFailed>().is_some() {
        return Some(ErrorClass::CheckFailed);
    }
    if e.downcast_ref::<PartitionError>().is_some() || e.downcast_ref::<BadFlags>().is_some() {
        return Some(ErrorClass::BadConfig);
    }
    if e.downcast_ref::<fedcmp_core::CoreError>().is_some() {
        return Some(ErrorClass::BadInput);
    }
    if let Some(e) = e.downcast_ref::<candle_core::Error>() {
        return Some(candle(e));
    }
    if let Some(e) = e.downcast_ref::<std::io::Error>() {
        return Some(io(e));
    }
    None
}

fn experiment(e: &ExperimentError) -> ErrorClass {
    match e {
        ExperimentError::Runtime(e) => runtime(e),
        ExperimentError::Model(e) => model(e),
        ExperimentError::Data(e) => data(e),
        ExperimentError::Strategy(e) => strategy(e),
        ExperimentError::Core(_) | ExperimentError::File { .. } => ErrorClass::BadInput,
        ExperimentError::Assets(e) => asset(e),
        ExperimentError::Tensor(e) => candle(e),
        ExperimentError::Io { source, .. } => io(source),
        ExperimentError::Setting { .. } | ExperimentError::Invalid(_) => ErrorClass::BadConfig,
        ExperimentError::Internal(_) => ErrorClass::Internal,
        ExperimentError::Context { source, .. } => experiment(source),
    }
}

fn runtime(e: &RuntimeError) -> ErrorClass {
    match e {
        RuntimeError::Model(e) => model(e),
        RuntimeError::Data(e) => data(e),
        RuntimeError::Strategy(e) => strategy(e),
        RuntimeError::Core(_) => ErrorClass::BadInput,
        RuntimeError::Tensor(e) => candle(e),
        RuntimeError::Io { source, .. } => io(source),
        RuntimeError::Config(_) => ErrorClass::BadConfig,
    }
}

fn data(e: &DataError) -> ErrorClass {
    match e {
        DataError::Io { source, .. } => io(source),
        DataError::Malformed { .. } | DataError::Image { .. } => ErrorClass::BadInput,
        DataError::Partition(_) | DataError::Config { .. } => ErrorClass::BadConfig,
        DataError::Model(e) => model(e),
        DataError::Tensor(e) => candle(e),
    }
}

fn model(e: &ModelError) -> ErrorClass {
    match e {
        ModelError::Io { source, .. } => io(source),
        ModelError::Candle(e) => candle(e),
        _ => ErrorClass::BadInput,
    }
}

fn strategy(e: &StrategyError) -> ErrorClass {
    match e {
        // A strategy's settings are configuration; everything it refuses
        // at run time (an update, a round) is recorded, not fatal, so what
        // reaches the user here is a bad setting.
        StrategyError::Core(_) => ErrorClass::BadInput,
        _ => ErrorClass::BadConfig,
    }
}

fn asset(e: &AssetError) -> ErrorClass {
    match e {
        AssetError::UnknownAsset { .. } | AssetError::NoCacheDir => ErrorClass::BadConfig,
        AssetError::Io { source, .. } => io(source),
        AssetError::MissingTool { .. } | AssetError::CommandFailed { .. } => ErrorClass::System,
        AssetError::Archive { .. } | AssetError::HashMismatch { .. } => ErrorClass::BadInput,
    }
}

/// Candle's errors reach the user from its file readers (safetensors,
/// GGUF, pickles, zip): those are bad input; shape and dtype errors past
/// loading are fedcmp's.
fn candle(e: &candle_core::Error) -> ErrorClass {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            candle(inner)
        }
        E::Io(e) => io(e),
        E::Zip(_)
        | E::SafeTensor(_)
        | E::UnsupportedSafeTensorDtype(_)
        | E::Npy(_)
        | E::ParseInt(_)
        | E::FromUtf8(_)
        | E::CannotFindTensor { .. }
        | E::Msg(_)
        | E::Wrapped(_)
        | E::WrappedContext { .. } => ErrorClass::BadInput,
        _ => ErrorClass::Internal,
    }
}

/// A file that is not there or not readable was named by the user; any
/// other I/O failure (disk full, ...) is the system's.
fn io(e: &std::io::Error) -> ErrorClass {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::NotFound
        | K::InvalidData
        | K::UnexpectedEof
        | K::InvalidInput
        | K::IsADirectory
        | K::NotADirectory => ErrorClass::BadInput,
        _ => ErrorClass::System,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_wrapped_error() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::from(ExperimentError::Context {
            context: "loading".into(),
            source: Box::new(ExperimentError::Data(DataError::Io {
                path: "m.jsonl".into(),
                source: missing,
            })),
        });
        assert_eq!(classify(&e), ErrorClass::BadInput);
        let full = std::io::Error::new(std::io::ErrorKind::StorageFull, "full");
        let e = anyhow::Error::from(ExperimentError::Io {
            path: "out".into(),
            source: full,
        });
        assert_eq!(classify(&e), ErrorClass::System);
        let e = anyhow::Error::from(ExperimentError::Setting {
            field: "lr".into(),
            value: "-1".into(),
            origin: "--lr".into(),
            reason: "must be positive".into(),
        })
        .context("resolving settings");
        assert_eq!(classify(&e), ErrorClass::BadConfig);
        let e = anyhow::Error::from(ExperimentError::Model(ModelError::Candle(
            candle_core::Error::Msg("tensor_count exceeds max".into()).bt(),
        )));
        assert_eq!(classify(&e), ErrorClass::BadInput);
        // With RUST_BACKTRACE set in the test's environment candle would
        // have attached a backtrace; RUST_LIB_BACKTRACE=0 (main) stops that.
        assert!(message_chain(&e).starts_with("tensor_count exceeds max"));
        let e = anyhow::anyhow!("no typed error");
        assert_eq!(classify(&e), ErrorClass::Internal);
        let e = anyhow::Error::from(BadFlags("--beams must be at least 1".into()));
        assert_eq!(classify(&e).code(), 78);
    }

    /// `{context}: {source}` errors whose source is also chained are shown
    /// once, and errors that do not repeat their source keep it.
    #[test]
    fn the_message_chain_shows_each_cause_once() {
        let e = anyhow::Error::from(ExperimentError::Context {
            context: "building scenario s".into(),
            source: Box::new(ExperimentError::File {
                path: "m.jsonl".into(),
                message: "not UTF-8".into(),
            }),
        });
        assert_eq!(message_chain(&e), "building scenario s: m.jsonl: not UTF-8");
        let e = anyhow::Error::from(BadFlags("--jobs must be at least 1".into()))
            .context("reading the flags");
        assert_eq!(
            message_chain(&e),
            "reading the flags: --jobs must be at least 1"
        );
    }
}
