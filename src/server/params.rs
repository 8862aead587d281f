//! Session parameters: what a client expects (startup values plus ParameterStatus updates it has
//! seen) and what a server connection has. On checkout the difference is applied with one `SET`
//! round trip, so a client's client_encoding, DateStyle, TimeZone… follow it from server to
//! server in transaction mode.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};

/// Parameters PostgreSQL reports with ParameterStatus whose client value must follow the client.
/// Others it reports (server_version, integer_datetimes…) are server facts, not client settings.
pub const TRACKED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Every parameter PostgreSQL 15 reports with ParameterStatus (GUC_REPORT). Values pgweir SET
/// for any other name are only known because pgweir set them.
pub const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

/// Maps a parameter name to the spelling PostgreSQL uses in ParameterStatus (names are
/// case-insensitive in SET but the reports use these exact spellings).
pub fn canonical_name(name: &str) -> String {
    for t in TRACKED {
        if t.eq_ignore_ascii_case(name) {
            return (*t).to_owned();
        }
    }
    name.to_ascii_lowercase()
}

/// True for names safe to put unquoted into `SET name = ...` (custom GUCs have a dot).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// A small ordered map of parameter name → raw value. A handful of entries, so a Vec beats a map.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    entries: Vec<(String, Vec<u8>)>,
    /// Bumped by every change, so "nothing changed since" is one integer compare.
    generation: u64,
}

impl PartialEq for ParamSet {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl Eq for ParamSet {}

impl ParamSet {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An exact, order-independent serialisation of the set (names sorted, values folded to
    /// ASCII lower case as `differences` compares them). Two sets with equal forms want the same
    /// values, so a server known to satisfy one form satisfies every set with that form.
    pub fn form(&self) -> Arc<[u8]> {
        let mut entries: Vec<&(String, Vec<u8>)> = self.entries.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (k, v) in entries {
            // Lengths first: names and values are arbitrary bytes, so no separator is safe.
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend(v.iter().map(u8::to_ascii_lowercase));
        }
        out.into()
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.entries.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// Sets `name` (already canonical) to `value`.
    pub fn set(&mut self, name: &str, value: &[u8]) {
        match self.entries.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => {
                if v.as_slice() != value {
                    v.clear();
                    v.extend_from_slice(value);
                    self.generation += 1;
                }
            }
            None => {
                self.entries.push((name.to_owned(), value.to_vec()));
                self.generation += 1;
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.entries.retain(|(k, _)| keep(k));
        self.generation += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries of `wanted` whose value differs from (or is missing in) `self`. PostgreSQL
    /// compares these case-insensitively in practice (it canonicalises "iso" to "ISO"), but a
    /// byte compare only costs a redundant SET, never a wrong value.
    pub fn differences<'a>(&self, wanted: &'a ParamSet) -> Vec<(&'a str, &'a [u8])> {
        wanted
            .iter()
            .filter(|(k, v)| self.get(k).is_none_or(|have| !have.eq_ignore_ascii_case(v)))
            .collect()
    }
}

/// Builds one simple-query text `SET a = 'x'; SET b = 'y'` for the given pairs, quoting values
/// as string literals (standard_conforming_strings style: only `'` is doubled, and an E'' form is
/// never produced, so backslashes are literal). Returns raw bytes because values may be in the
/// client's encoding.
pub fn set_statements(pairs: &[(&str, &[u8])]) -> BytesMut {
    let mut sql = BytesMut::new();
    for (name, value) in pairs {
        sql.put_slice(b"SET ");
        sql.put_slice(name.as_bytes());
        sql.put_slice(b" = '");
        for &b in *value {
            if b == b'\'' {
                sql.put_u8(b'\'');
            }
            sql.put_u8(b);
        }
        sql.put_slice(b"';");
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_and_differences() {
        assert_eq!(canonical_name("datestyle"), "DateStyle");
        assert_eq!(canonical_name("Search_Path"), "search_path");
        let mut server = ParamSet::default();
        server.set("DateStyle", b"ISO, MDY");
        server.set("TimeZone", b"UTC");
        let mut client = ParamSet::default();
        client.set("DateStyle", b"iso, mdy");
        client.set("TimeZone", b"Europe/Paris");
        client.set("application_name", b"x");
        let d = server.differences(&client);
        assert_eq!(
            d,
            vec![("TimeZone", &b"Europe/Paris"[..]), ("application_name", &b"x"[..])]
        );
        // Forms ignore order and value case, and track every change.
        let mut a = ParamSet::default();
        a.set("TimeZone", b"UTC");
        a.set("DateStyle", b"ISO, MDY");
        let mut b = ParamSet::default();
        b.set("DateStyle", b"iso, mdy");
        b.set("TimeZone", b"utc");
        assert_eq!(a.form(), b.form());
        let before = b.generation();
        b.set("TimeZone", b"utc");
        assert_eq!(b.generation(), before, "an unchanged value is no change");
        b.set("TimeZone", b"Europe/Paris");
        assert_ne!(b.generation(), before);
        assert_ne!(a.form(), b.form());
        // Length prefixes keep names and values from running into each other.
        let mut c = ParamSet::default();
        c.set("ab", b"c");
        let mut d = ParamSet::default();
        d.set("a", b"bc");
        assert_ne!(c.form(), d.form());
        let sql = set_statements(&[("application_name", b"it's")]);
        assert_eq!(&sql[..], b"SET application_name = 'it''s';");
        assert!(is_valid_name("myapp.tenant_id"));
        assert!(!is_valid_name("a; drop table x"));
    }
}
