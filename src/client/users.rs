//! Client credentials prepared once at start-up, so a login costs no key derivation.

use std::collections::HashMap;

use crate::auth::scram::ScramVerifier;
use crate::config::{Config, Secret};

/// What pgweir checks a client's password against.
#[derive(Debug, Clone)]
pub struct UserEntry {
    pub secret: Secret,
    /// For SCRAM client auth: parsed from a SCRAM secret, or derived from a plain one with a
    /// random salt (such a derived verifier can never be used for pass-through).
    pub verifier: Option<ScramVerifier>,
}

#[derive(Debug, Default)]
pub struct UserDirectory {
    users: HashMap<String, UserEntry>,
}

impl UserDirectory {
    pub fn from_config(config: &Config) -> Self {
        let users = config
            .users
            .iter()
            .map(|(name, u)| {
                let verifier = match &u.secret {
                    Secret::Scram(s) => ScramVerifier::parse(s).ok(),
                    Secret::Plain(p) => Some(ScramVerifier::generate(p)),
                    Secret::Md5(_) | Secret::None => None,
                };
                (
                    name.clone(),
                    UserEntry {
                        secret: u.secret.clone(),
                        verifier,
                    },
                )
            })
            .collect();
        UserDirectory { users }
    }

    pub fn get(&self, name: &str) -> Option<&UserEntry> {
        self.users.get(name)
    }
}
