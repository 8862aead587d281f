//! SCRAM-SHA-256 message parsers on both sides, and the stored-verifier parser.
//!
//! Input: a selector byte, then two messages separated by the first NUL. A literal `r=*` in a
//! message is replaced by the real nonce, so the fuzzer gets past the random-nonce check and
//! into proof and signature verification.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgweir::auth::scram::{ClientSecret, ScramClient, ScramKeys, ScramServer, ScramVerifier};

fn with_nonce(msg: &[u8], nonce: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + nonce.len());
    let mut i = 0;
    while i < msg.len() {
        if msg[i..].starts_with(b"r=*") {
            out.extend_from_slice(b"r=");
            out.extend_from_slice(nonce.as_bytes());
            i += 3;
        } else {
            out.push(msg[i]);
            i += 1;
        }
    }
    out
}

fn attr<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split(',').find_map(|p| p.strip_prefix(name))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &rest[..0]),
    };
    match selector % 3 {
        0 => {
            // Server side: client-first then client-final. Iterations 1 keeps PBKDF2 cheap.
            let verifier = ScramVerifier::from_password("pw", b"0123456789abcdef", 1);
            let mut server = ScramServer::new(verifier);
            if let Ok(server_first) = server.handle_client_first(first) {
                let server_first = String::from_utf8(server_first).expect("server-first is UTF-8");
                let nonce = attr(&server_first, "r=").expect("server-first has a nonce");
                let _ = server.handle_client_final(&with_nonce(second, nonce));
            }
        }
        1 => {
            // Client side with recovered keys (no PBKDF2): server-first then server-final.
            let keys = ScramKeys {
                client_key: [7; 32],
                server_key: [9; 32],
            };
            let mut client = ScramClient::new(ClientSecret::Keys(keys));
            let client_first = String::from_utf8(client.client_first()).expect("client-first is UTF-8");
            let nonce = attr(&client_first, "r=").expect("client-first has a nonce");
            if client.handle_server_first(&with_nonce(first, nonce)).is_ok() {
                let _ = client.handle_server_final(second);
            }
        }
        _ => {
            if let Ok(s) = std::str::from_utf8(rest)
                && let Ok(v) = ScramVerifier::parse(s)
            {
                // What we parse, we can print back and parse to the same value.
                assert_eq!(ScramVerifier::parse(&v.to_pg_string()).ok(), Some(v));
            }
        }
    }
});
