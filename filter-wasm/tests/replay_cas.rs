//! The edge replay copy in shared data: once per fresh nonce in any order, resends
//! told from reuse, bounds, CAS semantics, creation races, corruption.

use gw_core::replay::{digest, Limits, ShardOutcome};
use gw_core::Code;
use gw_filter::replay_cas::{
    accept_nonce, shard_key, NonceUse, SharedStore, StoreError, CREATE_CAS,
};

mod common;
use common::EnvoyLikeStore;

const NOW: u64 = 1_750_000_000;

fn limits() -> Limits {
    Limits {
        max_per_issuer: 64 * 4,
        max_issuers: 16,
    }
}

fn accept(s: &EnvoyLikeStore, issuer: &str, nonce: u64, body: &[u8]) -> Result<ShardOutcome, Code> {
    accept_at(s, issuer, nonce, body, NOW)
}

fn accept_at(
    s: &EnvoyLikeStore,
    issuer: &str,
    nonce: u64,
    body: &[u8],
    now: u64,
) -> Result<ShardOutcome, Code> {
    let d = digest(body);
    accept_nonce(
        s,
        "gw.replay.",
        &NonceUse {
            issuer,
            nonce,
            expires: now + 30,
            digest: &d,
        },
        now,
        limits(),
    )
    .map_err(|r| r.code)
}

#[test]
fn accepts_once_in_any_order_and_creates_the_key() {
    for strict in [false, true] {
        let s = if strict {
            EnvoyLikeStore::strict()
        } else {
            EnvoyLikeStore::default()
        };
        assert_eq!(accept(&s, "ops", 5, b"a"), Ok(ShardOutcome::Fresh));
        assert_eq!(
            accept(&s, "ops", 4, b"b"),
            Ok(ShardOutcome::Fresh),
            "older nonce, later"
        );
        assert_eq!(accept(&s, "ops", u64::MAX, b"c"), Ok(ShardOutcome::Fresh));
        assert_eq!(
            accept(&s, "ops", 3, b"d"),
            Ok(ShardOutcome::Fresh),
            "a huge nonce changes nothing"
        );
        assert_eq!(accept(&s, "ops", 5, b"other bytes"), Err(Code::Replay));
        assert_eq!(
            accept(&s, "ops", 5, b"a"),
            Ok(ShardOutcome::Resend),
            "the same bytes again"
        );
        assert_eq!(accept(&s, "other", 5, b"a"), Ok(ShardOutcome::Fresh));
    }
}

#[test]
fn a_nonce_is_forgotten_once_its_command_is_stale() {
    let s = EnvoyLikeStore::default();
    assert_eq!(accept(&s, "ops", 5, b"a"), Ok(ShardOutcome::Fresh));
    assert_eq!(
        accept_at(&s, "ops", 5, b"z", NOW + 31),
        Ok(ShardOutcome::Fresh)
    );
}

#[test]
fn each_shard_is_bounded() {
    let s = EnvoyLikeStore::default();
    // Nonces of one shard until it is full.
    let key = shard_key("gw.replay.", "ops", 1);
    let same_shard: Vec<u64> = (1..100_000u64)
        .filter(|n| shard_key("gw.replay.", "ops", *n) == key)
        .take(limits().per_shard() + 1)
        .collect();
    for n in &same_shard[..limits().per_shard()] {
        assert_eq!(accept(&s, "ops", *n, b"x"), Ok(ShardOutcome::Fresh));
    }
    let last = same_shard[limits().per_shard()];
    assert_eq!(accept(&s, "ops", last, b"x"), Err(Code::ReplayCapacity));
    assert_eq!(Code::ReplayCapacity.http_status(), 429);
    assert_eq!(
        accept_at(&s, "ops", last, b"x", NOW + 31),
        Ok(ShardOutcome::Fresh)
    );
}

#[test]
fn creating_never_erases_an_existing_shard() {
    let s = EnvoyLikeStore::default();
    accept(&s, "ops", 9, b"a").unwrap();
    // A late "create" from another worker must fail, not reset the shard.
    let key = shard_key("gw.replay.", "ops", 9);
    assert_eq!(s.set(&key, &[], CREATE_CAS), Err(StoreError::CasMismatch));
    assert_eq!(accept(&s, "ops", 9, b"b"), Err(Code::Replay));
}

#[test]
fn corrupt_state_fails_closed() {
    let s = EnvoyLikeStore::default();
    s.set(&shard_key("gw.replay.", "ops", 1), b"junk", 0)
        .unwrap();
    assert_eq!(accept(&s, "ops", 1, b"a"), Err(Code::ReplayUnavailable));
}

#[test]
fn concurrent_duplicates_are_accepted_exactly_once() {
    for round in 0..50u64 {
        let s = std::sync::Arc::new(EnvoyLikeStore::default());
        let fresh: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8u8)
                .map(|i| {
                    let s = s.clone();
                    // Different bytes reusing one nonce: exactly one is fresh.
                    sc.spawn(move || {
                        usize::from(
                            accept(&s, "issuer", 1000 + round, &[i]) == Ok(ShardOutcome::Fresh),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(fresh, 1, "round {round}");
    }
}

/// proxy-wasm cannot delete shared data: every issuer seen keeps its shard keys
/// for Envoy's life. The edge creates at most `max_issuers` issuers' worth of
/// them (each with every shard); beyond, a new issuer's command is refused
/// `replay_capacity` instead of growing Envoy's memory — on strict hosts too —
/// and the issuers it has go on.
#[test]
fn issuers_beyond_the_bound_are_refused_instead_of_growing_shared_data() {
    let one = Limits {
        max_per_issuer: 64 * 4,
        max_issuers: 1,
    };
    let at = |s: &EnvoyLikeStore, issuer: &str, nonce: u64| {
        let d = digest(&nonce.to_le_bytes());
        let u = NonceUse {
            issuer,
            nonce,
            expires: NOW + 30,
            digest: &d,
        };
        accept_nonce(s, "gw.replay.", &u, NOW, one).map_err(|r| r.code)
    };
    for strict in [false, true] {
        let s = if strict {
            EnvoyLikeStore::strict()
        } else {
            EnvoyLikeStore::default()
        };
        // Every shard of "ops": 64 keys, the bound.
        let mut shards = std::collections::BTreeSet::new();
        let mut nonce = 0;
        while shards.len() < 64 {
            nonce += 1;
            if shards.insert(gw_core::replay::shard_of(nonce)) {
                assert_eq!(at(&s, "ops", nonce), Ok(ShardOutcome::Fresh), "{nonce}");
            }
        }
        assert_eq!(
            at(&s, "dashboard", 1),
            Err(Code::ReplayCapacity),
            "strict {strict}"
        );
        assert_eq!(s.0.get(&shard_key("gw.replay.", "dashboard", 1)).0, None);
        // "ops" goes on in its shards.
        assert_eq!(at(&s, "ops", nonce + 1), Ok(ShardOutcome::Fresh));
    }
}
