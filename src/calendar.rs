//! Calendar windows: a daily quota that resets at a fixed time of day in a time zone (contract
//! §5 `resets = "HH:MM ZONE"`), as OpenRouter (00:00 UTC) and Gemini (midnight Pacific) count,
//! instead of 24 h after each call.
//!
//! The zone database is bundled (`jiff`'s `tzdb-bundle-always`), so a container image without
//! `/usr/share/zoneinfo` resets at the same instants as a developer's machine.

use std::fmt;
use std::time::SystemTime;

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;

/// The time of day, in a zone, at which a daily quota is whole again.
#[derive(Clone)]
pub struct DailyReset {
    at: Time,
    zone: TimeZone,
    /// As written in the config, for `status` and messages.
    text: String,
}

impl DailyReset {
    /// Parses `"HH:MM ZONE"`: a 24-hour time and `UTC` or an IANA zone name
    /// (`"00:00 America/Los_Angeles"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || format!("`{text}` is not a reset like \"00:00 UTC\" or \"00:00 America/Los_Angeles\"");
        let mut words = text.split_whitespace();
        let (Some(clock), Some(zone), None) = (words.next(), words.next(), words.next()) else {
            return Err(usage());
        };
        let (hour, minute) = clock.split_once(':').ok_or_else(usage)?;
        let two_digits =
            |s: &str| (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i8>().ok()).flatten();
        let (Some(hour), Some(minute)) = (two_digits(hour), two_digits(minute)) else {
            return Err(usage());
        };
        let at = Time::new(hour, minute, 0, 0).map_err(|_| usage())?;
        let zone = if zone.eq_ignore_ascii_case("UTC") {
            TimeZone::UTC
        } else {
            TimeZone::get(zone)
                .map_err(|_| format!("`{zone}` is not an IANA time zone (like \"America/Los_Angeles\")"))?
        };
        let text = format!("{clock} {}", zone_name(&zone));
        Ok(Self { at, zone, text })
    }

    /// The first reset strictly after `now`.
    pub fn next_after(&self, now: SystemTime) -> SystemTime {
        let Some(now_ts) = timestamp(now) else { return now };
        let today = now_ts.to_zoned(self.zone.clone()).date();
        [Some(today), today.tomorrow().ok()]
            .into_iter()
            .flatten()
            .filter_map(|day| self.on(day))
            .find(|reset| *reset > now_ts)
            .map_or(now, SystemTime::from)
    }

    /// The last reset at or before `now`: the start of the calendar window `now` is in.
    pub fn last_at_or_before(&self, now: SystemTime) -> SystemTime {
        let Some(now_ts) = timestamp(now) else { return now };
        let today = now_ts.to_zoned(self.zone.clone()).date();
        [Some(today), today.yesterday().ok()]
            .into_iter()
            .flatten()
            .filter_map(|day| self.on(day))
            .find(|reset| *reset <= now_ts)
            .map_or(now, SystemTime::from)
    }

    /// The reset instant on the civil `day` of the zone. A time that a DST change skips
    /// (02:30 on a spring-forward day) resets at the moment it would have been (03:30); a time
    /// that happens twice resets at the first.
    fn on(&self, day: Date) -> Option<Timestamp> {
        let zoned = self.zone.to_ambiguous_zoned(day.to_datetime(self.at)).compatible().ok()?;
        Some(zoned.timestamp())
    }
}

fn timestamp(t: SystemTime) -> Option<Timestamp> {
    Timestamp::try_from(t).ok()
}

fn zone_name(zone: &TimeZone) -> &str {
    zone.iana_name().unwrap_or("UTC")
}

impl fmt::Display for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for DailyReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DailyReset({})", self.text)
    }
}

impl PartialEq for DailyReset {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for DailyReset {}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn a_utc_midnight_reset_comes_at_the_next_midnight_not_a_day_after_the_call() {
        let reset = DailyReset::parse("00:00 UTC").unwrap();
        assert_eq!(reset.next_after(at("2026-11-30T23:30:00Z")), at("2026-12-01T00:00:00Z"));
        assert_eq!(reset.next_after(at("2026-12-01T00:00:00Z")), at("2026-12-02T00:00:00Z"));
        assert_eq!(reset.last_at_or_before(at("2026-12-01T00:00:00Z")), at("2026-12-01T00:00:00Z"));
        assert_eq!(reset.last_at_or_before(at("2026-11-30T23:30:00Z")), at("2026-11-30T00:00:00Z"));
    }

    #[test]
    fn pacific_midnight_follows_daylight_saving_time() {
        let reset = DailyReset::parse("00:00 America/Los_Angeles").unwrap();
        // PST (UTC-8) before 2026-03-08, PDT (UTC-7) after.
        assert_eq!(reset.next_after(at("2026-03-07T12:00:00Z")), at("2026-03-08T08:00:00Z"));
        assert_eq!(reset.next_after(at("2026-03-08T12:00:00Z")), at("2026-03-09T07:00:00Z"));
        // Back to PST on 2026-11-01: that day is 25 hours long.
        assert_eq!(reset.next_after(at("2026-11-01T06:00:00Z")), at("2026-11-01T07:00:00Z"));
        assert_eq!(reset.next_after(at("2026-11-01T07:00:00Z")), at("2026-11-02T08:00:00Z"));
        assert_eq!(reset.to_string(), "00:00 America/Los_Angeles");
    }

    #[test]
    fn a_reset_inside_the_skipped_hour_comes_when_that_hour_would_have() {
        let reset = DailyReset::parse("02:30 America/New_York").unwrap();
        // 2026-03-08 02:30 EST does not exist; it resets at 03:30 EDT = 07:30 UTC.
        assert_eq!(reset.next_after(at("2026-03-08T05:00:00Z")), at("2026-03-08T07:30:00Z"));
    }

    #[test]
    fn bad_resets_say_what_is_expected() {
        for text in
            ["", "00:00", "24:00 UTC", "0:00 UTC", "00:60 UTC", "00:00 Mars/Olympus", "00:00 UTC extra", "aa:bb UTC"]
        {
            assert!(DailyReset::parse(text).is_err(), "{text:?} parsed");
        }
        assert!(DailyReset::parse("00:00 Mars/Olympus").unwrap_err().contains("IANA"));
    }

    #[test]
    fn instants_outside_the_calendar_do_not_panic() {
        let reset = DailyReset::parse("00:00 UTC").unwrap();
        let far = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(400_000_000_000);
        let _ = (reset.next_after(far), reset.last_at_or_before(far));
    }
}
