//! `[[hba]]` rules: which users and databases may connect from where (PostgreSQL's pg_hba.conf
//! idea, for pgweir's own listener). The first rule that matches decides; with rules present,
//! a connection no rule matches is refused. With no rules, everyone may try to log in.

use std::net::IpAddr;

/// Allow or refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaAction {
    Allow,
    Deny,
}

/// An address range: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `ADDR` or `ADDR/PREFIX`. Host bits beyond the prefix are ignored, as PostgreSQL
    /// does.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            format!("{s:?} is not an IP address or CIDR range (e.g. \"10.0.0.0/8\", \"::1\", \"all\", \"local\")")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{s:?}: the prefix length must be 0 to {max}")),
            },
        };
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // IPv4 clients of a dual-stack listener arrive as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Which clients a rule's `address` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaAddress {
    /// "all": every client, TCP or Unix socket.
    All,
    /// "local": clients on pgweir's Unix socket (PostgreSQL's `local` lines).
    Local,
    /// A range: TCP clients whose address is in it.
    Net(Cidr),
}

impl HbaAddress {
    /// Parses "all", "local", `ADDR` or `ADDR/PREFIX`.
    pub fn parse(s: &str) -> Result<HbaAddress, String> {
        match s {
            "all" => Ok(HbaAddress::All),
            "local" => Ok(HbaAddress::Local),
            net => Cidr::parse(net).map(HbaAddress::Net),
        }
    }

    /// `ip` is None for a Unix-socket client.
    fn matches(&self, ip: Option<IpAddr>) -> bool {
        match (self, ip) {
            (HbaAddress::All, _) | (HbaAddress::Local, None) => true,
            (HbaAddress::Net(net), Some(ip)) => net.contains(ip),
            _ => false,
        }
    }
}

/// One `[[hba]]` entry. `None` lists mean "any".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRule {
    pub action: HbaAction,
    pub address: HbaAddress,
    pub databases: Option<Vec<String>>,
    pub users: Option<Vec<String>>,
    /// Some(true): TLS connections only (hostssl); Some(false): plaintext only (hostnossl).
    /// Either way TCP clients only: as PostgreSQL's hostssl/hostnossl lines never match a
    /// `local` client, and as `[tls] mode = "require"` counts the socket as this host, so a
    /// "deny plaintext" rule does not lock out clients that cannot do TLS at all.
    pub tls: Option<bool>,
}

/// What the rules decided for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaVerdict {
    /// No rules configured, or the matching rule allows.
    Allowed,
    /// Rule number (1-based, file order) denied the connection.
    DeniedBy(usize),
    /// Rules exist and none matched.
    NoMatch,
}

impl HbaRule {
    fn matches(&self, ip: Option<IpAddr>, database: &str, user: &str, tls: bool) -> bool {
        let listed = |list: &Option<Vec<String>>, name: &str| list.as_ref().is_none_or(|l| l.iter().any(|n| n == name));
        self.address.matches(ip)
            && listed(&self.databases, database)
            && listed(&self.users, user)
            && self.tls.is_none_or(|t| ip.is_some() && t == tls)
    }
}

/// Applies `rules` in order to a connection; `ip` is None for a Unix-socket client.
pub fn check(rules: &[HbaRule], ip: Option<IpAddr>, database: &str, user: &str, tls: bool) -> HbaVerdict {
    if rules.is_empty() {
        return HbaVerdict::Allowed;
    }
    match rules.iter().position(|r| r.matches(ip, database, user, tls)) {
        Some(i) if rules[i].action == HbaAction::Allow => HbaVerdict::Allowed,
        Some(i) => HbaVerdict::DeniedBy(i + 1),
        None => HbaVerdict::NoMatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: HbaAction, address: &str) -> HbaRule {
        HbaRule {
            action,
            address: HbaAddress::parse(address).expect("address"),
            databases: None,
            users: None,
            tls: None,
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    #[test]
    fn cidr_matching() {
        let ip = |s: &str| ip(s).expect("ip");
        let net = Cidr::parse("10.1.0.0/16").expect("v4");
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "v4-mapped");
        assert!(Cidr::parse("0.0.0.0/0").expect("any").contains(ip("192.0.2.1")));
        assert!(Cidr::parse("127.0.0.1").expect("host").contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").expect("host").contains(ip("127.0.0.2")));
        assert!(Cidr::parse("10.1.2.3/8").expect("host bits").contains(ip("10.200.0.0")));
        let v6 = Cidr::parse("2001:db8::/32").expect("v6");
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(Cidr::parse("::/0").expect("all v6").contains(ip("::1")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "banana", "10.0.0.0/x", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let mut admin_only = rule(HbaAction::Allow, "10.0.0.0/8");
        admin_only.users = Some(vec!["admin".into()]);
        let mut tls_only = rule(HbaAction::Allow, "all");
        tls_only.tls = Some(true);
        tls_only.databases = Some(vec!["app".into()]);
        let rules = vec![rule(HbaAction::Deny, "10.9.0.0/16"), admin_only, tls_only];
        assert_eq!(
            check(&rules, ip("10.9.1.1"), "app", "admin", true),
            HbaVerdict::DeniedBy(1)
        );
        assert_eq!(
            check(&rules, ip("10.8.1.1"), "app", "admin", false),
            HbaVerdict::Allowed
        );
        assert_eq!(check(&rules, ip("10.8.1.1"), "app", "bob", false), HbaVerdict::NoMatch);
        assert_eq!(check(&rules, ip("10.8.1.1"), "app", "bob", true), HbaVerdict::Allowed);
        assert_eq!(
            check(&rules, ip("192.0.2.1"), "other", "bob", true),
            HbaVerdict::NoMatch
        );
        assert_eq!(check(&[], ip("192.0.2.1"), "x", "y", false), HbaVerdict::Allowed);
    }

    #[test]
    fn tls_conditions_concern_tcp_clients_only() {
        let mut no_plaintext = rule(HbaAction::Deny, "all");
        no_plaintext.tls = Some(false);
        let rules = vec![no_plaintext, rule(HbaAction::Allow, "all")];
        assert_eq!(
            check(&rules, ip("10.0.0.1"), "app", "bob", false),
            HbaVerdict::DeniedBy(1)
        );
        assert_eq!(check(&rules, ip("10.0.0.1"), "app", "bob", true), HbaVerdict::Allowed);
        assert_eq!(
            check(&rules, None, "app", "bob", false),
            HbaVerdict::Allowed,
            "Unix socket"
        );
        let mut plaintext_only = rule(HbaAction::Allow, "all");
        plaintext_only.tls = Some(false);
        assert_eq!(check(&[plaintext_only], None, "app", "bob", false), HbaVerdict::NoMatch);
        // Without a tls condition, "all" still covers the socket.
        assert_eq!(
            check(&[rule(HbaAction::Deny, "all")], None, "app", "bob", false),
            HbaVerdict::DeniedBy(1)
        );
    }

    #[test]
    fn local_matches_unix_socket_clients_only_and_all_matches_everyone() {
        let rules = vec![
            rule(HbaAction::Deny, "0.0.0.0/0"),
            rule(HbaAction::Allow, "local"),
            rule(HbaAction::Deny, "all"),
        ];
        assert_eq!(check(&rules, None, "app", "bob", false), HbaVerdict::Allowed);
        assert_eq!(
            check(&rules, ip("127.0.0.1"), "app", "bob", false),
            HbaVerdict::DeniedBy(1)
        );
        assert_eq!(check(&rules, ip("::1"), "app", "bob", false), HbaVerdict::DeniedBy(3));
        let deny_all = vec![rule(HbaAction::Deny, "all")];
        assert_eq!(check(&deny_all, None, "app", "bob", false), HbaVerdict::DeniedBy(1));
        let tcp_only = vec![rule(HbaAction::Allow, "::/0")];
        assert_eq!(check(&tcp_only, None, "app", "bob", false), HbaVerdict::NoMatch);
        assert!(HbaAddress::parse("locals").is_err());
    }
}
