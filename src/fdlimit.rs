//! The open-file limit. Every client and every server connection is a file descriptor; the
//! common default soft limit of 1024 would make a pgweir with `max_client_conn = 5000` refuse
//! connections with EMFILE long before its own limit, so start-up raises the soft limit to the
//! hard limit and says plainly when even that is too low.

use crate::config::Config;

/// Descriptors besides client and server sockets: listeners, the admin API, logs, TLS files,
/// DNS lookups, the runtime's own epoll and eventfds.
pub const RESERVED_FDS: u64 = 64;

/// How many descriptors the configuration may need at its limits: every client, every server
/// connection of every (database, user) pool, plus [`RESERVED_FDS`]. Pools of users found
/// through `auth_query` are not known in advance; each database counts once for them.
pub fn fds_needed(config: &Config) -> u64 {
    let mut servers: u64 = 0;
    for (db_name, db) in &config.databases {
        if config.users.is_empty() {
            servers = servers.saturating_add(db.pool.pool_size as u64);
        }
        for user in config.users.keys() {
            let size = config
                .pool_settings(db_name, user)
                .map_or(db.pool.pool_size, |s| s.pool_size);
            servers = servers.saturating_add(size as u64);
        }
    }
    (config.listen.max_client_conn as u64)
        .saturating_add(servers)
        .saturating_add(RESERVED_FDS)
}

/// The soft limit to ask for: the hard limit (the most an unprivileged process may set).
/// `None` when the soft limit already is the hard limit.
pub fn target_soft_limit(soft: u64, hard: u64) -> Option<u64> {
    (soft < hard).then_some(hard)
}

/// A warning to log when `needed` descriptors do not fit under `limit`, naming both numbers
/// and the ways to raise the limit.
pub fn shortfall_warning(needed: u64, limit: u64) -> Option<String> {
    (needed > limit).then(|| {
        format!(
            "the open-file limit is {limit} but max_client_conn + all pool sizes + {RESERVED_FDS} = {needed}: \
             connections beyond the limit fail with \"too many open files\". Raise it (`ulimit -n {needed}` \
             in the shell that starts pgweir, LimitNOFILE={needed} in its systemd unit, or --ulimit nofile={needed} \
             for docker) or lower max_client_conn / pool_size"
        )
    })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and warns when the configuration needs more.
pub fn raise_and_check(config: &Config) {
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit (RLIMIT_NOFILE)");
            return;
        }
    };
    let mut effective = soft;
    if let Some(target) = target_soft_limit(soft, hard) {
        match rlimit::Resource::NOFILE.set(target, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = target, "raised the open-file soft limit");
                effective = target;
            }
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-file soft limit"),
        }
    }
    if let Some(msg) = shortfall_warning(fds_needed(config), effective) {
        tracing::warn!("{msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_is_raised_to_the_hard_limit_only_when_lower() {
        assert_eq!(target_soft_limit(1024, 524_288), Some(524_288));
        assert_eq!(target_soft_limit(4096, 4096), None);
        assert_eq!(target_soft_limit(u64::MAX, u64::MAX), None);
    }

    #[test]
    fn warning_names_both_numbers_and_the_remedies() {
        assert_eq!(shortfall_warning(5084, 5084), None);
        assert_eq!(shortfall_warning(100, 1_048_576), None);
        let msg = shortfall_warning(5084, 1024).expect("5084 > 1024 must warn");
        assert!(msg.contains("1024"), "{msg}");
        assert!(msg.contains("5084"), "{msg}");
        assert!(msg.contains("ulimit -n 5084"), "{msg}");
        assert!(msg.contains("LimitNOFILE=5084"), "{msg}");
    }

    #[test]
    fn needed_counts_clients_every_user_pool_and_the_reserve() {
        let config = Config::from_toml(
            r#"
            [listen]
            addr = "127.0.0.1:0"
            max_client_conn = 1000
            [pool]
            pool_size = 20
            [databases.a]
            [databases.b]
            pool_size = 5
            [users.alice]
            password = "x"
            [users.bob]
            password = "y"
            pool_size = 2
            "#,
            None,
        )
        .expect("valid config");
        // a: alice 20 + bob 2; b: alice 5 + bob 2.
        assert_eq!(fds_needed(&config), 1000 + 20 + 2 + 5 + 2 + RESERVED_FDS);
    }
}
