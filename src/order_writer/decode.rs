//! Decoding for the order writer: redis-rs stream replies (XAUTOCLAIM always, XREADGROUP
//! only when Redis is not reached over plain TCP; otherwise `resp.rs` reads those) into
//! entries, and `kind=order` entries (fields per docs/redis.md) into [`Order`]s.
//!
//! Pure functions over values already read: no I/O here, and no input, however broken,
//! may panic; a bad entry becomes [`Decoded::Dead`] with the reason.

use std::collections::HashSet;

use redis::Value;
use serde::Deserialize;

use crate::store::{Order, OrderItem};

/// Longest string field accepted in an order (ids are at most 64 chars by the protocol;
/// this bound only keeps garbage out of the store).
const MAX_FIELD_BYTES: usize = 256;
/// Most items one order may carry.
const MAX_ITEMS: usize = 1_000;

/// The field/value pairs of one entry, in stream order.
pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream entry as delivered to the consumer group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: String,
    /// The field/value pairs, in stream order; `None` when the entry was deleted from the
    /// stream while it was still pending.
    pub fields: Option<Fields>,
}

impl Entry {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .as_ref()?
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// What the writer does with one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A well-formed order: store it.
    Order(Order),
    /// Another kind: acknowledge without work.
    Skip,
    /// Cannot be decoded: copy to the dead-letter stream with this reason, then acknowledge.
    Dead(String),
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn items_of(v: &Value) -> Option<Vec<&Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a.iter().collect()),
        _ => None,
    }
}

/// The fields of an entry. Only `order` entries are decoded, so of any other kind only
/// `kind` is kept: a rush streams tens of thousands of `reserved` entries a second through
/// the writer, and copying their ten fields each was most of its own work.
fn fields_of(v: &Value) -> Result<Option<Fields>, String> {
    match v {
        Value::Nil => Ok(None),
        Value::Array(a) => {
            if a.len() % 2 != 0 {
                return Err("odd number of field values".to_string());
            }
            let kind = a
                .chunks(2)
                .find(|pair| matches!(&pair[0], Value::BulkString(k) if k == b"kind"))
                .and_then(|pair| bytes(&pair[1]));
            if let Some(kind) = kind.filter(|k| k != b"order") {
                return Ok(Some(vec![(b"kind".to_vec(), kind)]));
            }
            let mut out = Vec::with_capacity(a.len() / 2);
            for pair in a.chunks(2) {
                match (bytes(&pair[0]), bytes(&pair[1])) {
                    (Some(k), Some(v)) => out.push((k, v)),
                    _ => return Err("a field or value is not a string".to_string()),
                }
            }
            Ok(Some(out))
        }
        Value::Map(m) => {
            let mut out = Vec::with_capacity(m.len());
            for (k, v) in m {
                match (bytes(k), bytes(v)) {
                    (Some(k), Some(v)) => out.push((k, v)),
                    _ => return Err("a field or value is not a string".to_string()),
                }
            }
            Ok(Some(out))
        }
        other => Err(format!("unexpected fields value {other:?}")),
    }
}

/// Parses a list of entries (`[[id, [f, v, ...]], ...]`). Nil entries (Redis 6.2 reports
/// deleted entries so in XAUTOCLAIM) are skipped.
pub(crate) fn parse_entries(v: &Value) -> Result<Vec<Entry>, String> {
    let Some(list) = items_of(v) else {
        return match v {
            Value::Nil => Ok(Vec::new()),
            other => Err(format!("expected a list of entries, got {other:?}")),
        };
    };
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        match e {
            Value::Nil => continue,
            Value::Array(parts) if parts.len() == 2 => {
                let id = string(&parts[0]).ok_or("entry id is not a string")?;
                out.push(Entry {
                    id,
                    fields: fields_of(&parts[1])?,
                });
            }
            other => return Err(format!("unexpected entry {other:?}")),
        }
    }
    Ok(out)
}

/// Parses an XREADGROUP reply for one stream: nil (timeout) or `[[key, entries]]`
/// (RESP2), or a map `{key: entries}` (RESP3).
pub(crate) fn parse_read_reply(v: &Value) -> Result<Vec<Entry>, String> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut out = Vec::new();
            for s in streams {
                match s {
                    Value::Array(kv) if kv.len() == 2 => out.extend(parse_entries(&kv[1])?),
                    other => return Err(format!("unexpected stream reply {other:?}")),
                }
            }
            Ok(out)
        }
        Value::Map(streams) => {
            let mut out = Vec::new();
            for (_, entries) in streams {
                out.extend(parse_entries(entries)?);
            }
            Ok(out)
        }
        other => Err(format!("unexpected XREADGROUP reply {other:?}")),
    }
}

/// Parses an XAUTOCLAIM reply: `[next-cursor, entries, deleted-ids]` (the last part only
/// since Redis 7). Returns the next cursor and the claimed entries.
pub(crate) fn parse_autoclaim_reply(v: &Value) -> Result<(String, Vec<Entry>), String> {
    match v {
        Value::Array(parts) if parts.len() >= 2 => {
            let next = string(&parts[0]).ok_or("XAUTOCLAIM cursor is not a string")?;
            Ok((next, parse_entries(&parts[1])?))
        }
        other => Err(format!("unexpected XAUTOCLAIM reply {other:?}")),
    }
}

#[derive(Deserialize)]
struct RawItem {
    reservation: String,
    sku: String,
    qty: i64,
    price_cents: i64,
}

fn text_field<'a>(e: &'a Entry, name: &str, required: bool) -> Result<Option<&'a str>, String> {
    let Some(raw) = e.field(name) else {
        return if required {
            Err(format!("missing field {name}"))
        } else {
            Ok(None)
        };
    };
    let s = std::str::from_utf8(raw).map_err(|_| format!("field {name} is not UTF-8"))?;
    if s.is_empty() {
        return if required {
            Err(format!("field {name} is empty"))
        } else {
            Ok(None)
        };
    }
    check_text(name, s)?;
    Ok(Some(s))
}

fn check_text(name: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_FIELD_BYTES {
        return Err(format!(
            "field {name} is longer than {MAX_FIELD_BYTES} bytes"
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("field {name} contains control characters"));
    }
    Ok(())
}

fn int_field(e: &Entry, name: &str) -> Result<i64, String> {
    let s = text_field(e, name, true)?.unwrap_or_default();
    match s.parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        Ok(_) => Err(format!("field {name} is negative")),
        Err(_) => Err(format!("field {name}={s:?} is not an integer")),
    }
}

/// Classifies one entry of the events stream.
pub(crate) fn decode(e: &Entry) -> Decoded {
    if e.fields.is_none() {
        return Decoded::Dead("entry was deleted from the stream before it was processed".into());
    }
    match e.field("kind") {
        Some(b"order") => match decode_order(e) {
            Ok(o) => Decoded::Order(o),
            Err(err) => Decoded::Dead(err),
        },
        Some(_) => Decoded::Skip,
        None => Decoded::Dead("missing field kind".into()),
    }
}

fn decode_order(e: &Entry) -> Result<Order, String> {
    let order_id = text_field(e, "order", true)?
        .unwrap_or_default()
        .to_string();
    let user_id = text_field(e, "user", true)?.unwrap_or_default().to_string();
    let room = text_field(e, "room", true)?.unwrap_or_default().to_string();
    let ref_user = text_field(e, "ref", false)?.map(str::to_string);
    let total_cents = int_field(e, "total_cents")?;
    let created_at_ms = int_field(e, "created_at")?;
    let raw_items = e.field("items").ok_or("missing field items")?;
    let raw: Vec<RawItem> =
        serde_json::from_slice(raw_items).map_err(|err| format!("field items: {err}"))?;
    if raw.is_empty() {
        return Err("field items is empty".into());
    }
    if raw.len() > MAX_ITEMS {
        return Err(format!("more than {MAX_ITEMS} items"));
    }
    let mut seen = HashSet::with_capacity(raw.len());
    let mut sum: i64 = 0;
    let mut items = Vec::with_capacity(raw.len());
    for i in raw {
        if i.reservation.is_empty() || i.sku.is_empty() {
            return Err("an item has an empty reservation or sku".into());
        }
        check_text("items.reservation", &i.reservation)?;
        check_text("items.sku", &i.sku)?;
        if i.qty < 1 || i.price_cents < 0 {
            return Err(format!(
                "item {} has qty {} and price_cents {}",
                i.reservation, i.qty, i.price_cents
            ));
        }
        if !seen.insert(i.reservation.clone()) {
            return Err(format!("reservation {} appears twice", i.reservation));
        }
        sum = i
            .qty
            .checked_mul(i.price_cents)
            .and_then(|line| sum.checked_add(line))
            .ok_or("items total overflows")?;
        items.push(OrderItem {
            reservation: i.reservation,
            sku: i.sku,
            qty: i.qty,
            unit_price_cents: i.price_cents,
        });
    }
    if sum != total_cents {
        return Err(format!(
            "total_cents {total_cents} is not the sum of the items ({sum})"
        ));
    }
    Ok(Order {
        order_id,
        user_id,
        room,
        ref_user,
        total_cents,
        created_at_ms,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect(),
            ),
        }
    }

    const ITEMS: &str = r#"[{"reservation":"r1","sku":"s1","qty":2,"price_cents":1999},{"reservation":"r2","sku":"s2","qty":1,"price_cents":2}]"#;

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("kind", "order"),
            ("order", "o-1"),
            ("user", "u-1"),
            ("req", "q1"),
            ("room", "room-1"),
            ("ref", ""),
            ("total_cents", "4000"),
            ("created_at", "1700000000000"),
            ("items", ITEMS),
        ]
    }

    #[test]
    fn a_well_formed_order_decodes() {
        let Decoded::Order(o) = decode(&entry(&good())) else {
            panic!("not an order");
        };
        assert_eq!(o.order_id, "o-1");
        assert_eq!(o.ref_user, None);
        assert_eq!(o.total_cents, 4000);
        assert_eq!(o.items.len(), 2);
        assert_eq!(o.items[0].unit_price_cents, 1999);
    }

    #[test]
    fn other_kinds_are_skipped() {
        assert_eq!(decode(&entry(&[("kind", "reserved")])), Decoded::Skip);
        assert_eq!(decode(&entry(&[("kind", "brand-new")])), Decoded::Skip);
    }

    #[test]
    fn broken_orders_are_dead_letters() {
        let cases: Vec<(&str, Option<&str>)> = vec![
            ("items", Some("not json")),
            ("items", Some("[]")),
            (
                "items",
                Some(r#"[{"reservation":"r","sku":"s","qty":0,"price_cents":1}]"#),
            ),
            ("total_cents", None),
            ("total_cents", Some("12")),
            ("total_cents", Some("-4000")),
            ("created_at", Some("yesterday")),
            ("order", Some("")),
            ("user", None),
            ("room", Some("a\u{0}b")),
        ];
        for (name, value) in cases {
            let mut f = good();
            f.retain(|(k, _)| *k != name);
            if let Some(v) = value {
                f.push((name, v));
            }
            match decode(&entry(&f)) {
                Decoded::Dead(_) => {}
                other => panic!("{name}={value:?} gave {other:?}"),
            }
        }
        assert!(matches!(decode(&entry(&[("x", "y")])), Decoded::Dead(_)));
        let deleted = Entry {
            id: "1-0".into(),
            fields: None,
        };
        assert!(matches!(decode(&deleted), Decoded::Dead(_)));
    }

    #[test]
    fn replies_parse_and_garbage_does_not_panic() {
        let bs = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bs("p:events"),
            Value::Array(vec![
                Value::Array(vec![bs("1-0"), Value::Array(vec![bs("kind"), bs("order")])]),
                Value::Array(vec![bs("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply).expect("parse");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].fields, None);
        // Of another kind only `kind` is kept (it is skipped); an order keeps every field.
        let reply = Value::Array(vec![Value::Array(vec![
            bs("p:events"),
            Value::Array(vec![
                Value::Array(vec![
                    bs("3-0"),
                    Value::Array(vec![bs("kind"), bs("reserved"), bs("user"), bs("u")]),
                ]),
                Value::Array(vec![
                    bs("4-0"),
                    Value::Array(vec![bs("order"), bs("o-1"), bs("kind"), bs("order")]),
                ]),
            ]),
        ])]);
        let entries = parse_read_reply(&reply).expect("parse");
        assert_eq!(
            entries[0].fields,
            Some(vec![(b"kind".to_vec(), b"reserved".to_vec())])
        );
        assert_eq!(decode(&entries[0]), Decoded::Skip);
        assert_eq!(entries[1].fields.as_ref().map(Vec::len), Some(2));
        assert!(parse_read_reply(&Value::Nil).expect("nil").is_empty());
        assert!(parse_read_reply(&Value::Int(3)).is_err());
        assert!(parse_read_reply(&Value::Array(vec![Value::Int(3)])).is_err());
        let claim = Value::Array(vec![
            bs("0-0"),
            Value::Array(vec![Value::Nil]),
            Value::Array(vec![]),
        ]);
        let (next, e) = parse_autoclaim_reply(&claim).expect("claim");
        assert_eq!(next, "0-0");
        assert!(e.is_empty());
        assert!(parse_autoclaim_reply(&Value::Nil).is_err());
    }
}
