//! PgBouncer's `auth_file` format: one user per line, `"name" "password"`, where the password
//! may be plain text, `md5…` or a `SCRAM-SHA-256$…` verifier. `""` inside quotes is a quote;
//! blank lines and lines starting with `;` or `#` are ignored.

/// Parses a userlist; an error names the 1-based line number.
pub fn parse_userlist(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut users = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        let (name, rest) = quoted(trimmed).ok_or_else(|| format!("line {line_no}: expected \"user\" \"password\""))?;
        let (password, rest) = quoted(rest.trim_start())
            .ok_or_else(|| format!("line {line_no}: expected a quoted password after the user name"))?;
        let rest = rest.trim();
        if !rest.is_empty() && !rest.starts_with(';') && !rest.starts_with('#') {
            return Err(format!("line {line_no}: unexpected text after the password: {rest:?}"));
        }
        if name.is_empty() {
            return Err(format!("line {line_no}: empty user name"));
        }
        users.push((name, password));
    }
    Ok(users)
}

/// Reads one `"…"` string at the start of `s`; returns it and what follows.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices().peekable();
    let body = &s[1..];
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                out.push('"');
                continue;
            }
            return Some((out, &body[i + 1..]));
        }
        out.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::parse_userlist;

    #[test]
    fn parses_pgbouncer_userlists() {
        let text = "; comment\n# another\n\n\"alice\" \"secret\"\n\"bob\"   \"md5d41d8cd98f00b204e9800998ecf8427e\"\n\"o\"\"brien\" \"p\"\"w\"\n";
        assert_eq!(
            parse_userlist(text).unwrap(),
            vec![
                ("alice".into(), "secret".into()),
                ("bob".into(), "md5d41d8cd98f00b204e9800998ecf8427e".into()),
                ("o\"brien".into(), "p\"w".into()),
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse_userlist("\"a\" \"b\"\nalice secret\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(parse_userlist("\"a\"\n").unwrap_err().starts_with("line 1:"));
        assert!(parse_userlist("\"a\" \"b\" junk\n").is_err());
        assert!(parse_userlist("\"a\" \"unterminated\n").is_err());
    }
}
