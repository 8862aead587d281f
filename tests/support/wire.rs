//! Raw protocol v3 framing for tests that speak the wire protocol themselves.

#![allow(dead_code)]

use tokio::io::{AsyncRead, AsyncReadExt};

/// One frontend message: tag, length (counting itself) and body.
pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Reads exactly one backend message, header included (nothing after it is consumed).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l >= 4)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("message length {len}")))?;
    let mut m = Vec::with_capacity(1 + len);
    m.extend_from_slice(&header);
    m.resize(1 + len, 0);
    r.read_exact(&mut m[5..]).await?;
    Ok(m)
}
