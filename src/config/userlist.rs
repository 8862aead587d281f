//! PgBouncer's `auth_file` format: one user per line, `"name" "password"`, where the password
//! may be plain text, `md5…` or a `SCRAM-SHA-256$…` verifier. `""` inside quotes is a quote;
//! blank lines and lines starting with `;` or `#` are ignored.
//!
//! Unlike PgBouncer, which skips lines it cannot read and ignores whatever follows the second
//! field, every malformed line is an error here: a silently skipped line is a user who cannot
//! log in, with nothing in the log to say why.

use std::collections::HashMap;

/// Parses a userlist into `(user, password)` pairs in file order. An error names the 1-based
/// line number. A user listed twice is an error (naming both lines) rather than last-one-wins,
/// because which entry was meant cannot be known.
pub fn parse_userlist(text: &str) -> Result<Vec<(String, String)>, String> {
    // Editors on Windows may save a byte-order mark, which would otherwise hide the first quote.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut users = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let (name, rest) = quoted(trimmed)
            .map_err(|e| format!("line {line_no}: {e} in the user name (expected \"user\" \"password\")"))?;
        if name.is_empty() {
            return Err(format!("line {line_no}: empty user name"));
        }
        if !rest.starts_with(char::is_whitespace) {
            return Err(format!(
                "line {line_no}: expected whitespace and a quoted password after the user name"
            ));
        }
        let (password, rest) = quoted(rest.trim_start()).map_err(|e| format!("line {line_no}: {e} in the password"))?;
        let rest = rest.trim();
        if !rest.is_empty() && !rest.starts_with(';') && !rest.starts_with('#') {
            return Err(format!(
                "line {line_no}: unexpected text after the password: {rest:?} (a comment must start with ; or #)"
            ));
        }
        if let Some(first) = seen.insert(name.clone(), line_no) {
            return Err(format!(
                "line {line_no}: user {name:?} is already listed on line {first}"
            ));
        }
        users.push((name, password));
    }
    Ok(users)
}

/// Reads one `"…"` string at the start of `s` (`""` inside is a literal quote); returns its
/// contents and what follows the closing quote.
fn quoted(s: &str) -> Result<(String, &str), &'static str> {
    let body = s.strip_prefix('"').ok_or("missing opening double quote")?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                out.push('"');
                continue;
            }
            // The closing quote is one byte, so the remainder starts right after it.
            return Ok((out, &body[i + 1..]));
        }
        out.push(c);
    }
    Err("missing closing double quote")
}

#[cfg(test)]
mod tests {
    use super::parse_userlist;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(u, p)| ((*u).to_owned(), (*p).to_owned())).collect()
    }

    #[test]
    fn parses_pgbouncer_userlists() {
        let text = "; comment\n# another\n\n\"alice\" \"secret\"\n\"bob\"   \"md5d41d8cd98f00b204e9800998ecf8427e\"\n\"o\"\"brien\" \"p\"\"w\"\n";
        assert_eq!(
            parse_userlist(text).unwrap(),
            pairs(&[
                ("alice", "secret"),
                ("bob", "md5d41d8cd98f00b204e9800998ecf8427e"),
                ("o\"brien", "p\"w"),
            ])
        );
    }

    #[test]
    fn accepts_scram_verifiers_and_odd_characters() {
        let scram = "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB";
        let text = format!("\"carol\" \"{scram}\"\n\"d a v e\" \"pw with spaces; and # signs\"\n\"empty\" \"\"\n");
        assert_eq!(
            parse_userlist(&text).unwrap(),
            pairs(&[
                ("carol", scram),
                ("d a v e", "pw with spaces; and # signs"),
                ("empty", ""),
            ])
        );
    }

    #[test]
    fn tolerates_whitespace_crlf_bom_and_trailing_comments() {
        let text = "\u{feff}  \"a\"\t\"b\"  ; trailing comment\r\n\r\n   # indented comment\r\n\"c\" \"d\"#x\r\n";
        assert_eq!(parse_userlist(text).unwrap(), pairs(&[("a", "b"), ("c", "d")]));
    }

    #[test]
    fn empty_input_is_an_empty_list() {
        assert_eq!(parse_userlist("").unwrap(), vec![]);
        assert_eq!(parse_userlist("; only a comment\n\n").unwrap(), vec![]);
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_userlist("\"a\" \"b\"\nalice secret\n").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("opening double quote"), "{e}");
        let e = parse_userlist("\"a\"\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("password"), "{e}");
        let e = parse_userlist("; c\n\"a\" \"b\" junk\n").unwrap_err();
        assert!(e.starts_with("line 2:") && e.contains("junk"), "{e}");
        let e = parse_userlist("\"a\" \"unterminated\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("closing double quote"), "{e}");
        let e = parse_userlist("\"unterminated b\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("user name"), "{e}");
        let e = parse_userlist("\"\" \"pw\"\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("empty user name"), "{e}");
        let e = parse_userlist("\"a\"\"b\"\n").unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
        let e = parse_userlist("\"a\"\"pw\"\"\n").unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
    }

    #[test]
    fn fields_must_be_separated() {
        // `"a""b"` is one field (a"b), so this is a user name with no password.
        let e = parse_userlist("\"a\"x \"b\"\n").unwrap_err();
        assert!(e.starts_with("line 1:") && e.contains("whitespace"), "{e}");
    }

    #[test]
    fn duplicate_users_are_rejected() {
        let e = parse_userlist("\"a\" \"1\"\n\n\"a\" \"2\"\n").unwrap_err();
        assert!(e.starts_with("line 3:") && e.contains("line 1"), "{e}");
    }
}
