//! Model checking with loom: `RUSTFLAGS="--cfg loom" cargo test -p gw-ring --test loom --release`.
//! Every interleaving (bounded by loom's preemption bound) of a producer and a consumer
//! must deliver each item exactly once, in order, and drop what was never read.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;

#[test]
fn push_pop_across_wrap_around() {
    loom::model(|| {
        let (mut p, mut c) = gw_ring::channel::<u32>(2).unwrap();
        let t = thread::spawn(move || {
            let mut i = 0;
            while i < 3 {
                if p.push(i).is_ok() {
                    i += 1;
                } else {
                    thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < 3 {
            match c.pop() {
                Some(v) => {
                    assert_eq!(v, expect);
                    expect += 1;
                }
                None => thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}

#[test]
fn batches_publish_whole_and_in_order() {
    loom::model(|| {
        let (mut p, mut c) = gw_ring::channel::<u32>(2).unwrap();
        let t = thread::spawn(move || {
            let mut items = 0..4u32;
            let mut left = 4;
            while left > 0 {
                let n = p.push_iter(&mut items);
                if n == 0 {
                    thread::yield_now();
                }
                left -= n;
            }
        });
        let mut got = Vec::new();
        while got.len() < 4 {
            if c.pop_into(&mut got, 2) == 0 {
                thread::yield_now();
            }
        }
        assert_eq!(got, vec![0, 1, 2, 3]);
        t.join().unwrap();
    });
}

#[test]
fn unread_items_are_dropped_whoever_goes_last() {
    loom::model(|| {
        let token = Arc::new(());
        let (mut p, mut c) = gw_ring::channel::<Arc<()>>(2).unwrap();
        let tk = token.clone();
        let t = thread::spawn(move || {
            let _ = p.push(tk.clone());
            let _ = p.push(tk);
        });
        let _ = c.pop();
        drop(c);
        t.join().unwrap();
        assert_eq!(
            Arc::strong_count(&token),
            1,
            "every pushed clone was dropped"
        );
    });
}
