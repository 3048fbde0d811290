//! A site's maintenance window, in the site's own time zone: `Mon-Fri 01:00-05:00`,
//! `Sat,Sun 00:00-24:00`, `daily 22:00-04:00` (a window may run past midnight: it
//! belongs to the day it starts on). Several windows are separated by `;`.

use jiff::Timestamp;
use jiff::tz::TimeZone;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// One or more weekly windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows(Vec<Window>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Window {
    /// Monday first.
    days: [bool; 7],
    /// Minutes after local midnight.
    start: u16,
    end: u16,
}

impl std::str::FromStr for Windows {
    type Err = String;

    fn from_str(s: &str) -> Result<Windows, String> {
        let bad = |why: &str| {
            format!(
                "maintenance window {s:?}: {why}; e.g. \"Mon-Fri 01:00-05:00\" or \"daily 22:00-04:00; Sat 00:00-24:00\""
            )
        };
        let mut out = Vec::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (days, times) = part.split_once(' ').ok_or_else(|| bad("days, a space, then HH:MM-HH:MM"))?;
            let (a, b) = times.trim().split_once('-').ok_or_else(|| bad("times as HH:MM-HH:MM"))?;
            let (start, end) = (
                minutes(a).ok_or_else(|| bad("a time is not HH:MM"))?,
                minutes(b).ok_or_else(|| bad("a time is not HH:MM"))?,
            );
            if start == end || start == 24 * 60 {
                return Err(bad("a window must have a length"));
            }
            out.push(Window {
                days: day_set(days).ok_or_else(|| {
                    bad("days are mon..sun, ranges like Mon-Fri, lists like Sat,Sun, or daily")
                })?,
                start,
                end,
            });
        }
        if out.is_empty() {
            return Err(bad("empty"));
        }
        Ok(Windows(out))
    }
}

fn minutes(t: &str) -> Option<u16> {
    let (h, m) = t.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return None;
    }
    Some(h * 60 + m)
}

fn day_set(s: &str) -> Option<[bool; 7]> {
    let mut days = [false; 7];
    let index = |d: &str| DAYS.iter().position(|x| d.to_ascii_lowercase().starts_with(x) && d.len() <= 9);
    for item in s.split(',').map(str::trim) {
        if item.eq_ignore_ascii_case("daily") {
            days = [true; 7];
            continue;
        }
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (index(a)?, index(b)?);
                let mut i = a;
                loop {
                    days[i] = true;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => days[index(item)?] = true,
        }
    }
    days.iter().any(|d| *d).then_some(days)
}

impl Windows {
    /// Is a window open at `now_ms` in time zone `tz` (IANA name)?
    pub fn is_open(&self, now_ms: i64, tz: &str) -> Result<bool, String> {
        let zone = TimeZone::get(tz).map_err(|e| format!("time zone {tz:?}: {e}"))?;
        let t = Timestamp::from_millisecond(now_ms).map_err(|e| e.to_string())?.to_zoned(zone);
        let day = t.weekday().to_monday_zero_offset() as usize;
        let minute = t.hour() as u16 * 60 + t.minute() as u16;
        let yesterday = (day + 6) % 7;
        Ok(self.0.iter().any(|w| {
            if w.start < w.end {
                w.days[day] && (w.start..w.end).contains(&minute)
            } else {
                (w.days[day] && minute >= w.start) || (w.days[yesterday] && minute < w.end)
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ms of a local time in `tz`.
    fn at(tz: &str, civil: &str) -> i64 {
        let dt: jiff::civil::DateTime = civil.parse().unwrap();
        dt.to_zoned(TimeZone::get(tz).unwrap()).unwrap().timestamp().as_millisecond()
    }

    #[test]
    fn a_weekday_window_is_open_inside_and_closed_outside_in_local_time() {
        let w: Windows = "Mon-Fri 01:00-05:00".parse().unwrap();
        // 2026-11-25 is a Wednesday.
        assert!(w.is_open(at("Europe/London", "2026-11-25T01:00"), "Europe/London").unwrap());
        assert!(!w.is_open(at("Europe/London", "2026-11-25T05:00"), "Europe/London").unwrap());
        assert!(!w.is_open(at("Europe/London", "2026-11-28T02:00"), "Europe/London").unwrap(), "Saturday");
        // The same instant is 03:00 in London and 22:00 the day before in New York.
        let instant = at("Europe/London", "2026-11-25T03:00");
        assert!(!w.is_open(instant, "America/New_York").unwrap());
    }

    #[test]
    fn a_window_past_midnight_belongs_to_the_day_it_starts() {
        let w: Windows = "Fri 22:00-04:00".parse().unwrap();
        assert!(w.is_open(at("UTC", "2026-11-27T23:00"), "UTC").unwrap(), "Friday night");
        assert!(w.is_open(at("UTC", "2026-11-28T03:59"), "UTC").unwrap(), "Saturday early");
        assert!(!w.is_open(at("UTC", "2026-11-27T03:00"), "UTC").unwrap(), "Friday early is Thursday's");
    }

    #[test]
    fn several_windows_and_whole_days() {
        let w: Windows = "daily 02:00-03:00; Sat,Sun 00:00-24:00".parse().unwrap();
        assert!(w.is_open(at("UTC", "2026-11-29T15:00"), "UTC").unwrap(), "Sunday afternoon");
        assert!(w.is_open(at("UTC", "2026-11-25T02:30"), "UTC").unwrap());
        assert!(!w.is_open(at("UTC", "2026-11-25T15:00"), "UTC").unwrap());
    }

    #[test]
    fn bad_windows_and_zones_are_refused_with_the_reason() {
        for bad in
            ["", "Mon 25:00-26:00", "Funday 01:00-02:00", "Mon 01:00", "Mon 01:00-01:00", "01:00-02:00"]
        {
            let e = bad.parse::<Windows>().unwrap_err();
            assert!(e.contains("maintenance window"), "{bad}: {e}");
        }
        let w: Windows = "daily 00:00-24:00".parse().unwrap();
        assert!(w.is_open(0, "Mars/Olympus").unwrap_err().contains("Mars/Olympus"));
    }
}
