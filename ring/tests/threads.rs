//! Two real threads: every item arrives once, in order, across many wrap-arounds;
//! and a model check of single-threaded sequences against a VecDeque.
#![cfg(not(loom))]

use std::collections::VecDeque;

use proptest::prelude::*;

#[test]
fn two_threads_move_a_million_items_in_order() {
    let (mut p, mut c) = gw_ring::channel::<u64>(64).unwrap();
    const N: u64 = 1_000_000;
    let producer = std::thread::spawn(move || {
        let mut next = 0u64;
        while next < N {
            if next.is_multiple_of(3) {
                let mut batch = next..(next + 17).min(N);
                next += p.push_iter(&mut batch) as u64;
            } else if p.push(next).is_ok() {
                next += 1;
            }
        }
    });
    let mut expect = 0u64;
    let mut buf = Vec::new();
    while expect < N {
        buf.clear();
        if expect.is_multiple_of(2) {
            c.pop_into(&mut buf, 32);
        } else if let Some(v) = c.pop() {
            buf.push(v);
        }
        for v in &buf {
            assert_eq!(*v, expect, "lost, duplicated or reordered");
            expect += 1;
        }
    }
    producer.join().unwrap();
    assert_eq!(c.pop(), None);
}

#[derive(Debug, Clone)]
enum Op {
    Push(u16),
    PushMany(u8),
    Pop,
    PopMany(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u16>().prop_map(Op::Push),
        (0u8..20).prop_map(Op::PushMany),
        Just(Op::Pop),
        (0u8..20).prop_map(Op::PopMany),
    ]
}

proptest! {
    #[test]
    fn behaves_like_a_bounded_queue(cap in 1usize..40, ops in proptest::collection::vec(op(), 0..300)) {
        let (mut p, mut c) = gw_ring::channel::<u32>(cap).unwrap();
        let cap = p.capacity();
        let mut model = VecDeque::new();
        let mut next = 0u32;
        for op in ops {
            match op {
                Op::Push(v) => {
                    let r = p.push(u32::from(v));
                    if model.len() < cap {
                        prop_assert!(r.is_ok());
                        model.push_back(u32::from(v));
                    } else {
                        prop_assert_eq!(r, Err(u32::from(v)));
                    }
                }
                Op::PushMany(n) => {
                    let mut it = (0..u32::from(n)).map(|i| next + i);
                    let took = p.push_iter(&mut it);
                    prop_assert_eq!(took, usize::from(n).min(cap - model.len()));
                    for i in 0..took as u32 {
                        model.push_back(next + i);
                    }
                    next += u32::from(n);
                }
                Op::Pop => prop_assert_eq!(c.pop(), model.pop_front()),
                Op::PopMany(n) => {
                    let mut out = Vec::new();
                    let got = c.pop_into(&mut out, usize::from(n));
                    let want: Vec<u32> = (0..got).filter_map(|_| model.pop_front()).collect();
                    prop_assert_eq!(got, usize::from(n).min(got + model.len()));
                    prop_assert_eq!(out, want);
                }
            }
        }
    }
}
