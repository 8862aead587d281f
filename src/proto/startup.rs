//! The untagged packets a connection starts with: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage. Each is `length (4) | code (4) | payload`; callers pass exactly the declared
//! length and keep what was read beyond it apart (bytes stuffed behind an SSLRequest fail a TLS
//! login, `client::handshake`).

use std::borrow::Cow;

use super::{ProtocolError, read_cstr, read_i32};

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: i32 = 196608;
/// Startup packets larger than this are refused before they are read (PostgreSQL uses 10000).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// A decoded first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupParams),
}

/// The key a client presents in a CancelRequest, as carried in BackendKeyData.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// Parameters of a StartupMessage, in the order sent. Values stay raw bytes: they are forwarded
/// to PostgreSQL, which may interpret them in a non-UTF-8 client_encoding.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupParams {
    /// Minor protocol version requested (3.x); pgweir answers 3.0 via NegotiateProtocolVersion
    /// when it is above 0.
    pub minor_version: u16,
    /// The parameters as the client sent them, `name NUL value NUL` each, without the final NUL:
    /// one allocation per login instead of two per parameter (the packet's own, when the reader
    /// hands it over). Checked when parsed: every string terminated, every name UTF-8.
    pairs: Pairs,
    /// Where each parameter lies in `pairs`, found while parsing: a login looks up half a
    /// dozen names, and splitting the packet again for each cost more than the rest of the
    /// lookups together.
    spans: Vec<Span>,
}

/// [`StartupParams::pairs`]: text when all of it is UTF-8, as drivers send it, so names and
/// values come out as `str`s without checking each again (half a dozen checks per login cost
/// more than the one of the whole); bytes when a value is in another encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pairs {
    Text(String),
    Bytes(Vec<u8>),
}

impl Default for Pairs {
    fn default() -> Self {
        Pairs::Text(String::new())
    }
}

impl Pairs {
    fn bytes(&self) -> &[u8] {
        match self {
            Pairs::Text(text) => text.as_bytes(),
            Pairs::Bytes(bytes) => bytes,
        }
    }

    /// `range` as a `str`; None when it is not UTF-8. A range between NULs of UTF-8 text lies
    /// on character boundaries, so text needs no check.
    fn str(&self, range: std::ops::Range<usize>) -> Option<&str> {
        match self {
            Pairs::Text(text) => text.get(range),
            Pairs::Bytes(bytes) => std::str::from_utf8(bytes.get(range)?).ok(),
        }
    }
}

/// One parameter's place in [`StartupParams::pairs`]: the name is `name..value - 1` (the NUL
/// between them), the value `value..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    name: u32,
    value: u32,
    end: u32,
}

impl StartupParams {
    /// The parameters as sent: two packets with the same bytes here ask for the same session.
    pub fn bytes(&self) -> &[u8] {
        self.pairs.bytes()
    }

    /// The parameters in the order the client sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let bytes = self.pairs.bytes();
        self.spans
            .iter()
            .map(move |s| (self.name(s), &bytes[s.value as usize..s.end as usize]))
    }

    /// [`StartupParams::iter`] without turning names into `str`s.
    pub fn raw(&self) -> impl DoubleEndedIterator<Item = (&[u8], &[u8])> {
        let bytes = self.pairs.bytes();
        self.spans.iter().map(move |s| {
            let (name, value, end) = (s.name as usize, s.value as usize, s.end as usize);
            (&bytes[name..value - 1], &bytes[value..end])
        })
    }

    /// `span`'s name, checked to be UTF-8 at parse time (one that were not would read as empty).
    fn name(&self, span: &Span) -> &str {
        self.pairs
            .str(span.name as usize..span.value as usize - 1)
            .unwrap_or_default()
    }

    /// Where `key`'s value is; the last one when the client sent it more than once, as
    /// PostgreSQL reads a startup packet.
    fn find(&self, key: &str) -> Option<std::ops::Range<usize>> {
        let bytes = self.pairs.bytes();
        self.spans
            .iter()
            .rev()
            .find(|s| &bytes[s.name as usize..s.value as usize - 1] == key.as_bytes())
            .map(|s| s.value as usize..s.end as usize)
    }

    /// The value of `key`; the last one when the client sent it more than once.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.find(key).map(|range| &self.pairs.bytes()[range])
    }

    /// [`StartupParams::get`] when the value is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.find(key).and_then(|range| self.pairs.str(range))
    }

    /// `_pq_.*` protocol options the client asked for; pgweir supports none of them.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        let bytes = self.pairs.bytes();
        self.spans
            .iter()
            .filter(move |s| bytes[s.name as usize..].starts_with(b"_pq_."))
            .map(|s| self.name(s))
    }
}

/// Decodes a first packet. `packet` is the whole packet including its 4-byte length prefix, and
/// its length has already been checked against [`MAX_STARTUP_LEN`] and to be at least 8. A
/// StartupMessage's parameters keep an owned packet's allocation.
pub fn parse_startup_packet<'a>(packet: impl Into<Cow<'a, [u8]>>) -> Result<StartupPacket, ProtocolError> {
    const WHAT: &str = "startup";
    let packet = packet.into();
    let bytes: &[u8] = &packet;
    let declared = read_i32(bytes, 0).ok_or(ProtocolError::Malformed {
        what: WHAT,
        why: "shorter than 8 bytes",
    })?;
    if declared < 8 || declared as usize != packet.len() {
        return Err(ProtocolError::Malformed {
            what: WHAT,
            why: "length does not match",
        });
    }
    let code = read_i32(bytes, 4).ok_or(ProtocolError::Malformed {
        what: WHAT,
        why: "no protocol code",
    })?;
    match code {
        SSL_REQUEST_CODE if packet.len() == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if packet.len() == 8 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if packet.len() == 16 => Ok(StartupPacket::Cancel(CancelKey {
            pid: read_i32(bytes, 8).unwrap_or_default(),
            secret: read_i32(bytes, 12).unwrap_or_default(),
        })),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => Err(ProtocolError::Malformed {
            what: WHAT,
            why: "request code with the wrong length",
        }),
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            let mut pos = 8;
            // libpq sends four to six parameters, pgJDBC eight: one allocation for most.
            let mut spans = Vec::with_capacity(8);
            loop {
                let (key, next) = read_cstr(bytes, pos).ok_or(ProtocolError::Malformed {
                    what: WHAT,
                    why: "unterminated parameter name",
                })?;
                if key.is_empty() {
                    if next != packet.len() {
                        return Err(ProtocolError::Malformed {
                            what: WHAT,
                            why: "bytes after the terminating NUL",
                        });
                    }
                    break;
                }
                let (_, after) = read_cstr(bytes, next).ok_or(ProtocolError::Malformed {
                    what: WHAT,
                    why: "unterminated parameter value",
                })?;
                // Offsets into `pairs`, which starts at byte 8; the packet is at most
                // MAX_STARTUP_LEN long, so they fit.
                spans.push(Span {
                    name: (pos - 8) as u32,
                    value: (next - 8) as u32,
                    end: (after - 1 - 8) as u32,
                });
                pos = after;
            }
            // Up to the final NUL, which `pos` stands on.
            let pairs = match packet {
                Cow::Borrowed(packet) => packet[8..pos].to_vec(),
                Cow::Owned(mut packet) => {
                    packet.truncate(pos);
                    packet.drain(..8);
                    packet
                }
            };
            let pairs = match String::from_utf8(pairs) {
                Ok(text) => Pairs::Text(text),
                Err(e) => {
                    let bytes = e.into_bytes();
                    for s in &spans {
                        std::str::from_utf8(&bytes[s.name as usize..s.value as usize - 1]).map_err(|_| {
                            ProtocolError::Malformed {
                                what: WHAT,
                                why: "parameter name is not UTF-8",
                            }
                        })?;
                    }
                    Pairs::Bytes(bytes)
                }
            };
            Ok(StartupPacket::Startup(StartupParams {
                minor_version: minor,
                pairs,
                spans,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            parse_startup_packet(packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup_packet(packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let mut key = 7i32.to_be_bytes().to_vec();
        key.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup_packet(packet(CANCEL_REQUEST_CODE, &key)),
            Ok(StartupPacket::Cancel(CancelKey { pid: 7, secret: -9 }))
        );
        let p = parse_startup_packet(packet(PROTOCOL_3_0, b"user\0bob\0database\0db\0\0"));
        let Ok(StartupPacket::Startup(params)) = p else {
            panic!("{p:?}")
        };
        assert_eq!(params.get_str("user"), Some("bob"));
        assert_eq!(params.get_str("database"), Some("db"));
    }

    #[test]
    fn lookups_agree_with_splitting_the_packet() {
        // The spans found while parsing against the packet split at its NULs, the last of a
        // repeated name winning.
        let bodies: [&[u8]; 5] = [
            b"\0",
            b"user\0\0\0",
            b"user\0a\0database\0b\0user\0c\0\0",
            b"x\0\0y\0long value with spaces\0x\0\0_pq_.a\0\0_pq_.b\0on\0\0",
            b"options\0-c a=b\0application_name\0\xff\xfe\0\0",
        ];
        for body in bodies {
            let Ok(StartupPacket::Startup(params)) = parse_startup_packet(packet(PROTOCOL_3_0, body)) else {
                panic!("not a startup packet: {body:?}")
            };
            // Without the last value's NUL and the terminating one.
            let pairs: Vec<(&[u8], &[u8])> = match body.len() {
                1 => Vec::new(),
                n => {
                    let strings: Vec<&[u8]> = body[..n - 2].split(|&b| b == 0).collect();
                    strings.chunks(2).map(|p| (p[0], p[1])).collect()
                }
            };
            assert_eq!(params.raw().collect::<Vec<_>>(), pairs, "{body:?}");
            for (name, _) in &pairs {
                let last = pairs.iter().rev().find(|(n, _)| n == name).map(|(_, v)| *v);
                let name = std::str::from_utf8(name).unwrap();
                assert_eq!(params.get(name), last, "{name} in {body:?}");
            }
            assert_eq!(params.get("absent"), None);
            let options: Vec<&str> = pairs
                .iter()
                .filter(|(n, _)| n.starts_with(b"_pq_."))
                .map(|(n, _)| std::str::from_utf8(n).unwrap())
                .collect();
            assert_eq!(params.protocol_options().collect::<Vec<_>>(), options);
        }
    }

    #[test]
    fn parameters_come_back_in_order_with_empty_values_and_options() {
        let body = b"user\0bob\0application_name\0\0_pq_.x\0on\0options\0-c a=b\0\0";
        let Ok(StartupPacket::Startup(params)) = parse_startup_packet(packet(PROTOCOL_3_0, body)) else {
            panic!("not a startup packet")
        };
        let all: Vec<(&str, &[u8])> = params.iter().collect();
        assert_eq!(
            all,
            [
                ("user", &b"bob"[..]),
                ("application_name", b""),
                ("_pq_.x", b"on"),
                ("options", b"-c a=b")
            ]
        );
        assert_eq!(params.get("application_name"), Some(&b""[..]));
        assert_eq!(params.get("database"), None);
        assert_eq!(params.protocol_options().collect::<Vec<_>>(), ["_pq_.x"]);
        let Ok(StartupPacket::Startup(none)) = parse_startup_packet(packet(PROTOCOL_3_0, b"\0")) else {
            panic!("not a startup packet")
        };
        assert_eq!(none.iter().count(), 0);
        assert!(parse_startup_packet(packet(PROTOCOL_3_0, b"us\xffer\0bob\0\0")).is_err());
    }

    /// Text and bytes (a value in another encoding) answer alike, owned packet or borrowed.
    #[test]
    fn parameters_read_the_same_whether_the_packet_is_utf8_or_not() {
        for body in [
            &b"user\0bob\0application_name\0caf\xc3\xa9\0\0"[..],
            b"user\0bob\0application_name\0caf\xe9\0\0",
        ] {
            let packet = packet(PROTOCOL_3_0, body);
            let owned = parse_startup_packet(packet.clone());
            assert_eq!(parse_startup_packet(&packet), owned);
            let Ok(StartupPacket::Startup(params)) = owned else {
                panic!("not a startup packet")
            };
            assert_eq!(params.bytes(), &body[..body.len() - 1]);
            assert_eq!(params.get_str("user"), Some("bob"));
            let value = &body[26..body.len() - 2];
            assert_eq!(params.get("application_name"), Some(value));
            assert_eq!(params.get_str("application_name"), std::str::from_utf8(value).ok());
            let names: Vec<&str> = params.iter().map(|(k, _)| k).collect();
            assert_eq!(names, ["user", "application_name"]);
        }
        // A name must be UTF-8 even when a value is not, and whichever comes first.
        for body in [&b"us\xe9r\0bob\0\0"[..], b"a\0\xe9\0us\xe9r\0bob\0\0"] {
            assert!(parse_startup_packet(packet(PROTOCOL_3_0, body)).is_err(), "{body:?}");
        }
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse_startup_packet(packet(PROTOCOL_3_0, b"user\0bob")).is_err());
        assert!(parse_startup_packet(packet(PROTOCOL_3_0, b"user\0bob\0\0junk")).is_err());
        assert!(parse_startup_packet(packet(SSL_REQUEST_CODE, b"x")).is_err());
        assert!(matches!(
            parse_startup_packet(packet(0x0002_0000, b"\0")),
            Err(ProtocolError::UnsupportedProtocol { major: 2, .. })
        ));
        let mut p = packet(PROTOCOL_3_0, b"\0");
        p[3] = 200;
        assert!(parse_startup_packet(&p).is_err());
        for cut in 0..8 {
            assert!(parse_startup_packet(&p[..cut]).is_err());
        }
    }
}
