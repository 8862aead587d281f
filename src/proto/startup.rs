//! The untagged packets a connection starts with: SSLRequest, GSSENCRequest, CancelRequest and
//! StartupMessage. Each is `length (4) | code (4) | payload`; callers pass exactly the declared
//! length and keep what was read beyond it apart (bytes stuffed behind an SSLRequest fail a TLS
//! login, `client::handshake`).

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
    /// one allocation per login instead of two per parameter. Checked when parsed: every string
    /// terminated, every name UTF-8.
    pairs: Box<[u8]>,
    /// Where each parameter lies in `pairs`, found while parsing: a login looks up half a
    /// dozen names, and splitting the packet again for each cost more than the rest of the
    /// lookups together.
    spans: Vec<Span>,
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
        &self.pairs
    }

    /// The parameters in the order the client sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        // Checked at parse time; a name that were not UTF-8 would read as empty.
        self.raw().map(|(k, v)| (std::str::from_utf8(k).unwrap_or_default(), v))
    }

    /// [`StartupParams::iter`] without turning names into `str`s.
    pub fn raw(&self) -> impl DoubleEndedIterator<Item = (&[u8], &[u8])> {
        self.spans.iter().map(|s| {
            let (name, value, end) = (s.name as usize, s.value as usize, s.end as usize);
            (&self.pairs[name..value - 1], &self.pairs[value..end])
        })
    }

    /// The value of `key`; the last one when the client sent it more than once, as PostgreSQL
    /// reads a startup packet.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.raw().rev().find(|(k, _)| *k == key.as_bytes()).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// `_pq_.*` protocol options the client asked for; pgweir supports none of them.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.raw()
            .filter(|(k, _)| k.starts_with(b"_pq_."))
            .map(|(k, _)| std::str::from_utf8(k).unwrap_or_default())
    }
}

/// Decodes a first packet. `packet` is the whole packet including its 4-byte length prefix, and
/// its length has already been checked against [`MAX_STARTUP_LEN`] and to be at least 8.
pub fn parse_startup_packet(packet: &[u8]) -> Result<StartupPacket, ProtocolError> {
    const WHAT: &str = "startup";
    let declared = read_i32(packet, 0).ok_or(ProtocolError::Malformed {
        what: WHAT,
        why: "shorter than 8 bytes",
    })?;
    if declared < 8 || declared as usize != packet.len() {
        return Err(ProtocolError::Malformed {
            what: WHAT,
            why: "length does not match",
        });
    }
    let code = read_i32(packet, 4).ok_or(ProtocolError::Malformed {
        what: WHAT,
        why: "no protocol code",
    })?;
    match code {
        SSL_REQUEST_CODE if packet.len() == 8 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if packet.len() == 8 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if packet.len() == 16 => Ok(StartupPacket::Cancel(CancelKey {
            pid: read_i32(packet, 8).unwrap_or_default(),
            secret: read_i32(packet, 12).unwrap_or_default(),
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
                let (key, next) = read_cstr(packet, pos).ok_or(ProtocolError::Malformed {
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
                let (_, after) = read_cstr(packet, next).ok_or(ProtocolError::Malformed {
                    what: WHAT,
                    why: "unterminated parameter value",
                })?;
                std::str::from_utf8(key).map_err(|_| ProtocolError::Malformed {
                    what: WHAT,
                    why: "parameter name is not UTF-8",
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
            Ok(StartupPacket::Startup(StartupParams {
                minor_version: minor,
                // Up to the final NUL, which `pos` stands on.
                pairs: packet[8..pos].into(),
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
            parse_startup_packet(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup_packet(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let mut key = 7i32.to_be_bytes().to_vec();
        key.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_startup_packet(&packet(CANCEL_REQUEST_CODE, &key)),
            Ok(StartupPacket::Cancel(CancelKey { pid: 7, secret: -9 }))
        );
        let p = parse_startup_packet(&packet(PROTOCOL_3_0, b"user\0bob\0database\0db\0\0"));
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
            let Ok(StartupPacket::Startup(params)) = parse_startup_packet(&packet(PROTOCOL_3_0, body)) else {
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
        let Ok(StartupPacket::Startup(params)) = parse_startup_packet(&packet(PROTOCOL_3_0, body)) else {
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
        let Ok(StartupPacket::Startup(none)) = parse_startup_packet(&packet(PROTOCOL_3_0, b"\0")) else {
            panic!("not a startup packet")
        };
        assert_eq!(none.iter().count(), 0);
        assert!(parse_startup_packet(&packet(PROTOCOL_3_0, b"us\xffer\0bob\0\0")).is_err());
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse_startup_packet(&packet(PROTOCOL_3_0, b"user\0bob")).is_err());
        assert!(parse_startup_packet(&packet(PROTOCOL_3_0, b"user\0bob\0\0junk")).is_err());
        assert!(parse_startup_packet(&packet(SSL_REQUEST_CODE, b"x")).is_err());
        assert!(matches!(
            parse_startup_packet(&packet(0x0002_0000, b"\0")),
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
