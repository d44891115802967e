//! What arrives, read: a message body decoded into the one event type
//! (native, or a CloudEvents 1.0 structured event whose `data` is one), and
//! how late it landed.

use std::time::Duration;

use crate::outbox::EventBody;

/// How long after it happened an event landed.
pub(super) fn lag(event: &EventBody) -> Duration {
    let occurred = chrono_free_parse(&event.occurred_at);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    Duration::from_secs_f64((now - occurred.unwrap_or(now)).max(0.0))
}

/// Seconds since the epoch of an RFC 3339 UTC time as the relay writes it
/// (`YYYY-MM-DDTHH:MM:SS[.ffffff]Z`); None for anything else.
fn chrono_free_parse(t: &str) -> Option<f64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, mo, da) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut c = time.split(':');
    let (h, mi) = (c.next()?.parse::<i64>().ok()?, c.next()?.parse::<i64>().ok()?);
    let s: f64 = c.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3_600 + mi * 60) as f64 + s)
}

/// Decodes a message body: our native event, or a CloudEvents 1.0
/// structured event whose `data` is one. Returns the event and its native
/// JSON as it arrived (unknown fields kept); Err says why it is not one of
/// ours.
pub fn decode(body: &str) -> std::result::Result<(EventBody, serde_json::Value), String> {
    use serde::Deserialize;
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let native = if value.get("specversion").is_some() {
        let mut value = value;
        value.get_mut("data").map(serde_json::Value::take).ok_or("a CloudEvent without data")?
    } else {
        value
    };
    let event = EventBody::deserialize(&native).map_err(|e| format!("not a transfer-worker event: {e}"))?;
    uuid::Uuid::parse_str(&event.event_id).map_err(|e| format!("its event_id is not a UUID: {e}"))?;
    Ok((event, native))
}

/// The event types in the order they happen to one transfer, for consumers
/// of standard queues that must put them back in order.
pub fn in_transfer_order(mut events: Vec<EventBody>) -> Vec<EventBody> {
    events.sort_by_key(|e| (e.transfer_id, e.event_type.sequence()));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::EventType;

    const NATIVE: &str = r#"{"event_id":"0190b2a4-7d2e-7c3a-9f00-000000000001","event_type":"transfer.succeeded","transfer_id":42,
        "occurred_at":"2026-11-21T12:00:00.000000Z","schema_version":1,
        "data":{"from_account":1,"to_account":2,"amount":500,"idempotency_key":"k-42"},"added_later":true}"#;

    #[test]
    fn native_and_cloudevents_bodies_decode_to_one_event_and_foreign_ones_do_not() {
        let (native, _) = decode(NATIVE).unwrap();
        assert_eq!(
            (native.event_type, native.transfer_id.0, native.data.amount),
            (EventType::TransferSucceeded, 42, 500)
        );
        let cloud = format!(
            r#"{{"specversion":"1.0","id":"{}","source":"transfer-worker","type":"transfer.succeeded","subject":"42","data":{NATIVE}}}"#,
            native.event_id
        );
        assert_eq!(decode(&cloud).unwrap().0, native);
        for foreign in
            ["not json", "{}", r#"{"hello":"world"}"#, &NATIVE.replace("0190b2a4-7d2e-7c3a-9f00-000000000001", "nope")]
        {
            assert!(decode(foreign).is_err(), "{foreign}");
        }
    }

    #[test]
    fn the_relays_times_parse() {
        assert_eq!(chrono_free_parse("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(chrono_free_parse("2026-11-21T12:00:00.500000Z"), Some(1_795_262_400.5));
        assert_eq!(chrono_free_parse("yesterday"), None);
    }
}
