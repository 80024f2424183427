//! Unit tests of the inventory core: one or more per operation and per error.

use super::*;

const SPEC: ProductSpec = ProductSpec {
    price_cents: 1999,
    limit_per_user: 0,
    ttl_s: 60,
};

fn inv() -> Inventory {
    Inventory::new(InventoryConfig {
        shards: 8,
        epoch: 3,
        idempotency_ttl_ms: 10_000,
        idempotency_cap: 8000,
    })
}

fn req(user: &str, req: &str, sku: &str, qty: u32, now: u64) -> ReserveRequest {
    ReserveRequest {
        user: user.into(),
        req: req.into(),
        room: "room1".into(),
        referrer: None,
        sku: sku.into(),
        qty,
        now,
    }
}

fn new_res(inv: &Inventory, user: &str, r: &str, sku: &str, qty: u32, now: u64) -> ResHandle {
    match inv.reserve(req(user, r, sku, qty, now)) {
        Ok(ReserveOutcome::New(res)) => res,
        other => panic!("expected New, got {other:?}"),
    }
}

fn held(inv: &Inventory, user: &str, r: &str, sku: &str, qty: u32, now: u64) -> ResHandle {
    let res = new_res(inv, user, r, sku, qty, now);
    inv.confirm_reserve(res.id).expect("confirm");
    res
}

fn counts(inv: &Inventory, sku: &str) -> (u64, u64, u64, u64) {
    let c = inv.counts(sku).expect("sku");
    assert_eq!(c.available, c.stocked - c.reserved - c.sold);
    (c.stocked, c.available, c.reserved, c.sold)
}

#[test]
fn res_id_text_round_trip_and_garbage() {
    let id = ResId::new(7, 1234);
    assert_eq!(id.to_string(), "r7-1234");
    assert_eq!(ResId::parse("r7-1234"), Some(id));
    assert_eq!("r7-1234".parse::<ResId>(), Ok(id));
    let max = ResId::new(EPOCH_MASK, (1 << COUNTER_BITS) - 1);
    assert_eq!(ResId::parse(&max.to_string()), Some(max));
    assert!(max.to_string().len() <= 64);
    for bad in [
        "",
        "r",
        "r-",
        "r1-",
        "r-1",
        "x1-2",
        "r1_2",
        "r01-2",
        "r1-02",
        "r+1-2",
        "r1--2",
        "r1-2-3",
        "r99999999-1",
        "r1-1099511627776",
        "r1-99999999999999999999999",
        "R1-2",
        " r1-2",
        "r1-2 ",
        "r١-2",
    ] {
        assert_eq!(ResId::parse(bad), None, "{bad:?}");
    }
    assert_eq!(ResId::parse("r0-0"), Some(ResId::new(0, 0)));
}

#[test]
fn upsert_creates_updates_and_refuses_stock_on_existing() {
    let inv = inv();
    let (created, c) = inv.upsert("a", SPEC, Some(5)).expect("create");
    assert!(created);
    assert_eq!((c.stocked, c.available), (5, 5));
    let spec2 = ProductSpec {
        price_cents: 500,
        limit_per_user: 2,
        ttl_s: 30,
    };
    let (created, c) = inv.upsert("a", spec2, None).expect("update");
    assert!(!created);
    assert_eq!(c.stocked, 5);
    assert_eq!(inv.product("a").map(|p| p.0), Some(spec2));
    assert!(matches!(
        inv.upsert("a", SPEC, Some(1)),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(inv.upsert("b", SPEC, None).map(|x| x.1.stocked), Ok(0));
    let bad = ProductSpec {
        price_cents: -1,
        ..SPEC
    };
    assert!(matches!(
        inv.upsert("c", bad, None),
        Err(InvError::Invalid(_))
    ));
    let bad = ProductSpec { ttl_s: 0, ..SPEC };
    assert!(matches!(
        inv.upsert("c", bad, None),
        Err(InvError::Invalid(_))
    ));
    assert_eq!(inv.counts("c"), None);
    assert_eq!(inv.available("a"), Some(5));
    assert_eq!(inv.available("zzz"), None);
}

#[test]
fn reserve_takes_units_and_sets_price_and_expiry() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(10)).expect("create");
    let r = new_res(&inv, "u1", "q1", "a", 3, 1000);
    assert_eq!(r.qty, 3);
    assert_eq!(r.price_cents, 1999);
    assert_eq!(r.expires_at, 61_000);
    assert_eq!(r.id.epoch(), 3);
    assert_eq!(&*r.sku, "a");
    assert_eq!(counts(&inv, "a"), (10, 7, 3, 0));
    // A later price change does not touch the reservation.
    inv.upsert(
        "a",
        ProductSpec {
            price_cents: 1,
            ..SPEC
        },
        None,
    )
    .expect("update");
    assert_eq!(inv.reservation(r.id).map(|x| x.price_cents), Some(1999));
}

#[test]
fn reserve_errors() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(2)).expect("create");
    assert_eq!(
        inv.reserve(req("u", "q", "a", 0, 0)),
        Err(InvError::InvalidQty)
    );
    assert_eq!(
        inv.reserve(req("u", "q", "a", 100, 0)),
        Err(InvError::InvalidQty)
    );
    assert_eq!(
        inv.reserve(req("u", "q", "nope", 1, 0)),
        Err(InvError::UnknownSku)
    );
    assert_eq!(
        inv.reserve(req("u", "q", "a", 3, 0)),
        Err(InvError::SoldOut { available: 2 })
    );
    new_res(&inv, "u", "q1", "a", 2, 0);
    assert_eq!(
        inv.reserve(req("u", "q2", "a", 1, 0)),
        Err(InvError::SoldOut { available: 0 })
    );
    assert_eq!(counts(&inv, "a"), (2, 0, 2, 0));
}

#[test]
fn reserve_is_idempotent_per_user_req_and_sku() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(10)).expect("create");
    inv.upsert("b", SPEC, Some(10)).expect("create");
    let r = new_res(&inv, "u", "q", "a", 2, 0);
    // Still Pending: the first write is in flight.
    assert_eq!(
        inv.reserve(req("u", "q", "a", 2, 5)),
        Err(InvError::InFlight)
    );
    inv.confirm_reserve(r.id).expect("confirm");
    assert_eq!(
        inv.reserve(req("u", "q", "a", 2, 5)),
        Ok(ReserveOutcome::Existing(r.clone()))
    );
    // Even with another qty the answer is the earlier reservation, and no stock moves.
    assert_eq!(
        inv.reserve(req("u", "q", "a", 1, 5)),
        Ok(ReserveOutcome::Existing(r.clone()))
    );
    assert_eq!(counts(&inv, "a"), (10, 8, 2, 0));
    // Another user with the same req, or the same user with another SKU: separate.
    new_res(&inv, "v", "q", "a", 1, 0);
    new_res(&inv, "u", "q", "b", 1, 0);
    // Mid-release it is in flight too.
    inv.begin_release("u", r.id).expect("begin");
    assert_eq!(
        inv.reserve(req("u", "q", "a", 2, 5)),
        Err(InvError::InFlight)
    );
    inv.finish_release(r.id, true).expect("finish");
    assert_eq!(
        inv.reserve(req("u", "q", "a", 2, 5)),
        Err(InvError::Ended { id: r.id })
    );
}

#[test]
fn limit_per_user_counts_held_and_bought() {
    let inv = inv();
    let spec = ProductSpec {
        limit_per_user: 3,
        ..SPEC
    };
    inv.upsert("a", spec, Some(100)).expect("create");
    let r1 = held(&inv, "u", "q1", "a", 2, 0);
    assert_eq!(
        inv.reserve(req("u", "q2", "a", 2, 0)),
        Err(InvError::LimitExceeded { limit: 3, held: 2 })
    );
    inv.begin_checkout("u", &[r1.id], 1).expect("checkout");
    inv.finish_checkout(&[r1.id], true).expect("commit");
    // Bought units count too.
    assert_eq!(
        inv.reserve(req("u", "q3", "a", 2, 0)),
        Err(InvError::LimitExceeded { limit: 3, held: 2 })
    );
    let r2 = held(&inv, "u", "q4", "a", 1, 0);
    assert!(matches!(
        inv.reserve(req("u", "q5", "a", 1, 0)),
        Err(InvError::LimitExceeded { .. })
    ));
    // Releasing frees the limit; other users are not affected.
    inv.begin_release("u", r2.id).expect("begin");
    inv.finish_release(r2.id, true).expect("finish");
    held(&inv, "u", "q6", "a", 1, 0);
    held(&inv, "v", "q1", "a", 3, 0);
}

#[test]
fn confirm_and_abort() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(5)).expect("create");
    let r = new_res(&inv, "u", "q", "a", 2, 0);
    inv.abort_reserve(r.id).expect("abort");
    assert_eq!(counts(&inv, "a"), (5, 5, 0, 0));
    assert_eq!(inv.confirm_reserve(r.id), Err(InvError::NotFound));
    assert_eq!(inv.abort_reserve(r.id), Err(InvError::NotFound));
    // The idempotency record went with it: a retry reserves anew.
    let r2 = new_res(&inv, "u", "q", "a", 2, 0);
    assert_ne!(r2.id, r.id);
    inv.confirm_reserve(r2.id).expect("confirm");
    assert!(matches!(
        inv.confirm_reserve(r2.id),
        Err(InvError::Conflict(_))
    ));
    assert!(matches!(
        inv.abort_reserve(r2.id),
        Err(InvError::Conflict(_))
    ));
    // Through the handle (no lock): a confirmed, an aborted or an ended one is Conflict.
    assert!(matches!(inv.confirm(&r2), Err(InvError::Conflict(_))));
    assert!(matches!(inv.confirm(&r), Err(InvError::Conflict(_))));
    let r3 = new_res(&inv, "u", "q3", "a", 1, 0);
    inv.confirm(&r3).expect("confirm by handle");
    assert_eq!(inv.counts("a").map(|c| c.reserved), Some(3));
    inv.begin_release("u", r3.id).expect("begin");
    inv.finish_release(r3.id, true).expect("finish");
    assert!(matches!(inv.confirm(&r3), Err(InvError::Conflict(_))));
    assert_eq!(
        inv.confirm_reserve(ResId::new(3, 999_999)),
        Err(InvError::NotFound)
    );
    assert_eq!(
        inv.confirm_reserve(ResId::new(9, 1)),
        Err(InvError::NotFound)
    );
}

#[test]
fn release_two_phase() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(5)).expect("create");
    let p = new_res(&inv, "u", "q0", "a", 1, 0);
    assert!(matches!(
        inv.begin_release("u", p.id),
        Err(InvError::Conflict(_))
    ));
    let r = held(&inv, "u", "q", "a", 2, 0);
    assert_eq!(inv.begin_release("v", r.id), Err(InvError::NotFound));
    assert_eq!(inv.begin_release("u", r.id), Ok(r.clone()));
    assert!(matches!(
        inv.begin_release("u", r.id),
        Err(InvError::Conflict(_))
    ));
    assert!(matches!(
        inv.begin_checkout("u", &[r.id], 0),
        Err(InvError::Conflict(_))
    ));
    assert!(matches!(
        inv.finish_checkout(&[r.id], true),
        Err(InvError::Conflict(_))
    ));
    inv.finish_release(r.id, false).expect("undo");
    assert!(matches!(
        inv.finish_release(r.id, true),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(counts(&inv, "a"), (5, 2, 3, 0));
    inv.begin_release("u", r.id).expect("begin");
    inv.finish_release(r.id, true).expect("commit");
    assert_eq!(counts(&inv, "a"), (5, 4, 1, 0));
    assert_eq!(inv.finish_release(r.id, true), Err(InvError::NotFound));
    assert_eq!(inv.begin_release("u", r.id), Err(InvError::NotFound));
}

#[test]
fn checkout_all_or_none() {
    let inv = inv();
    for s in ["a", "b", "c", "d", "e"] {
        inv.upsert(s, SPEC, Some(10)).expect("create");
    }
    let ra = held(&inv, "u", "q1", "a", 1, 0);
    let rb = held(&inv, "u", "q2", "b", 2, 0);
    let rc = held(&inv, "u", "q3", "c", 3, 0);
    let other = held(&inv, "v", "q1", "d", 1, 0);
    let late = held(&inv, "u", "q4", "e", 1, 30_000);
    assert_eq!(
        inv.begin_checkout("u", &[], 0),
        Err(InvError::Invalid("no reservation ids"))
    );
    assert!(matches!(
        inv.begin_checkout("u", &[ra.id, ra.id], 0),
        Err(InvError::Invalid(_))
    ));
    assert_eq!(
        inv.begin_checkout("u", &[ra.id, other.id], 0),
        Err(InvError::NotFound)
    );
    assert_eq!(
        inv.begin_checkout("u", &[ra.id, ResId::new(3, 1 << 30)], 0),
        Err(InvError::NotFound)
    );
    // rb, rc expire at 60_000; late at 90_000.
    assert_eq!(
        inv.begin_checkout("u", &[late.id, rb.id], 60_000),
        Err(InvError::Expired { id: rb.id })
    );
    // Nothing changed by the failed attempts: all still Held.
    let got = inv
        .begin_checkout("u", &[rc.id, ra.id, rb.id], 59_999)
        .expect("checkout");
    assert_eq!(got, vec![rc.clone(), ra.clone(), rb.clone()]);
    assert!(matches!(
        inv.begin_checkout("u", &[ra.id], 0),
        Err(InvError::Conflict(_))
    ));
    inv.finish_checkout(&[ra.id, rb.id, rc.id], false)
        .expect("undo");
    inv.begin_checkout("u", &[ra.id, rb.id, rc.id], 0)
        .expect("again");
    // A finish with one id not CheckingOut changes nothing.
    assert!(matches!(
        inv.finish_checkout(&[ra.id, late.id], true),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(counts(&inv, "a"), (10, 9, 1, 0));
    inv.finish_checkout(&[ra.id, rb.id, rc.id], true)
        .expect("commit");
    assert_eq!(counts(&inv, "a"), (10, 9, 0, 1));
    assert_eq!(counts(&inv, "b"), (10, 8, 0, 2));
    assert_eq!(counts(&inv, "c"), (10, 7, 0, 3));
    assert_eq!(
        inv.reserve(req("u", "q2", "b", 2, 0)),
        Err(InvError::Ended { id: rb.id })
    );
    assert_eq!(inv.finish_checkout(&[ra.id], true), Err(InvError::NotFound));
}

#[test]
fn expiry_two_phase() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(10)).expect("create");
    let short = ProductSpec { ttl_s: 1, ..SPEC };
    inv.upsert("b", short, Some(10)).expect("create");
    let pending = new_res(&inv, "u", "q0", "b", 1, 0);
    let r1 = held(&inv, "u", "q1", "b", 1, 0); // expires 1000
    let r2 = held(&inv, "u", "q2", "b", 2, 500); // 1500
    let r3 = held(&inv, "u", "q3", "a", 3, 0); // 60000
    assert!(inv.take_due(999, 10).is_empty());
    let due = inv.take_due(1500, 1);
    assert_eq!(due, vec![r1.clone()]);
    // Expiring: not releasable, not buyable, not taken twice.
    assert!(matches!(
        inv.begin_release("u", r1.id),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(inv.take_due(1500, 10), vec![r2.clone()]);
    inv.finish_expire(&[r1.id], false).expect("undo");
    inv.finish_expire(&[r2.id], true).expect("commit");
    assert_eq!(counts(&inv, "b"), (10, 8, 2, 0));
    assert!(matches!(
        inv.finish_expire(&[r1.id], true),
        Err(InvError::Conflict(_))
    ));
    // r1 comes back on a later sweep; the pending one is never taken.
    assert_eq!(inv.take_due(2000, 10), vec![r1.clone()]);
    inv.finish_expire(&[r1.id], true).expect("commit");
    assert_eq!(counts(&inv, "b"), (10, 9, 1, 0));
    assert_eq!(
        inv.reserve(req("u", "q1", "b", 1, 3000)),
        Err(InvError::Ended { id: r1.id })
    );
    // A released one is not handed out later (stale index entry dropped).
    inv.begin_release("u", r3.id).expect("begin");
    assert!(inv.take_due(70_000, 10).is_empty());
    inv.finish_release(r3.id, false).expect("undo");
    assert_eq!(inv.take_due(70_000, 10), vec![r3]);
    // The pending one was passed over by every sweep since it fell due (its durable write
    // is unsettled); once confirmed, the next sweep takes it.
    let pending2 = new_res(&inv, "u", "q4", "b", 1, 0);
    assert!(inv.take_due(70_100, 10).is_empty());
    inv.confirm(&pending).expect("confirm");
    assert_eq!(inv.take_due(70_200, 10), vec![pending.clone()]);
    inv.finish_expire(&[pending.id], true).expect("commit");
    // An aborted pending one leaves the wheel with it.
    inv.abort_reserve(pending2.id).expect("abort");
    assert!(inv.take_due(80_000, 10).is_empty());
    assert_eq!(counts(&inv, "b"), (10, 10, 0, 0));
}

#[test]
fn restock_and_undo() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(5)).expect("create");
    held(&inv, "u", "q", "a", 3, 0);
    assert_eq!(
        inv.restock("a", 4).map(|c| (c.stocked, c.available)),
        Ok((9, 6))
    );
    assert_eq!(
        inv.restock("a", -6).map(|c| (c.stocked, c.available)),
        Ok((3, 0))
    );
    assert!(matches!(inv.restock("a", -1), Err(InvError::Conflict(_))));
    assert_eq!(inv.undo_restock("a", -6).map(|c| c.available), Ok(6));
    assert_eq!(inv.undo_restock("a", 4).map(|c| c.available), Ok(2));
    assert!(matches!(
        inv.undo_restock("a", 3),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(inv.restock("nope", 1), Err(InvError::UnknownSku));
    assert_eq!(inv.undo_restock("nope", 1), Err(InvError::UnknownSku));
    assert!(matches!(
        inv.restock("a", i64::MIN),
        Err(InvError::Conflict(_))
    ));
    assert!(inv.undo_restock("a", i64::MIN).is_ok());
    assert!(matches!(
        inv.restock("a", i64::MAX),
        Err(InvError::Conflict(_))
    ));
    assert_eq!(counts(&inv, "a").2, 3);
}

#[test]
fn snapshot_restore_is_identity() {
    let inv = inv();
    let limited = ProductSpec {
        limit_per_user: 4,
        ..SPEC
    };
    inv.upsert("a", limited, Some(10)).expect("create");
    inv.upsert("b", SPEC, Some(3)).expect("create");
    let r1 = held(&inv, "u", "q1", "a", 2, 0);
    let r2 = held(&inv, "u", "q2", "a", 1, 0);
    inv.begin_checkout("u", &[r2.id], 0).expect("co");
    inv.finish_checkout(&[r2.id], true).expect("commit");
    let r3 = held(&inv, "v", "q1", "b", 3, 0);
    let snap = inv.snapshot();
    assert_eq!(snap.reservations, vec![(*r1).clone(), (*r3).clone()]);
    // Records of live reservations only (r2 ended).
    assert_eq!(snap.idempotency.len(), 2);

    let other = Inventory::new(InventoryConfig {
        shards: 2,
        ..InventoryConfig::default()
    });
    let sum = other.restore(snap.clone(), 0);
    assert_eq!((sum.products, sum.reservations, sum.idempotency), (2, 2, 2));
    assert!(sum.deficits.is_empty());
    assert_eq!(other.snapshot(), snap);
    for s in ["a", "b"] {
        assert_eq!(other.counts(s), inv.counts(s));
    }
    // Restored ids are found although the shard count changed.
    assert_eq!(other.reservation(r1.id), Some(r1.clone()));
    assert_eq!(
        other.reserve(req("u", "q1", "a", 2, 0)),
        Ok(ReserveOutcome::Existing(r1.clone()))
    );
    // The limit remembers the bought unit: 2 held + 1 bought.
    assert_eq!(
        other.reserve(req("u", "q9", "a", 2, 0)),
        Err(InvError::LimitExceeded { limit: 4, held: 3 })
    );
    other.begin_release("u", r1.id).expect("begin");
    other.finish_release(r1.id, true).expect("finish");
    assert_eq!(other.counts("a").map(|c| c.available), Some(9));
}

#[test]
fn restore_into_same_epoch_never_reuses_ids() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(100)).expect("create");
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(held(&inv, "u", &format!("q{i}"), "a", 1, 0).id);
    }
    let snap = inv.snapshot();
    let again = Inventory::new(InventoryConfig {
        shards: 16,
        epoch: 3,
        ..InventoryConfig::default()
    });
    again.restore(snap, 0);
    for i in 0..20 {
        let r = held(&again, "w", &format!("q{i}"), "a", 1, 0);
        assert!(!ids.contains(&r.id));
        assert!(r.id > *ids.iter().max().expect("ids"));
    }
    for id in &ids {
        assert!(again.reservation(*id).is_some());
    }
}

#[test]
fn restore_clamps_a_deficit_and_never_oversells() {
    let inv = inv();
    let mk = |id: u64, qty: u32| Reservation {
        id: ResId::new(1, id),
        user: "u".into(),
        req: format!("q{id}").into(),
        room: "r".into(),
        referrer: Some("ref".into()),
        sku: "a".into(),
        qty,
        price_cents: 10,
        expires_at: 1000,
    };
    let state = RestoreState {
        products: vec![RestoredProduct {
            sku: "a".into(),
            spec: SPEC,
            stocked: 5,
            sold: 3,
        }],
        bought: vec![("a".into(), "u".into(), 3), ("zz".into(), "u".into(), 1)],
        reservations: vec![mk(1, 2), mk(2, 2), mk(2, 1), mk(3, 0)],
        idempotency: vec![
            ("u".into(), "q9".into(), "a".into(), ResId::new(1, 9), false),
            ("u".into(), "q8".into(), "a".into(), ResId::new(1, 8), true),
            ("u".into(), "q1".into(), "a".into(), ResId::new(1, 1), false),
        ],
    };
    let sum = inv.restore(state, 0);
    assert_eq!(sum.reservations, 2);
    assert_eq!(sum.skipped_reservations, 2);
    assert_eq!(sum.skipped_rows, 1);
    assert_eq!(sum.idempotency, 3);
    assert_eq!(sum.deficits, vec![(Arc::from("a"), 2)]);
    let c = inv.counts("a").expect("a");
    assert_eq!((c.stocked, c.available, c.reserved, c.sold), (5, 0, 4, 3));
    // A record whose reservation is gone is treated as ended.
    assert_eq!(
        inv.reserve(req("u", "q9", "a", 1, 0)),
        Err(InvError::Ended {
            id: ResId::new(1, 9)
        })
    );
    assert_eq!(
        inv.reserve(req("u", "q8", "a", 1, 0)),
        Err(InvError::Ended {
            id: ResId::new(1, 8)
        })
    );
    assert!(matches!(
        inv.reserve(req("u", "q1", "a", 1, 0)),
        Ok(ReserveOutcome::Existing(r)) if r.id == ResId::new(1, 1)
    ));
    // The first two units back pay the deficit; only then does stock become available.
    let due = inv.take_due(1000, 10);
    assert_eq!(due.len(), 2);
    inv.finish_expire(&[due[0].id], true).expect("expire");
    assert_eq!(inv.available("a"), Some(0));
    inv.finish_expire(&[due[1].id], true).expect("expire");
    let c = inv.counts("a").expect("a");
    assert_eq!((c.stocked, c.available, c.reserved, c.sold), (5, 2, 0, 3));
}

#[test]
fn idempotency_records_expire_and_are_capped() {
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        epoch: 0,
        idempotency_ttl_ms: 1000,
        idempotency_cap: 2,
    });
    inv.upsert("a", SPEC, Some(100)).expect("create");
    let r1 = held(&inv, "u", "q1", "a", 1, 0);
    inv.begin_release("u", r1.id).expect("begin");
    inv.finish_release(r1.id, true).expect("finish");
    assert_eq!(
        inv.reserve(req("u", "q1", "a", 1, 500)),
        Err(InvError::Ended { id: r1.id })
    );
    // The sweep at the TTL drops the record: the req is new again.
    assert!(inv.take_due(1000, 10).is_empty());
    let r1b = held(&inv, "u", "q1", "a", 1, 1000);
    assert_ne!(r1b.id, r1.id);
    // Cap 2: a third record evicts the oldest.
    held(&inv, "u", "q2", "a", 1, 1000);
    held(&inv, "u", "q3", "a", 1, 1000);
    assert!(matches!(
        inv.reserve(req("u", "q1", "a", 1, 1000)),
        Ok(ReserveOutcome::New(_))
    ));
}

/// The cap counts records in all shards together: the hot SKU of a rush may use the whole
/// window (not `cap / shards` of it), and a sweep trims every shard's oldest records in
/// proportion to its share of the excess.
#[test]
fn idempotency_cap_is_shared_by_all_shards() {
    let inv = Inventory::new(InventoryConfig {
        shards: 4,
        epoch: 0,
        idempotency_ttl_ms: 1_000_000,
        idempotency_cap: 8,
    });
    let hot = "hot";
    let Some(cold) = (0..100)
        .map(|i| format!("cold{i}"))
        .find(|s| inv.shard_of(s) != inv.shard_of(hot))
    else {
        panic!("no SKU in another shard");
    };
    inv.upsert(hot, SPEC, Some(100)).expect("create");
    inv.upsert(&cold, SPEC, Some(100)).expect("create");
    for i in 0..4 {
        held(&inv, "u", &format!("c{i}"), &cold, 1, 0);
    }
    for i in 0..8 {
        held(&inv, "u", &format!("h{i}"), hot, 1, 0);
    }
    let reqs = |sku: &str| -> Vec<String> {
        let mut v: Vec<String> = inv
            .snapshot()
            .idempotency
            .iter()
            .filter(|r| &*r.2 == sku)
            .map(|r| r.1.to_string())
            .collect();
        v.sort();
        v
    };
    // 12 records, over the cap of 8, until a sweep: the hot shard holds all 8 of its own.
    assert_eq!(reqs(hot).len(), 8);
    assert_eq!(reqs(&cold).len(), 4);
    // The sweep trims 12 - 8 = 4: floor(4 * 4 / 12) = 1 cold, floor(8 * 4 / 12) = 2 hot, and
    // the remainder from the largest (hot): the oldest of each.
    assert!(inv.take_due(1, 10).is_empty());
    assert_eq!(reqs(&cold), ["c1", "c2", "c3"]);
    assert_eq!(reqs(hot), ["h3", "h4", "h5", "h6", "h7"]);
    // A forgotten req reserves anew; a remembered one answers the same reservation.
    assert!(matches!(
        inv.reserve(req("u", "h0", hot, 1, 2)),
        Ok(ReserveOutcome::New(_))
    ));
    assert!(matches!(
        inv.reserve(req("u", "h7", hot, 1, 2)),
        Ok(ReserveOutcome::Existing(_))
    ));
    // One shard never holds more than the whole cap, even between sweeps.
    for i in 10..30 {
        held(&inv, "u", &format!("h{i}"), hot, 1, 3);
    }
    assert_eq!(reqs(hot).len(), 8);
}

/// The sweep's trims: proportional, rounded down, the remainder from the largest shards; a
/// quiet shard's few records survive a sweep over the cap (rounding every share up would
/// drop one of them at every sweep of a rush elsewhere).
#[test]
fn proportional_trims_spare_quiet_shards() {
    use super::proportional_trims;
    assert!(proportional_trims(&[3, 4], 7).is_empty());
    assert!(proportional_trims(&[], 7).is_empty());
    // A rush in shard 0, one record in shards 1 and 2, 5,600 over the cap.
    let t = proportional_trims(&[1_000_000, 1, 1], 994_402);
    assert_eq!(t, [5_600, 0, 0]);
    // Shares rounded down, the remainder from the largest first, never more than a shard
    // holds, always exactly the excess.
    let lens = [10, 7, 3, 0, 1];
    let t = proportional_trims(&lens, 9);
    assert_eq!(t.iter().sum::<usize>(), 12);
    assert!(t.iter().zip(&lens).all(|(t, l)| t <= l));
    assert_eq!(t, [7, 4, 1, 0, 0]);
    assert_eq!(proportional_trims(&[2, 2], 0), [2, 2]);
}

/// The idempotency table over a long run at its cap, swept now and then: stale entries are
/// reused by inserts and cleared by sweeps past 9/16 (no full rebuild needed, the index
/// stays well under three quarters used), and once most
/// records are gone a sweep's shrink gives the memory back, keeping the records left.
#[test]
fn idem_table_cleans_as_it_goes_and_shrinks() {
    use super::idem::IdemTable;
    use super::shard::IdemRec;
    let rec = |i: u64| IdemRec {
        id: ResId(i),
        check: i,
        ended: false,
    };
    let key = |i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut t = IdemTable::new();
    let cap = 4096;
    for i in 0..50_000u64 {
        t.insert_new(key(i), rec(i), i, cap);
        let (_, index, used) = t.sizes();
        assert!(
            used * 8 <= index * 5,
            "step {i}: {used} of {index} index slots used"
        );
        if i % 1000 == 999 {
            // What a sweep does.
            t.clean_pending();
        }
    }
    // The last `cap` records are there, older ones are not.
    assert!(t.get(key(50_000 - 4096)).is_some());
    assert!(t.get(key(50_000 - 4097)).is_none());
    let (ring, index, _) = t.sizes();
    assert!(ring >= 4096 && index >= 16_384);
    // A sweep after the TTL of all but the last 10: memory comes back, the 10 stay.
    t.prune(49_989, 0);
    t.shrink_if_sparse();
    assert_eq!(t.len(), 10);
    let (ring, index, used) = t.sizes();
    assert!(
        ring <= 32 && index <= 64 && used == 10,
        "{ring} {index} {used}"
    );
    for i in 49_990..50_000 {
        assert_eq!(t.get(key(i)).map(|r| r.id), Some(ResId(i)));
    }
    assert!(t.get(key(49_989)).is_none());
    // Cleaning deletes exactly the stale entries: after a walk of the whole index, the
    // entries in use are the live records, and every one of them is still found.
    for i in 60_000..70_000u64 {
        t.insert_new(key(i), rec(i), i, cap);
    }
    t.clean_all();
    let (_, _, used) = t.sizes();
    assert_eq!(used, t.len());
    for i in 70_000 - 4095..70_000 {
        assert_eq!(t.get(key(i)).map(|r| r.id), Some(ResId(i)), "record {i}");
    }
    assert!(t.get(key(70_000 - 4097)).is_none());
    // And it grows again as needed.
    for i in 50_000..60_000u64 {
        t.insert_new(key(i), rec(i), i, cap);
    }
    assert_eq!(t.len(), 4096);
    assert!(t.get(key(59_999)).is_some());
}

#[test]
fn inventory_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Inventory>();
}

#[test]
fn error_codes() {
    assert_eq!(InvError::UnknownSku.code(), "not_found");
    assert_eq!(InvError::SoldOut { available: 0 }.code(), "sold_out");
    assert_eq!(
        InvError::LimitExceeded { limit: 1, held: 1 }.code(),
        "limit_exceeded"
    );
    assert_eq!(InvError::NotFound.code(), "not_found");
    assert_eq!(InvError::Expired { id: ResId(1) }.code(), "expired");
    assert_eq!(InvError::Conflict(String::new()).code(), "conflict");
    assert_eq!(InvError::InFlight.code(), "conflict");
    assert_eq!(InvError::Ended { id: ResId(1) }.code(), "conflict");
    assert_eq!(InvError::InvalidQty.code(), "bad_request");
    assert_eq!(InvError::Invalid("x").code(), "bad_request");
}

#[test]
fn limit_set_later_counts_what_is_already_held_and_bought() {
    let inv = inv();
    inv.upsert("a", SPEC, Some(100)).expect("create");
    let r1 = held(&inv, "u", "q1", "a", 2, 0);
    let r2 = held(&inv, "u", "q2", "a", 1, 0);
    inv.begin_checkout("u", &[r2.id], 0).expect("co");
    inv.finish_checkout(&[r2.id], true).expect("commit");
    let limited = ProductSpec {
        limit_per_user: 4,
        ..SPEC
    };
    inv.upsert("a", limited, None).expect("set limit");
    assert_eq!(
        inv.reserve(req("u", "q3", "a", 2, 0)),
        Err(InvError::LimitExceeded { limit: 4, held: 3 })
    );
    held(&inv, "u", "q4", "a", 1, 0);
    // Lifting the limit and setting it again recounts.
    inv.upsert("a", SPEC, None).expect("lift");
    held(&inv, "u", "q5", "a", 5, 0);
    inv.upsert("a", limited, None).expect("set again");
    assert_eq!(
        inv.reserve(req("u", "q6", "a", 1, 0)),
        Err(InvError::LimitExceeded { limit: 4, held: 9 })
    );
    inv.begin_release("u", r1.id).expect("begin");
    inv.finish_release(r1.id, true).expect("finish");
    assert_eq!(
        inv.reserve(req("u", "q6", "a", 1, 0)),
        Err(InvError::LimitExceeded { limit: 4, held: 7 })
    );
    assert_eq!(counts(&inv, "a"), (100, 93, 6, 1));
}

/// The expiry wheel: reservations more than a turn (102.4 s) away, several in one bucket
/// with a small `max`, removal from the middle of a bucket, a clock that goes back, and a
/// reservation that becomes Held again after its time was swept past.
#[test]
fn expiry_wheel_edges() {
    let inv = inv();
    let long = ProductSpec {
        ttl_s: 1000,
        ..SPEC
    };
    inv.upsert("a", SPEC, Some(100)).expect("create");
    inv.upsert("far", long, Some(100)).expect("create");
    let far = held(&inv, "u", "f", "far", 1, 0); // 1_000_000: shares a bucket
    let near: Vec<ResHandle> = (0..5)
        .map(|i| held(&inv, "u", &format!("n{i}"), "a", 1, 0)) // all 60_000
        .collect();
    // Take one out of the middle of the bucket; the others keep their places.
    inv.begin_release("u", near[2].id).expect("begin");
    inv.finish_release(near[2].id, true).expect("release");
    assert!(inv.take_due(59_999, 10).is_empty());
    let mut got: Vec<ResId> = Vec::new();
    for _ in 0..4 {
        let due = inv.take_due(60_000, 1);
        assert_eq!(due.len(), 1);
        got.push(due[0].id);
    }
    got.sort();
    let want: Vec<ResId> = [0, 1, 3, 4].iter().map(|&i| near[i].id).collect();
    assert_eq!(got, want);
    // The far one is passed over a whole turn later, and found when due.
    assert!(inv.take_due(60_000 + 102_400, 10).is_empty());
    assert!(inv.take_due(999_999, 10).is_empty());
    // Back to Held after its time was swept past, with the clock behind the sweeps.
    inv.finish_expire(&[near[0].id], false).expect("undo");
    assert_eq!(inv.take_due(70_000, 10), vec![near[0].clone()]);
    inv.finish_expire(&[near[0].id], false).expect("undo");
    let mut last: Vec<ResId> = inv.take_due(2_000_000, 10).iter().map(|r| r.id).collect();
    last.sort();
    let mut want = vec![near[0].id, far.id];
    want.sort();
    assert_eq!(last, want);
    assert!(inv.take_due(2_000_000, 10).is_empty());
}

/// SKUs up to 23 bytes are compared inline in the product's first cache line, longer ones
/// by hash and bytes: SKUs at both sides of that length, prefixes of each other and long
/// ones differing only in their last byte each find their own product, and none finds a
/// product it only resembles.
#[test]
fn skus_inline_and_long_find_their_own_product() {
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        ..InventoryConfig::default()
    });
    let long = "x".repeat(63);
    let skus = [
        "a".to_string(),
        "ab".to_string(),
        "abcdefghijklmnopqrstuvw".to_string(),  // 23: inline
        "abcdefghijklmnopqrstuvwx".to_string(), // 24: not inline
        "abcdefghijklmnopqrstuvwy".to_string(),
        format!("{long}1"),
        format!("{long}2"),
    ];
    for (i, sku) in skus.iter().enumerate() {
        inv.upsert(sku, SPEC, Some(100 + i as u64)).expect("create");
    }
    for (i, sku) in skus.iter().enumerate() {
        new_res(&inv, "u", "q", sku, i as u32 + 1, 0);
    }
    for (i, sku) in skus.iter().enumerate() {
        let i = i as u64;
        assert_eq!(counts(&inv, sku), (100 + i, 99, i + 1, 0), "{sku}");
    }
    for unknown in [
        "",
        "abc",
        "abcdefghijklmnopqrstuv",
        &long,
        &format!("{long}3"),
    ] {
        assert_eq!(
            inv.reserve(req("u", "q", unknown, 1, 0)),
            Err(InvError::UnknownSku),
            "{unknown:?}"
        );
    }
}

/// The idempotency filter never hides a record still in the ring (over far more records
/// than its generations hold, with the ring growing, at its cap and shrinking), answers
/// most new keys itself, and stays small.
#[test]
fn idem_filter_never_hides_a_live_record() {
    use super::filter::MAX_GENS;
    use super::idem::IdemTable;
    use super::shard::IdemRec;
    let rec = |i: u64| IdemRec {
        id: ResId(i),
        check: i,
        ended: false,
    };
    let key = |i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5555;
    let cap = 5000;
    let mut t = IdemTable::new();
    let mut newest = 0u64;
    for round in 0..6u64 {
        for i in newest..newest + 4000 {
            t.insert_new(key(i), rec(i), i, cap);
            assert!(t.filter_gens() <= MAX_GENS, "record {i}");
        }
        newest += 4000;
        // Every record in the ring is found; the one before the oldest is not.
        let oldest = newest.saturating_sub(cap as u64);
        for i in oldest..newest {
            assert_eq!(t.get(key(i)).map(|r| r.id), Some(ResId(i)), "round {round}");
        }
        if oldest > 0 {
            assert!(t.get(key(oldest - 1)).is_none());
        }
        // Keys never made: the filter answers nearly all of them alone.
        let passed = (0..10_000u64)
            .filter(|&i| t.filter_passes(key(1 << 40 | i)))
            .count();
        assert!(
            passed < 1_000,
            "round {round}: {passed} of 10,000 new keys passed"
        );
        // At most 32 bits per record the ring can hold.
        assert!(t.filter_words() * 64 <= 32 * cap, "{}", t.filter_words());
        // What a sweep does.
        t.clean_pending();
    }
    // A sweep after most records expired shrinks the filter too, keeping the rest.
    t.prune(newest - 10, 0);
    t.shrink_if_sparse();
    assert!(t.filter_words() <= 64, "{}", t.filter_words());
    for i in newest - 9..newest {
        assert!(t.get(key(i)).is_some());
    }
    assert!(t.get(key(newest - 11)).is_none());
}

/// The idempotency table against the map + FIFO it replaced, over every call it has, mixed: inserts,
/// removals (right and wrong ids), ends by place and by lookup, TTL prunes, trims, sweeps,
/// shrinks and full cleans, with many distinct keys (half sharing probe runs, half spread,
/// so the filter answers most lookups) and caps from 1 to 20,000 (so filter generations
/// open, retire, merge and refill). Written in review of the filter; it caught a generation
/// retired one record early, a lost staged entry and a refill that skipped a record.
#[test]
fn idem_table_matches_a_model_over_every_call() {
    use super::idem::{IdemTable, UNKNOWN_SEQ};
    use super::shard::IdemRec;
    use std::collections::{HashMap, VecDeque};

    let (seeds, kmul, steps, ttl) = (2u64, 3u64, 5000u64, 4000u64);
    for seed in 1..=seeds {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x1234_5678_9abc_def1);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for cap in [1usize, 7, 64, 300, 3000, 20000] {
            let nkeys = (cap as u64 * kmul).max(50);
            // Half the keys share tags (probe-run collisions), half are spread.
            let mk = |i: u64| {
                if i % 2 == 0 {
                    ((i % 16) << 33) | i
                } else {
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 7)
                }
            };
            let mut t = IdemTable::new();
            let mut map: HashMap<u64, (ResId, bool)> = HashMap::new();
            let mut seqs: HashMap<ResId, (u64, u64)> = HashMap::new();
            let mut fifo: VecDeque<(u64, u64, ResId)> = VecDeque::new();
            let pop = |map: &mut HashMap<u64, (ResId, bool)>,
                       fifo: &mut VecDeque<(u64, u64, ResId)>| {
                if let Some((_, k, id)) = fifo.pop_front() {
                    if map.get(&k).is_some_and(|r| r.0 == id) {
                        map.remove(&k);
                    }
                }
            };
            let mut now = 0u64;
            for step in 0..steps {
                let key = mk(next() % nkeys);
                let op = next() % 100;
                match op {
                    0..=59 => {
                        let id = ResId(step);
                        let rec = IdemRec {
                            id,
                            check: key ^ 1,
                            ended: false,
                        };
                        if t.get(key).is_none() {
                            let seq = t.insert_new(key, rec, now, cap);
                            seqs.insert(id, (key, seq));
                        } else {
                            t.insert(key, rec, now, cap);
                        }
                        map.insert(key, (id, false));
                        fifo.push_back((now, key, id));
                        while fifo.len() > cap {
                            pop(&mut map, &mut fifo);
                        }
                    }
                    60..=67 => {
                        if let Some(&(id, _)) = map.get(&key) {
                            if next() % 4 == 0 {
                                // Another reservation's id: the record stays.
                                t.remove(key, ResId(id.0 + 1 + next() % 7));
                            } else {
                                t.remove(key, id);
                                map.remove(&key);
                            }
                        } else {
                            t.remove(key, ResId(next() % (step + 1)));
                        }
                    }
                    68..=71 => {
                        t.mark_ended(key, None);
                        if let Some(r) = map.get_mut(&key) {
                            r.1 = true;
                        }
                    }
                    72..=79 => {
                        let id = ResId(next() % (step + 1));
                        let (k, seq) = seqs.get(&id).copied().unwrap_or((key, UNKNOWN_SEQ));
                        t.end(seq, k, id);
                        if let Some(r) = map.get_mut(&k).filter(|r| r.0 == id) {
                            r.1 = true;
                        }
                    }
                    80..=84 => {
                        now += next() % 50;
                        t.prune(now, ttl);
                        while fifo.front().is_some_and(|f| f.0 + ttl <= now) {
                            pop(&mut map, &mut fifo);
                        }
                    }
                    85..=88 => {
                        let n = if next() % 16 == 0 {
                            (next() % (cap as u64 / 4 + 2)) as usize
                        } else {
                            (next() % 4) as usize
                        };
                        t.drop_oldest(n);
                        for _ in 0..n {
                            pop(&mut map, &mut fifo);
                        }
                    }
                    89..=93 => t.clean_pending(),
                    94..=96 => t.shrink_if_sparse(),
                    97 => t.clean_all(),
                    _ => {
                        // Sweep-style: prune most, shrink.
                        now += 300;
                        t.prune(now, ttl);
                        while fifo.front().is_some_and(|f| f.0 + ttl <= now) {
                            pop(&mut map, &mut fifo);
                        }
                        t.clean_pending();
                        t.shrink_if_sparse();
                    }
                }
                assert_eq!(t.len(), fifo.len(), "len seed {seed} step {step} cap {cap}");
                // Every live record is found; a sample of other keys are not.
                for (&k, &v) in &map {
                    let got = t.get(k).map(|r| (r.id, r.ended));
                    assert_eq!(
                        got,
                        Some(v),
                        "live key {k:#x} seed {seed} step {step} cap {cap} op {op}"
                    );
                }
                // Small key spaces: every key, made or not; large ones: a sample.
                let sample = if nkeys <= 200 { nkeys } else { 32 };
                for j in 0..sample {
                    let k = if sample == nkeys {
                        mk(j)
                    } else {
                        mk(next() % nkeys)
                    };
                    let got = t.get(k).map(|r| (r.id, r.ended));
                    assert_eq!(
                        got,
                        map.get(&k).copied(),
                        "key {k:#x} seed {seed} step {step} cap {cap}"
                    );
                }
                assert!(t.filter_gens() <= super::filter::MAX_GENS);
            }
            assert_eq!(t.records().count(), map.len());
        }
    }
}

/// A shard keeps the lock and what every reserve writes in its first `WRITTEN_LINES` cache
/// lines, and what a reserve only reads (products, the index) after them
/// (`Shard`'s field order, `Padded::prefetch`): adding a field in the wrong place fails here.
#[test]
fn a_shards_written_fields_fill_its_first_lines() {
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        ..InventoryConfig::default()
    });
    let slot = &inv.shards[0];
    let base = slot as *const Padded as usize;
    let shard = slot.0.data_ptr() as usize - base;
    let written_end =
        shard + std::mem::offset_of!(Shard, idem) + super::idem::IdemTable::WRITTEN_BYTES;
    assert!(
        written_end <= WRITTEN_LINES * 64,
        "written up to byte {written_end}"
    );
    let products = shard + std::mem::offset_of!(Shard, products);
    assert!(
        products >= WRITTEN_LINES * 64,
        "products at byte {products}"
    );
    // A reservation map slot (id, entry) is 32 bytes, so none straddles two lines (the
    // slot's own test, `resmap.rs`, holds it; an entry alone is 24).
    assert_eq!(std::mem::size_of::<Entry>(), 24);
}

/// The product hint table (prefetch only) points at each product's slot after products are
/// added one by one (the list moves as it grows: every slot is noted again then) and after
/// a restore: where a hint slot is a single SKU's, it holds that product's address.
#[test]
fn product_hints_follow_the_products() {
    use std::collections::HashMap;
    let check = |inv: &Inventory| {
        let g = lock(&inv.shards[0]);
        let places: Vec<(u64, usize)> = g.products.places().collect();
        let mut per_slot: HashMap<usize, usize> = HashMap::new();
        for &(hash, _) in &places {
            *per_slot.entry(hint_slot(hash)).or_default() += 1;
        }
        let mut checked = 0;
        for (hash, addr) in places {
            if per_slot.get(&hint_slot(hash)) == Some(&1) {
                let hint = inv.product_hints[hint_slot(hash)].load(Ordering::Relaxed);
                assert_ne!(hint, 0, "hash {hash:#x} noted");
                assert_eq!(inv.hinted(hint), addr, "hash {hash:#x}");
                checked += 1;
            }
        }
        assert!(checked > 900, "{checked}");
    };
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        ..InventoryConfig::default()
    });
    for i in 0..1000 {
        inv.upsert(&format!("sku-{i}"), SPEC, Some(1))
            .expect("create");
    }
    check(&inv);
    let again = Inventory::new(InventoryConfig {
        shards: 1,
        ..InventoryConfig::default()
    });
    again.restore(inv.snapshot(), 0);
    check(&again);
}

/// Checks the expiry index of every shard: a reservation has a position exactly while
/// Pending or Held; a `fresh` position holds its id there, a wheel position its id in the
/// wheel; the wheel holds nothing else, and `fresh` nothing live that is not pointed at.
fn audit_expiry_index(inv: &Inventory) {
    for slot in inv.shards.iter() {
        let g = lock(slot);
        let mut in_wheel = 0;
        for e in g.reservations.values() {
            let raw = e.res.id.0;
            let live = matches!(e.state(), State::Pending | State::Held);
            assert_eq!(e.wheel.is_some(), live, "{:?} {:?}", e.res.id, e.state());
            match e.wheel {
                Some(p) if p.slot == shard::FRESH => {
                    assert_eq!(g.fresh.get(p.idx as usize), Some(&raw));
                }
                Some(p) => {
                    assert_eq!(g.wheel.get(p).map(|w| w.1), Some(raw));
                    in_wheel += 1;
                }
                None => {}
            }
        }
        assert_eq!(g.wheel.len(), in_wheel);
        // Every entry not vacated names a reservation waiting there.
        for (idx, raw) in g.fresh.iter().enumerate() {
            if *raw == shard::VACATED {
                continue;
            }
            let here = Some(wheel::Pos {
                slot: shard::FRESH,
                idx: idx as u32,
            });
            let at = g.reservations.get(raw).map(|e| e.wheel);
            assert_eq!(at, Some(here), "fresh[{idx}] names {raw}");
        }
        assert!(g.fresh.len() <= shard::FRESH_CAP);
    }
}

/// New reservations wait in the shard's `fresh` list until a sweep (or a full list) moves
/// the live ones into the wheel: the `FRESH_CAP + 1`-th reserve since a sweep settles the
/// list first; ones that leave while in the list only vacate their entry (and never enter
/// the wheel), ones released after the list was settled leave the wheel; one released and
/// undone while in the list is in the wheel once; every one left expires exactly once.
#[test]
fn new_reservations_reach_the_wheel_through_the_fresh_list() {
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        ..InventoryConfig::default()
    });
    inv.upsert("a", SPEC, Some(10_000)).expect("create");
    let n = shard::FRESH_CAP + 300;
    let all: Vec<ResHandle> = (0..n)
        .map(|i| held(&inv, "u", &format!("q{i}"), "a", 1, 0))
        .collect();
    audit_expiry_index(&inv);
    let waiting = |inv: &Inventory| {
        let g = lock(&inv.shards[0]);
        let vacant = g.fresh.iter().filter(|&&r| r == shard::VACATED).count();
        (g.fresh.len(), vacant, g.wheel.len())
    };
    // The first FRESH_CAP were settled into the wheel by the reserve after them.
    assert_eq!(waiting(&inv), (300, 0, shard::FRESH_CAP));
    let release = |r: &ResHandle, commit: bool| {
        inv.begin_release("u", r.id).expect("begin");
        inv.finish_release(r.id, commit).expect("finish");
    };
    // Released from the wheel, and from the list (vacated there).
    all[..10].iter().for_each(|r| release(r, true));
    all[n - 100..].iter().for_each(|r| release(r, true));
    // Released and undone while in the list: into the wheel from the undo on.
    all[n - 110..n - 100].iter().for_each(|r| release(r, false));
    // Aborted while Pending (in the list).
    let pending = new_res(&inv, "u", "p", "a", 1, 0);
    inv.abort_reserve(pending.id).expect("abort");
    // In the list: 300 + the aborted one, 111 of them vacated; the wheel lost 10 and
    // gained the 10 undone ones.
    assert_eq!(waiting(&inv), (301, 111, shard::FRESH_CAP));
    audit_expiry_index(&inv);
    assert!(inv.take_due(59_999, usize::MAX).is_empty());
    audit_expiry_index(&inv);
    // The sweep settled the list: the 190 still waiting went into the wheel.
    assert_eq!(waiting(&inv), (0, 0, shard::FRESH_CAP + 190));
    let mut due: Vec<ResId> = inv
        .take_due(60_000, usize::MAX)
        .iter()
        .map(|r| r.id)
        .collect();
    due.sort();
    let want: Vec<ResId> = all[10..n - 100].iter().map(|r| r.id).collect();
    assert_eq!(due, want);
    audit_expiry_index(&inv);
    inv.finish_expire(&due, true).expect("expire");
    assert!(inv.take_due(1_000_000, usize::MAX).is_empty());
    assert_eq!(counts(&inv, "a"), (10_000, 10_000, 0, 0));
    audit_expiry_index(&inv);
}

/// Shard counts are rounded up to a power of two (the shard of a SKU or an id is a mask),
/// within 1..=MAX_SHARDS.
#[test]
fn shard_counts_are_powers_of_two() {
    for (asked, got) in [
        (0, 1),
        (1, 1),
        (3, 4),
        (5, 8),
        (64, 64),
        (65, 128),
        (5000, 4096),
    ] {
        let inv = Inventory::new(InventoryConfig {
            shards: asked,
            ..InventoryConfig::default()
        });
        assert_eq!(inv.shard_count(), got, "{asked}");
    }
}

/// After every reserve the shard's filter hint holds the filter's current layout, while
/// generations open, retire (sweeps over a small cap) and are merged.
#[test]
fn the_filter_hint_follows_the_filter_after_each_reserve() {
    let inv = Inventory::new(InventoryConfig {
        shards: 1,
        idempotency_cap: 500,
        ..InventoryConfig::default()
    });
    inv.upsert("a", SPEC, Some(1 << 30)).expect("create");
    let mut gens_seen = std::collections::BTreeSet::new();
    for i in 0..20_000u64 {
        let r = new_res(&inv, "u", &format!("q{i}"), "a", 1, i);
        inv.abort_reserve(r.id).expect("abort");
        let g = lock(&inv.shards[0]);
        assert!(inv.filter_hints[0].matches(&g.idem), "after reserve {i}");
        gens_seen.insert(g.idem.filter_gens());
        drop(g);
        if i % 97 == 0 {
            inv.take_due(i, 16);
        }
    }
    // Generations came and went.
    assert!(gens_seen.len() >= 3, "{gens_seen:?}");
}

/// The pre-lock hint of each shard's product index (`FilterHint::note_index`) holds the
/// index's current place while products are added one by one (the index is rebuilt as it
/// grows) and after a restore, which builds new indexes.
#[test]
fn the_product_index_hint_follows_the_index() {
    let inv = Inventory::new(InventoryConfig {
        shards: 4,
        ..InventoryConfig::default()
    });
    let follows = |inv: &Inventory, when: &str| {
        for (i, slot) in inv.shards.iter().enumerate() {
            let g = lock(slot);
            assert_eq!(
                inv.filter_hints[i].index_hint(),
                g.products.index_layout(),
                "shard {i} {when}"
            );
        }
    };
    follows(&inv, "when empty");
    for n in 0..600 {
        inv.upsert(&format!("sku-{n}"), SPEC, Some(5))
            .expect("create");
        follows(&inv, &format!("after product {n}"));
    }
    let (addr, mask) = lock(&inv.shards[0]).products.index_layout();
    assert!(addr != 0 && mask >= 255, "the index grew: mask {mask}");
    let restored = Inventory::new(InventoryConfig {
        shards: 4,
        ..InventoryConfig::default()
    });
    restored.restore(inv.snapshot(), 0);
    follows(&restored, "after a restore");
    // A restore into the same inventory replaces each shard's index: the hint moves too.
    let before = inv.filter_hints[0].index_hint();
    inv.restore(inv.snapshot(), 0);
    follows(&inv, "after a restore into it");
    assert_ne!(inv.filter_hints[0].index_hint(), (0, 0), "{before:?}");
    // And a reserve of every product still finds it (the hint is only ever prefetched).
    for n in 0..600 {
        new_res(&restored, "u", &format!("q{n}"), &format!("sku-{n}"), 1, 0);
        new_res(&inv, "u", &format!("q{n}"), &format!("sku-{n}"), 1, 0);
    }
}

/// The idempotency key is the same whichever buffer packed it (keys that fit 64 bytes use a
/// smaller one), and the length prefixes keep different splits of the same bytes apart.
#[test]
fn idempotency_keys_do_not_depend_on_the_buffer() {
    let inv = inv();
    for user_len in 20..=40 {
        let user = "u".repeat(user_len);
        let (req, sku) = ("req-0001", "sku-00000001-aaaaaaaa");
        let mut buf = [0u8; 195];
        let big = pack(&mut buf, [&user, req, sku]).expect("fits");
        assert_eq!(
            inv.idem_key(&user, req, sku),
            inv.packed_key(big),
            "{user_len}"
        );
    }
    assert_ne!(inv.idem_key("ab", "c", "d"), inv.idem_key("a", "bc", "d"));
    let long = "x".repeat(65);
    assert_ne!(
        inv.idem_key(&long, "r", "s"),
        inv.idem_key(&long[..64], "r", "s")
    );
}

/// Strings longer than `Text` keeps inline (24 bytes) live on the heap; a reservation
/// keeps and compares them byte for byte either way: the retry of the same long key is
/// the same reservation, a user differing only past byte 24 is another user.
#[test]
fn long_and_short_strings_are_kept_whole() {
    let inv = inv();
    let sku = format!("sku-{}", "s".repeat(40));
    inv.upsert(&sku, SPEC, Some(10)).expect("create");
    let user = format!("{}-a", "u".repeat(30));
    let other = format!("{}-b", "u".repeat(30));
    let r = req(&user, &"q".repeat(64), &sku, 1, 1000);
    let held = match inv.reserve(r.clone()) {
        Ok(ReserveOutcome::New(res)) => res,
        got => panic!("expected New, got {got:?}"),
    };
    assert_eq!(
        (&*held.user, &*held.req, &*held.sku),
        (&*user, &*"q".repeat(64), &*sku)
    );
    assert_eq!(&*held.room, "room1");
    inv.confirm(&held).expect("confirm");
    assert!(matches!(inv.reserve(r), Ok(ReserveOutcome::Existing(e)) if e.id == held.id));
    assert_eq!(
        inv.begin_release(&other, held.id).err(),
        Some(InvError::NotFound)
    );
    let short = new_res(&inv, "u", "q", &sku, 1, 1000);
    assert_eq!((&*short.user, &*short.req), ("u", "q"));
    inv.begin_release(&user, held.id)
        .expect("the owner releases");
    inv.finish_release(held.id, true).expect("finish");
    assert_eq!(counts(&inv, &sku), (10, 9, 1, 0));
}

/// A xorshift generator from `seed` (non-zero): deterministic pseudo-random words for the
/// model tests of the core's tables, so a failure repeats.
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The handle `reserve` returns carries every field of the request and those the core sets
/// (id, price, expiry, Pending), the one the core keeps is the same reservation, and a
/// refused reserve takes nothing.
#[test]
fn a_new_reservations_handle_carries_the_request_and_the_cores_fields() {
    let inv = Inventory::new(InventoryConfig {
        shards: 4,
        epoch: 3,
        idempotency_ttl_ms: 60_000,
        idempotency_cap: 1000,
    });
    let spec = ProductSpec {
        price_cents: 4321,
        limit_per_user: 0,
        ttl_s: 30,
    };
    assert!(inv.upsert("sku-a", spec, Some(1)).is_ok());
    let mut r = req("user-1", "req-1", "sku-a", 1, 5_000);
    r.room = Text::from("room-9");
    r.referrer = Some(Text::from("anchor-2"));
    let Ok(ReserveOutcome::New(h)) = inv.reserve(r) else {
        panic!("the first reserve takes the unit");
    };
    assert_eq!(h.id.epoch(), 3);
    assert_eq!(
        (&*h.user, &*h.req, &*h.room, h.referrer.as_deref(), &*h.sku),
        ("user-1", "req-1", "room-9", Some("anchor-2"), "sku-a")
    );
    assert_eq!((h.qty, h.price_cents, h.expires_at), (1, 4321, 35_000));
    let kept = inv.reservation(h.id).map(|k| k.reservation().clone());
    assert_eq!(kept.as_ref(), Some(h.reservation()));
    assert!(inv.confirm(&h).is_ok(), "Pending, so confirm succeeds once");
    assert!(inv.confirm(&h).is_err(), "and only once");
    assert!(matches!(
        inv.reserve(req("user-2", "req-1", "sku-a", 1, 5_000)),
        Err(InvError::SoldOut { available: 0 })
    ));
    let c = inv.counts("sku-a");
    assert_eq!(c.map(|c| (c.available, c.reserved)), Some((0, 1)));
}

/// The ring's record keeps its creation time and both flags in one word: a record made at
/// a time past `AT_MAX` is kept (as made at the latest time it can say), ended and removed
/// records read back as such, and the TTL prune still drops by creation time.
#[test]
fn a_record_keeps_its_time_and_flags_in_one_word() {
    use super::idem::IdemTable;
    use super::shard::IdemRec;
    let mut t = IdemTable::new();
    let rec = |id: u64, ended: bool| IdemRec {
        id: ResId(id),
        check: id * 7,
        ended,
    };
    t.insert(1, rec(1, false), 1_000, 100);
    t.insert(2, rec(2, true), 2_000, 100);
    t.insert(3, rec(3, false), u64::MAX, 100);
    assert_eq!(
        t.get(1).map(|r| (r.id, r.check, r.ended)),
        Some((ResId(1), 7, false))
    );
    assert_eq!(t.get(2).map(|r| (r.id, r.ended)), Some((ResId(2), true)));
    assert!(t.mark_ended(1, Some(ResId(1))));
    assert!(
        !t.mark_ended(1, Some(ResId(9))),
        "another reservation's record"
    );
    assert_eq!(t.get(1).map(|r| r.ended), Some(true));
    t.remove(2, ResId(2));
    assert!(t.get(2).is_none());
    assert_eq!(
        t.records().map(|r| r.id).collect::<Vec<_>>(),
        [ResId(1), ResId(3)]
    );
    // Made at or before now - ttl goes: 1,000 with ttl 500 at now 1,500.
    t.prune(1_500, 500);
    assert!(t.get(1).is_none());
    assert_eq!(
        t.get(3).map(|r| r.id),
        Some(ResId(3)),
        "the far-future record stays"
    );
    t.prune(u64::MAX, 0);
    assert!(
        t.get(3).is_none(),
        "and goes once now passes its (clamped) time"
    );
}
