//! The floor: the least a transaction pooler can do per transaction, as a yardstick for
//! pgweir's own cost (benches/pgbench_compare.sh with FLOOR=1; docs/performance.md).
//!
//! One thread, one epoll loop (mio), PgBouncer's shape: a client's readable event reads its
//! query and either forwards it to a free server or queues the client; a server's readable event
//! forwards the reply and, at ReadyForQuery 'I' with nothing else owed, hands the server straight
//! to the oldest queued client by sending that client's buffered query in the same step.
//!
//! Not a pooler anyone should run: trust login answered locally (user and database ignored),
//! no TLS, no prepared-statement tracking (so no `pgbench -M prepared`), no timeouts, no
//! session-state checks, no metrics, and a server that misbehaves stops it. What it measures is
//! the cost of the event loop, the syscalls and the framing alone.
//!
//!     cargo run --release --example floor -- LISTEN_PORT PG_PORT POOL_SIZE [DATABASE [USER]]
//!
//! `FLOOR_SPIN_NS=n` spins n ns before each forwarded batch of client messages (one per `-S`
//! transaction): user time standing in for a pooler's own work, to measure what a given amount
//! of it costs on the clock in a loop of this shape (docs/performance.md, round 15).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
/// Tokens from here on are servers; below, clients.
const SERVER_BASE: usize = 1 << 40;

/// A read buffer initialised once: `data[..filled]` is unread input.
struct ReadBuf {
    data: Vec<u8>,
    filled: usize,
}

impl ReadBuf {
    fn new() -> Self {
        ReadBuf {
            data: vec![0; 16 * 1024],
            filled: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[..self.filled]
    }

    fn consume(&mut self, n: usize) {
        self.data.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Reads until the socket is drained: a read that leaves room in the buffer says so (with
    /// edge-triggered epoll, bytes arriving later raise a new event), which saves the `recv`
    /// that would only return EAGAIN — pgweir's `try_read_drained` does the same. False when
    /// the peer closed or failed.
    fn fill(&mut self, s: &mut TcpStream) -> bool {
        loop {
            if self.data.len() - self.filled < 4096 {
                let grown = self.data.len() * 2;
                self.data.resize(grown, 0);
            }
            let room = self.data.len() - self.filled;
            match s.read(&mut self.data[self.filled..]) {
                Ok(0) => return false,
                Ok(n) => {
                    self.filled += n;
                    if n < room {
                        return true;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

struct Peer {
    s: TcpStream,
    input: ReadBuf,
    /// Bytes a write could not take yet; flushed on the next writable event.
    output: Vec<u8>,
}

impl Peer {
    fn new(s: TcpStream) -> Self {
        Peer {
            s,
            input: ReadBuf::new(),
            output: Vec::new(),
        }
    }

    fn send(&mut self, data: &[u8]) {
        if !self.output.is_empty() {
            self.output.extend_from_slice(data);
            return;
        }
        match self.s.write(data) {
            Ok(n) => self.output.extend_from_slice(&data[n..]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => self.output.extend_from_slice(data),
            // A client that went away: its reply is dropped, the transaction still ends.
            Err(_) => {}
        }
    }

    fn flush(&mut self) {
        if let Ok(n) = self.s.write(&self.output) {
            self.output.drain(..n);
        }
    }
}

struct Client {
    peer: Peer,
    logged_in: bool,
    server: Option<usize>,
    queued: bool,
    gone: bool,
}

struct Server {
    peer: Peer,
    client: Option<usize>,
    /// ReadyForQuery messages still owed (one per Query or Sync sent).
    owed: u32,
    status: u8,
}

/// Calls `f(tag, body)` for each complete message at the start of `buf`; returns the bytes
/// they span.
fn frames(buf: &[u8], mut f: impl FnMut(u8, &[u8])) -> usize {
    let mut pos = 0;
    while buf.len() - pos >= 5 {
        let len = u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]) as usize;
        if len < 4 || buf.len() - pos < 1 + len {
            break;
        }
        f(buf[pos], &buf[pos + 5..pos + 1 + len]);
        pos += 1 + len;
    }
    pos
}

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// Opens and logs in one server connection (trust), blocking: done before the loop starts.
fn connect(pg_port: u16, database: &str, user: &str) -> std::io::Result<TcpStream> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg_port))?;
    s.set_nodelay(true)?;
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", database)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    s.write_all(&packet)?;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&chunk[..n]);
        let (mut ready, mut refused) = (false, false);
        frames(&seen, |tag, body| {
            ready |= tag == b'Z';
            // An error, or an authentication request other than AuthenticationOk.
            refused |= tag == b'E' || (tag == b'R' && body != [0, 0, 0, 0]);
        });
        if refused {
            return Err(std::io::Error::other("PostgreSQL refused the login (trust expected)"));
        }
        if ready {
            s.set_nonblocking(true)?;
            return Ok(TcpStream::from_std(s));
        }
    }
}

/// Forwards the client's complete messages to its server, counting the replies owed.
fn forward(server: &mut Server, client: &mut Client, spin: std::time::Duration) {
    if !spin.is_zero() {
        let t = std::time::Instant::now();
        while t.elapsed() < spin {
            std::hint::spin_loop();
        }
    }
    let mut owed = server.owed;
    let used = frames(client.peer.input.bytes(), |tag, _| {
        if tag == b'Q' || tag == b'S' {
            owed += 1;
        }
    });
    server.owed = owed;
    server.peer.send(&client.peer.input.bytes()[..used]);
    client.peer.input.consume(used);
}

/// Answers the client's startup locally. False while the startup packet is incomplete.
fn login(c: &mut Client) -> bool {
    let b = c.peer.input.bytes();
    if b.len() < 8 {
        return false;
    }
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let code = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    if code == 80877103 {
        // SSLRequest: no TLS here.
        c.peer.input.consume(8);
        c.peer.send(b"N");
        return login(c);
    }
    if b.len() < len {
        return false;
    }
    c.peer.input.consume(len);
    let mut out = Vec::new();
    message(&mut out, b'R', &0u32.to_be_bytes());
    for (k, v) in [
        ("server_version", "15.0"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
    ] {
        message(&mut out, b'S', format!("{k}\0{v}\0").as_bytes());
    }
    message(&mut out, b'K', &[0, 0, 0, 1, 0, 0, 0, 2]);
    message(&mut out, b'Z', b"I");
    c.peer.send(&out);
    c.logged_in = true;
    true
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: floor LISTEN_PORT PG_PORT POOL_SIZE [DATABASE [USER]]");
        std::process::exit(2);
    }
    let port = |i: usize| -> u16 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("not a port: {}", args[i]);
            std::process::exit(2)
        })
    };
    let (listen_port, pg_port) = (port(1), port(2));
    let size: usize = args[3].parse().unwrap_or(20);
    let spin = std::time::Duration::from_nanos(
        std::env::var("FLOOR_SPIN_NS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let database = args.get(4).map_or("bench", String::as_str);
    let user = args.get(5).map_or("postgres", String::as_str);

    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], listen_port)))?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut servers = Vec::with_capacity(size);
    let mut free = Vec::with_capacity(size);
    for i in 0..size {
        let mut s = connect(pg_port, database, user)?;
        poll.registry()
            .register(&mut s, Token(SERVER_BASE + i), Interest::READABLE | Interest::WRITABLE)?;
        servers.push(Server {
            peer: Peer::new(s),
            client: None,
            owed: 0,
            status: b'I',
        });
        free.push(i);
    }
    let mut clients: Vec<Option<Client>> = Vec::new();
    let mut vacant: Vec<usize> = Vec::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut events = Events::with_capacity(1024);
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let token = event.token().0;
            if event.token() == LISTENER {
                while let Ok((mut s, _)) = listener.accept() {
                    s.set_nodelay(true)?;
                    let id = vacant.pop().unwrap_or_else(|| {
                        clients.push(None);
                        clients.len() - 1
                    });
                    poll.registry()
                        .register(&mut s, Token(id), Interest::READABLE | Interest::WRITABLE)?;
                    clients[id] = Some(Client {
                        peer: Peer::new(s),
                        logged_in: false,
                        server: None,
                        queued: false,
                        gone: false,
                    });
                }
                continue;
            }
            if token >= SERVER_BASE {
                let si = token - SERVER_BASE;
                let server = &mut servers[si];
                if event.is_writable() && !server.peer.output.is_empty() {
                    server.peer.flush();
                }
                if !event.is_readable() {
                    continue;
                }
                if !server.peer.input.fill(&mut server.peer.s) {
                    return Err(std::io::Error::other("a server connection closed"));
                }
                let (mut owed, mut status) = (server.owed, server.status);
                let used = frames(server.peer.input.bytes(), |tag, body| {
                    if tag == b'Z' {
                        owed = owed.saturating_sub(1);
                        status = body.first().copied().unwrap_or(b'I');
                    }
                });
                server.owed = owed;
                server.status = status;
                let Some(ci) = server.client else {
                    // Nothing is owed to anyone: a notice between transactions.
                    server.peer.input.consume(used);
                    continue;
                };
                if let Some(c) = clients[ci].as_mut() {
                    c.peer.send(&server.peer.input.bytes()[..used]);
                }
                server.peer.input.consume(used);
                if server.owed > 0 || server.status != b'I' || server.peer.input.filled > 0 {
                    continue;
                }
                // Idle: unlink, then hand the server to the oldest queued client at once.
                server.client = None;
                if let Some(c) = clients[ci].as_mut() {
                    c.server = None;
                    if c.gone {
                        let _ = poll.registry().deregister(&mut c.peer.s);
                        clients[ci] = None;
                        vacant.push(ci);
                    }
                }
                let mut handed = false;
                while let Some(w) = queue.pop_front() {
                    if let Some(wc) = clients[w].as_mut() {
                        wc.queued = false;
                        wc.server = Some(si);
                        servers[si].client = Some(w);
                        forward(&mut servers[si], wc, spin);
                        handed = true;
                        break;
                    }
                }
                if !handed {
                    free.push(si);
                }
                continue;
            }
            let Some(c) = clients[token].as_mut() else {
                continue;
            };
            if event.is_writable() && !c.peer.output.is_empty() {
                c.peer.flush();
            }
            if !event.is_readable() {
                continue;
            }
            if !c.peer.input.fill(&mut c.peer.s) {
                c.gone = true;
            }
            let terminated = c.peer.input.bytes().first() == Some(&b'X');
            if c.gone || terminated {
                // A client that leaves mid-transaction keeps its slot until its server is idle.
                if c.server.is_none() {
                    let _ = poll.registry().deregister(&mut c.peer.s);
                    clients[token] = None;
                    vacant.push(token);
                } else {
                    c.gone = true;
                }
                continue;
            }
            if !c.logged_in && !login(c) {
                continue;
            }
            if c.peer.input.filled == 0 {
                continue;
            }
            match c.server {
                Some(si) => forward(&mut servers[si], c, spin),
                None if c.queued => {}
                None => match free.pop() {
                    Some(si) => {
                        c.server = Some(si);
                        servers[si].client = Some(token);
                        forward(&mut servers[si], c, spin);
                    }
                    None => {
                        c.queued = true;
                        queue.push_back(token);
                    }
                },
            }
        }
    }
}
