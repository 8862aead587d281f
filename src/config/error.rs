//! Configuration errors. Every problem names its key path, and all problems are reported at
//! once so a config can be fixed in one pass.

use std::path::PathBuf;

use thiserror::Error;

/// One problem in an otherwise parseable config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `databases.app.pool_size`.
    pub key: String,
    /// What is wrong and, where it helps, what would be accepted.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("could not read {}: {source}", path.display())]
    Read {
        /// The file as given.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and wrong types. toml's own Display is kept (minus its trailing
    /// newline): it gives the line and column, quotes the offending line with the key or value
    /// underlined, and for an unknown key lists the keys that table accepts.
    #[error("{}", .0.to_string().trim_end())]
    Parse(#[source] toml::de::Error),
    /// The file parsed but some values are wrong: a header line, then one problem per line.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    /// The collected problems, for callers that want them one by one (empty for `Read`/`Parse`).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Read { .. } | ConfigError::Parse(_) => &[],
        }
    }
}

fn display_problems(problems: &[ConfigProblem]) -> String {
    // The header keeps the first problem off the line of whatever prefix the caller prints
    // (e.g. the file name), so every problem starts its own line.
    let mut out = match problems.len() {
        1 => "invalid configuration (1 problem):".to_owned(),
        n => format!("invalid configuration ({n} problems):"),
    };
    for problem in problems {
        out.push_str("\n  ");
        out.push_str(&problem.to_string());
    }
    out
}
