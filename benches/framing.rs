//! Header-only framing cost on the workloads of crates.md §1.7: a 1,000-row result and a batch
//! of 100 Parse/Bind/Describe/Execute/Sync. Run with `cargo bench --bench framing`.

use criterion::{Criterion, criterion_group, criterion_main};
use pgweir::proto::frame_at;
use std::hint::black_box;

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
}

fn result_set() -> Vec<u8> {
    let mut out = Vec::new();
    msg(&mut out, b'T', &[0u8; 120]);
    for i in 0..1000 {
        let row = format!("{i:>10}|some text value|another column|{i}|0.5");
        msg(&mut out, b'D', row.as_bytes());
    }
    msg(&mut out, b'C', b"SELECT 1000\0");
    msg(&mut out, b'Z', b"I");
    out
}

fn extended_batch() -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100 {
        msg(
            &mut out,
            b'P',
            b"\0select aid, bid, abalance from pgbench_accounts where aid = $1\0\0\x01\0\0\0\x17",
        );
        msg(&mut out, b'B', b"\0\0\0\0\0\x01\0\0\0\x041234\0\0");
        msg(&mut out, b'D', b"P\0");
        msg(&mut out, b'E', b"\0\0\0\0\0");
        msg(&mut out, b'S', b"");
    }
    out
}

fn count_frames(buf: &[u8]) -> usize {
    let mut pos = 0;
    let mut n = 0;
    while let Ok(Some(f)) = frame_at(buf, pos, 1 << 30) {
        pos += f.total_len;
        n += 1;
    }
    n
}

fn framing(c: &mut Criterion) {
    let rs = result_set();
    let batch = extended_batch();
    assert_eq!(count_frames(&rs), 1003);
    assert_eq!(count_frames(&batch), 500);
    c.bench_function("frame 1000-row result", |b| b.iter(|| count_frames(black_box(&rs))));
    c.bench_function("frame 100x P/B/D/E/S batch", |b| {
        b.iter(|| count_frames(black_box(&batch)))
    });
}

criterion_group!(benches, framing);
criterion_main!(benches);
