//! GS1 element strings as a cartridge's DataMatrix carries them.
//!
//! A scanner hands over the symbology identifier (`]d2` for GS1 DataMatrix, `]C1`
//! GS1-128, `]Q3` GS1 QR Code) and then application identifiers (AIs), each followed by
//! its value. Fixed-length values run on into the next AI; variable-length ones end
//! with the FNC1 separator, which scanners transmit as GS (0x1D), unless they are last.
//! People type the human-readable form instead: `(01)…(17)…(10)…(21)…`. Both parse
//! here, into the same [`Scan`].
//!
//! The AIs a cartridge carries, and nothing else, are known ([`AIS`]): an unknown AI
//! cannot be skipped safely (its length is unknown), so it is refused with its
//! position. Every refusal names the AI, the value and what was allowed.
//!
//! Dates are `YYMMDD`; the century is the one that puts the year within 49 years
//! behind to 50 years ahead of the reference year (GS1 General Specifications 7.12);
//! day `00` means the last day of the month.

use jiff::civil::{Date, DateTime};

/// The group separator that stands for FNC1 inside an element string.
pub const GS: char = '\u{1d}';

/// Longest scan taken, in characters: a cartridge code with every AI is under 90.
pub const MAX_SCAN_LEN: usize = 256;

/// Symbology identifiers of GS1 symbols, with the symbol's name.
const SYMBOLOGIES: &[(&str, &str)] =
    &[("]d2", "GS1 DataMatrix"), ("]C1", "GS1-128"), ("]Q3", "GS1 QR Code"), ("]e0", "GS1 DataBar")];

/// What a value holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// 14 digits, the last a check digit.
    Gtin,
    /// GS1 AI encodable character set 82, at most this many characters.
    Text(usize),
    /// `YYMMDD`, day 00 for the end of the month.
    Date,
    /// `YYMMDDhhmm`.
    DateTime,
}

/// One application identifier a cartridge carries.
#[derive(Debug, Clone, Copy)]
pub struct Ai {
    pub code: &'static str,
    pub name: &'static str,
    kind: Kind,
}

impl Ai {
    fn fixed_len(&self) -> Option<usize> {
        match self.kind {
            Kind::Gtin => Some(14),
            Kind::Date => Some(6),
            Kind::DateTime => Some(10),
            Kind::Text(_) => None,
        }
    }
}

/// The AIs a cartridge's code may carry.
pub static AIS: &[Ai] = &[
    Ai { code: "01", name: "GTIN", kind: Kind::Gtin },
    Ai { code: "10", name: "lot", kind: Kind::Text(20) },
    Ai { code: "11", name: "production date", kind: Kind::Date },
    Ai { code: "17", name: "expiry date", kind: Kind::Date },
    Ai { code: "21", name: "serial", kind: Kind::Text(20) },
    Ai { code: "7003", name: "expiry date and time", kind: Kind::DateTime },
];

/// The characters of GS1's set 82, as the refusal states them.
const CSET82: &str = "A-Z a-z 0-9 and ! \" % & ' ( ) * + , - . / : ; < = > ? _";

fn in_cset82(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!\"%&'()*+,-./:;<=>?_".contains(c)
}

/// A scan that cannot be read as a cartridge's code, and exactly why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("the scan is empty")]
    Empty,
    #[error("the scan is {len} characters long; a cartridge's code is at most {MAX_SCAN_LEN}")]
    TooLongScan { len: usize },
    #[error(
        "symbology identifier {found:?} is not a GS1 symbol; expected ]d2 (GS1 DataMatrix), ]C1 \
         (GS1-128), ]Q3 (GS1 QR Code) or ]e0 (GS1 DataBar)"
    )]
    NotGs1 { found: String },
    #[error(
        "at character {at}: {found:?} is not an application identifier a cartridge carries; \
         expected (01), (10), (11), (17), (21) or (7003)"
    )]
    UnknownAi { at: usize, found: String },
    #[error("({ai}) {name} is empty")]
    EmptyValue { ai: &'static str, name: &'static str },
    #[error("({ai}) {name} {value:?} has {len} characters; it must have exactly {expected}")]
    WrongLength { ai: &'static str, name: &'static str, value: String, len: usize, expected: usize },
    #[error("({ai}) {name} {value:?} has {len} characters; at most {max} are allowed")]
    TooLong { ai: &'static str, name: &'static str, value: String, len: usize, max: usize },
    #[error("({ai}) {name} {value:?} has {ch:?} at position {at}; allowed: {allowed}")]
    BadCharacter {
        ai: &'static str,
        name: &'static str,
        value: String,
        at: usize,
        ch: char,
        allowed: &'static str,
    },
    #[error("(01) GTIN {value} ends in check digit {found}; its first 13 digits give {expected}")]
    CheckDigit { value: String, found: u32, expected: u32 },
    #[error("({ai}) {name} {value:?} is not a date: {why}")]
    BadDate { ai: &'static str, name: &'static str, value: String, why: String },
    #[error("({ai}) {name} appears twice: {first:?} and {second:?}")]
    Duplicate { ai: &'static str, name: &'static str, first: String, second: String },
    #[error(
        "the scan carries no {missing}; a cartridge's code carries (01) GTIN, (10) lot, (17) expiry \
         date and (21) serial"
    )]
    Missing { missing: &'static str },
    #[error("(11) production date {production} is after (17) expiry date {expiry}")]
    ProducedAfterExpiry { production: Date, expiry: Date },
    #[error("(7003) expiry date and time {expiry_time} is not on (17) expiry date {expiry}")]
    ExpiryDisagrees { expiry: Date, expiry_time: DateTime },
}

/// Everything a scan carried; each AI at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub gtin: Option<String>,
    pub lot: Option<String>,
    pub serial: Option<String>,
    pub production: Option<Date>,
    pub expiry: Option<Date>,
    pub expiry_time: Option<DateTime>,
}

/// A cartridge's code: type, lot, serial and expiry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartridgeCode {
    pub gtin: String,
    pub lot: String,
    pub serial: String,
    pub expiry: Date,
    pub production: Option<Date>,
    /// The exact end of use (UTC), when the code carries (7003).
    pub expiry_time: Option<DateTime>,
}

const DAY_MS: i64 = 86_400_000;

/// Milliseconds since the Unix epoch of `d` at 00:00 UTC.
pub fn day_start_ms(d: Date) -> i64 {
    let days = i64::from(d.since(Date::constant(1970, 1, 1)).map_or(0, |s| s.get_days()));
    days * DAY_MS
}

/// The UTC day `ms` since the Unix epoch falls on (clamped to the dates a code can
/// carry).
pub fn date_at_ms(ms: i64) -> Date {
    const LAST: Date = Date::constant(2169, 12, 31);
    let days = ms.div_euclid(DAY_MS).clamp(0, day_start_ms(LAST) / DAY_MS);
    Date::constant(1970, 1, 1).checked_add(jiff::Span::new().days(days)).unwrap_or(LAST)
}

impl CartridgeCode {
    /// The last millisecond the cartridge may be used (UTC): the end of its expiry day,
    /// or its (7003) expiry time.
    pub fn expires_unix_ms(&self) -> i64 {
        match self.expiry_time {
            Some(t) => {
                day_start_ms(t.date()) + i64::from(t.hour()) * 3_600_000 + i64::from(t.minute()) * 60_000 - 1
            }
            None => day_start_ms(self.expiry) + DAY_MS - 1,
        }
    }

    /// The element string a scanner of its DataMatrix transmits: `]d2`, the
    /// fixed-length AIs, then lot and serial separated by GS.
    pub fn element_string(&self) -> String {
        let mut s = format!("]d201{}", self.gtin);
        if let Some(p) = self.production {
            s.push_str(&format!("11{}", yymmdd(p)));
        }
        s.push_str(&format!("17{}", yymmdd(self.expiry)));
        if let Some(t) = self.expiry_time {
            s.push_str(&format!("7003{}{:02}{:02}{GS}", yymmdd(t.date()), t.hour(), t.minute()));
        }
        s.push_str(&format!("10{}{GS}21{}", self.lot, self.serial));
        s
    }

    /// The human-readable form printed under the symbol.
    pub fn human(&self) -> String {
        let mut s = format!("(01){}", self.gtin);
        if let Some(p) = self.production {
            s.push_str(&format!("(11){}", yymmdd(p)));
        }
        s.push_str(&format!("(17){}", yymmdd(self.expiry)));
        if let Some(t) = self.expiry_time {
            s.push_str(&format!("(7003){}{:02}{:02}", yymmdd(t.date()), t.hour(), t.minute()));
        }
        s.push_str(&format!("(10){}(21){}", self.lot, self.serial));
        s
    }
}

fn yymmdd(d: Date) -> String {
    format!("{:02}{:02}{:02}", d.year().rem_euclid(100), d.month(), d.day())
}

/// The check digit GS1's mod-10 algorithm gives `digits` (weights 3, 1, 3, … from the
/// right). `None` if `digits` holds anything but ASCII digits.
pub fn check_digit(digits: &str) -> Option<u32> {
    let mut sum = 0;
    for (i, c) in digits.chars().rev().enumerate() {
        let d = c.to_digit(10)?;
        sum += if i % 2 == 0 { 3 * d } else { d };
    }
    Some((10 - sum % 10) % 10)
}

/// Checks a GTIN-14: 14 digits whose last is the check digit of the others.
pub fn check_gtin(value: &str) -> Result<(), ScanError> {
    let ai = &AIS[0];
    check_value(ai, value, 1970)?;
    Ok(())
}

/// Reads a scan (scanner form or human-readable form) as a cartridge's code: GTIN,
/// lot, expiry and serial must all be there. `reference_year` settles two-digit years.
pub fn parse_cartridge(input: &str, reference_year: i16) -> Result<CartridgeCode, ScanError> {
    let scan = parse(input, reference_year)?;
    let missing = |m| ScanError::Missing { missing: m };
    let code = CartridgeCode {
        gtin: scan.gtin.ok_or(missing("(01) GTIN"))?,
        lot: scan.lot.ok_or(missing("(10) lot"))?,
        expiry: scan.expiry.ok_or(missing("(17) expiry date"))?,
        serial: scan.serial.ok_or(missing("(21) serial"))?,
        production: scan.production,
        expiry_time: scan.expiry_time,
    };
    Ok(code)
}

/// Reads every AI of a scan, checking each value and the dates against each other.
pub fn parse(input: &str, reference_year: i16) -> Result<Scan, ScanError> {
    let chars: Vec<char> = input.trim_end_matches(['\r', '\n']).chars().collect();
    if chars.len() > MAX_SCAN_LEN {
        return Err(ScanError::TooLongScan { len: chars.len() });
    }
    let fields = if chars.first() == Some(&'(') { bracketed(&chars)? } else { raw(&chars)? };
    if fields.is_empty() {
        return Err(ScanError::Empty);
    }
    let mut scan = Scan::default();
    for (ai, value) in fields {
        let parsed = check_value(ai, &value, reference_year)?;
        let slot_taken =
            |first: String| ScanError::Duplicate { ai: ai.code, name: ai.name, first, second: value.clone() };
        match (ai.code, parsed) {
            ("01", Value::Text(t)) => set(&mut scan.gtin, t, slot_taken)?,
            ("10", Value::Text(t)) => set(&mut scan.lot, t, slot_taken)?,
            ("21", Value::Text(t)) => set(&mut scan.serial, t, slot_taken)?,
            ("11", Value::Date(d)) => set(&mut scan.production, d, |d| slot_taken(d.to_string()))?,
            ("17", Value::Date(d)) => set(&mut scan.expiry, d, |d| slot_taken(d.to_string()))?,
            (_, Value::Time(t)) => set(&mut scan.expiry_time, t, |t| slot_taken(t.to_string()))?,
            _ => unreachable!("the AI table pairs each code with its kind"),
        }
    }
    if let (Some(production), Some(expiry)) = (scan.production, scan.expiry)
        && production > expiry
    {
        return Err(ScanError::ProducedAfterExpiry { production, expiry });
    }
    if let (Some(expiry), Some(expiry_time)) = (scan.expiry, scan.expiry_time)
        && expiry_time.date() != expiry
    {
        return Err(ScanError::ExpiryDisagrees { expiry, expiry_time });
    }
    Ok(scan)
}

fn set<T: Clone>(slot: &mut Option<T>, v: T, taken: impl FnOnce(T) -> ScanError) -> Result<(), ScanError> {
    if let Some(first) = slot.clone() {
        return Err(taken(first));
    }
    *slot = Some(v);
    Ok(())
}

fn find_ai(chars: &[char]) -> Option<&'static Ai> {
    AIS.iter().find(|ai| chars.len() >= ai.code.len() && ai.code.chars().zip(chars).all(|(a, b)| a == *b))
}

fn unknown(chars: &[char], at: usize) -> ScanError {
    ScanError::UnknownAi { at: at + 1, found: chars[at..].iter().take(4).collect() }
}

/// Fields of the scanner form: `]d2` then AI and value pairs.
fn raw(chars: &[char]) -> Result<Vec<(&'static Ai, String)>, ScanError> {
    let mut pos = 0;
    if chars.first() == Some(&']') {
        let found: String = chars.iter().take(3).collect();
        if !SYMBOLOGIES.iter().any(|(id, _)| *id == found) {
            return Err(ScanError::NotGs1 { found });
        }
        pos = 3;
    }
    let mut out = Vec::new();
    while pos < chars.len() {
        // A leading FNC1 and a doubled separator carry nothing.
        if chars[pos] == GS {
            pos += 1;
            continue;
        }
        let ai = find_ai(&chars[pos..]).ok_or_else(|| unknown(chars, pos))?;
        pos += ai.code.len();
        let end = match ai.fixed_len() {
            // A fixed-length value is cut at its length; a separator inside it is a
            // value too short, reported as such.
            Some(n) => {
                let stop = chars[pos..].iter().position(|&c| c == GS).map_or(chars.len(), |i| pos + i);
                (pos + n).min(stop)
            }
            None => chars[pos..].iter().position(|&c| c == GS).map_or(chars.len(), |i| pos + i),
        };
        out.push((ai, chars[pos..end].iter().collect()));
        // A separator after a fixed-length value is skipped above, whether or not
        // its AI needs one (7003 does, 01, 11 and 17 do not).
        pos = end;
    }
    Ok(out)
}

/// Fields of the human-readable form: `(AI)value…`. A value runs to the next `(`
/// followed by two to four digits and `)`, so lots and serials may hold other
/// parentheses.
fn bracketed(chars: &[char]) -> Result<Vec<(&'static Ai, String)>, ScanError> {
    // `(` and two to four digits and `)`: an AI, known or not.
    let opens_ai = |at: usize| -> bool {
        let digits = chars[at.min(chars.len())..].iter().skip(1).take_while(|c| c.is_ascii_digit()).count();
        chars.get(at) == Some(&'(') && (2..=4).contains(&digits) && chars.get(at + 1 + digits) == Some(&')')
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < chars.len() {
        let ai = if opens_ai(pos) { find_ai(&chars[pos + 1..]) } else { None };
        let ai = ai.filter(|ai| chars.get(pos + 1 + ai.code.len()) == Some(&')'));
        let ai = ai.ok_or_else(|| unknown(chars, pos))?;
        let start = pos + ai.code.len() + 2;
        let mut end = start;
        while end < chars.len() && !opens_ai(end) {
            end += 1;
        }
        out.push((ai, chars[start..end].iter().collect()));
        pos = end;
    }
    Ok(out)
}

enum Value {
    Text(String),
    Date(Date),
    Time(DateTime),
}

fn check_value(ai: &'static Ai, value: &str, reference_year: i16) -> Result<Value, ScanError> {
    let len = value.chars().count();
    if len == 0 {
        return Err(ScanError::EmptyValue { ai: ai.code, name: ai.name });
    }
    let bad_char = |allowed: &'static str, ok: fn(char) -> bool| {
        value.chars().enumerate().find(|&(_, c)| !ok(c)).map(|(at, ch)| ScanError::BadCharacter {
            ai: ai.code,
            name: ai.name,
            value: value.to_owned(),
            at: at + 1,
            ch,
            allowed,
        })
    };
    if let Some(expected) = ai.fixed_len() {
        if let Some(e) = bad_char("digits 0-9", |c| c.is_ascii_digit()) {
            return Err(e);
        }
        if len != expected {
            return Err(ScanError::WrongLength {
                ai: ai.code,
                name: ai.name,
                value: value.to_owned(),
                len,
                expected,
            });
        }
    }
    match ai.kind {
        Kind::Gtin => {
            let found = value[13..].parse::<u32>().unwrap_or(10);
            let expected = check_digit(&value[..13]).unwrap_or(10);
            if found != expected {
                return Err(ScanError::CheckDigit { value: value.to_owned(), found, expected });
            }
            Ok(Value::Text(value.to_owned()))
        }
        Kind::Text(max) => {
            if len > max {
                return Err(ScanError::TooLong {
                    ai: ai.code,
                    name: ai.name,
                    value: value.to_owned(),
                    len,
                    max,
                });
            }
            if let Some(e) = bad_char(CSET82, in_cset82) {
                return Err(e);
            }
            Ok(Value::Text(value.to_owned()))
        }
        Kind::Date => date(&value[..6], true, reference_year)
            .map(Value::Date)
            .map_err(|why| ScanError::BadDate { ai: ai.code, name: ai.name, value: value.to_owned(), why }),
        Kind::DateTime => {
            let bad =
                |why: String| ScanError::BadDate { ai: ai.code, name: ai.name, value: value.to_owned(), why };
            let d = date(&value[..6], false, reference_year).map_err(bad)?;
            let hour: i8 = value[6..8].parse().unwrap_or(99);
            let minute: i8 = value[8..10].parse().unwrap_or(99);
            if hour > 23 {
                return Err(bad(format!("hour {hour} is not 00-23")));
            }
            if minute > 59 {
                return Err(bad(format!("minute {minute} is not 00-59")));
            }
            Ok(Value::Time(d.at(hour, minute, 0, 0)))
        }
    }
}

/// `YYMMDD` (six ASCII digits) as a date.
fn date(v: &str, day_00_is_month_end: bool, reference_year: i16) -> Result<Date, String> {
    let yy: i16 = v[0..2].parse().map_err(|_| "year is not two digits".to_owned())?;
    let month: i8 = v[2..4].parse().map_err(|_| "month is not two digits".to_owned())?;
    let day: i8 = v[4..6].parse().map_err(|_| "day is not two digits".to_owned())?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month:02} is not 01-12"));
    }
    let year = century(yy, reference_year);
    let first = Date::new(year, month, 1).map_err(|e| e.to_string())?;
    if day == 0 {
        if day_00_is_month_end {
            return Ok(first.last_of_month());
        }
        return Err("day 00 is not allowed here".into());
    }
    let last = first.last_of_month().day();
    if day > last {
        return Err(format!("day {day:02} is past the end of {year}-{month:02}, which has {last} days"));
    }
    Date::new(year, month, day).map_err(|e| e.to_string())
}

/// The four-digit year of `yy`: within 49 years behind to 50 years ahead of
/// `reference_year` (GS1 General Specifications 7.12).
fn century(yy: i16, reference_year: i16) -> i16 {
    let base = reference_year - reference_year.rem_euclid(100);
    let diff = yy - reference_year.rem_euclid(100);
    if diff >= 51 {
        base - 100 + yy
    } else if diff <= -50 {
        base + 100 + yy
    } else {
        base + yy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: i16 = 2026;

    fn code() -> CartridgeCode {
        CartridgeCode {
            gtin: "09506000134352".into(),
            lot: "LNP2611A".into(),
            serial: "C000123".into(),
            expiry: Date::constant(2027, 5, 31),
            production: Some(Date::constant(2026, 11, 2)),
            expiry_time: None,
        }
    }

    #[test]
    fn a_day_from_milliseconds_inverts_day_start() {
        let d = Date::constant(2028, 2, 29);
        assert_eq!(date_at_ms(day_start_ms(d)), d);
        assert_eq!(date_at_ms(day_start_ms(d) + DAY_MS - 1), d);
        assert_eq!(date_at_ms(-1), Date::constant(1970, 1, 1), "clamped");
        assert_eq!(date_at_ms(i64::MAX).year(), 2169, "clamped");
    }

    #[test]
    fn the_domain_example_reads_in_both_forms() {
        let human = "(01)51022222233336(11)141231(17)150707(10)A213B1(21)1234";
        let c = parse_cartridge(human, 2014).unwrap();
        assert_eq!(c.gtin, "51022222233336");
        assert_eq!(c.production, Some(Date::constant(2014, 12, 31)));
        assert_eq!(c.expiry, Date::constant(2015, 7, 7));
        assert_eq!((c.lot.as_str(), c.serial.as_str()), ("A213B1", "1234"));
        let raw = "]d20151022222233336111412311715070710A213B1\u{1d}211234";
        assert_eq!(parse_cartridge(raw, 2014).unwrap(), c);
    }

    #[test]
    fn a_code_round_trips_through_both_forms() {
        let mut c = code();
        assert_eq!(parse_cartridge(&c.element_string(), YEAR).unwrap(), c);
        assert_eq!(parse_cartridge(&c.human(), YEAR).unwrap(), c);
        c.expiry_time = Some(Date::constant(2027, 5, 31).at(14, 30, 0, 0));
        c.production = None;
        assert_eq!(parse_cartridge(&c.element_string(), YEAR).unwrap(), c);
        assert_eq!(parse_cartridge(&c.human(), YEAR).unwrap(), c);
    }

    #[test]
    fn gtin_check_digits_follow_the_gs1_weights() {
        assert_eq!(check_digit("5102222223333"), Some(6));
        assert_eq!(check_digit("0950600013435"), Some(2));
        assert_eq!(check_digit("12x"), None);
        assert!(check_gtin("09506000134352").is_ok());
        assert_eq!(
            check_gtin("09506000134353").unwrap_err().to_string(),
            "(01) GTIN 09506000134353 ends in check digit 3; its first 13 digits give 2"
        );
    }

    #[test]
    fn day_00_is_the_end_of_the_month_and_leap_years_count() {
        let at = |s: &str| parse(&format!("(17){s}"), YEAR).unwrap().expiry.unwrap();
        assert_eq!(at("270200"), Date::constant(2027, 2, 28));
        assert_eq!(at("280200"), Date::constant(2028, 2, 29));
        assert_eq!(at("281200"), Date::constant(2028, 12, 31));
        assert_eq!(at("280229"), Date::constant(2028, 2, 29));
    }

    #[test]
    fn two_digit_years_fall_in_the_gs1_window_around_the_reference_year() {
        assert_eq!(century(26, 2026), 2026);
        assert_eq!(century(76, 2026), 2076);
        assert_eq!(century(77, 2026), 1977);
        assert_eq!(century(75, 2026), 2075);
        assert_eq!(century(2, 2098), 2102);
        assert_eq!(century(48, 2098), 2048 + 100);
        assert_eq!(century(47, 2098), 2147);
        assert_eq!(century(49, 2098), 2049);
    }

    #[test]
    fn expiry_is_the_last_millisecond_of_the_day_or_the_7003_minute() {
        let mut c = code();
        let day = day_start_ms(Date::constant(2027, 5, 31));
        assert_eq!(c.expires_unix_ms(), day + DAY_MS - 1);
        c.expiry_time = Some(Date::constant(2027, 5, 31).at(14, 30, 0, 0));
        assert_eq!(c.expires_unix_ms(), day + 14 * 3_600_000 + 30 * 60_000 - 1);
        assert_eq!(day_start_ms(Date::constant(1970, 1, 2)), DAY_MS);
    }

    /// Each bad scan, and the exact refusal it gets.
    #[test]
    fn bad_scans_are_refused_with_what_is_wrong() {
        let table: &[(&str, &str)] = &[
            ("", "the scan is empty"),
            ("]d2", "the scan is empty"),
            (
                "]d1010950600013435217270531",
                "symbology identifier \"]d1\" is not a GS1 symbol; expected ]d2 (GS1 DataMatrix), ]C1 \
                 (GS1-128), ]Q3 (GS1 QR Code) or ]e0 (GS1 DataBar)",
            ),
            (
                "]d20109506000134353",
                "(01) GTIN 09506000134353 ends in check digit 3; its first 13 digits give 2",
            ),
            ("]d2010950600013435", "(01) GTIN \"0950600013435\" has 13 characters; it must have exactly 14"),
            (
                "(01)0950600013435X",
                "(01) GTIN \"0950600013435X\" has 'X' at position 14; allowed: digits 0-9",
            ),
            ("]d217271331", "(17) expiry date \"271331\" is not a date: month 13 is not 01-12"),
            (
                "]d217270230",
                "(17) expiry date \"270230\" is not a date: day 30 is past the end of 2027-02, which has 28 days",
            ),
            ("]d21727053", "(17) expiry date \"27053\" has 5 characters; it must have exactly 6"),
            (
                "]d27003270531\u{1d}",
                "(7003) expiry date and time \"270531\" has 6 characters; it must have exactly 10",
            ),
            (
                "]d270032705312460",
                "(7003) expiry date and time \"2705312460\" is not a date: hour 24 is not 00-23",
            ),
            (
                "]d270032705001200",
                "(7003) expiry date and time \"2705001200\" is not a date: day 00 is not allowed here",
            ),
            (
                "]d210ABCDEFGHIJKLMNOPQRSTU",
                "(10) lot \"ABCDEFGHIJKLMNOPQRSTU\" has 21 characters; at most 20 are allowed",
            ),
            (
                "]d221SN 1",
                "(21) serial \"SN 1\" has ' ' at position 3; allowed: A-Z a-z 0-9 and ! \" % & ' ( ) * + , - . / \
                 : ; < = > ? _",
            ),
            ("]d210\u{1d}21X", "(10) lot is empty"),
            (
                "]d20109506000134352240ABC",
                "at character 20: \"240A\" is not an application identifier a cartridge carries; expected \
                 (01), (10), (11), (17), (21) or (7003)",
            ),
            (
                "(01)09506000134352(99)X",
                "at character 19: \"(99)\" is not an application identifier a cartridge carries; expected \
                 (01), (10), (11), (17), (21) or (7003)",
            ),
            ("]d210A\u{1d}10B", "(10) lot appears twice: \"A\" and \"B\""),
            ("(11)270601(17)270531", "(11) production date 2027-06-01 is after (17) expiry date 2027-05-31"),
            (
                "(17)270531(7003)2706011200",
                "(7003) expiry date and time 2027-06-01T12:00:00 is not on (17) expiry date 2027-05-31",
            ),
        ];
        for (scan, message) in table {
            let got = parse(scan, YEAR).map(|s| format!("{s:?}")).map_err(|e| e.to_string());
            assert_eq!(got, Err((*message).to_owned()), "scan {scan:?}");
        }
        let long = "1".repeat(MAX_SCAN_LEN + 1);
        assert_eq!(parse(&long, YEAR), Err(ScanError::TooLongScan { len: MAX_SCAN_LEN + 1 }));
    }

    #[test]
    fn a_cartridge_needs_gtin_lot_expiry_and_serial() {
        let c = code();
        for (drop, missing) in [
            ("(01)", "(01) GTIN"),
            ("(10)", "(10) lot"),
            ("(17)", "(17) expiry date"),
            ("(21)", "(21) serial"),
        ] {
            let human = c.human();
            let start = human.find(drop).unwrap();
            let end = human[start + 4..].find('(').map_or(human.len(), |i| start + 4 + i);
            let scan = format!("{}{}", &human[..start], &human[end..]);
            assert_eq!(parse_cartridge(&scan, YEAR), Err(ScanError::Missing { missing }), "{scan}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_input_parses_or_is_refused_without_a_panic(input in "\\PC{0,80}", raw in "[]d2(0-9\u{1d})A-Z]{0,60}") {
            for s in [input, raw] {
                if let Ok(c) = parse_cartridge(&s, YEAR) {
                    proptest::prop_assert_eq!(parse_cartridge(&c.element_string(), YEAR), Ok(c.clone()));
                }
            }
        }

        #[test]
        fn valid_codes_read_back_as_themselves(
            g in "[0-9]{13}", lot in "[A-Za-z0-9!%&'*+,./:;<=>?_-]{1,20}", serial in "[A-Z0-9-]{1,20}",
            y in 2000i16..2075, m in 1i8..=12, d in 1i8..=28,
        ) {
            let c = CartridgeCode {
                gtin: format!("{g}{}", check_digit(&g).unwrap()),
                lot, serial, expiry: Date::new(y, m, d).unwrap(), production: None, expiry_time: None,
            };
            proptest::prop_assert_eq!(parse_cartridge(&c.element_string(), YEAR), Ok(c.clone()));
            proptest::prop_assert_eq!(parse_cartridge(&c.human(), YEAR), Ok(c));
        }
    }

    #[test]
    fn scanner_noise_is_tolerated() {
        let c = code();
        let noisy = format!("{GS}{}\r\n", c.element_string().trim_start_matches("]d2"));
        assert_eq!(parse_cartridge(&noisy, YEAR).unwrap(), c);
        let doubled = c.element_string().replace(GS, "\u{1d}\u{1d}");
        assert_eq!(parse_cartridge(&doubled, YEAR).unwrap(), c);
        // Parentheses inside a lot, in the human form.
        let mut p = code();
        p.lot = "A(1)B".into();
        assert_eq!(parse_cartridge(&p.human(), YEAR).unwrap(), p);
    }
}
