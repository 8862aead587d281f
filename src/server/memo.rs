//! What pgweir works out from an unnamed Parse's query text, remembered per server connection.
//!
//! Drivers that do not name their statements (pgbench `-M extended`, JDBC below its prepare
//! threshold, node-postgres, psycopg) send the same text in a Parse on every execution, and
//! each Parse is scanned for session-state changes and resets (~500 instructions for a
//! 70-byte statement, a sixth of what pgweir spends on a tpcb-like transaction). The answers
//! depend on the text alone, so they are kept for the texts a connection was last asked to
//! parse. A connection serves one client at a time: no lock. The texts are kept whole and
//! compared whole, so a text that is not there is never answered for.

use super::params::ResetScope;

/// Texts kept per connection. A transaction of a driver's usual shape has a handful.
const ENTRIES: usize = 16;

/// Longer texts are worked out every time and not kept, so a connection holds at most
/// `ENTRIES * MAX_TEXT` bytes of them.
const MAX_TEXT: usize = 1024;

/// What a Parse's text does: the session-state change it makes (a description, as
/// `client::hygiene` gives it) and the parameters it resets.
pub type ParseFacts = (Option<&'static str>, Option<ResetScope>);

#[derive(Debug, Default)]
pub struct ParseMemo {
    entries: Vec<(Box<[u8]>, ParseFacts)>,
    /// The entry the next new text replaces once all are taken (round robin).
    victim: usize,
    /// Hashes of the last texts met once and not kept (0: none). A text is kept the second
    /// time it comes, so a client whose every text is new (literals written into it) pays a
    /// hash per Parse, not an allocation and a copy.
    met_once: [u64; ENTRIES],
    met_next: usize,
}

impl ParseMemo {
    /// The facts of `text`: remembered, or worked out by `work_out` (and remembered if the
    /// text came before).
    pub fn facts(&mut self, text: &[u8], work_out: impl FnOnce(&[u8]) -> ParseFacts) -> ParseFacts {
        if text.len() > MAX_TEXT {
            return work_out(text);
        }
        // The length first: most texts are told apart by it without a compare of the bytes.
        if let Some((_, facts)) = self.entries.iter().find(|(t, _)| t.len() == text.len() && **t == *text) {
            return *facts;
        }
        let facts = work_out(text);
        let h = hash(text);
        match self.met_once.iter().position(|&m| m == h) {
            Some(i) => {
                self.met_once[i] = 0;
                let entry = (Box::from(text), facts);
                if self.entries.len() < ENTRIES {
                    self.entries.push(entry);
                } else {
                    self.entries[self.victim] = entry;
                    self.victim = (self.victim + 1) % ENTRIES;
                }
            }
            None => {
                self.met_once[self.met_next] = h;
                self.met_next = (self.met_next + 1) % ENTRIES;
            }
        }
        facts
    }
}

/// A 64-bit hash of `text`, never 0. Only admits texts (a collision keeps a text one sighting
/// early); answers always come from a whole compare.
fn hash(text: &[u8]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = text.len() as u64;
    let mut chunks = text.chunks_exact(8);
    for chunk in &mut chunks {
        let word = <[u8; 8]>::try_from(chunk).map_or(0, u64::from_le_bytes);
        h = (h.rotate_left(5) ^ word).wrapping_mul(K);
    }
    for &b in chunks.remainder() {
        h = (h.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
    }
    h | 1
}

#[cfg(test)]
mod tests {
    use super::{ENTRIES, MAX_TEXT, ParseFacts, ParseMemo};
    use std::cell::Cell;

    #[test]
    fn answers_a_text_it_has_met_twice_without_working_it_out_again() {
        let mut memo = ParseMemo::default();
        let calls = Cell::new(0);
        let work_out = |t: &[u8]| -> ParseFacts {
            calls.set(calls.get() + 1);
            (t.starts_with(b"SET").then_some("SET"), None)
        };
        for _ in 0..2 {
            assert_eq!(memo.facts(b"SET search_path = a", work_out), (Some("SET"), None));
            assert_eq!(memo.facts(b"SELECT 1", work_out), (None, None));
        }
        assert_eq!(calls.get(), 4, "met once, then kept");
        for _ in 0..3 {
            assert_eq!(memo.facts(b"SET search_path = a", work_out), (Some("SET"), None));
            assert_eq!(memo.facts(b"SELECT 1", work_out), (None, None));
        }
        assert_eq!(calls.get(), 4);
        // Same length, other bytes: worked out, not taken for its neighbour.
        assert_eq!(memo.facts(b"SET search_path = b", work_out), (Some("SET"), None));
        assert_eq!(memo.facts(b"SELECT 2", work_out), (None, None));
        assert_eq!(calls.get(), 6);
    }

    #[test]
    fn texts_that_never_come_again_are_not_kept() {
        let mut memo = ParseMemo::default();
        for i in 0..200 {
            memo.facts(format!("SELECT * FROM t WHERE id = {i}").as_bytes(), |_| (None, None));
        }
        assert!(memo.entries.is_empty());
    }

    #[test]
    fn keeps_a_bounded_number_of_bounded_texts() {
        let mut memo = ParseMemo::default();
        let calls = Cell::new(0);
        let work_out = |_: &[u8]| -> ParseFacts {
            calls.set(calls.get() + 1);
            (None, None)
        };
        for i in 0..ENTRIES * 3 {
            let text = format!("SELECT {i}");
            memo.facts(text.as_bytes(), work_out);
            memo.facts(text.as_bytes(), work_out);
        }
        assert_eq!(memo.entries.len(), ENTRIES);
        // The newest are kept, the oldest replaced.
        let before = calls.get();
        memo.facts(format!("SELECT {}", ENTRIES * 3 - 1).as_bytes(), work_out);
        assert_eq!(calls.get(), before);
        memo.facts(b"SELECT 0", work_out);
        assert_eq!(calls.get(), before + 1);
        let long = vec![b'x'; MAX_TEXT + 1];
        for _ in 0..3 {
            memo.facts(&long, work_out);
        }
        assert_eq!(calls.get(), before + 4, "a long text is worked out every time");
        assert!(memo.entries.iter().all(|(t, _)| t.len() <= MAX_TEXT));
    }
}
